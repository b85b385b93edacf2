"""Every error path of ``crcm._native`` from Python: the exact exception class (a subclass of
``crcm.errors.CrcmError`` and of the built-in a caller would catch) and a readable message.

Argument conversion errors (wrong Python type, an int outside u32/u64) are PyO3's built-in
``TypeError`` / ``OverflowError``: they never reach Rust. A fuzz test calls random methods with
random, mostly invalid, arguments and checks that no Rust panic (``pyo3_runtime.
PanicException``, a ``BaseException``) escapes and that the scheduler's invariants still hold.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crcm import _native, errors
from crcm.errors import (
    BufferClosedError,
    ConfigError,
    CrcmError,
    FrameShapeError,
    FrameTimeoutError,
    InvalidStateError,
    PagesExhaustedError,
    StreamExistsError,
    UnknownPlanError,
    UnknownStreamError,
)

# A valid stream config; tests override one field at a time.
STREAM = dict(chunk_frames=1, steps_per_chunk=[2], times=[1.0, 0.5], window_frames=2)


def scheduler(num_pages: int = 16, **kw) -> _native.Scheduler:
    # 24 tokens per frame in 16-token pages: 2 pages per frame.
    args = dict(num_pages=num_pages, page_tokens=16, tokens_per_frame=24, max_batch_tokens=96)
    return _native.Scheduler(**(args | kw))


def frame(h: int = 4, w: int = 5, c: int = 3, dtype=np.uint8) -> np.ndarray:
    return np.zeros((h, w, c), dtype=dtype)


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (errors.ConfigError, ValueError),
        (errors.UnknownStreamError, KeyError),
        (errors.StreamExistsError, ValueError),
        (errors.InvalidStateError, RuntimeError),
        (errors.UnknownPlanError, KeyError),
        (errors.BadPageError, ValueError),
        (errors.FrameShapeError, ValueError),
        (errors.FrameTimeoutError, TimeoutError),
        (errors.PagesExhaustedError, CrcmError),
        (errors.BufferClosedError, CrcmError),
    ],
)
def test_error_classes_derive_from_the_natural_builtin(cls, base):
    assert issubclass(cls, CrcmError) and issubclass(cls, base)


def test_key_errors_print_without_quotes():
    # KeyError's own __str__ would print "'unknown stream 7'"; CrcmError undoes that.
    with pytest.raises(UnknownStreamError) as info:
        scheduler().phase(7)
    assert str(info.value) == "unknown stream 7"


# ---- Scheduler construction --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "cls", "match"),
    [
        (dict(num_pages=0), ConfigError, "must be positive"),
        (dict(page_tokens=0), ConfigError, "must be positive"),
        (dict(tokens_per_frame=0), ConfigError, "must be positive"),
        (dict(max_batch_tokens=0), ConfigError, "must be positive"),
        (dict(max_batch_items=0), ConfigError, "must be positive"),
        (dict(num_pages=2**31), ConfigError, "over the limit"),
        (dict(num_pages=2**24 + 1), ConfigError, "over the limit"),
        (dict(max_batch_tokens=2**31), ConfigError, "int32"),
        (dict(num_pages=2**32), OverflowError, "num_pages"),
        (dict(num_pages=-1), OverflowError, "num_pages"),
        (dict(num_pages=None), TypeError, "num_pages"),
        (dict(num_pages="16"), TypeError, "num_pages"),
        (dict(num_pages=16.0), TypeError, "num_pages"),
        (dict(bogus=1), TypeError, "unexpected keyword argument 'bogus'"),
    ],
)
def test_scheduler_config_errors(kwargs, cls, match):
    # Conversion errors are PyO3's TypeError/OverflowError, with a note naming the argument.
    with pytest.raises(cls, match=match):
        scheduler(**kwargs)


def test_scheduler_requires_its_sizes():
    with pytest.raises(TypeError, match="num_pages"):
        _native.Scheduler(page_tokens=16, tokens_per_frame=24, max_batch_tokens=96)


# ---- open ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "cls", "match"),
    [
        (dict(chunk_frames=0), ConfigError, "chunk_frames must be positive"),
        (dict(chunk_frames=5), ConfigError, "over max_batch_tokens 96"),  # 120 tokens
        (dict(steps_per_chunk=[]), ConfigError, "steps_per_chunk must be non-empty"),
        (dict(steps_per_chunk=[2, 0]), ConfigError, "steps_per_chunk must be non-empty"),
        (dict(steps_per_chunk=[3]), ConfigError, "2 times given but a chunk takes 3 steps"),
        (dict(times=[0.5, 1.0]), ConfigError, "strictly decreasing"),
        (dict(times=[1.0, 1.0]), ConfigError, "strictly decreasing"),
        (dict(times=[1.5, 0.5]), ConfigError, "strictly decreasing in \\(0, 1\\]"),
        (dict(times=[1.0, 0.0]), ConfigError, "strictly decreasing"),
        (dict(times=[1.0, math.nan]), ConfigError, "strictly decreasing"),
        (dict(target_fps=0.0), ConfigError, "target_fps must be positive"),
        (dict(target_fps=-30.0), ConfigError, "target_fps must be positive"),
        (dict(target_fps=math.inf), ConfigError, "target_fps must be positive"),
        (dict(target_fps=math.nan), ConfigError, "target_fps must be positive"),
        (dict(max_frames=0), ConfigError, "max_frames must be positive"),
        (dict(window_frames=None), ConfigError, "memory is unbounded"),
        (dict(admission="Queue"), ConfigError, "admission must be 'refuse' or 'queue'"),
        (dict(admission=None), TypeError, "admission"),
        (dict(chunk_frames=None), TypeError, "chunk_frames"),
        (dict(chunk_frames=-1), OverflowError, "chunk_frames"),
        (dict(chunk_frames=2**32), OverflowError, "chunk_frames"),
        (dict(steps_per_chunk="2"), TypeError, "steps_per_chunk"),
        (dict(steps_per_chunk=[-1]), OverflowError, "steps_per_chunk"),
        (dict(steps_per_chunk=None), TypeError, "steps_per_chunk"),
        (dict(times="1.0"), TypeError, "times"),
        (dict(times=[1.0, "x"]), TypeError, "times"),
        (dict(cache_update="yes"), TypeError, "cache_update"),
        (dict(sink_frames=-1), OverflowError, "sink_frames"),
        (dict(window_frames=2**32), OverflowError, "window_frames"),
        (dict(max_frames=2**64), OverflowError, "max_frames"),
        (dict(target_fps="30"), TypeError, "target_fps"),
        (dict(needs_actions=None), TypeError, "needs_actions"),
    ],
)
def test_open_config_errors(override, cls, match):
    s = scheduler()
    with pytest.raises(cls, match=match):
        s.open(1, **(STREAM | override))
    # A refused open leaves nothing behind.
    assert s.stream_ids() == [] and s.stats()["pages_reserved"] == 0
    s.check_invariants()


@pytest.mark.parametrize("sid", [-1, 2**64, None, "1", 1.0])
def test_bad_stream_id_types(sid):
    s = scheduler()
    cls = OverflowError if isinstance(sid, int) else TypeError
    for call in (
        lambda: s.open(sid, **STREAM),
        lambda: s.phase(sid),
        lambda: s.close(sid),
        lambda: s.push_actions(sid, [1]),
        lambda: s.fork(sid, 2),
        lambda: s.stream_stats(sid),
        lambda: s.page_table(sid),
    ):
        with pytest.raises(cls):
            call()


def test_unknown_stream_everywhere():
    s = scheduler()
    s.open(1, **STREAM)
    for call in (
        lambda: s.phase(42),
        lambda: s.close(42),
        lambda: s.push_actions(42, [1]),
        lambda: s.fork(42, 43),
        lambda: s.stream_stats(42),
        lambda: s.page_table(42),
    ):
        with pytest.raises(UnknownStreamError, match=r"^unknown stream 42$"):
            call()
    s.close(1)
    with pytest.raises(UnknownStreamError, match="unknown stream 1"):
        s.close(1)  # closing twice


def test_stream_exists():
    s = scheduler()
    s.open(1, **STREAM)
    s.open(2, **STREAM)
    with pytest.raises(StreamExistsError, match=r"^stream 1 already exists$"):
        s.open(1, **STREAM)
    with pytest.raises(StreamExistsError, match="stream 2 already exists"):
        s.fork(1, 2)


def test_closing_stream_keeps_its_id_until_its_plan_ends():
    s = scheduler()
    s.open(1, **STREAM)
    plan = s.tick(0.0)
    s.close(1)
    with pytest.raises(UnknownStreamError):
        s.phase(1)  # closed for the caller
    with pytest.raises(StreamExistsError):
        s.open(1, **STREAM)  # but its pages are still being written
    s.complete(plan.id, 0.1)
    assert s.open(1, **STREAM) == "idle"


# ---- admission: PagesExhaustedError --------------------------------------------------------


def test_pages_exhausted_on_open_and_fork():
    # (sink 0 + window 2 + chunk 1) frames × 2 pages = 6 pages per stream; 16 pages hold two.
    s = scheduler(num_pages=16)
    s.open(1, **STREAM)
    s.open(2, **STREAM)
    with pytest.raises(PagesExhaustedError) as info:
        s.open(3, **STREAM)
    assert str(info.value) == (
        "not enough KV pages to admit stream 3: it needs 6 reserved pages, 4 of 16 are unreserved"
    )
    with pytest.raises(PagesExhaustedError, match="stream 4: it needs 6 reserved pages"):
        s.fork(1, 4)
    assert s.stream_ids() == [1, 2]
    s.check_invariants()


def test_queue_admission_waits_and_is_admitted_in_arrival_order():
    s = scheduler(num_pages=12)
    s.open(1, **STREAM)
    s.open(2, **STREAM)
    assert s.open(3, **STREAM, admission="queue") == "queued"
    assert s.open(4, **STREAM, admission="queue") == "queued"
    assert s.tick(0.0).stream_ids.tolist() == [1, 2]  # queued streams are not planned
    assert s.stats()["queued"] == 2
    s.close(2)  # in flight: its pages come back when the plan ends
    assert s.phase(3) == "queued"
    s.fail(0)
    assert (s.phase(3), s.phase(4)) == ("idle", "queued")
    s.close(1)
    assert s.phase(4) == "idle"
    s.check_invariants()


def test_reservation_over_capacity_is_refused_even_with_queue():
    s = scheduler(num_pages=4)
    with pytest.raises(PagesExhaustedError, match="it needs 6 reserved pages, 4 of 4"):
        s.open(1, **STREAM, admission="queue")


# ---- state errors ------------------------------------------------------------------------


def test_fork_needs_an_idle_source():
    s = scheduler()
    s.open(1, **STREAM)
    plan = s.tick(0.0)
    with pytest.raises(InvalidStateError, match=r"^stream 1: cannot fork while denoising"):
        s.fork(1, 2)
    s.complete(plan.id, 0.0)
    with pytest.raises(InvalidStateError, match="denoising \\(step 1\\)"):
        s.fork(1, 2)
    q = scheduler(num_pages=6)
    q.open(1, **STREAM)
    q.open(2, **STREAM, admission="queue")
    with pytest.raises(InvalidStateError, match="stream 2: cannot fork while queued"):
        q.fork(2, 3)


def test_actions_errors():
    s = scheduler()
    s.open(1, **STREAM)
    with pytest.raises(ConfigError, match="stream 1 was opened without actions"):
        s.push_actions(1, [0])
    s.open(2, **STREAM, needs_actions=True, max_frames=1)
    for bad, cls in [
        ([-1], ConfigError),
        ([0, -5], ConfigError),
        ([2**63], OverflowError),
        (None, TypeError),
        ("12", TypeError),
        ([1.5], TypeError),
        ([None], TypeError),
    ]:
        with pytest.raises(cls):
            s.push_actions(2, bad)
    with pytest.raises(ConfigError, match="actions must be >= 0, got -5"):
        s.push_actions(2, [0, -5])
    assert s.stream_stats(2)["pending_actions"] == 0  # a refused push adds nothing
    s.push_actions(2, np.array([3], dtype=np.int64))  # any integer sequence
    for _ in range(3):  # two steps, then finished (max_frames=1)
        plan = s.tick(1.0)
        s.complete(plan.id, 1.0)
    assert s.phase(2) == "finished"
    with pytest.raises(InvalidStateError, match="stream 2: cannot take actions while finished"):
        s.push_actions(2, [1])


def test_unknown_plan_and_completing_twice():
    s = scheduler()
    with pytest.raises(UnknownPlanError, match=r"^unknown plan 0 \(not in flight\)$"):
        s.complete(0, 0.0)
    s.open(1, **STREAM)
    plan = s.tick(0.0)
    s.complete(plan.id, 0.0)
    with pytest.raises(UnknownPlanError, match=f"unknown plan {plan.id}"):
        s.complete(plan.id, 0.0)
    with pytest.raises(UnknownPlanError):
        s.fail(plan.id)
    plan = s.tick(0.0)
    s.fail(plan.id)
    with pytest.raises(UnknownPlanError):
        s.complete(plan.id, 0.0)
    for bad, cls in [(-1, OverflowError), (2**64, OverflowError), (None, TypeError)]:
        with pytest.raises(cls):
            s.complete(bad)
        with pytest.raises(cls):
            s.fail(bad)
    s.check_invariants()


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_tick_needs_a_finite_clock(now):
    s = scheduler()
    s.open(1, **STREAM)
    with pytest.raises(ConfigError, match="now must be finite"):
        s.tick(now)
    assert s.tick(0.0) is not None  # nothing was planned by the refused tick


def test_complete_needs_a_finite_clock():
    s = scheduler()
    s.open(1, **STREAM)
    plan = s.tick(0.0)
    with pytest.raises(ConfigError, match="now must be finite"):
        s.complete(plan.id, math.nan)


def test_huge_max_frames_is_refused_or_runs():
    # ceil(max_frames / 2) * 2 once wrapped to 0 in u64: the stream was admitted with 0 pages
    # reserved and then never planned (its first allocation exceeded the reservation).
    s = scheduler()
    try:
        s.open(1, **(STREAM | dict(chunk_frames=2, window_frames=None, max_frames=2**64 - 1)))
    except ConfigError:
        return
    assert s.tick(0.0) is not None


# ---- frame buffer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "cls", "match"),
    [
        ((0, 5), {}, ConfigError, "positive capacity and frame shape"),
        ((4, 5, 0), {}, ConfigError, "positive capacity and frame shape"),
        ((4, 5), dict(capacity=0), ConfigError, "got capacity 0"),
        ((4, 5), dict(target_fps=0.0), ConfigError, "target_fps must be positive"),
        ((4, 5), dict(target_fps=math.nan), ConfigError, "target_fps must be positive"),
        ((4, 5), dict(target_fps=math.inf), ConfigError, "target_fps must be positive"),
        ((4, 5), dict(backpressure="drop"), ConfigError, "'block' or 'drop_oldest'"),
        ((-4, 5), {}, OverflowError, "height"),
        ((None, 5), {}, TypeError, "height"),
        ((4, 5), dict(capacity="8"), TypeError, "capacity"),
        ((4, 5), dict(backpressure=None), TypeError, "backpressure"),
    ],
)
def test_frame_buffer_config_errors(args, kwargs, cls, match):
    with pytest.raises(cls, match=match):
        _native.FrameBuffer(*args, **kwargs)


def test_frame_shape_and_dtype_errors():
    fb = _native.FrameBuffer(4, 5)
    with pytest.raises(FrameShapeError, match=r"must have shape \[4, 5, 3\], got \[5, 4, 3\]"):
        fb.push(frame(5, 4), 0)
    with pytest.raises(FrameShapeError, match=r"got \[60\]"):
        fb.push(np.zeros(60, np.uint8), 0)
    with pytest.raises(TypeError, match="uint8 array, got ndarray of dtype float32"):
        fb.push(frame(dtype=np.float32), 0)
    with pytest.raises(TypeError, match="uint8 array, got ndarray of dtype int64"):
        fb.push(frame(dtype=np.int64), 0)
    with pytest.raises(TypeError, match="uint8 array, got list"):
        fb.push(frame().tolist(), 0)
    with pytest.raises(TypeError, match="uint8 array, got NoneType"):
        fb.push(None, 0)
    for index, cls in [(-1, OverflowError), (2**64, OverflowError), (None, TypeError)]:
        with pytest.raises(cls):
            fb.push(frame(), index)
    with pytest.raises(TypeError):
        fb.push(frame(), 0, timestamp="now")
    assert len(fb) == 0 and fb.stats()["pushed"] == 0  # nothing refused got in


def test_timeouts_and_bad_timeouts():
    fb = _native.FrameBuffer(4, 5, capacity=1)
    t0 = time.perf_counter()
    with pytest.raises(FrameTimeoutError, match=r"^timed out after 0\.050 s$"):
        fb.pop(timeout=0.05)
    assert time.perf_counter() - t0 >= 0.04
    fb.push(frame(), 0)
    with pytest.raises(FrameTimeoutError, match=r"^timed out after 0\.000 s$"):
        fb.push(frame(), 1, timeout=0.0)  # full, block: no room within the timeout
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="timeout must be >= 0 seconds"):
            fb.pop(timeout=bad)
        with pytest.raises(ConfigError, match="timeout must be >= 0 seconds"):
            fb.push(frame(), 1, timeout=bad)
    with pytest.raises(TypeError):
        fb.pop(timeout="1")
    assert fb.stats() == dict(len=1, pushed=1, popped=0, dropped=0)


@pytest.mark.parametrize("timeout", [1e9, 1e19, 1e20, 1e300])
def test_huge_timeouts_mean_forever_not_a_panic(timeout):
    # Duration::from_secs_f64 panics above u64::MAX s and Instant + Duration overflows far
    # below: the binding treats such timeouts as "no timeout".
    fb = _native.FrameBuffer(4, 5)
    fb.push(frame(), 0, timeout=timeout)
    assert fb.pop(timeout=timeout)[1] == 0


def test_closed_buffer():
    fb = _native.FrameBuffer(4, 5)
    fb.push(frame(), 0)
    fb.close()
    assert fb.closed
    with pytest.raises(BufferClosedError, match=r"^frame buffer is closed$"):
        fb.push(frame(), 1)
    assert fb.pop(timeout=0.0)[1] == 0  # what was pushed before close still drains
    assert fb.pop(timeout=0.0) is None and fb.pop() is None and fb.try_pop() is None


def test_close_fails_a_blocked_push():
    fb = _native.FrameBuffer(4, 5, capacity=1)
    fb.push(frame(), 0)
    result: list[BaseException] = []

    def producer():
        try:
            fb.push(frame(), 1, timeout=5.0)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.05)
    fb.close()
    t.join(2.0)
    assert not t.is_alive() and isinstance(result[0], BufferClosedError)


def test_tiny_target_fps_is_refused_or_works():
    # 1 / 1e-300 s does not fit a Duration: FrameBuffer::pop once panicked after taking the
    # frame off the ring (the frame was lost). 1e-19 fps overflowed Instant + Duration.
    try:
        fb = _native.FrameBuffer(4, 5, target_fps=1e-300)
    except ConfigError:
        return
    fb.push(frame(), 0)
    fb.push(frame(), 1)
    try:
        assert fb.pop(timeout=0.01)[1] == 0
    except BaseException as e:
        assert type(e).__name__ != "PanicException", str(e)
        raise


# ---- fuzz: no panic escapes ----------------------------------------------------------------

WEIRD = st.one_of(
    st.integers(-(2**65), 2**65),
    st.integers(0, 8),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 1e-19, 1e19, 1e300, -0.0, 0.5]),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
    st.sampled_from(["refuse", "queue", "block", "drop_oldest"]),
    st.lists(st.integers(-3, 2**64), max_size=3),
    st.lists(st.floats(-2, 2), max_size=3),
    st.sampled_from(
        [
            np.zeros((2, 3, 1), np.uint8),
            np.zeros((2, 3), np.uint8),
            np.zeros((2, 3, 1), np.float32),
            np.zeros((3, 2, 1), np.uint8)[::-1],
        ]
    ),
)
OPEN_KEYS = [
    "chunk_frames",
    "steps_per_chunk",
    "times",
    "cache_update",
    "sink_frames",
    "window_frames",
    "max_frames",
    "target_fps",
    "needs_actions",
    "admission",
]
OPEN_VALID = dict(
    chunk_frames=1, steps_per_chunk=[1], times=[1.0], window_frames=1, needs_actions=True
)


@st.composite
def calls(draw: st.DrawFn):
    """(target, method, args, kwargs): a valid-ish call with some arguments replaced."""
    small = st.integers(0, 3)
    method = draw(
        st.sampled_from(
            [
                "open",
                "fork",
                "push_actions",
                "close",
                "tick",
                "complete",
                "fail",
                "phase",
                "stream_stats",
                "page_table",
                "stats",
                "push",
                "pop",
                "try_pop",
                "fb_close",
                "new_fb",
                "new_sched",
            ]
        )
    )
    if method == "open":
        kwargs = dict(OPEN_VALID)
        for key in draw(st.lists(st.sampled_from(OPEN_KEYS), max_size=3)):
            kwargs[key] = draw(WEIRD)
        return method, [draw(st.one_of(small, WEIRD))], kwargs
    if method in ("fork",):
        return method, [draw(st.one_of(small, WEIRD)), draw(st.one_of(small, WEIRD))], {}
    if method == "push_actions":
        return method, [draw(st.one_of(small, WEIRD)), draw(st.one_of(st.just([1, 2]), WEIRD))], {}
    if method in ("close", "phase", "stream_stats", "page_table", "fail"):
        return method, [draw(st.one_of(small, WEIRD))], {}
    if method == "tick":
        return method, [draw(st.one_of(st.floats(0, 10), WEIRD))], {}
    if method == "complete":
        return method, [draw(st.one_of(small, WEIRD)), draw(st.one_of(st.floats(0, 10), WEIRD))], {}
    if method == "push":
        return (
            method,
            [
                draw(st.one_of(st.just(np.zeros((2, 3, 1), np.uint8)), WEIRD)),
                draw(st.one_of(small, WEIRD)),
            ],
            dict(
                timestamp=draw(st.one_of(st.none(), WEIRD)),
                timeout=draw(st.one_of(st.none(), WEIRD)),
            ),
        )
    if method == "pop":
        return method, [], dict(timeout=draw(WEIRD))
    if method in ("new_fb", "new_sched"):
        return method, [draw(WEIRD) for _ in range(4)], {}
    return method, [], {}


def is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException" or "pyo3_runtime" in type(e).__module__


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(calls(), min_size=1, max_size=40))
def test_fuzz_no_panic_escapes(sequence):
    sched = scheduler(num_pages=12)
    # Drop-oldest with no pacing: push and pop never wait, whatever the timeout.
    fb = _native.FrameBuffer(2, 3, 1, capacity=2, backpressure="drop_oldest")
    for method, args, kwargs in sequence:
        try:
            if method == "push":
                fb.push(*args, **kwargs)
            elif method == "pop":
                if len(fb):  # an empty buffer with a valid long timeout would wait for real
                    fb.pop(**kwargs)
            elif method == "try_pop":
                fb.try_pop()
            elif method == "fb_close":
                fb.close()
            elif method == "new_fb":
                h, w, c, cap = args
                _native.FrameBuffer(h, w, c, capacity=cap)
            elif method == "new_sched":
                n, pt, tpf, mbt = args
                # Keep the pool small: a valid num_pages near 2**24 would allocate 1 GiB of
                # torch-free bookkeeping per call.
                n = n if not isinstance(n, int) or n < 0 or n > 2**24 else n % 64
                _native.Scheduler(
                    num_pages=n, page_tokens=pt, tokens_per_frame=tpf, max_batch_tokens=mbt
                )
            else:
                getattr(sched, method)(*args, **kwargs)
        except BaseException as e:
            assert not is_panic(e), f"{method}{args}{kwargs} panicked: {e}"
            assert isinstance(e, (CrcmError, TypeError, OverflowError, ValueError)), repr(e)
            assert str(e), f"{method} raised {type(e).__name__} without a message"
        sched.check_invariants()
    # Whatever happened, closing everything returns every page.
    for sid in sched.stream_ids():
        sched.close(sid)
    for pid in range(200):
        with contextlib.suppress(UnknownPlanError):
            sched.complete(pid, 0.0)
    stats = sched.stats()
    assert stats["pages_used"] == stats["pages_reserved"] == stats["streams"] == 0


def test_error_messages_are_one_readable_line():
    """Every message names what was wrong, on one line, without Rust debug noise."""
    s = scheduler()
    msgs = []
    for call in (
        lambda: s.open(1, **(STREAM | dict(times=[0.2, 0.9]))),
        lambda: s.phase(9),
        lambda: s.complete(9),
        lambda: _native.FrameBuffer(0, 1),
    ):
        with pytest.raises(CrcmError) as info:
            call()
        msgs.append(str(info.value))
    for m in msgs:
        assert "\n" not in m and "Err(" not in m and "panicked" not in m and len(m) < 200
        assert re.search(r"\d", m), m  # names the offending value or id


def test_admission_is_first_come_first_served():
    """A stream that would fit does not overtake streams already waiting for pages."""
    s = _native.Scheduler(num_pages=8, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64)
    big = dict(chunk_frames=1, steps_per_chunk=[1], times=[1.0], window_frames=5)
    small = dict(chunk_frames=1, steps_per_chunk=[1], times=[1.0], window_frames=1)
    assert s.open(1, **big) == "idle"  # 6 of 8 pages reserved
    assert s.open(2, **big, admission="queue") == "queued"  # needs 6, 2 left
    with pytest.raises(PagesExhaustedError, match="waiting for KV pages"):
        s.open(3, **small)  # needs 2 and 2 are free, but stream 2 came first
    assert s.open(3, **small, admission="queue") == "queued"
    s.close(1)
    assert s.phase(2) == "idle" and s.phase(3) == "idle"  # admitted in arrival order
