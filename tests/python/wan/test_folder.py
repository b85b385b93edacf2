"""A local diffusers Wan folder and causal student checkpoints, loaded as a ``CausalDiT``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crcm.errors import ConfigError
from crcm.models.wan_weights import convert_state_dict
from crcm.wan.folder import (
    check_wan_folder,
    dit_config_from_folder,
    is_wan_folder,
    load_transformer,
    read_checkpoint,
)

FRAME_HW = (8, 8)  # latents: 4×4 = 16 tokens a frame
TEXT_LEN = 7  # Wan pads to 512; a short condition keeps the tests fast
# diffusers computes the sinusoidal time embedding in float32 where Wan and crcm use float64
# (see tests/python/models/test_wan_weights.py); observed 4e-6 on outputs of magnitude ≈2.
DIFFUSERS_ATOL = 2e-5


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        from crcm.wan.tiny import make_tiny_wan_folder
    except ImportError as err:
        pytest.skip(f"crcm.wan.tiny is not importable ({err})")
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny")


@pytest.fixture(scope="module")
def diffusers_transformer(wan_folder: Path) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    # Built and loaded by hand: from_pretrained wants accelerate, which crcm does not need.
    config = WanTransformer3DModel.load_config(wan_folder / "transformer")
    model = WanTransformer3DModel.from_config(config)
    weights = wan_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


def load(folder: Path, **kwargs) -> torch.nn.Module:
    return load_transformer(folder, frame_hw=FRAME_HW, text_len=TEXT_LEN, **kwargs)


def student_weights(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A student in Wan naming (crcm's own names, without crcm's null_text): the folder's
    transformer, perturbed."""
    gen = torch.Generator().manual_seed(seed)
    state = load(folder).state_dict()
    del state["null_text"]
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert torch.equal(state["null_text"], torch.zeros(TEXT_LEN, 32))


# -- the folder -----------------------------------------------------------------------------------


def test_wan_folder_is_recognised_and_its_parts_checked(wan_folder: Path, tmp_path: Path) -> None:
    assert is_wan_folder(wan_folder)
    check_wan_folder(wan_folder)
    assert not is_wan_folder(tmp_path)  # no model_index.json
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert not is_wan_folder(tmp_path)
    with pytest.raises(ConfigError, match="StableDiffusionPipeline"):
        check_wan_folder(tmp_path)

    copy = shutil.copytree(wan_folder, tmp_path / "copy")
    vae_config = copy / "vae" / "config.json"
    vae_config.rename(tmp_path / "vae_config.json")
    with pytest.raises(ConfigError, match=f"{vae_config} is missing"):
        check_wan_folder(copy)
    (tmp_path / "vae_config.json").rename(vae_config)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ConfigError, match=f"{copy / 'tokenizer'} is missing"):
        check_wan_folder(copy)


def test_config_comes_from_the_transformer_config(wan_folder: Path) -> None:
    cfg = dit_config_from_folder(wan_folder, frame_hw=(60, 104))
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim) == (24, 2, 2, 48)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch, cfg.freq_dim) == (16, 16, (1, 2, 2), 256)
    assert (cfg.cond, cfg.text_dim, cfg.text_len, cfg.frame_hw) == ("text", 32, 512, (60, 104))
    assert cfg.cross_attn_norm and cfg.eps == 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_dim": 1280}, "image_dim=1280 is for image conditioning"),
        ({"added_kv_proj_dim": 24}, "added_kv_proj_dim=24"),
        ({"pos_embed_seq_len": 514}, "pos_embed_seq_len=514"),
        ({"qk_norm": "rms_norm"}, "qk_norm='rms_norm'"),
        ({"rope_max_seq_len": 2}, r"rope_max_seq_len=2 is shorter than the latent grid \(4, 4\)"),
        ({"rotary_dims": 3}, "fields crcm does not know: rotary_dims"),
        ({"_class_name": "SkyReelsV2Transformer3DModel"}, "not a WanTransformer3DModel"),
        ({"attention_head_dim": 5}, "head_dim=5 must be even"),
    ],
)
def test_configs_crcm_cannot_run_are_refused(
    wan_folder: Path, tmp_path: Path, change: dict, message: str
) -> None:
    config = json.loads((wan_folder / "transformer" / "config.json").read_text()) | change
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as err:
        dit_config_from_folder(tmp_path, frame_hw=FRAME_HW)
    assert str(tmp_path / "transformer" / "config.json") in str(err.value)
    assert "\n" not in str(err.value)


# -- the folder's transformer ---------------------------------------------------------------------


def test_folder_transformer_equals_diffusers(wan_folder: Path, diffusers_transformer) -> None:
    model = load(wan_folder)
    assert not any(p.is_meta for p in model.parameters())
    converted = convert_state_dict(diffusers_transformer.state_dict(), src="diffusers")
    assert_weights(model, converted)
    assert model.state_dict().keys() == converted.keys() | {"null_text"}

    B, T = 2, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 16, *FRAME_HW, generator=gen)
    text = torch.randn(B, TEXT_LEN, 32, generator=gen)
    s_B = torch.rand(B, generator=gen)
    with torch.no_grad():
        ref = diffusers_transformer(x.transpose(1, 2), 1000 * s_B, text, return_dict=False)[0]
        ours = model(x, s_B[:, None].expand(B, T), cond=text)
    assert ref.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=DIFFUSERS_ATOL, rtol=0)


