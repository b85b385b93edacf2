"""pytest-benchmark benchmarks of the streaming runtime through PyO3 (design §3).

    python -m pytest benches/test_bench_runtime.py --benchmark-enable --benchmark-json=/tmp/b.json
    python benches/record_runtime_bench.py   # runs this file and writes benches/results/

- One full scheduler tick as the executor sees it, FFI included: ``tick`` → read every plan
  array once → ``complete``, with 1 and 64 streams in steady state: c1, a 1-step schedule and
  noisy context (``cache_update=False``), so every tick plans one item per stream; sink + window
  so memory is flat; no actions to top up. Target: ≤ 20 µs at 64 streams.
- ``FrameBuffer`` push + pop of one 64×64×3 uint8 frame (one copy in, zero-copy out).

With the repo's default ``--benchmark-disable`` each benchmark runs once, as a smoke test.
"""

from __future__ import annotations

import numpy as np
import pytest

from crcm import _native

PLAN_ARRAYS = (
    "stream_ids", "chunk_index", "kind", "step", "num_steps", "s", "s_next", "emits_frames",
    "frame_start", "num_frames", "q_cu_seqlens", "kv_indptr", "kv_page_ids", "kv_page_lens",
    "kv_frames", "write_indptr", "write_page_ids", "frame_indptr", "actions",
)  # fmt: skip
TOKENS_PER_FRAME = 1560  # wan2.1-1.3b at 480×832: one latent frame
SINK, WINDOW = 1, 12


class SteadyState:
    """``streams`` c1 streams whose windows are already full, and a fake clock."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.sched = _native.Scheduler(
            num_pages=streams * (SINK + WINDOW + 1),  # exactly the reservations: one page/frame
            page_tokens=1600,
            tokens_per_frame=TOKENS_PER_FRAME,
            max_batch_tokens=streams * TOKENS_PER_FRAME,
            max_batch_items=streams,
        )
        for i in range(streams):
            self.sched.open(
                i, chunk_frames=1, steps_per_chunk=[1], times=[1.0], cache_update=False,
                sink_frames=SINK, window_frames=WINDOW, target_fps=30.0,
            )  # fmt: skip
        self.now = 0.0
        for _ in range(2 * (SINK + WINDOW)):  # fill every window: eviction on every tick
            self.one_tick()
        self.pages_used = self.sched.stats()["pages_used"]

    def one_tick(self) -> int:
        self.now += 1e-3
        plan = self.sched.tick(self.now)
        for name in PLAN_ARRAYS:  # the executor reads each array once (as torch.from_numpy)
            getattr(plan, name)
        self.sched.complete(plan.id, self.now)
        return len(plan)


@pytest.mark.parametrize("streams", [1, 64])
def test_tick_read_complete(benchmark, streams):
    state = SteadyState(streams)
    benchmark.group = "scheduler tick incl. FFI"
    benchmark.extra_info["streams"] = streams
    items = benchmark(state.one_tick)
    # Steady state held: one item per stream on every tick, memory flat, invariants intact.
    assert items == streams
    assert state.sched.stats()["pages_used"] == state.pages_used
    state.sched.check_invariants()


def test_frame_buffer_push_pop(benchmark):
    fb = _native.FrameBuffer(64, 64, 3, capacity=8, backpressure="drop_oldest")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def push_pop():
        fb.push(frame, 0, 0.0)
        return fb.pop(0.0)

    benchmark.group = "frame buffer"
    out, index, _ = benchmark(push_pop)
    np.testing.assert_array_equal(out, frame)
    assert index == 0 and len(fb) == 0
