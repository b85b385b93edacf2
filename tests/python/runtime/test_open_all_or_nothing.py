"""``Runtime.open`` and ``Session`` calls with bad arguments (issue 18, classes 1, 2 and 8).

A refused call leaves nothing behind: the runtime's streams, pages, sessions and executor
states are exactly where they were (an open is all or nothing; so is a fork). Every refusal is
a ``ConfigError`` naming the argument; non-finite numbers are refused at the boundary instead
of becoming black frames; seeds outside ``[0, 2**64)`` are refused instead of wrapped; NumPy
integers are accepted wherever Python ints are.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crcm.errors import ConfigError, CrcmError
from crcm.models import DiTConfig
from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig

NAN, INF = math.nan, math.inf

# One bad value per argument of Runtime.open (the tiny model: class condition with 3 classes,
# 4 actions, 16x16x1 frames, chunks of 1 frame).
BAD_OPEN: dict[str, list[object]] = {
    "sampler": ["nope", 3, object()],
    "steps": [0, -1, 5, 2.0, "2", [], [0], [1, "x"], np.float64(2), 2**70, True],
    "cond": [4, -1, 1.5, "a", 2**70, torch.tensor(NAN), torch.tensor([1, 2]), torch.tensor(1.5)],
    "seed": [-1, 2**64, 2**70, 1.5, "1", NAN, True, np.float32(3)],
    "actions": ["yes", 2, 1.0],
    "max_frames": [0, -1, 2**64, 1.5, "3", INF],
    "target_fps": [0, -1.0, NAN, INF, 1e9, 1e-9, "30", True],
    "buffer_frames": [0, -1, 1.5, "64", 2**64, None],
    "backpressure": ["x", None, 1],
    "admission": ["x", None],
    "context": [
        "x",
        np.zeros((1, 16, 16, 1), np.float32),
        np.zeros((0, 16, 16, 1), np.uint8),
        np.zeros((1, 8, 8, 1), np.uint8),
    ],
    "context_actions": [[0], "LEFT"],  # without context frames
}
# The argument each message must name (a prefix of it for the context arguments).
NAMED = {"context_actions": "context"}


def _snapshot(rt: Runtime) -> tuple:
    stats = rt.stats()
    return (
        stats["streams"],
        stats["queued"],
        stats["pages_used"],
        stats["pages_reserved"],
        stats["pages_free"],
        tuple(rt.sessions),
        tuple(rt.executor.streams),
        tuple(rt.scheduler.stream_ids()),
    )


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny", action_names=("NOOP", "FIRE", "RIGHT", "LEFT"))


@pytest.fixture(scope="module")
def rt(pipe):
    with Runtime(pipe, max_streams=2) as runtime:
        yield runtime


@st.composite
def bad_open(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    name = draw(st.sampled_from(sorted(BAD_OPEN)))
    value = draw(st.sampled_from(BAD_OPEN[name]))
    return name, {name: value}


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(bad_open(), min_size=1, max_size=6))
def test_a_refused_open_leaves_nothing_behind(rt, calls):
    before = _snapshot(rt)
    for name, kwargs in calls:
        with pytest.raises(ConfigError) as info:
            rt.open(**({"steps": 1, "seed": 0} | kwargs))
        assert NAMED.get(name, name) in str(info.value), (kwargs, str(info.value))
        assert "\n" not in str(info.value)
        assert _snapshot(rt) == before, (kwargs, str(info.value))
        rt.scheduler.check_invariants()


def test_refused_opens_do_not_fill_the_runtime(rt):
    """The probe's sequence: three opens that failed after the scheduler's open, then a
    session without actions — it used to be closed with KeyError by the orphans."""
    for kwargs in (dict(buffer_frames=0), dict(backpressure="x"), dict(target_fps=1e9)):
        with pytest.raises(ConfigError):
            rt.open(**kwargs)
    assert rt.stats()["streams"] == 0 and rt.stats()["pages_reserved"] == 0
    with rt.open(steps=1, seed=0, actions=False, max_frames=3) as s:
        assert rt.run_until_idle() == 3
        assert s.error is None and len(s.read()) == 3
    with rt.open(steps=1, seed=0) as a, rt.open(steps=1, seed=1) as b:  # both fit again
        a.push_actions([0])
        b.push_actions([1])
        assert rt.run_until_idle() == 2
    assert rt.stats()["streams"] == 0 and rt.stats()["pages_used"] == 0


# -- Session calls ---------------------------------------------------------------------------

BAD_SESSION: list[tuple[str, tuple, dict]] = [
    ("push_actions", (["JUMP"],), {}),
    ("push_actions", ([4],), {}),
    ("push_actions", ([-2],), {}),
    ("push_actions", ([1.5],), {}),
    ("push_actions", ([None],), {}),
    ("push_actions", ([True],), {}),
    ("push_actions", ([0, "JUMP"],), {}),  # nothing of a refused push is queued
    ("push_actions", ("LEFT",), {}),
    ("push_actions", (3,), {}),
    ("push_actions", (np.int64(3),), {}),
    ("push_actions", (None,), {}),
    ("read", (), {"max_frames": -1}),
    ("read", (), {"max_frames": "x"}),
    ("read", (), {"max_frames": 1.5}),
    ("pop", (), {"timeout": -1.0}),
    ("pop", (), {"timeout": NAN}),
    ("pop", (), {"timeout": "x"}),
    ("fork", (), {"seed": -1}),
    ("fork", (), {"seed": 2**64}),
    ("fork", (), {"seed": "x"}),
    ("fork", (), {"seed": 1.5}),
]
SESSION_ARG = {"push_actions": "action", "read": "max_frames", "pop": "timeout", "fork": "seed"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(BAD_SESSION), min_size=1, max_size=8))
def test_a_refused_session_call_changes_nothing(rt, calls):
    with rt.open(steps=1, seed=0) as s:
        s.push_actions([1])
        before = (_snapshot(rt), s.stats()["pending_actions"], len(s.buffer))
        for method, args, kwargs in calls:
            with pytest.raises(ConfigError) as info:
                getattr(s, method)(*args, **kwargs)
            assert SESSION_ARG[method] in str(info.value), (method, args, kwargs)
            assert (_snapshot(rt), s.stats()["pending_actions"], len(s.buffer)) == before
            rt.scheduler.check_invariants()
    assert rt.stats()["streams"] == 0


# -- class 8: numbers, seeds and NumPy integers ----------------------------------------------


def _frames(rt: Runtime, n: int = 3, **kwargs) -> np.ndarray:
    with rt.open(actions=False, max_frames=n, **kwargs) as s:
        rt.run_until_idle()
        return np.stack(s.read())


def test_numpy_integers_are_accepted_wherever_ints_are(rt):
    ref = _frames(rt, steps=2, seed=5, cond=1, buffer_frames=8)
    got = _frames(
        rt, steps=np.int64(2), seed=np.uint64(5), cond=np.int64(1), buffer_frames=np.int32(8)
    )
    assert np.array_equal(ref, got)
    assert np.array_equal(
        ref, _frames(rt, np.int64(3), steps=(np.int32(2),), seed=np.int8(5), cond=torch.tensor(1))
    )
    with rt.open(steps=1, seed=0, max_frames=np.int64(2)) as s:
        s.fork(seed=np.int64(3)).close()
        s.push_actions([np.int64(1), np.uint8(2)])
        s.push_actions(np.array([3, 0]))
        assert s.stats()["pending_actions"] == 4
        rt.run_until_idle()
        assert len(s.read(max_frames=np.int64(5))) == 2


def test_seeds_are_refused_not_wrapped(rt):
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        rt.open(seed=-1)
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        rt.open(seed=2**64)
    top = _frames(rt, seed=2**64 - 1)  # the largest seed works, and is not seed 0 or 1
    assert not np.array_equal(top, _frames(rt, seed=0))


def test_messages_name_the_argument_and_its_range(rt):
    cases = {
        "max_frames": (dict(max_frames=-1), "max_frames must be"),
        "buffer_frames": (dict(buffer_frames=2**64), "buffer_frames must be an integer in [1,"),
        "steps": (dict(steps=2.0), "steps must be"),
        "target_fps": (dict(target_fps=1e9), "target_fps must be"),
    }
    for kwargs, text in cases.values():
        with pytest.raises(ConfigError) as info:
            rt.open(**kwargs)
        assert text in str(info.value), str(info.value)


# -- class 2: non-finite numbers -------------------------------------------------------------


@pytest.fixture(scope="module")
def text_rt():
    cfg = DiTConfig(
        in_channels=4,
        out_channels=4,
        dim=24,
        num_layers=1,
        num_heads=2,
        ffn_dim=48,
        frame_hw=(8, 8),
        freq_dim=16,
        cond="text",
        text_dim=8,
        text_len=4,
    )
    with Runtime(Pipeline.from_config(cfg), max_streams=1, cfg=True) as runtime:
        yield runtime


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_condition_tensors_are_refused(text_rt, value):
    before = _snapshot(text_rt)
    tokens = torch.zeros(4, 8)
    tokens[1, 2] = value
    for cond in (tokens, tokens.numpy(), tokens.double()):
        with pytest.raises(ConfigError, match=r"cond.*finite"):
            text_rt.open(cond=cond, max_frames=1)
    assert _snapshot(text_rt) == before
    assert len(_frames(text_rt, 1, cond=torch.ones(4, 8))) == 1  # a finite one works


@pytest.mark.parametrize("scale", [NAN, INF])
def test_non_finite_cfg_scale_is_refused(text_rt, scale):
    with pytest.raises(ConfigError, match="cfg_scale"):
        SamplerConfig(kind="euler", steps_per_chunk=(2,), times=(1.0, 0.5), cfg_scale=scale)
    teacher = SamplerConfig(kind="euler", steps_per_chunk=(2,), times=(1.0, 0.5), cfg_scale=3.0)
    with pytest.raises(ConfigError, match="cfg_scale"):
        replace(teacher, cfg_scale=scale)


def test_non_finite_model_output_is_an_error_not_black_frames():
    pipe = Pipeline.from_config("tiny", seed=1)
    with torch.no_grad():
        pipe.model.head.head.bias.fill_(NAN)  # every output NaN: used to decode as black
    with Runtime(pipe, max_streams=1) as rt:
        s = rt.open(actions=False, max_frames=2, seed=0)
        with pytest.raises(CrcmError, match="not finite"):
            rt.run_until_idle()
        assert s.closed and isinstance(s.error, CrcmError) and s.read() == []
        assert rt.stats()["streams"] == 0 and rt.stats()["pages_used"] == 0
