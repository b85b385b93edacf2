"""The installed package is complete: native module, kernels, stubs, CLI, README example."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crcm
from crcm import _native

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(crcm.__file__).parent


def _installed_files() -> set[str] | None:
    """Files the installed distribution lists, or None for an editable install."""
    files = importlib.metadata.files("crcm") or []
    names = {f.as_posix() for f in files}
    return names if "crcm/__init__.py" in names else None


def test_kernels_ship_inside_the_package():
    kernels = importlib.import_module("crcm.kernels")
    assert Path(kernels.__file__).resolve().parent == (PACKAGE / "kernels").resolve()
    names = _installed_files()
    if names is None:
        pytest.skip("editable install: the wheel's file list is checked by a non-editable install")
    assert "crcm/kernels/__init__.py" in names
    shipped = {p.name for p in (PACKAGE / "kernels").glob("*.py")}
    assert {n.rsplit("/", 1)[-1] for n in names if n.startswith("crcm/kernels/")} >= shipped


def test_data_files_ship_inside_the_package():
    """The web page and the training recipes are package data, not only repository files."""
    assert (PACKAGE / "serve" / "static" / "index.html").is_file()
    assert len(list((PACKAGE / "training" / "recipes").rglob("*.toml"))) >= 10
    names = _installed_files()
    if names is None:
        pytest.skip("editable install: the wheel's file list is checked by a non-editable install")
    assert "crcm/serve/static/index.html" in names
    assert "crcm/training/recipes/causal-rcm/2-tf-scm.toml" in names


def test_shipped_breakout_model_loads_by_name():
    """The default world model ships inside the package: within the size target, float16 on
    disk, float32 once loaded, streaming the way it was trained (1 step, noisy context)."""
    from crcm.pipeline import shipped_models

    assert "breakout" in shipped_models()
    pipe = crcm.load("breakout")
    params = sum(p.numel() for p in pipe.model.parameters())
    assert params <= 5_000_000, params
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters())
    assert pipe.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    # 1 step per frame with the clean cache-update pass: the sampler it was evaluated with (its
    # teacher-forced stages saw clean context; docs/breakout-model.md).
    assert pipe.sampler.steps_per_chunk == (1,) and pipe.sampler.cache_update
    assert pipe.model.cfg.frame_hw == (64, 64)
    weights = PACKAGE / "weights" / "breakout" / "model.safetensors"
    assert weights.stat().st_size < 10_000_000  # float16: ≈ 2 bytes per parameter
    names = _installed_files()
    if names is not None:
        assert "crcm/weights/breakout/model.safetensors" in names


def test_native_module_is_abi3_with_stub_and_marker():
    assert Path(_native.__file__).name.endswith(".abi3.so")
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_native.pyi").is_file()


def test_stub_matches_native_module():
    tree = ast.parse((PACKAGE / "_native.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(_native, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    assert hasattr(cls, item.name), f"{node.name}.{item.name} is stubbed only"
        elif isinstance(node, ast.FunctionDef):
            assert hasattr(_native, node.name), f"{node.name} is stubbed only"
    for name in ("Scheduler", "Plan", "FrameBuffer", "monotonic"):
        assert re.search(rf"\b(class|def) {name}\b", (PACKAGE / "_native.pyi").read_text())


def test_readme_example_runs():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    namespaces = []
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), namespace)
        namespaces.append(namespace)
    api, runtime = namespaces
    assert len(api["frames"]) == 3 and len(api["video"]) == 6
    assert api["rt"].stats()["pages_used"] == 0  # leaving the `with` closed every session
    sched = runtime["sched"]
    assert sched.stream_stats(1)["frames_emitted"] == 4  # every pushed action became a frame


def _crcm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crcm.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_demo_plays_the_shipped_model(tmp_path):
    out = tmp_path / "frames.npz"
    result = _crcm("demo", "--streams", "3", "--frames", "12", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "breakout: 3 streams, 36 frames" in result.stdout
    assert "steps per frame 1,2,1" in result.stdout
    import numpy as np

    with np.load(out) as frames:
        assert sorted(frames) == ["stream_0", "stream_1", "stream_2"]
        assert all(frames[k].shape == (12, 64, 64, 3) for k in frames)
        assert all(frames[k].dtype == np.uint8 and frames[k].any() for k in frames)


def test_cli_user_errors_are_one_line():
    result = _crcm("demo", "--steps", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "steps must be between 1 and 4" in result.stderr


def test_cli_help_lists_commands():
    result = _crcm("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_cli_bench_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = _crcm("bench", "--model", "tiny", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    import json

    record = json.loads(out.read_text())
    assert record["machine"]["cores"] >= 1
    keys = {"model", "steps", "chunk", "streams", "fps", "first_frame_ms", "p99_frame_ms"}
    assert len(record["rows"]) == 12 and all(keys <= set(row) for row in record["rows"])
    assert all(row["fps"] > 0 and row["first_frame_ms"] > 0 for row in record["rows"])
    # Where a plan's time goes: every phase measured, the forward the largest part.
    phases = {"scheduler", "layout", "forward", "decode", "buffer"}
    for row in record["rows"]:
        assert set(row["phase_us"]) == phases and min(row["phase_us"].values()) >= 0
        assert row["phase_us"]["forward"] == max(row["phase_us"].values())


def test_cli_bench_measures_the_fused_and_the_unfused_cache_update(tmp_path):
    out = tmp_path / "bench.json"
    args = ("--steps", "1", "--streams", "1", "--contexts", "clean,clean-unfused")
    result = _crcm("bench", "--model", "tiny", "--quick", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [row["context"] for row in rows] == ["clean", "clean-unfused"]
    assert all(row["fps"] > 0 for row in rows)
    bad = _crcm("bench", "--contexts", "clean,dirty")
    assert bad.returncode != 0 and "clean-unfused" in bad.stderr
