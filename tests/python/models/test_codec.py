"""Codecs: exact uint8 round trips, shapes, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crcm.codec import Codec, PixelCodec, VAECodec
from crcm.models import get_config


def all_byte_values(B: int = 2, T: int = 2, hw: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """``uint8 [B, T, H, W, 3]`` frames containing every value 0..255 (and then some)."""
    n = B * T * hw[0] * hw[1] * 3
    return (torch.arange(n) % 256).to(torch.uint8).reshape(B, T, *hw, 3)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixel_round_trip_is_exact(patch: int) -> None:
    codec = PixelCodec((16, 16), 3, patch)
    frames = all_byte_values()
    x = codec.encode(frames)
    assert x.shape == (2, 2, 3 * patch * patch, 16 // patch, 16 // patch)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    out = codec.decode(x)
    assert out.dtype == torch.uint8 and torch.equal(out, frames)


def test_space_to_depth_keeps_pixel_blocks_together() -> None:
    codec = PixelCodec((4, 4), 1, 2)
    frames = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4, 1)
    x = codec.encode(frames)
    # Token (0, 0) holds the top-left 2×2 block: pixels 0, 1, 4, 5.
    block = ((x[0, 0, :, 0, 0] + 1) * 127.5).round().tolist()
    assert block == [0.0, 1.0, 4.0, 5.0]


def test_numpy_frames_and_out_of_range_decode() -> None:
    codec = PixelCodec((8, 8), 3)
    frames = np.full((1, 1, 8, 8, 3), 200, dtype=np.uint8)
    x = codec.encode(frames)
    assert torch.equal(codec.decode(x), torch.from_numpy(frames))
    wild = torch.full_like(x, 3.0)
    wild[..., 0] = -5.0
    out = codec.decode(wild)
    assert out[..., 0, :].eq(0).all() and out[..., 1:, :].eq(255).all()


def test_codec_protocol_and_breakout_shapes() -> None:
    cfg = get_config("breakout")
    codec = PixelCodec(cfg.frame_hw, 3)
    assert isinstance(codec, Codec)
    x = codec.encode(torch.zeros(1, 1, *cfg.frame_hw, 3, dtype=torch.uint8))
    assert x.shape[2:] == (cfg.in_channels, *cfg.frame_hw)


@pytest.mark.parametrize(
    ("frames", "error", "message"),
    [
        (torch.zeros(1, 1, 8, 8, 3), TypeError, "uint8"),
        (np.zeros((1, 1, 8, 8, 3), dtype=np.float32), TypeError, "uint8"),
        ([[0]], TypeError, "uint8"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ValueError, r"\[B, T, 8, 8, 3\]"),
        (torch.zeros(1, 1, 8, 6, 3, dtype=torch.uint8), ValueError, r"\[B, T, 8, 8, 3\]"),
        (torch.zeros(1, 1, 8, 8, 4, dtype=torch.uint8), ValueError, r"\[B, T, 8, 8, 3\]"),
    ],
)
def test_encode_rejects_bad_frames(frames, error, message) -> None:
    with pytest.raises(error, match=message):
        PixelCodec((8, 8), 3, 2).encode(frames)


def test_decode_and_construction_errors() -> None:
    codec = PixelCodec((8, 8), 3, 2)
    with pytest.raises(ValueError, match=r"\[B, T, 12, 4, 4\]"):
        codec.decode(torch.zeros(1, 1, 3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        codec.decode(torch.zeros(1, 1, 12, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by patch=3"):
        PixelCodec((8, 8), 3, 3)
    with pytest.raises(ValueError, match="invalid PixelCodec"):
        PixelCodec((8, 8), 0)


# -- the VAE slot ---------------------------------------------------------------------------------


def fake_vae() -> VAECodec:
    """A stand-in "VAE": 4× average pooling to 3 latent channels, nearest upsampling back."""

    def encode_fn(video_B_T_C_H_W: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(video_B_T_C_H_W.flatten(0, 1), 4).unflatten(
            0, video_B_T_C_H_W.shape[:2]
        )

    def decode_fn(z_B_T_C_h_w: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(z_B_T_C_h_w.flatten(0, 1), scale_factor=4, mode="nearest")
        return up.unflatten(0, z_B_T_C_h_w.shape[:2])

    return VAECodec(encode_fn, decode_fn, frame_hw=(16, 16), channels=3, spatial_downsample=4)


def test_vae_slot_shapes_and_constant_round_trip() -> None:
    codec = fake_vae()
    assert isinstance(codec, Codec) and codec.latent_hw == (4, 4)
    frames = torch.full((2, 3, 16, 16, 3), 77, dtype=torch.uint8)
    z = codec.encode(frames)
    assert z.shape == (2, 3, 3, 4, 4)
    assert torch.equal(codec.decode(z), frames)  # constant frames survive pooling exactly


def test_vae_slot_checks_the_callables() -> None:
    bad = VAECodec(
        lambda v: v,  # forgets to downsample
        lambda z: z,
        frame_hw=(16, 16),
        channels=3,
        spatial_downsample=4,
    )
    with pytest.raises(ValueError, match=r"encode_fn: expected floating \[B, T, 3, 4, 4\]"):
        bad.encode(torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"decode_fn: expected floating \[B, T, 3, 16, 16\]"):
        bad.decode(torch.zeros(1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="not divisible"):
        VAECodec(lambda v: v, lambda z: z, frame_hw=(10, 16), channels=3, spatial_downsample=4)
