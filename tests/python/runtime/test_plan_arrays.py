"""The arrays of ``crcm._native.Plan``: dtypes, shapes, layout, zero-copy into torch, and a
worked example with exact values through several ticks (eviction with sinks, fork).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crcm import _native

# name -> (dtype, length: "n" items, "n+1" offsets, or the flat array its offsets index)
ARRAYS = {
    "stream_ids": (np.uint64, "n"),
    "chunk_index": (np.uint64, "n"),
    "kind": (np.uint8, "n"),
    "step": (np.uint32, "n"),
    "num_steps": (np.uint32, "n"),
    "s": (np.float32, "n"),
    "s_next": (np.float32, "n"),
    "emits_frames": (np.bool_, "n"),
    "frame_start": (np.int64, "n"),
    "num_frames": (np.uint32, "n"),
    "q_cu_seqlens": (np.int32, "n+1"),
    "kv_indptr": (np.int32, "n+1"),
    "kv_page_ids": (np.int32, "kv_indptr"),
    "kv_page_lens": (np.int32, "kv_indptr"),
    "kv_frames": (np.int64, "kv_indptr"),
    "write_indptr": (np.int32, "n+1"),
    "write_page_ids": (np.int32, "write_indptr"),
    "frame_indptr": (np.int32, "n+1"),
    "actions": (np.int64, "frame_indptr"),
}

TIMES = [1.0, 0.5]
TPF = 24  # tokens per frame; 16-token pages: 2 pages per frame, the second 8 tokens long


def make_scheduler(num_pages: int = 64) -> _native.Scheduler:
    return _native.Scheduler(
        num_pages=num_pages, page_tokens=16, tokens_per_frame=TPF, max_batch_tokens=8 * TPF
    )


def check_layout(plan) -> None:
    n = len(plan)
    for name, (dtype, length) in ARRAYS.items():
        a = getattr(plan, name)
        assert isinstance(a, np.ndarray) and a.ndim == 1, name
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert a.flags.c_contiguous, name
        expected = {"n": n, "n+1": n + 1}.get(length) or int(getattr(plan, length)[-1])
        assert len(a) == expected, f"{name}: {len(a)} != {expected}"
        t = torch.from_numpy(a)  # no copy: the tensor views the plan's memory
        assert t.numel() == len(a)
        if len(a):
            assert t.data_ptr() == a.ctypes.data, name
    for name in ("q_cu_seqlens", "kv_indptr", "write_indptr", "frame_indptr"):
        a = getattr(plan, name)
        assert a[0] == 0 and (np.diff(a) >= 0).all(), name


def test_layout_on_a_mixed_plan():
    s = make_scheduler()
    s.open(1, chunk_frames=1, steps_per_chunk=[2], times=TIMES, window_frames=2, needs_actions=True)
    s.open(
        2,
        chunk_frames=3,
        steps_per_chunk=[1],
        times=TIMES,
        cache_update=False,
        window_frames=3,
        sink_frames=1,
    )
    s.push_actions(1, [4, 5])
    for now in range(6):
        plan = s.tick(float(now))
        check_layout(plan)
        assert repr(plan).startswith(f"Plan(id={plan.id}, items={len(plan)}, tokens=")
        s.complete(plan.id, float(now))


def test_tensor_shares_memory_with_the_plan():
    s = make_scheduler()
    s.open(1, chunk_frames=1, steps_per_chunk=[1], times=TIMES, window_frames=1)
    plan = s.tick(0.0)
    t = torch.from_numpy(plan.q_cu_seqlens)
    t[1] = 123  # a write through the tensor is visible in the array: same buffer
    assert plan.q_cu_seqlens[1] == 123
    assert plan.kv_page_ids is plan.kv_page_ids  # an attribute, not rebuilt per access


def items(plan) -> list[dict]:
    """The plan, item by item, as plain Python values."""
    out = []
    for i in range(len(plan)):
        kv = slice(plan.kv_indptr[i], plan.kv_indptr[i + 1])
        wr = slice(plan.write_indptr[i], plan.write_indptr[i + 1])
        fr = slice(plan.frame_indptr[i], plan.frame_indptr[i + 1])
        out.append(
            dict(
                stream=int(plan.stream_ids[i]),
                chunk=int(plan.chunk_index[i]),
                kind=int(plan.kind[i]),
                step=(int(plan.step[i]), int(plan.num_steps[i])),
                s=(float(plan.s[i]), float(plan.s_next[i])),
                emits=bool(plan.emits_frames[i]),
                frames=(int(plan.frame_start[i]), int(plan.num_frames[i])),
                q=(int(plan.q_cu_seqlens[i]), int(plan.q_cu_seqlens[i + 1])),
                kv=plan.kv_page_ids[kv].tolist(),
                kv_lens=plan.kv_page_lens[kv].tolist(),
                kv_frames=plan.kv_frames[kv].tolist(),
                writes=plan.write_page_ids[wr].tolist(),
                actions=plan.actions[fr].tolist(),
            )
        )
    return out


def test_worked_example_two_streams_with_eviction_and_fork():
    """Stream A: c1, 2 steps, cache update, 1 sink + window 1, actions, 30 fps.
    Stream B: c3, 1 step, noisy context (no cache update), window 3, best effort.
    Pages are handed out lowest id first, two per frame (16 + 8 valid tokens)."""
    s = make_scheduler()
    s.open(
        1,
        chunk_frames=1,
        steps_per_chunk=[2],
        times=TIMES,
        cache_update=True,
        sink_frames=1,
        window_frames=1,
        needs_actions=True,
        target_fps=30.0,
    )
    s.open(2, chunk_frames=3, steps_per_chunk=[1], times=TIMES, cache_update=False, window_frames=3)
    s.push_actions(1, [7, 8, 9])

    # Tick 0: both start their first chunk. A (deadline 1/30 s) before B (best effort).
    plan = s.tick(0.0)
    check_layout(plan)
    a, b = items(plan)
    assert a == dict(
        stream=1,
        chunk=0,
        kind=0,
        step=(0, 2),
        s=(1.0, 0.5),
        emits=False,
        frames=(0, 1),
        q=(0, 24),
        kv=[],
        kv_lens=[],
        kv_frames=[],
        writes=[],
        actions=[7],
    )
    # B: its only step emits and (noisy context) writes its 3 frames' K/V: pages 2..7.
    assert b == dict(
        stream=2,
        chunk=0,
        kind=0,
        step=(0, 1),
        s=(1.0, 0.0),
        emits=True,
        frames=(0, 3),
        q=(24, 96),
        kv=[],
        kv_lens=[],
        kv_frames=[],
        writes=[2, 3, 4, 5, 6, 7],
        actions=[-1, -1, -1],
    )
    s.complete(plan.id, 0.01)

    # Tick 1: A's last step emits frame 0 (no write: its cache update follows); B starts
    # chunk 1 over its 3 committed frames.
    a, b = items(s.tick(0.02))
    assert (a["step"], a["s"], a["emits"], a["writes"]) == ((1, 2), (0.5, 0.0), True, [])
    assert b["chunk"] == 1 and b["frames"] == (3, 3)
    assert b["kv"] == [2, 3, 4, 5, 6, 7] and b["kv_frames"] == [0, 0, 1, 1, 2, 2]
    assert b["kv_lens"] == [16, 8] * 3 and b["writes"] == [8, 9, 10, 11, 12, 13]
    s.complete(1, 0.03)
    assert s.stream_stats(1)["last_latency_s"] == pytest.approx(0.03)

    # Tick 2: A's cache update at time 0 writes frame 0 into pages 0, 1. B's window of 3 has
    # evicted frames 0..2: its context is frames 3..5, and pages 2..7 are free again.
    a, b = items(s.tick(0.04))
    assert a == dict(
        stream=1,
        chunk=0,
        kind=1,
        step=(2, 2),
        s=(0.0, 0.0),
        emits=False,
        frames=(0, 1),
        q=(0, 24),
        kv=[],
        kv_lens=[],
        kv_frames=[],
        writes=[0, 1],
        actions=[7],
    )
    assert b["kv"] == [8, 9, 10, 11, 12, 13] and b["kv_frames"] == [3, 3, 4, 4, 5, 5]
    assert b["writes"] == [7, 6, 5, 4, 3, 2]  # freed pages, reused last-freed first
    s.complete(2, 0.05)
    assert s.page_table(2)[0].tolist() == [6, 7, 8]

    # A: chunks 1 and 2. Frame 0 is a sink; the window keeps one more frame.
    for expected_context in ([0], [0, 1]):
        plan = s.tick(1.0)
        a = items(plan)[0]
        assert a["kv_frames"] == [f for f in expected_context for _ in range(2)]
        assert a["actions"] == [8 + len(expected_context) - 1]
        s.complete(plan.id, 1.0)
        while s.phase(1) != "idle":
            s.complete(s.tick(1.0).id, 1.0)
    frames, pages = s.page_table(1)
    assert frames.tolist() == [0, 2]  # frame 1 evicted, sink 0 stays
    assert pages[0].tolist() == [0, 1]

    # Fork A (idle, no actions left): the child's first plan reads the parent's resident pages.
    s.fork(1, 3)
    used = s.stats()["pages_used"]
    assert s.stream_stats(3)["frames_emitted"] == 3
    s.push_actions(3, [42])
    plan = s.tick(2.0)
    c = next(it for it in items(plan) if it["stream"] == 3)
    assert c["kv"] == pages.reshape(-1).tolist() and c["kv_frames"] == [0, 0, 2, 2]
    assert c["frames"] == (3, 1) and c["actions"] == [42]
    assert not set(c["writes"]) & set(c["kv"])  # the child writes its own new pages
    # Closing the parent keeps the shared pages: the child still holds them.
    s.close(1)
    s.complete(plan.id, 2.0)
    assert s.page_table(3)[1][:2].reshape(-1).tolist() == pages.reshape(-1).tolist()
    assert s.stats()["pages_used"] == used + 2  # child's new frame; shared ones kept
    s.check_invariants()
    for sid in s.stream_ids():
        s.close(sid)
    assert s.stats()["pages_used"] == 0
