"""``crcm demo``: the shipped Breakout world model, played by an autopilot in several streams.

Every stream is a session of one :class:`~crcm.runtime.Runtime` (one scheduler, one paged KV
cache, one batched forward per plan). There is no emulator anywhere: each stream's autopilot
reads the paddle and the ball from the *generated* frames with the Breakout detector and
chooses the next action (FIRE to serve, then LEFT/RIGHT towards the ball), so the model's own
output drives it, frame after frame, as a person's keys would in ``crcm play``. Streams
alternate 1 and 2 sampling steps per frame. The report says what was measured: frames/s, the
time from an action to its frame, KV pages in use (flat however long the streams run) and how
often the autopilot found the paddle and the ball in the model's frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from crcm.errors import ConfigError


@dataclass
class DemoReport:
    model: str
    streams: int
    frames: int
    seconds: float
    latency_ms_p50: float  # action pushed → its frame read, per frame
    latency_ms_p99: float
    steps: tuple[int, ...]  # sampling steps per stream
    max_pages_used: int
    pages_capacity: int
    paddle_found: float  # share of generated frames where the detector found the paddle
    ball_found: float
    frames_by_stream: dict[int, np.ndarray]

    def summary(self) -> str:
        return (
            f"{self.model}: {self.streams} streams, {self.frames} frames in {self.seconds:.2f} s "
            f"({self.frames / self.seconds:.1f} frames/s together; steps per frame "
            f"{','.join(map(str, self.steps))}); action → frame p50 {self.latency_ms_p50:.1f} ms, "
            f"p99 {self.latency_ms_p99:.1f} ms; KV pages in use peaked at {self.max_pages_used} "
            f"of {self.pages_capacity}; the autopilot found the paddle in "
            f"{100 * self.paddle_found:.0f}% and the ball in {100 * self.ball_found:.0f}% of "
            "the generated frames"
        )


class Autopilot:
    """Chooses Breakout actions from a frame: serve when there is no ball, else follow it."""

    def __init__(self, action_names: tuple[str, ...], frame_hw: tuple[int, int], seed: int):
        from crcm.eval.breakout import BreakoutDetector

        names = [n.upper() for n in action_names]
        missing = {"NOOP", "FIRE", "LEFT", "RIGHT"} - set(names)
        if missing:
            raise ConfigError(
                f"the demo's autopilot plays Breakout; the model's actions lack {sorted(missing)}"
            )
        self.ids = {n: names.index(n) for n in ("NOOP", "FIRE", "LEFT", "RIGHT")}
        self.detect = BreakoutDetector(frame_hw)
        self.rng = np.random.default_rng(seed)
        self.aim = self.rng.uniform(-1.5, 1.5)  # each stream aims a little differently
        self.seen = {"paddle": 0, "ball": 0, "frames": 0}

    def act(self, frame: np.ndarray | None) -> int:
        if frame is None:
            return self.ids["FIRE"]
        found = self.detect(frame)
        self.seen["frames"] += 1
        self.seen["paddle"] += found.paddle_x is not None
        self.seen["ball"] += found.ball_xy is not None
        if found.ball_xy is None or found.paddle_x is None:
            return self.ids["FIRE"] if self.rng.random() < 0.5 else self.ids["NOOP"]
        gap = found.ball_xy[0] + self.aim - found.paddle_x
        if abs(gap) < 1.0:
            return self.ids["NOOP"]
        return self.ids["RIGHT"] if gap > 0 else self.ids["LEFT"]


def run_demo(
    model: str = "breakout",
    streams: int = 4,
    frames_per_stream: int = 120,
    steps: tuple[int, ...] = (1, 2),
    seed: int = 0,
    progress: bool = True,
) -> DemoReport:
    """Runs the demo and returns what it measured, with every stream's frames.

    ``steps`` are assigned to the streams in turn (stream i samples with ``steps[i % len]``)."""
    from crcm.pipeline import load
    from crcm.runtime import Runtime

    if streams < 1 or frames_per_stream < 1:
        raise ConfigError("streams and frames must be >= 1")
    pipe = load(model)
    if not pipe.model.cfg.num_actions:
        raise ConfigError(f"{model} takes no actions: the demo plays an action-conditioned model")
    h, w, _ = pipe.frame_shape
    per_stream = [steps[i % len(steps)] for i in range(streams)]
    frames = {i: [] for i in range(streams)}
    latencies: list[float] = []
    pilots = [Autopilot(pipe.action_names, (h, w), seed + i) for i in range(streams)]
    with Runtime(pipe, max_streams=streams) as rt:
        sessions = [
            rt.open(steps=per_stream[i], seed=seed + i, max_frames=frames_per_stream)
            for i in range(streams)
        ]
        bar = _progress(streams * frames_per_stream, progress)
        max_used = 0
        start = time.perf_counter()
        for _ in range(frames_per_stream):
            pushed = time.perf_counter()
            for i, session in enumerate(sessions):
                last = frames[i][-1] if frames[i] else None
                session.push_actions([pilots[i].act(last)])
            rt.run_until_idle()  # one frame per stream, batched across the streams
            max_used = max(max_used, rt.stats()["pages_used"])
            for i, session in enumerate(sessions):
                got = session.read()
                frames[i].extend(got)
                latencies.extend([1000 * (time.perf_counter() - pushed)] * len(got))
                bar.update(len(got))
        seconds = time.perf_counter() - start
        bar.close()
        capacity = rt.scheduler.num_pages
    seen = {k: sum(p.seen[k] for p in pilots) for k in ("paddle", "ball", "frames")}
    return DemoReport(
        model=pipe.name,
        streams=streams,
        frames=sum(len(f) for f in frames.values()),
        seconds=seconds,
        latency_ms_p50=float(np.percentile(latencies, 50)),
        latency_ms_p99=float(np.percentile(latencies, 99)),
        steps=tuple(per_stream),
        max_pages_used=max_used,
        pages_capacity=capacity,
        paddle_found=seen["paddle"] / max(seen["frames"], 1),
        ball_found=seen["ball"] / max(seen["frames"], 1),
        frames_by_stream={i: np.stack(f) for i, f in frames.items()},
    )


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", disable=not enabled, desc="playing")
