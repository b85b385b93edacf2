"""The kernels compile for a real GPU target, not only in the interpreter.

The interpreter runs the kernels' logic but not Triton's GPU lowering (layouts, pipelining,
register allocation), where a kernel can fail to compile or outgrow the device. This compiles the
preferred launch configuration of each kernel ahead of time for sm_90 (H100/H200), in a
subprocess without ``TRITON_INTERPRET``, and checks that it fits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[3]
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one program may use on sm_90


def test_preferred_configurations_compile_for_sm90_and_fit(tmp_path: Path) -> None:
    out = tmp_path / "resources.json"
    # crcm is imported the way this process imports it (installed, or PYTHONPATH).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [sys.executable, str(ROOT / "benches" / "kernel_resources.py"),
         "--rungs", "1", "--head-dims", "128", "--out", str(out)],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())["configurations"]
    compiled = {(row["kernel"], row["variant"]) for row in rows}
    assert compiled == {
        ("paged attention", "whole-context"),
        ("paged attention", "split-context"),
        ("attention JVP", "static-query"),
        ("attention JVP", "moving-query"),
    }
    for row in rows:
        assert 0 < row["shared_bytes"] <= SM90_SHARED_BYTES, row
        assert 0 < row["registers"] <= 255, row
