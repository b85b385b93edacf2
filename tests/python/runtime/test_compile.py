"""The runtime's compiled path around the streaming tests' oracle check: value checks that can
be skipped, warming up, falling back when compilation fails, and the precision ``crcm play``
picks (its switches are tested in tests/python/serve/test_app.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import crcm
from crcm.models import CausalDiT
from crcm.models.configs import get_config
from crcm.pipeline import Pipeline, fast_dtype
from crcm.runtime import Runtime


@pytest.fixture
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny", seed=0)


def test_forward_value_checks_can_be_skipped_and_shape_checks_cannot():
    model = CausalDiT(get_config("tiny")).eval()
    x = torch.randn(1, 2, 4, 8, 8)
    bad_s = torch.full((1, 2), 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x, bad_s)
    model(x, bad_s, check_values=False)  # the caller vouches for the values: no host sync
    with pytest.raises(ValueError, match="s_B_T must be"):
        model(x, torch.ones(1, 3), check_values=False)


def test_warm_up_leaves_no_session_and_serves_afterwards(pipe):
    rt = Runtime(pipe, max_streams=3)
    free = rt.stats()["pages_free"]
    assert rt.warm_up(streams=2) >= 0
    assert not rt.sessions and rt.stats()["pages_free"] == free
    session = rt.open(max_frames=3, cond=1)
    session.push_actions([0, 1, 2])
    rt.run_until_idle()
    assert len(session.read()) == 3
    rt.open(max_frames=1)
    with pytest.raises(crcm.InvalidStateError, match="before any session"):
        rt.warm_up()
    Runtime(pipe, max_streams=1).warm_up(streams=4)  # as many streams as the runtime holds


def test_a_failed_compilation_warns_and_runs_uncompiled(pipe, monkeypatch):
    rt = Runtime(pipe, max_streams=2, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(rt.executor, "_forward", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        rt.warm_up()
    assert not rt.executor.compiled and rt.executor._forward is pipe.model
    session = rt.open(max_frames=2)
    session.push_actions([0, 1])
    rt.run_until_idle()
    assert len(session.read()) == 2
    # Uncompiled, a failure is the caller's to see: warm_up does not swallow it.
    monkeypatch.setattr(pipe.model, "forward", broken)
    session.close()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        warnings.simplefilter("error")
        rt.warm_up()


def test_fast_dtype_reads_the_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    without = tmp_path / "plain"
    without.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert fast_dtype("cpu", str(with_bf16)) == torch.bfloat16
    assert fast_dtype("cpu", str(without)) == torch.float32
    assert fast_dtype("cpu", str(tmp_path / "missing")) == torch.float32
    assert fast_dtype("cuda") == torch.bfloat16
