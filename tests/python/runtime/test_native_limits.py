"""``crcm._native`` against hostile input (issue 18, classes 3, 7 and 8).

- No call aborts the process: allocation sizes are checked and fail as Python exceptions
  (run in a subprocess, so that an abort fails the test instead of killing the test run).
- Waits check for signals: Ctrl+C interrupts a ``pop`` or a blocked ``push`` at once.
- Argument errors name the argument and its valid range; NumPy integers are accepted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from crcm import _native
from crcm.errors import ConfigError

HOSTILE = textwrap.dedent(
    """
    import numpy as np
    from crcm import _native

    def attempt(name, fn):
        try:
            fn()
            print(name, "ok", flush=True)
        except Exception as e:  # any Python exception is fine; an abort is not
            print(name, type(e).__name__, str(e)[:100].replace("\\n", " "), flush=True)

    def zero_stride_push(h, w, c):
        fb = _native.FrameBuffer(h, w, c)
        fb.push(np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (h, w, c)), 0)

    # A zero-stride view of a 3 TB frame used to abort (SIGABRT) in the copy. (Sizes that
    # an allocator would grant are not tried here: copying them would fill the machine.)
    attempt("zero-stride-3TB", lambda: zero_stride_push(10**6, 10**6, 3))
    attempt("zero-stride-300GB", lambda: zero_stride_push(10**5, 10**6, 3))
    attempt("frame-over-usize", lambda: _native.FrameBuffer(2**40, 2**40, 2**40))
    attempt("huge-capacity", lambda: _native.FrameBuffer(2, 2, 1, capacity=2**62))
    print("DONE", flush=True)
    """
)


def test_no_native_call_aborts_the_process():
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", HOSTILE], capture_output=True, text=True, timeout=120, env=env
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{out[-3000:]}"
    assert "DONE" in proc.stdout, out
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert len(results) == 4, out
    assert all(r.startswith("ConfigError") for r in results.values()), out


def test_frame_and_buffer_sizes_are_bounded():
    with pytest.raises(ConfigError, match=r"frame of .* bytes is over the limit"):
        _native.FrameBuffer(2**17, 2**17, 1)
    with pytest.raises(ConfigError, match=r"capacity .* over the limit"):
        _native.FrameBuffer(2, 2, 1, capacity=2**40)
    s = _native.Scheduler(num_pages=8, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64)
    s.open(1, chunk_frames=1, steps_per_chunk=[1], times=[1.0], window_frames=1, needs_actions=True)
    with pytest.raises(ConfigError, match="pending actions, over the limit"):
        s.push_actions(1, np.zeros(2**24 + 1, np.int64))
    assert s.stream_stats(1)["pending_actions"] == 0


# -- Ctrl+C ------------------------------------------------------------------------------------


def _interrupt_after(seconds: float, fallback: threading.Event, undo) -> threading.Thread:
    """Sends SIGINT to this process after ``seconds``; if the wait has not ended 3 s later,
    ``undo()`` ends it (so that a broken build fails the test instead of hanging it)."""

    def run():
        time.sleep(seconds)
        os.kill(os.getpid(), signal.SIGINT)
        if not fallback.wait(3.0):
            undo()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("case", ["pop forever", "pop with timeout", "push blocked"])
def test_waits_are_interrupted_by_ctrl_c(case):
    fb = _native.FrameBuffer(2, 2, 1, capacity=1)
    frame = np.zeros((2, 2, 1), np.uint8)
    if case == "push blocked":
        fb.push(frame, 0)
    ended = threading.Event()
    thread = _interrupt_after(0.2, ended, fb.close)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        try:
            if case == "pop forever":
                fb.pop(None)
            elif case == "pop with timeout":
                fb.pop(30.0)
            else:
                fb.push(frame, 1)
        finally:
            ended.set()
    elapsed = time.monotonic() - t0
    thread.join()
    assert elapsed < 1.5, f"Ctrl+C took {elapsed:.1f} s to interrupt {case}"
    assert not fb.closed  # interrupted, not ended by the fallback
    assert fb.stats()["pushed"] == (1 if case == "push blocked" else 0)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_session_pop_on_an_idle_stream_is_interrupted_by_ctrl_c():
    from crcm.pipeline import Pipeline
    from crcm.runtime import Runtime

    with Runtime(Pipeline.from_config("tiny"), max_streams=1) as rt:
        session = rt.open(steps=1, seed=0)  # waits for actions: no frame will come
        ended = threading.Event()
        thread = _interrupt_after(0.2, ended, session.close)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            try:
                session.pop()
            finally:
                ended.set()
        thread.join()
        assert time.monotonic() - t0 < 1.5
        assert not session.closed


# -- argument messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "cls", "text"),
    [
        (
            lambda s: s.open(
                2**64, chunk_frames=1, steps_per_chunk=[1], times=[1.0], window_frames=1
            ),
            OverflowError,
            "stream_id must be an integer in [0, 18446744073709551615], got 18446744073709551616",
        ),
        (
            lambda s: s.open(1, chunk_frames=-1, steps_per_chunk=[1], times=[1.0], window_frames=1),
            OverflowError,
            "chunk_frames must be an integer in [0, 4294967295], got -1",
        ),
        (
            lambda s: s.open(
                1, chunk_frames=1, steps_per_chunk=[1, -2], times=[1.0], window_frames=1
            ),
            OverflowError,
            "steps_per_chunk[1] must be an integer in [0, 4294967295], got -2",
        ),
        (
            lambda s: s.open(
                1, chunk_frames=1.0, steps_per_chunk=[1], times=[1.0], window_frames=1
            ),
            TypeError,
            "chunk_frames must be an integer, got float",
        ),
        (
            lambda s: s.open(1, chunk_frames=1, steps_per_chunk=2.0, times=[1.0], window_frames=1),
            TypeError,
            "steps_per_chunk must be a sequence of integers, got float",
        ),
        (
            lambda s: s.open(1, chunk_frames=1, steps_per_chunk=[1], times=["a"], window_frames=1),
            TypeError,
            "times[0] must be a number, got str",
        ),
        (lambda s: s.push_actions(-1, [0]), OverflowError, "stream_id must be an integer in [0,"),
        (
            lambda s: s.push_actions(1, [2**64]),
            OverflowError,
            "actions[0] must be an integer in [-9223372036854775808, 9223372036854775807]",
        ),
        (lambda s: s.complete(-5), OverflowError, "plan_id must be an integer in [0,"),
        (lambda s: s.tick("now"), TypeError, "now must be a number, got str"),
        (lambda s: _native.FrameBuffer(-4, 5), OverflowError, "height must be an integer in [0,"),
        (
            lambda s: _native.FrameBuffer(4, 5, capacity=True),
            TypeError,
            "capacity must be an integer, got bool",
        ),
        (
            lambda s: _native.FrameBuffer(4, 5).push(np.zeros((4, 5, 3), np.uint8), -1),
            OverflowError,
            "index must be an integer in [0,",
        ),
        (
            lambda s: _native.FrameBuffer(4, 5).pop(timeout="1"),
            TypeError,
            "timeout must be a number, got str",
        ),
    ],
)
def test_argument_errors_name_the_argument_and_range(call, cls, text):
    s = _native.Scheduler(num_pages=8, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64)
    with pytest.raises(cls) as info:
        call(s)
    assert text in str(info.value), str(info.value)


def test_numpy_integers_are_accepted_and_bools_are_not():
    for kwargs in (dict(num_pages=True), dict(max_batch_tokens=False)):
        args = dict(num_pages=8, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64)
        with pytest.raises(TypeError, match="must be an integer, got bool"):
            _native.Scheduler(**(args | kwargs))
    with pytest.raises(TypeError, match="target_fps must be a number, got bool"):
        _native.FrameBuffer(2, 2, 1, target_fps=True)
    s = _native.Scheduler(
        num_pages=np.int64(8),
        page_tokens=np.uint32(16),
        tokens_per_frame=np.int16(16),
        max_batch_tokens=np.int64(64),
    )
    s.open(
        np.uint64(1),
        chunk_frames=np.int64(1),
        steps_per_chunk=np.array([1]),
        times=np.array([1.0], np.float32),
        window_frames=np.int8(1),
        target_fps=np.float32(30),
        max_frames=np.int64(4),
        needs_actions=True,
    )
    s.push_actions(np.int64(1), np.array([1, 2], np.int32))
    assert s.stream_stats(np.uint8(1))["pending_actions"] == 2
    fb = _native.FrameBuffer(np.int64(2), np.int32(2), np.uint8(1), capacity=np.int64(2))
    fb.push(np.zeros((2, 2, 1), np.uint8), np.int64(7), timestamp=np.float64(1.0))
    assert fb.pop(timeout=np.float32(0.5))[1] == 7
