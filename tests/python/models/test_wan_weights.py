"""Checkpoint layout: crcm == original Wan naming, diffusers conversion, safetensors I/O."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crcm.models import CausalDiT, DiTConfig, get_config
from crcm.models.wan_weights import (
    convert_state_dict,
    detect_naming,
    load_model,
    load_state_dict,
    load_weights,
    read_config,
    save_weights,
)

# A Wan-shaped tiny text-to-video model: 2 heads × 16 (RoPE dims 8 frame / 4 row / 4 column,
# uneven like Wan's 44/42/42 so that a wrong split shows), 2 layers.
WAN_TINY = DiTConfig(
    in_channels=4,
    out_channels=4,
    dim=32,
    num_layers=2,
    num_heads=2,
    ffn_dim=40,
    frame_hw=(8, 8),
    patch=(1, 2, 2),
    freq_dim=32,
    cond="text",
    text_dim=16,
    text_len=5,
)
# float32; observed ≈2e-5 on outputs of magnitude ≈10. The gap is diffusers computing the
# sinusoidal time embedding of t ≤ 1000 in float32 where Wan (and crcm) use float64.
DIFFUSERS_ATOL = 1e-4


def random_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=gen))


def crcm_model(cfg: DiTConfig = WAN_TINY, seed: int = 0) -> CausalDiT:
    model = CausalDiT(cfg).eval()
    random_weights(model, seed)
    return model


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- against diffusers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_wan():
    try:
        from diffusers import WanTransformer3DModel
    except Exception as e:  # ImportError, or a diffusers/torch version clash at import
        pytest.skip(f"diffusers is not importable ({e}); `pip install 'diffusers>=0.35'`")
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=40,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    ).eval()
    random_weights(ref, seed=1)
    return ref


def test_diffusers_weights_give_the_same_velocity(diffusers_wan) -> None:
    model = CausalDiT(WAN_TINY).eval()
    left_at_init = load_state_dict(model, diffusers_wan.state_dict())
    assert left_at_init == ["null_text"]  # every diffusers tensor found its place

    B, T = 2, 3
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, 4, 8, 8, generator=gen)
    text = torch.randn(B, WAN_TINY.text_len, WAN_TINY.text_dim, generator=gen)
    s_B = torch.rand(B, generator=gen)
    with torch.no_grad():
        ref = diffusers_wan(x.transpose(1, 2), 1000 * s_B, text, return_dict=False)[0]
        ours = model(x, s_B[:, None].expand(B, T), cond=text)
    assert ref.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=DIFFUSERS_ATOL, rtol=0)

    # Per-frame times: diffusers takes per-token timesteps (its Wan2.2 path); 16 tokens a frame.
    s_B_T = torch.rand(B, T, generator=gen)
    per_token = (1000 * s_B_T).repeat_interleave(WAN_TINY.tokens_per_frame, dim=1)
    with torch.no_grad():
        ref = diffusers_wan(x.transpose(1, 2), per_token, text, return_dict=False)[0]
        ours = model(x, s_B_T, cond=text)
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=DIFFUSERS_ATOL, rtol=0)


def test_crcm_weights_load_into_diffusers(diffusers_wan) -> None:
    model = crcm_model(seed=5)
    exported = convert_state_dict(model.state_dict(), src="crcm", dst="diffusers")
    del exported["null_text"]  # crcm-only: diffusers has no null caption
    diffusers_wan.load_state_dict(exported, strict=True)
    B, T = 1, 2
    x, text = torch.randn(B, T, 4, 8, 8), torch.randn(B, WAN_TINY.text_len, WAN_TINY.text_dim)
    with torch.no_grad():
        ref = diffusers_wan(x.transpose(1, 2), torch.tensor([700.0]), text, return_dict=False)[0]
        ours = model(x, torch.full((B, T), 0.7), cond=text)
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=DIFFUSERS_ATOL, rtol=0)


# -- namings --------------------------------------------------------------------------------------


# diffusers' converter of original Wan2.1 checkpoints (scripts/convert_wan_to_diffusers.py,
# TRANSFORMER_KEYS_RENAME_DICT, its text-to-video entries), applied as it applies them: plain
# substring replacements in this order. It is the Wan layout as an independent party reads it,
# and shares nothing with crcm's own conversion tables.
WAN_TO_DIFFUSERS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "cross_attn": "attn2",
    "self_attn": "attn1",
    ".o.": ".to_out.0.",
    ".q.": ".to_q.",
    ".k.": ".to_k.",
    ".v.": ".to_v.",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "modulation": "scale_shift_table",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    # the original model's norms are norm1, norm3 (cross-attention), norm2: swapped
    "norm2": "norm__placeholder",
    "norm3": "norm2",
    "norm__placeholder": "norm3",
}


def test_original_wan_names_are_crcm_names(diffusers_wan) -> None:
    """crcm's state dict *is* an original Wan2.1 checkpoint: converted the way diffusers
    converts Wan's own files (not with crcm's tables), it loads strictly into diffusers'
    Wan transformer and gives crcm's velocity. A renamed, swapped or re-laid-out tensor
    (e.g. the order of the 6 modulation vectors, norm2/norm3) fails here."""
    model = crcm_model(seed=4)
    wan_sd = model.state_dict()
    del wan_sd["null_text"]  # crcm-only: Wan has no null caption
    converted = {}
    for key, tensor in wan_sd.items():
        for old, new in WAN_TO_DIFFUSERS.items():
            key = key.replace(old, new)
        converted[key] = tensor
    diffusers_wan.load_state_dict(converted, strict=True)
    B, T = 2, 2
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, 4, 8, 8, generator=gen)
    text = torch.randn(B, WAN_TINY.text_len, WAN_TINY.text_dim, generator=gen)
    s_B = torch.rand(B, generator=gen)
    with torch.no_grad():
        ref = diffusers_wan(x.transpose(1, 2), 1000 * s_B, text, return_dict=False)[0]
        ours = model(x, s_B[:, None].expand(B, T), cond=text)
    assert ref.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=DIFFUSERS_ATOL, rtol=0)
    # And crcm reads a Wan-named file as Wan names, unchanged.
    assert detect_naming(wan_sd) == "wan"
    assert convert_state_dict(wan_sd, src="wan", dst="crcm") == wan_sd


@pytest.mark.parametrize("naming", ["wan", "diffusers"])
def test_conversion_round_trip_is_identity(naming: str) -> None:
    cfg = get_config("tiny")  # class + action tables: crcm-only keys ride along unchanged
    sd = crcm_model(cfg).state_dict()
    there = convert_state_dict(sd, src="crcm", dst=naming)
    back = convert_state_dict(there, src=naming, dst="crcm")
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)
    assert detect_naming(there) == ("diffusers" if naming == "diffusers" else "wan")
    if naming == "diffusers":
        assert "blocks.0.attn1.to_out.0.weight" in there and "proj_out.weight" in there
        assert "blocks.0.scale_shift_table" in there and "scale_shift_table" in there


def test_unknown_naming_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown naming"):
        convert_state_dict({}, src="comfy")


# -- safetensors files ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = crcm_model(get_config("tiny"))
    path = tmp_path / "tiny.safetensors"
    save_weights(model, path)
    assert not (tmp_path / "tiny.safetensors.tmp").exists()
    assert read_config(path) == model.cfg

    fresh = CausalDiT(model.cfg)
    assert not same_state(model, fresh)
    assert load_weights(fresh, path) == []
    assert same_state(model, fresh)
    assert same_state(model, load_model(path))

    # A crcm file is loaded strictly: its crcm-only tensors are required too.
    state = {k: v for k, v in model.state_dict().items() if k != "action_embedding.weight"}
    save_file(state, path, metadata={"crcm_config": read_metadata_config(path)})
    with pytest.raises(ValueError, match=r"missing \(1\): action_embedding\.weight"):
        load_weights(fresh, path)


def test_saved_weights_are_readable_by_others_under_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_weights(crcm_model(get_config("tiny")), tmp_path / "tiny.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tiny.safetensors").stat().st_mode) == 0o644


def read_metadata_config(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["crcm_config"]


def test_wrapper_prefixes_and_sub_models(tmp_path: Path) -> None:
    model = crcm_model()
    sd = model.state_dict()
    fresh = CausalDiT(WAN_TINY)
    load_state_dict(fresh, {f"_orig_mod.model.{k}": v for k, v in sd.items()})
    assert same_state(model, fresh)

    # A Self-Forcing-style file with two models: the caller picks one by prefix.
    other = crcm_model(seed=9).state_dict()
    path = tmp_path / "self_forcing.safetensors"
    both = {f"generator.model.{k}": v for k, v in other.items()}
    both |= {f"generator_ema.model.{k}": v for k, v in sd.items()}
    save_file(both, path)
    with pytest.raises(ValueError, match="generator_ema"):
        load_weights(CausalDiT(WAN_TINY), path)
    fresh = CausalDiT(WAN_TINY)
    load_weights(fresh, path, prefix="generator_ema.")
    assert same_state(model, fresh)
    with pytest.raises(ValueError, match=r"no key starts with 'ema\.'"):
        load_weights(fresh, path, prefix="ema.")


def test_nested_dicts_are_rejected() -> None:
    sd = crcm_model().state_dict()
    with pytest.raises(ValueError, match=r"sub-dicts.*generator_ema"):
        load_state_dict(CausalDiT(WAN_TINY), {"generator": sd, "generator_ema": sd})


def broken(change: str) -> dict[str, torch.Tensor]:
    sd = dict(crcm_model().state_dict())
    if change == "missing":
        del sd["blocks.1.self_attn.k.weight"]
    elif change == "unexpected":
        sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(32, 32)
    elif change == "mis-shaped":
        sd["blocks.0.ffn.0.weight"] = torch.zeros(41, 32)
    elif change == "non-finite":
        sd["head.modulation"] = torch.full((1, 2, 32), float("nan"))
    elif change == "not floating point":
        sd["patch_embedding.bias"] = torch.zeros(32, dtype=torch.long)
    return sd


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "missing \\(1\\): blocks.1.self_attn.k.weight"),
        ("unexpected", "unexpected \\(1\\): blocks.0.cross_attn.k_img.weight"),
        ("mis-shaped", "blocks.0.ffn.0.weight \\[41, 32\\] \\(model \\[40, 32\\]\\)"),
        ("non-finite", "non-finite values \\(1\\): head.modulation"),
        ("not floating point", "patch_embedding.bias torch.int64"),
    ],
)
def test_bad_checkpoints_list_the_keys(tmp_path: Path, change: str, message: str) -> None:
    target = crcm_model(seed=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    path = tmp_path / "bad.safetensors"
    save_file(broken(change), path)
    with pytest.raises(ValueError, match=message):
        load_weights(target, path)
    # Checked before copying: a rejected checkpoint leaves the model untouched.
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_corrupt_and_absent_files(tmp_path: Path) -> None:
    model = CausalDiT(WAN_TINY)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(model, garbage)
    truncated = tmp_path / "truncated.safetensors"
    save_weights(crcm_model(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(model, truncated)
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "absent.safetensors")


def test_config_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(crcm_model(), path)
    with pytest.raises(ValueError, match=r"rope_theta=10000\.0 \(model 500\.0\)"):
        load_weights(CausalDiT(WAN_TINY.replace(rope_theta=500.0)), path)
