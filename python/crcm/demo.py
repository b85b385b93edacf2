"""``crcm demo``: the shipped Breakout world model, played by an autopilot in several streams.

Every stream is a session of one :class:`~crcm.runtime.Runtime` (one scheduler, one paged KV
cache, one batched forward per plan). There is no emulator in the streams: each stream's
autopilot reads the paddle and the ball from the *generated* frames with the Breakout detector
and chooses the next action (FIRE to serve, then LEFT/RIGHT towards the ball), so the model's
own output drives it, frame after frame, as a person's keys would in ``crcm play``. Streams
alternate 1 and 2 sampling steps per frame. The report says what was measured: frames/s, the
time from an action to its frame and KV pages in use (flat however long the streams run).

Whether the frames are any good is not something the streams can say (the autopilot would
"find" a paddle in anything a lax detector accepts), so the demo also runs a short version of
``crcm eval``'s scripted-action check against the emulator (:func:`controllability_check`: a
few held-out starts, LEFT held, RIGHT held and alternating, plus shuffled actions) and prints
those numbers, saying plainly when the model is action-blind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from crcm.errors import ConfigError

CHECK_HORIZON = 16  # steps of the demo's scripted rollouts: the paddle crosses in ~6


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
    frames_by_stream: dict[int, np.ndarray]
    # The scripted-action check against the emulator: a ``crcm eval`` model entry (None: skipped).
    check: dict[str, Any] | None = None
    check_starts: int = 0
    check_seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"{self.model}: {self.streams} streams, {self.frames} frames in {self.seconds:.2f} s "
            f"({self.frames / self.seconds:.1f} frames/s together; steps per frame "
            f"{','.join(map(str, self.steps))}); action → frame p50 {self.latency_ms_p50:.1f} ms, "
            f"p99 {self.latency_ms_p99:.1f} ms; KV pages in use peaked at {self.max_pages_used} "
            f"of {self.pages_capacity}"
        )
        if self.check is None:
            return text
        from crcm.eval.targets import describe

        head = (
            f"against the emulator from {self.check_starts} held-out starts "
            f"({self.steps[0]} step{'s' if self.steps[0] > 1 else ''}, {CHECK_HORIZON} frames "
            f"of each scripted sequence, {self.check_seconds:.0f} s; `crcm eval` measures more):"
        )
        return "\n".join([text, head, *(f"  {line}" for line in describe(self.check))])


def controllability_check(
    model, frame_hw: tuple[int, int], *, starts: int = 4, seed: int = 0
) -> dict[str, Any]:
    """A small, fast ``crcm eval`` of ``model`` (a :class:`~crcm.eval.harness.WorldModel`):
    ``starts`` held-out starts (two per episode), LEFT held, RIGHT held, alternating and their
    shuffled control for ``CHECK_HORIZON`` steps, next-frame and h8 rollouts with the real
    actions; no drift rollout. Returns the report's entry for the model (``control``,
    ``objects``, ``context_check``, ``targets``, ``action_blind``, ``verdict``, …)."""
    from crcm.eval.harness import EvalConfig, evaluate

    cfg = EvalConfig(
        episodes=max(1, (starts + 1) // 2),
        starts_per_episode=min(starts, 2),
        horizons=(1, 8),
        control_horizon=CHECK_HORIZON,
        control_horizons=(1, 2, 4, 8, 16),
        frame_hw=tuple(frame_hw),
        max_steps=400,
        long_rollout=0,
        seed=seed,
    )
    return evaluate([model], cfg, progress=False)["models"][model.name]


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

    def act(self, frame: np.ndarray | None) -> int:
        if frame is None:
            return self.ids["FIRE"]
        found = self.detect(frame)
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
    check_starts: int = 4,
) -> DemoReport:
    """Runs the demo and returns what it measured, with every stream's frames.

    ``steps`` are assigned to the streams in turn (stream i samples with ``steps[i % len]``).
    ``check_starts`` held-out starts go to :func:`controllability_check` at ``steps[0]`` steps
    (0: no check)."""
    from crcm.pipeline import load
    from crcm.runtime import Runtime

    if streams < 1 or frames_per_stream < 1 or check_starts < 0:
        raise ConfigError("streams and frames must be >= 1, check starts >= 0")
    pipe = load(model)
    if not pipe.model.cfg.num_actions:
        raise ConfigError(f"{model} takes no actions: the demo plays an action-conditioned model")
    h, w, _ = pipe.frame_shape
    per_stream = [steps[i % len(steps)] for i in range(streams)]
    frames = {i: [] for i in range(streams)}
    latencies: list[float] = []
    pilots = [Autopilot(pipe.action_names, (h, w), seed + i) for i in range(streams)]
    with Runtime(pipe, max_streams=streams) as rt:
        # Streams begin on the model's opening frames (the game's first screen) when it has
        # some; the autopilot sees them, and the generated frames are what is counted.
        opening = 0 if pipe.start_frames is None else len(pipe.start_frames)
        sessions = [
            rt.open(
                steps=per_stream[i],
                seed=seed + i,
                max_frames=opening + frames_per_stream,
                **pipe.start,
            )
            for i in range(streams)
        ]
        first_seen: dict[int, np.ndarray | None] = dict.fromkeys(range(streams))
        if opening:
            rt.run_until_idle()
            for i, session in enumerate(sessions):
                first_seen[i] = session.read()[-1]
        bar = _progress(streams * frames_per_stream, progress)
        max_used = 0
        start = time.perf_counter()
        for _ in range(frames_per_stream):
            pushed = time.perf_counter()
            for i, session in enumerate(sessions):
                last = frames[i][-1] if frames[i] else first_seen[i]
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
    check, check_seconds = None, 0.0
    if check_starts:
        from crcm.eval.harness import PipelineModel

        t0 = time.perf_counter()
        check = controllability_check(
            PipelineModel(pipe, steps=per_stream[0]), (h, w), starts=check_starts, seed=seed
        )
        check_seconds = time.perf_counter() - t0
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
        frames_by_stream={i: np.stack(f) for i, f in frames.items()},
        check=check,
        check_starts=check_starts,
        check_seconds=check_seconds,
    )


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", disable=not enabled, desc="playing")
