"""Model folders from an untrusted source (issue 18, class 4).

``crcm.load`` validates ``crcm.json`` field by field and reads the safetensors header — shapes,
dtypes, sizes against the file — before it builds anything, so a small folder that declares a
large model is refused at once instead of allocating the model first. Every malformed value is
a ``ConfigError`` naming the field, and the command line prints it as one line.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import crcm.pipeline
from crcm.cli import main
from crcm.errors import ConfigError
from crcm.pipeline import Pipeline, load

BIG = dict(dim=4096, num_layers=40, num_heads=32, ffn_dim=16384)  # ~10 G parameters


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    Pipeline.from_config("tiny", action_names=("NOOP", "FIRE", "RIGHT", "LEFT")).save(folder)
    return folder


@pytest.fixture
def no_big_models(monkeypatch):
    """Fails the test if anything builds a model with more parameters than tiny's folder
    holds (the check must come before the allocation, not after it)."""
    real = crcm.pipeline.CausalDiT

    def guarded(cfg, *args, **kwargs):
        assert cfg.num_params() < 10**6, f"built a model of {cfg.num_params():,} parameters"
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(crcm.pipeline, "CausalDiT", guarded)


def _copy(saved: Path, dst: Path, meta_edit=None, weights: bytes | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((saved / "crcm.json").read_text())
    if meta_edit is not None:
        meta = meta_edit(meta)
    (dst / "crcm.json").write_text(json.dumps(meta))
    data = (saved / "model.safetensors").read_bytes() if weights is None else weights
    (dst / "model.safetensors").write_bytes(data)
    return dst


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value
        return meta

    return edit


def test_a_small_folder_declaring_a_large_model_is_refused_before_building(
    saved, tmp_path, no_big_models
):
    big = _set("model", {**json.loads((saved / "crcm.json").read_text())["model"], **BIG})
    # a 7-byte weights file
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        load(_copy(saved, tmp_path / "a", big, weights=b"\x07" * 7))
    # the tiny model's real weights (which name their config) under a large declaration
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        load(_copy(saved, tmp_path / "b", big))
    # weights without a stored config: the header's shapes decide
    tensors = crcm.pipeline.load(saved).model.state_dict()
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, plain)
    with pytest.raises(ConfigError, match="parameters"):
        load(_copy(saved, tmp_path / "c", big, weights=plain.read_bytes()))
    # a terabyte declaration
    huge = _set("model.dim", 2**20)
    with pytest.raises(ConfigError):
        load(_copy(saved, tmp_path / "d", huge, weights=plain.read_bytes()))
    # and the folder as saved still loads
    pipe = load(saved)
    assert pipe.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert isinstance(pipe.model.head.head.weight, torch.nn.Parameter)


def _header_file(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    "weights",
    [
        b"",
        b"\x00" * 8,
        _header_file({}, length=2**40),  # header longer than the file
        _header_file({}, length=2**63),
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
        _header_file([1, 2]),
        _header_file({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}),
        _header_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
        _header_file({"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _header_file({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
)
def test_malformed_weight_files_are_refused_before_building(saved, tmp_path, weights, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the weights file was checked")

    monkeypatch.setattr(crcm.pipeline, "CausalDiT", never)
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        load(_copy(saved, tmp_path / "w", weights=weights))


MALFORMED = [
    ("model.dim", "24"),
    ("model.num_layers", 2.5),
    ("model.num_heads", True),
    ("model.ffn_dim", 1e30),
    ("model.frame_hw", "88"),
    ("model.patch", [1, 2]),
    ("model.cond", 5),
    ("model.num_actions", -1),
    ("model.eps", "small"),
    ("model.cross_attn_norm", "yes"),
    ("model", []),
    ("codec", "pixel"),
    ("codec.frame_hw", 16),
    ("codec.patch", "2"),
    ("codec.frame_channels", None),
    ("sampler", None),
    ("sampler.steps_per_chunk", "1"),
    ("sampler.times", [1.0, "x"]),
    ("sampler.window_frames", "8"),
    ("sampler.chunk_frames", 0),
    ("sampler.cfg_scale", "NaN"),
    ("action_names", "LEFT"),  # a string is not a list of 4 names
    ("action_names", [1, 2, 3, 4]),
    ("name", ["x"]),
]


@pytest.mark.parametrize(("field", "value"), MALFORMED, ids=[f"{f}={v!r}" for f, v in MALFORMED])
def test_malformed_crcm_json_values_are_refused_naming_the_field(
    saved, tmp_path, field, value, no_big_models, capsys
):
    folder = _copy(saved, tmp_path / "m", _set(field, value))
    with pytest.raises(ConfigError) as info:
        load(folder)
    assert field.split(".")[-1] in str(info.value), str(info.value)
    # The command line says the same in one line, not a traceback.
    code = main(["stream", str(tmp_path / "out.mp4"), "--model", str(folder), "--frames", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("crcm stream: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "null", '{"format": "crcm-pipeline"}'])
def test_crcm_json_of_the_wrong_shape_is_refused(saved, tmp_path, text):
    folder = _copy(saved, tmp_path / "s")
    (folder / "crcm.json").write_text(text)
    with pytest.raises(ConfigError, match=r"crcm\.json"):
        load(folder)
