"""``crcm._native.FrameBuffer`` from Python: round trip, zero-copy hand-over, backpressure,
blocking with the GIL released, thread safety, pacing and close (rust/crcm-core/src/frames.rs).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from crcm import _native
from crcm.errors import FrameTimeoutError

H, W, C = 4, 6, 3


def frame(value: int) -> np.ndarray:
    """A frame whose bytes all differ, offset by ``value``, so mix-ups show."""
    return ((np.arange(H * W * C) + value) % 256).astype(np.uint8).reshape(H, W, C)


def test_round_trip_values_index_timestamp():
    fb = _native.FrameBuffer(H, W, C, capacity=4)
    assert fb.shape == (H, W, C) and len(fb) == 0 and not fb.closed
    fb.push(frame(1), 10, timestamp=1.5)
    fb.push(np.asfortranarray(frame(2)), 11, timestamp=2.5)  # non-contiguous input is copied
    fb.push(frame(3)[::1, ::1], 12)  # default timestamp: the runtime's monotonic clock
    assert len(fb) == 3
    for value, index, ts in [(1, 10, 1.5), (2, 11, 2.5)]:
        arr, got_index, got_ts = fb.pop(timeout=0)
        assert arr.dtype == np.uint8 and arr.shape == (H, W, C) and arr.flags.c_contiguous
        np.testing.assert_array_equal(arr, frame(value))
        assert (got_index, got_ts) == (index, ts)
    arr, index, ts = fb.try_pop()
    np.testing.assert_array_equal(arr, frame(3))
    assert index == 12 and 0 <= ts <= _native.monotonic()
    assert fb.try_pop() is None
    assert fb.stats() == dict(len=0, pushed=3, popped=3, dropped=0)


def test_push_copies_its_input():
    fb = _native.FrameBuffer(H, W, C)
    src = frame(5)
    fb.push(src, 0)
    src[:] = 0  # the caller may reuse its array right after push
    np.testing.assert_array_equal(fb.pop(timeout=0)[0], frame(5))


@pytest.mark.parametrize("method", ["pop", "try_pop"])
def test_pop_hands_the_rust_allocation_to_numpy(method):
    fb = _native.FrameBuffer(H, W, C)
    fb.push(frame(7), 0)
    arr = getattr(fb, method)()[0]
    # No numpy copy anywhere: every array on the base chain is a view, and the chain ends in
    # the object that keeps Rust's Vec alive (not an ndarray that owns a copy).
    assert arr.flags.owndata is False
    base = arr.base
    while isinstance(base, np.ndarray):
        assert base.flags.owndata is False
        base = base.base
    assert base is not None and not isinstance(base, (bytes, bytearray))
    # torch sees the same memory, and writes through it.
    t = torch.from_numpy(arr)
    assert t.data_ptr() == arr.ctypes.data
    t[0, 0, 0] = 255
    assert arr[0, 0, 0] == 255


def test_drop_oldest_keeps_the_newest():
    fb = _native.FrameBuffer(H, W, C, capacity=3, backpressure="drop_oldest")
    for i in range(7):
        fb.push(frame(i), i, timeout=0)  # never waits, whatever the timeout
    assert len(fb) == 3
    assert fb.stats() == dict(len=3, pushed=7, popped=0, dropped=4)
    got = [fb.pop(timeout=0) for _ in range(3)]
    assert [g[1] for g in got] == [4, 5, 6]
    for arr, i, _ in got:
        np.testing.assert_array_equal(arr, frame(i))


def test_block_times_out_when_full():
    fb = _native.FrameBuffer(H, W, C, capacity=2)
    fb.push(frame(0), 0)
    fb.push(frame(1), 1)
    t0 = time.perf_counter()
    with pytest.raises(FrameTimeoutError):
        fb.push(frame(2), 2, timeout=0.05)
    assert time.perf_counter() - t0 >= 0.04
    assert fb.stats() == dict(len=2, pushed=2, popped=0, dropped=0)  # nothing was dropped


def test_blocked_producer_is_released_by_a_pop():
    fb = _native.FrameBuffer(H, W, C, capacity=1)
    fb.push(frame(0), 0)
    done = threading.Event()

    def producer():
        fb.push(frame(1), 1, timeout=5.0)  # blocks: the ring is full
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.1), "push should block while the buffer is full"
    assert fb.pop(timeout=1.0)[1] == 0  # makes room...
    assert done.wait(2.0), "...which must wake the producer"
    t.join()
    assert fb.pop(timeout=1.0)[1] == 1


def test_gil_is_released_while_pop_waits():
    fb = _native.FrameBuffer(H, W, C)
    started = threading.Event()
    outcome: list[BaseException] = []

    def consumer():
        started.set()
        try:
            fb.pop(timeout=2.0)  # empty: waits the full 2 s
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=consumer)
    t.start()
    started.wait()
    time.sleep(0.02)  # let the consumer enter pop
    # Pure-Python work needs the GIL; had pop kept it, this would only finish after 2 s.
    t0 = time.perf_counter()
    n = 0
    for i in range(300_000):
        n += i
    elapsed = time.perf_counter() - t0
    assert t.is_alive(), "pop returned early"
    assert elapsed < 1.0, f"main thread starved for {elapsed:.2f} s: GIL held during pop"
    t.join()
    assert isinstance(outcome[0], FrameTimeoutError)


def test_gil_is_released_while_push_waits():
    fb = _native.FrameBuffer(H, W, C, capacity=1)
    fb.push(frame(0), 0)
    outcome: list[BaseException] = []

    def producer():
        try:
            fb.push(frame(1), 1, timeout=1.5)  # full: waits the full 1.5 s
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    sum(range(300_000))
    assert t.is_alive() and time.perf_counter() - t0 < 0.75
    t.join()
    assert isinstance(outcome[0], FrameTimeoutError)


def test_two_producers_one_consumer_counts_add_up():
    fb = _native.FrameBuffer(H, W, C, capacity=4, backpressure="drop_oldest")
    per_producer = 500
    popped: list[int] = []
    producers_done = threading.Event()

    def producer(p: int):
        for i in range(per_producer):
            fb.push(frame(i), p * per_producer + i)

    def consumer():
        while not (producers_done.is_set() and len(fb) == 0):
            got = fb.try_pop()
            if got is None:
                time.sleep(0)  # let a producer run
                continue
            arr, index, _ = got
            np.testing.assert_array_equal(arr, frame(index % per_producer))  # never torn
            popped.append(index)
            if len(popped) % 50 == 0:
                break  # stop early: some frames stay in the ring

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(2)]
    cons = threading.Thread(target=consumer)
    for t in [*threads, cons]:
        t.start()
    for t in threads:
        t.join()
    producers_done.set()
    cons.join()
    s = fb.stats()
    assert s["pushed"] == 2 * per_producer
    assert (
        s["pushed"] == s["popped"] + s["dropped"] + s["len"] == len(popped) + s["dropped"] + len(fb)
    )
    # Each producer's frames come out in its own order (a ring is FIFO).
    for p in range(2):
        mine = [i for i in popped if i // per_producer == p]
        assert mine == sorted(mine)
    assert len(set(popped)) == len(popped)


def test_pacing_at_target_fps():
    fps = 50.0
    fb = _native.FrameBuffer(H, W, C, capacity=8, target_fps=fps)
    for i in range(6):
        fb.push(frame(i), i)
    t0 = time.perf_counter()
    got = [fb.pop(timeout=2.0)[1] for _ in range(6)]
    elapsed = time.perf_counter() - t0
    assert got == list(range(6))
    # The first frame leaves at once, then one per period: at least 5 periods (lower bound
    # only, minus a little clock slack; a loaded machine may be slower, never faster).
    assert elapsed >= 5 / fps * 0.9, elapsed
    # try_pop ignores pacing.
    fb.push(frame(9), 9)
    fb.push(frame(10), 10)
    assert fb.try_pop()[1] == 9 and fb.try_pop()[1] == 10


def test_pacing_wait_is_bounded_by_timeout():
    fb = _native.FrameBuffer(H, W, C, target_fps=1.0)
    fb.push(frame(0), 0)
    fb.push(frame(1), 1)
    assert fb.pop(timeout=0)[1] == 0
    with pytest.raises(FrameTimeoutError):
        fb.pop(timeout=0.05)  # the next frame is due in 1 s
    assert len(fb) == 1  # and it was not lost


def test_close_wakes_a_blocked_pop():
    fb = _native.FrameBuffer(H, W, C)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(fb.pop(timeout=5.0)))
    t.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    fb.close()
    t.join(2.0)
    assert not t.is_alive() and time.perf_counter() - t0 < 1.0
    assert result == [None]  # closed and empty
