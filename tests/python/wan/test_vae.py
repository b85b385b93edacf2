"""WanVAECodec against diffusers' own AutoencoderKLWan, on tiny random VAEs (CPU, fp32).

Streaming decodes are compared to ``vae.decode`` of the whole sequence. Float outputs agree to
``ATOL``. Measured on this CPU: chunks of 1 are bit-identical to diffusers at the same batch
size; chunks of 3 differ by ≤ 6e-7 and other batch sizes by ≤ 2e-6 (convolutions over other
lengths or batches round differently). uint8 frames may differ by one grey level: a float that
close can still round across a .5 boundary (none did here).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLWan

from crcm.codec import StreamingCodec, unit_to_frames
from crcm.errors import ConfigError
from crcm.wan.vae import WanVAECodec

ATOL = 1e-5
Z = 4  # latent channels of the tiny VAE
HW = (32, 32)  # → 4×4 latents


def tiny_vae(**overrides: object) -> AutoencoderKLWan:
    """The smallest Wan2.1 layout with 8× spatial / 4× temporal compression."""
    torch.manual_seed(0)
    config = dict(
        base_dim=8,
        z_dim=Z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.3 * i - 0.5 for i in range(Z)],
        latents_std=[1.0 + 0.5 * i for i in range(Z)],
    )
    return AutoencoderKLWan(**{**config, **overrides}).eval()


@pytest.fixture(scope="module")
def codec() -> WanVAECodec:
    return WanVAECodec(tiny_vae(), HW)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    """Two different normalised latent sequences: 7 latent frames → 25 video frames each."""
    return torch.randn(2, 7, Z, 4, 4, generator=torch.Generator().manual_seed(1))


def reference(codec: WanVAECodec, x_B_T_C_H_W: torch.Tensor) -> torch.Tensor:
    """diffusers' full-sequence decode, de-normalised as WanPipeline does: float [B, T, 3, H, W]."""
    cfg = codec.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.inference_mode():
        return codec.vae.decode(x_B_T_C_H_W.transpose(1, 2) * std + mean).sample.transpose(1, 2)


def stream(codec: WanVAECodec, x_T_C_H_W: torch.Tensor, chunk: int) -> torch.Tensor:
    """One stream decoded chunk by chunk through the float path: [F, 3, H, W]."""
    state, videos = codec.open_stream(), []
    for start in range(0, x_T_C_H_W.shape[0], chunk):
        (video,) = codec._decode_unit([x_T_C_H_W[start : start + chunk]], [state])
        videos.append(video)
    return torch.cat(videos)


def assert_frames_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
    assert (a.int() - b.int()).abs().max() <= 1


def count_decoder_batches(codec: WanVAECodec) -> tuple[list[int], object]:
    """Batch sizes of every call of the decoder network, and the hook handle to remove."""
    sizes: list[int] = []
    handle = codec.vae.decoder.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    return sizes, handle


def test_attributes_follow_the_config(codec: WanVAECodec) -> None:
    assert isinstance(codec, StreamingCodec) and codec.first_frame_alone
    assert (codec.channels, codec.spatial_downsample, codec.temporal_downsample) == (Z, 8, 4)
    assert (codec.frame_channels, codec.latent_hw) == (3, (4, 4))
    with torch.device("meta"):  # Wan2.1's real layout, without allocating it
        wan21 = WanVAECodec(AutoencoderKLWan(), (480, 832))
    assert (wan21.channels, wan21.spatial_downsample, wan21.temporal_downsample) == (16, 8, 4)
    assert wan21.latent_hw == (60, 104)


def test_full_decode_equals_diffusers(codec: WanVAECodec, latents: torch.Tensor) -> None:
    expected = reference(codec, latents)
    assert expected.shape == (2, 25, 3, *HW)
    assert_frames_close(codec.decode(latents), unit_to_frames(expected))


@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_decode(
    codec: WanVAECodec, latents: torch.Tensor, chunk: int
) -> None:
    expected = reference(codec, latents[:1])[0]
    torch.testing.assert_close(stream(codec, latents[0], chunk), expected, atol=ATOL, rtol=0)
    state, frames = codec.open_stream(), []
    for start in range(0, 7, chunk):
        piece = latents[0, start : start + chunk]
        (out,) = codec.decode_streams([piece], [state])
        assert len(out) == 4 * len(piece) - (3 if start == 0 else 0)  # frame 0 gives 1 frame
        frames.append(out)
    assert state.latent_frames == 7
    assert_frames_close(torch.cat(frames), unit_to_frames(expected[None])[0])


def test_streams_batch_together_and_apart(codec: WanVAECodec, latents: torch.Tensor) -> None:
    expected = reference(codec, latents)
    a, b = codec.open_stream(), codec.open_stream()
    sizes, handle = count_decoder_batches(codec)
    try:
        # Same phase: one batched call (frame 0 alone, then frames 1-2).
        first = codec._decode_unit([latents[0, :3], latents[1, :3]], [a, b])
        assert sizes == [2, 2]
        # Another stream at its first chunk beside one past it: two groups in one call.
        sizes.clear()
        c = codec.open_stream()
        second = codec._decode_unit([latents[0, 3:6], latents[1, :3]], [a, c])
        assert sorted(sizes) == [1, 1, 1]
    finally:
        handle.remove()
    torch.testing.assert_close(first[0], expected[0, :9], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[1], expected[1, :9], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0], expected[0, 9:21], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[1], expected[1, :9], atol=ATOL, rtol=0)
    # Each stream's batched result is what it gives decoded alone.
    alone = codec.open_stream()
    (alone_first,) = codec._decode_unit([latents[1, :3]], [alone])
    torch.testing.assert_close(first[1], alone_first, atol=ATOL, rtol=0)
    frames = codec.decode_streams([latents[0, 6:], latents[1, 3:]], [a, b])  # lengths 1 and 4
    assert [len(f) for f in frames] == [4, 16]
    assert_frames_close(frames[1], unit_to_frames(expected[1:, 9:])[0])


