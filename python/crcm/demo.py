"""A short streaming demo of the runtime: many streams, one scheduler, paced frame buffers.

Until the shipped world model lands, a procedural *stand-in executor* renders each stream's
frames: a ball bounces, a paddle follows the stream's actions. Everything around it is the real
runtime path: the Rust scheduler batches the streams' chunks (c1-1 and c3-3 side by side) into
plans with per-chunk step schedules, a time-0 cache-update pass and sink + window eviction; the
executor walks every plan item (a model would run one batched forward per plan here), emitted
frames go through each stream's `FrameBuffer`, and KV page usage stays flat however long the
streams run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from crcm import _native

ACTIONS = ("noop", "left", "right")


@dataclass
class _World:
    """A 1-paddle, 1-ball toy game: the stand-in for a world model's state."""

    size: int
    rng: np.random.Generator
    ball: np.ndarray = field(init=False)
    velocity: np.ndarray = field(init=False)
    paddle: float = field(init=False)

    def __post_init__(self) -> None:
        self.ball = self.rng.uniform(4, self.size - 4, size=2)
        self.velocity = self.rng.choice([-1.5, 1.5], size=2)
        self.paddle = self.size / 2

    def step(self, action: int) -> np.ndarray:
        self.paddle = float(np.clip(self.paddle + (0, -2, 2)[action], 4, self.size - 4))
        self.ball += self.velocity
        for axis in range(2):
            if not 1 <= self.ball[axis] <= self.size - 2:
                self.velocity[axis] *= -1
                self.ball[axis] = np.clip(self.ball[axis], 1, self.size - 2)
        frame = np.zeros((self.size, self.size, 3), np.float32)
        y, x = self.ball.astype(int)
        frame[y - 1 : y + 1, x - 1 : x + 1] = (1.0, 0.9, 0.2)
        p = int(self.paddle)
        frame[self.size - 3 : self.size - 1, p - 4 : p + 4] = (0.2, 0.6, 1.0)
        return frame


@dataclass
class DemoReport:
    streams: int
    frames: int
    seconds: float
    ticks: int
    mean_tick_us: float
    items: dict[str, int]
    max_pages_used: int
    pages_capacity: int
    frames_by_stream: dict[int, np.ndarray]

    def summary(self) -> str:
        return (
            f"{self.streams} streams, {self.frames} frames in {self.seconds:.2f} s "
            f"({self.frames / self.seconds:.0f} frames/s with the stand-in executor); "
            f"{self.ticks} plans ({self.items['denoise']} denoising steps, "
            f"{self.items['cache_update']} cache updates), "
            f"scheduler tick {self.mean_tick_us:.1f} µs on average; "
            f"KV pages in use peaked at {self.max_pages_used} of {self.pages_capacity}"
        )


def run_demo(
    streams: int = 4,
    frames_per_stream: int = 96,
    size: int = 32,
    steps: tuple[int, ...] = (4, 2),
    window_frames: int = 6,
    sink_frames: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> DemoReport:
    """Runs the demo and returns what it measured, with every stream's frames."""
    if streams < 1 or frames_per_stream < 1 or size < 16:
        raise ValueError("streams and frames_per_stream must be >= 1 and size >= 16")
    tokens_per_frame = (size // 8) ** 2
    sched = _native.Scheduler(
        num_pages=streams * (sink_frames + window_frames + 3),
        page_tokens=16,
        tokens_per_frame=tokens_per_frame,
        max_batch_tokens=streams * 3 * tokens_per_frame,
    )
    rng = np.random.default_rng(seed)
    times = [1600 / 1601, 15 / 16, 5 / 6, 5 / 8]  # design §1.4: σmax/(1+σmax), σmax = 1600
    worlds, buffers = {}, {}
    for sid in range(streams):
        sched.open(
            sid,
            chunk_frames=1 if sid % 2 == 0 else 3,  # c1-1 and c3-3 side by side
            steps_per_chunk=list(steps),
            times=times,
            sink_frames=sink_frames,
            window_frames=window_frames,
            max_frames=frames_per_stream,
            needs_actions=True,
        )
        worlds[sid] = _World(size, np.random.default_rng(seed + sid))
        buffers[sid] = _native.FrameBuffer(size, size, 3, capacity=frames_per_stream)
        sched.push_actions(sid, rng.integers(0, len(ACTIONS), frames_per_stream).tolist())

    bar = _progress(streams * frames_per_stream, progress)
    tick_seconds, ticks, max_used = 0.0, 0, 0
    items = {"denoise": 0, "cache_update": 0}
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        plan = sched.tick()
        tick_seconds += time.perf_counter() - t0
        if plan is None:
            break
        ticks += 1
        max_used = max(max_used, sched.stats()["pages_used"])
        for i, sid in enumerate(plan.stream_ids.tolist()):
            items["cache_update" if plan.kind[i] == 1 else "denoise"] += 1
            if not plan.emits_frames[i]:
                continue
            # The chunk's last denoising step: its frames are final. The stand-in advances the
            # world under the chunk's actions where a model would decode its x0.
            f0, f1 = plan.frame_indptr[i], plan.frame_indptr[i + 1]
            for k, action in enumerate(plan.actions[f0:f1].tolist()):
                pixels = np.clip(worlds[sid].step(action) * 255, 0, 255).astype(np.uint8)
                buffers[sid].push(pixels, int(plan.frame_start[i]) + k)
            bar.update(f1 - f0)
        sched.complete(plan.id)
    seconds = time.perf_counter() - start
    bar.close()

    frames = {}
    for sid, buf in buffers.items():
        buf.close()
        popped = []
        while (item := buf.pop()) is not None:
            popped.append(item[0])
        frames[sid] = np.stack(popped)
    for sid in range(streams):
        sched.close(sid)
    return DemoReport(
        streams=streams,
        frames=sum(len(f) for f in frames.values()),
        seconds=seconds,
        ticks=ticks,
        mean_tick_us=1e6 * tick_seconds / max(ticks, 1),
        items=items,
        max_pages_used=max_used,
        pages_capacity=sched.num_pages,
        frames_by_stream=frames,
    )


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", disable=not enabled, desc="streaming")