def test_sharded_transformer_and_dtype(
    wan_folder: Path, diffusers_transformer, tmp_path: Path
) -> None:
    diffusers_transformer.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    expected = load(wan_folder).state_dict()
    sharded = load(tmp_path).state_dict()
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], v) for k, v in expected.items())
    half = load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_pickled_transformer_weights_are_not_loaded(wan_folder: Path, tmp_path: Path) -> None:
    shutil.copytree(wan_folder / "transformer", tmp_path / "transformer")
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ConfigError, match=r"is missing \(only diffusion_pytorch_model\.bin"):
        load(tmp_path)


def test_weights_that_contradict_the_config_are_refused(wan_folder: Path, tmp_path: Path) -> None:
    shutil.copytree(wan_folder / "transformer", tmp_path / "transformer")
    config_path = tmp_path / "transformer" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"ffn_dim": 40}))
    with pytest.raises(ConfigError, match=r"match its config.json: .*ffn.0.bias is \[48\]"):
        load(tmp_path)


# -- student checkpoints --------------------------------------------------------------------------


def test_pt_checkpoint_as_the_releases_ship_it(wan_folder: Path, tmp_path: Path) -> None:
    ema, raw = student_weights(wan_folder, seed=1), student_weights(wan_folder, seed=2)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in raw.items()},
            "generator_ema": {f"model.{k}": v for k, v in ema.items()},
            "step": 600,
        },
        path,
    )
    assert_weights(load(wan_folder, checkpoint=path), ema)  # the EMA weights by default
    assert_weights(load(wan_folder, checkpoint=path, checkpoint_key="generator"), raw)
    with pytest.raises(ConfigError, match=r"no 'ema'; its top-level keys: \['generator'"):
        read_checkpoint(path, key="ema")

    bare = tmp_path / "bare.pth"  # a state dict with no container, torch.compile's prefix
    torch.save({f"_orig_mod.{k}": v for k, v in ema.items()}, bare)
    assert_weights(load(wan_folder, checkpoint=bare), ema)


def test_safetensors_checkpoint(wan_folder: Path, tmp_path: Path) -> None:
    ema, raw = student_weights(wan_folder, seed=3), student_weights(wan_folder, seed=4)
    path = tmp_path / "causal_forcing.safetensors"
    both = {f"generator.model.{k}": v for k, v in raw.items()}
    save_file(both | {f"generator_ema.model.{k}": v for k, v in ema.items()}, path)
    assert_weights(load(wan_folder, checkpoint=path), ema)
    assert_weights(load(wan_folder, checkpoint=path, checkpoint_key="generator"), raw)
    assert read_checkpoint(path).keys() == ema.keys()


@dataclasses.dataclass
class TrainingConfig:
    lr: float = 1e-5


class WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: a full unpickle leaves the file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_are_never_unpickled(
    wan_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ema = student_weights(wan_folder, seed=5)
    marker = tmp_path / "unpickled"
    for extra in (WritesMarker(marker), TrainingConfig()):
        path = tmp_path / "with_objects.pt"
        torch.save({"generator_ema": ema, "config": extra}, path)
        with pytest.raises(ConfigError, match="crcm never unpickles") as err:
            load(wan_folder, checkpoint=path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()

    path = tmp_path / "fine.pt"
    torch.save({"generator_ema": ema}, path)
    assert_weights(load(wan_folder, checkpoint=path), ema)
    assert len(calls) == 3
    assert all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)
    assert all(c.get("mmap") is True for c in calls)  # torch.save's zip format maps


def broken(state: dict[str, torch.Tensor], change: str) -> dict[str, object]:
    state = dict(state)
    if change == "missing":
        del state["blocks.1.self_attn.k.weight"]
    elif change == "mis-shaped":
        state["blocks.0.ffn.0.weight"] = torch.zeros(49, 24)
    elif change == "unexpected":
        state["blocks.0.cross_attn.k_img.weight"] = torch.zeros(24, 24)
    elif change == "non-finite":
        state["head.modulation"] = torch.full((1, 2, 24), float("nan"))
    elif change == "integer":
        state["patch_embedding.bias"] = torch.zeros(24, dtype=torch.long)
    elif change == "not a tensor":
        state["head.modulation"] = 0.5
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "missing blocks.1.self_attn.k.weight"),
        ("mis-shaped", r"blocks.0.ffn.0.weight is \[49, 24\], expected \[48, 24\]"),
        ("unexpected", "unexpected blocks.0.cross_attn.k_img.weight"),
        ("non-finite", "head.modulation holds non-finite values"),
        ("integer", "patch_embedding.bias is torch.int64, not floating point"),
        ("not a tensor", r"not tensors: head.modulation \(float\)"),
    ],
)
def test_mismatched_checkpoints_are_named(
    wan_folder: Path, tmp_path: Path, change: str, message: str
) -> None:
    path = tmp_path / "student.pt"
    torch.save({"generator_ema": broken(student_weights(wan_folder, seed=6), change)}, path)
    with pytest.raises(ConfigError, match=message) as err:
        load(wan_folder, checkpoint=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ConfigError, match=r"cannot read .*garbage.pt .*Unsupported operand"):
        read_checkpoint(garbage)
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format: read without mmap
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["w"], torch.ones(2))
    not_safetensors = tmp_path / "student.safetensors"
    not_safetensors.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        read_checkpoint(not_safetensors)
    nested = tmp_path / "nested.pt"
    torch.save({"net": {"w": torch.zeros(1)}, "optimizer": {}}, nested)
    with pytest.raises(ConfigError, match=r"none of .*'generator_ema'.*\['net', 'optimizer'\]"):
        read_checkpoint(nested)