def test_fork_continues_identically_and_independently(
    codec: WanVAECodec, latents: torch.Tensor
) -> None:
    x = latents[0]
    original = codec.open_stream()
    codec._decode_unit([x[:3]], [original])
    fork = codec.fork_stream(original)
    assert fork.latent_frames == original.latent_frames == 3
    assert codec.state_nbytes(fork) == codec.state_nbytes(original) > 0
    assert codec.state_nbytes(codec.open_stream()) == 0
    (from_fork,) = codec._decode_unit([x[3:6]], [fork])
    with torch.inference_mode():  # wreck the fork's caches in place: the original must not see it
        for entry in fork.cache:
            if isinstance(entry, torch.Tensor):
                entry.fill_(1e3)
    (from_original,) = codec._decode_unit([x[3:6]], [original])
    assert torch.equal(from_fork, from_original)
    (rest,) = codec._decode_unit([x[6:]], [original])
    expected = reference(codec, latents[:1])[0]
    torch.testing.assert_close(rest, expected[21:], atol=ATOL, rtol=0)


def test_encode_is_the_normalised_posterior_mean(codec: WanVAECodec) -> None:
    frames = torch.randint(0, 256, (2, 9, *HW, 3), dtype=torch.uint8)
    latents = codec.encode(frames)
    assert latents.shape == (2, 3, Z, 4, 4) and latents.dtype == torch.float32
    cfg = codec.vae.config
    video = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.inference_mode():
        mean = codec.vae.encode(video).latent_dist.mean
    mean_c = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std_c = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    expected = ((mean - mean_c) / std_c).transpose(1, 2)
    torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="1 \\+ 4"):
        codec.encode(frames[:, :8])


def test_wan22_layout_residual_and_patched() -> None:
    """Wan2.2's VAE (residual blocks, 2×2 pixel patches → 16×) streams the same way."""
    vae = tiny_vae(
        is_residual=True, patch_size=2, in_channels=12, out_channels=12, decoder_base_dim=8
    )
    codec = WanVAECodec(vae, HW)
    assert (codec.spatial_downsample, codec.frame_channels, codec.latent_hw) == (16, 3, (2, 2))
    x = torch.randn(1, 7, Z, 2, 2, generator=torch.Generator().manual_seed(2))
    expected = reference(codec, x)[0]
    torch.testing.assert_close(stream(codec, x[0], 3), expected, atol=ATOL, rtol=0)
    assert codec.encode(torch.zeros(1, 5, *HW, 3, dtype=torch.uint8)).shape == (1, 2, Z, 2, 2)


@pytest.mark.parametrize("shard", [False, True])
def test_from_folder_round_trip(
    codec: WanVAECodec, latents: torch.Tensor, tmp_path, shard: bool
) -> None:
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    codec.vae.save_pretrained(tmp_path, **kwargs)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == shard
    loaded = WanVAECodec.from_folder(tmp_path, HW)
    assert torch.equal(loaded.decode(latents), codec.decode(latents))
    frames = torch.randint(0, 256, (1, 5, *HW, 3), dtype=torch.uint8)
    assert torch.equal(loaded.encode(frames), codec.encode(frames))


def test_from_folder_errors_name_the_path(codec: WanVAECodec, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        WanVAECodec.from_folder(missing, HW)
    codec.vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.rename(tmp_path / "moved.safetensors")
    with pytest.raises(ConfigError, match=re.escape(str(weights))):
        WanVAECodec.from_folder(tmp_path, HW)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        WanVAECodec.from_folder(tmp_path, HW)
    other = tmp_path / "other"
    tiny_vae(num_res_blocks=2).save_pretrained(other)  # more blocks than the weights hold
    (other / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "moved.safetensors").rename(other / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        WanVAECodec.from_folder(other, HW)


def test_bad_input_is_refused(codec: WanVAECodec, latents: torch.Tensor) -> None:
    wrong_channels, wrong_ndim = latents[:, :, :3], latents[0]
    for x in (wrong_channels, wrong_ndim, latents.to(torch.int32), latents[..., :2]):
        with pytest.raises(ValueError, match=r"expected floating \[B, T, 4, 4, 4\]"):
            codec.decode(x)
    with pytest.raises(ValueError, match=r"chunk 0: expected floating \[T, 4, 4, 4\]"):
        codec.decode_streams([latents[:, :1]], [codec.open_stream()])
    with pytest.raises(ValueError, match="chunks for"):
        codec.decode_streams([latents[0]], [])
    state = codec.open_stream()
    with pytest.raises(ValueError, match="twice"):
        codec.decode_streams([latents[0, :1], latents[1, :1]], [state, state])
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(torch.zeros(1, 5, *HW, 3))
    with pytest.raises(ValueError, match="frames must be"):
        codec.encode(torch.zeros(1, 5, *HW, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="multiple of 8"):
        WanVAECodec(codec.vae, (30, 32))
    assert state.latent_frames == 0 and codec.state_nbytes(state) == 0  # refused: untouched
