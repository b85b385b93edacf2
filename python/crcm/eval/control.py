"""Does the model follow the keys, and does it draw one paddle and one ball? (issue 16)

Metrics that an action-blind or speckle-drawing world model cannot pass by accident, measured
against the emulator from held-out starts (``crcm.eval.harness.evaluate`` places the starts and
runs the models; this module turns their frames into numbers):

- **Scripted actions.** From each start the emulator is restored from its snapshot and plays
  LEFT held, RIGHT held and LEFT/RIGHT alternating in blocks of ``alternate_every`` steps; the
  model plays the same actions from the same ground-truth context. Paddle x error (native px)
  at each control horizon, median over rollouts; a frame where the model's paddle is not found
  counts as ``MISS_PX`` (a screen width: no real error is that large), so a model that draws no
  paddle cannot score well by being measured only where it happens to draw one.
- **Action sensitivity**: per start, the model's (final paddle x under RIGHT − under LEFT) over
  the emulator's; median over starts. 0 for an action-blind model, 1 for the emulator.
- **Direction agreement**: over every step where the emulator's paddle moves by more than the
  dead band, the share where the model's paddle moves the same way by more than the dead band
  (pooled over steps). An action-blind model scores ~0 (its paddle does not move) or ~its
  random motion; the **shuffled control** is the same number when the model plays a random
  permutation of the scripted actions (pooled over the three sequences of a start) while it is
  still compared with the emulator under the scripted ones: a model that follows its actions
  drops to about chance, one that ignores them scores the same as unshuffled.
- **Objects** in every generated frame: paddle found as one compact object (share of frames
  where the emulator's paddle is found), the largest frame-to-frame paddle jump, ball found at
  h ≤ 8, ball position error at h1/h4/h8 (misses count as ``MISS_PX``), and whether a brick
  the emulator's ball knocks out disappears in the model's frames too.
- **Teacher-forced context check**: the next frame's paddle error (the model samples it from
  noise given the ground-truth context) against copying the last context frame; the model must
  be at least as good.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from crcm.eval.breakout import BreakoutDetector

__all__ = [
    "LEFT",
    "MISS_PX",
    "RIGHT",
    "SCRIPTS",
    "StartRecord",
    "measure_start",
    "scripted_actions",
    "shuffled_actions",
    "summarize",
]

NOOP, FIRE, RIGHT, LEFT = 0, 1, 2, 3  # Breakout's minimal action ids
SCRIPTS = ("LEFT", "RIGHT", "ALTERNATE")
MISS_PX = 160.0  # the error a missing object counts as: the screen's width in native pixels
MIN_SPREAD_PX = 8.0  # starts where the emulator's LEFT/RIGHT paddles end closer are not scored
BALL_HORIZONS = (1, 4, 8)
BALL_FOUND_HORIZON = 8
BALL_CLOSE_PX = 4.0
BRICK_AGREE = 0.95  # the rest of the brick wall must match for a knocked-out brick to count


def scripted_actions(name: str, n: int, alternate_every: int = 4) -> np.ndarray:
    """``int64 [n]``: LEFT held, RIGHT held, or LEFT/RIGHT alternating in blocks.

    Blocks of a few steps rather than single steps: the emulator's paddle has momentum, so a
    LEFT right after a RIGHT barely moves it (2–3 px) while a block moves it ~23 px a step.
    """
    if name == "LEFT":
        return np.full(n, LEFT, np.int64)
    if name == "RIGHT":
        return np.full(n, RIGHT, np.int64)
    if name == "ALTERNATE":
        block = np.arange(n) // max(alternate_every, 1)
        return np.where(block % 2 == 0, LEFT, RIGHT).astype(np.int64)
    raise ValueError(f"unknown scripted sequence {name!r}; known: {', '.join(SCRIPTS)}")


def shuffled_actions(
    scripts: Mapping[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The scripted sequences' actions pooled, randomly permuted and dealt back out.

    Pooled because permuting one held sequence gives it back unchanged; the pool keeps the mix
    of LEFT and RIGHT while breaking which step gets which."""
    names = list(scripts)
    pool = np.concatenate([scripts[n] for n in names])
    pool = pool[rng.permutation(len(pool))]
    out, i = {}, 0
    for n in names:
        out[n] = pool[i : i + len(scripts[n])]
        i += len(scripts[n])
    return out


def _paddle(det: BreakoutDetector, frames: np.ndarray) -> np.ndarray:
    """``float [N]``: paddle x per frame, NaN where the detector finds no single paddle."""
    return np.array([np.nan if (x := det.paddle_x(f)) is None else x for f in frames], float)


def _ball(det: BreakoutDetector, frames: np.ndarray) -> np.ndarray:
    """``float [N, 2]``: ball (x, y) per frame, NaN where no single ball is found."""
    out = np.full((len(frames), 2), np.nan)
    for i, f in enumerate(frames):
        xy = det.ball_xy(f)
        if xy is not None:
            out[i] = xy
    return out


@dataclass
class StartRecord:
    """What the frames of one start say, as tracks (NaN: not found) and counts.

    ``paddle`` / ``ball`` map a rollout name (``real`` for the episode's own actions, or a
    scripted sequence) to ``(model track, emulator track)``; ``shuffled`` maps a scripted
    sequence to the model's paddle track under the shuffled actions.
    """

    x0: float  # paddle x in the last context frame (the emulator's frame at the start)
    paddle: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    shuffled: dict[str, np.ndarray] = field(default_factory=dict)
    ball: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    brick_hits: int = 0  # bricks the emulator's ball knocked out
    brick_kept: int = 0  # of those, knocked out in the model's frames too


def _brick_hits(det, ctx_last, model, emulator) -> tuple[int, int]:
    """(hits, reproduced): bricks present in the emulator's frame t−1 and gone at t, and how
    many of them the model also shows gone at t or t+1 after showing them at t−1, with the
    rest of its wall matching the emulator's (so a blank or noisy frame scores nothing)."""
    emu = np.stack([det.brick_weights(f) for f in (ctx_last, *emulator)]) > 0.5
    gone = emu[:-1] & ~emu[1:]  # [N, 6, 18]: knocked out at step t = index + 1
    if not gone.any():
        return 0, 0
    mod = np.stack([det.brick_weights(f) for f in (ctx_last, *model)]) > 0.5
    hits = kept = 0
    for t, r, c in zip(*np.nonzero(gone), strict=True):
        hits += 1
        t = int(t) + 1  # frame index into (ctx_last, *frames)
        for u in (t, t + 1):
            if u >= len(mod) or not mod[t - 1, r, c] or mod[u, r, c]:
                continue
            same = mod[u] == emu[min(u, len(emu) - 1)]
            same[r, c] = True
            if same.mean() >= BRICK_AGREE:
                kept += 1
                break
    return hits, kept


def measure_start(
    det: BreakoutDetector,
    ctx_last: np.ndarray,
    rollouts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    shuffled: Mapping[str, np.ndarray],
) -> StartRecord:
    """Reads one start's frames: ``rollouts`` maps ``real`` and each scripted sequence to
    ``(model frames, emulator frames)`` (``uint8 [N, H, W, C]``, the frames after
    ``ctx_last``); ``shuffled`` maps each scripted sequence to the model's frames under the
    shuffled actions."""
    rec = StartRecord(x0=np.nan if (x := det.paddle_x(ctx_last)) is None else x)
    for name, (model, emu) in rollouts.items():
        rec.paddle[name] = (_paddle(det, model), _paddle(det, emu))
        n = min(len(model), BALL_FOUND_HORIZON)
        rec.ball[name] = (_ball(det, model[:n]), _ball(det, emu[:n]))
        hits, kept = _brick_hits(det, ctx_last, model, emu)
        rec.brick_hits += hits
        rec.brick_kept += kept
    for name, model in shuffled.items():
        rec.shuffled[name] = _paddle(det, model)
    return rec


# ---------------------------------------------------------------------------------------------
# Aggregation


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def _miss(model: float, truth: float) -> float:
    """|model − truth|, or ``MISS_PX`` where the model has no object."""
    return MISS_PX if np.isnan(model) else abs(model - truth)


def _steps(x0: float, track: np.ndarray) -> np.ndarray:
    """``float [N]``: the track's step-to-step motion, from ``x0`` (NaN where either end is)."""
    return np.diff(np.concatenate([[x0], track]))


def _direction(records, key: str, dead_band: float) -> tuple[float | None, int]:
    """Share of the emulator's moving steps (|Δ| > dead band) where the model's paddle moves
    the same way by more than the dead band; ``key`` picks the model's scripted or shuffled
    tracks. Pooled over every step of every start."""
    agree = counted = 0
    for rec in records:
        for name in SCRIPTS:
            if name not in rec.paddle:
                continue
            model = rec.paddle[name][0] if key == "scripted" else rec.shuffled.get(name)
            if model is None:
                continue
            d_emu = _steps(rec.x0, rec.paddle[name][1])
            d_mod = _steps(rec.x0, model)
            moving = np.abs(d_emu) > dead_band  # False where NaN
            counted += int(moving.sum())
            with np.errstate(invalid="ignore"):
                ok = (np.sign(d_mod) == np.sign(d_emu)) & (np.abs(d_mod) > dead_band)
            agree += int((ok & moving).sum())
    return (agree / counted if counted else None), counted


def summarize(records: Sequence[StartRecord], horizons: Sequence[int], dead_band: float) -> dict:
    """The report's ``control``, ``objects`` and ``context_check`` entries for one model.

    Errors and sensitivity are medians over rollouts/starts (the issue's targets are medians);
    rates (found, direction agreement, brick hits) are pooled over frames/steps.
    """
    scripted = [n for n in SCRIPTS if any(n in r.paddle for r in records)]
    errors: dict[str, dict[str, float | None]] = {}
    for name in [*scripted, "all"]:
        errors[name] = {}
        for h in horizons:
            vals = []
            for rec in records:
                for n in scripted if name == "all" else [name]:
                    if n not in rec.paddle or len(rec.paddle[n][0]) < h:
                        continue
                    m, e = rec.paddle[n][0][h - 1], rec.paddle[n][1][h - 1]
                    if not np.isnan(e):
                        vals.append(_miss(m, e))
            errors[name][str(h)] = _median(vals)

    sens = []
    for rec in records:
        if "LEFT" not in rec.paddle or "RIGHT" not in rec.paddle:
            continue
        (ml, el), (mr, er) = rec.paddle["LEFT"], rec.paddle["RIGHT"]
        spread = er[-1] - el[-1]
        if np.isnan(spread) or abs(spread) < MIN_SPREAD_PX:
            continue  # the emulator itself did not separate them
        model_spread = mr[-1] - ml[-1]
        sens.append(0.0 if np.isnan(model_spread) else model_spread / spread)
    agree, steps = _direction(records, "scripted", dead_band)
    agree_shuffled, _ = _direction(records, "shuffled", dead_band)
    control = {
        "horizons": list(horizons),
        "dead_band_px": dead_band,
        "paddle_error_px": errors,
        "sensitivity": _median(sens),
        "sensitivity_n": len(sens),
        "direction_agree": agree,
        "direction_agree_shuffled": agree_shuffled,
        "direction_steps": steps,
    }

    # Objects, over every rollout of every start.
    found = frames = 0
    jumps, emu_jumps = [], []
    ball_found = ball_frames = 0
    ball_err = {h: [] for h in BALL_HORIZONS}
    close_h1 = []
    tf_model, tf_copy = [], []
    for rec in records:
        for model, emu in rec.paddle.values():
            seen = ~np.isnan(emu)
            frames += int(seen.sum())
            found += int((seen & ~np.isnan(model)).sum())
            for track, out in ((model, jumps), (emu, emu_jumps)):
                d = np.abs(_steps(rec.x0, track))
                out.extend(d[~np.isnan(d)].tolist())
            # The teacher-forced context check: frame 1 from noise given the true context.
            if len(emu) and not np.isnan(emu[0]) and not np.isnan(rec.x0):
                tf_model.append(_miss(model[0], emu[0]))
                tf_copy.append(abs(rec.x0 - emu[0]))
        for model, emu in rec.ball.values():
            seen = ~np.isnan(emu[:, 0])
            ball_frames += int(seen.sum())
            ball_found += int((seen & ~np.isnan(model[:, 0])).sum())
            for h in BALL_HORIZONS:
                if len(emu) >= h and seen[h - 1]:
                    m = model[h - 1]
                    err = MISS_PX if np.isnan(m[0]) else float(np.hypot(*(m - emu[h - 1])))
                    ball_err[h].append(err)
                    if h == 1:
                        close_h1.append(err <= BALL_CLOSE_PX)
    hits = sum(r.brick_hits for r in records)
    objects = {
        "paddle_found": found / frames if frames else None,
        "paddle_frames": frames,
        "paddle_max_jump_px": max(jumps) if jumps else None,
        "emulator_max_jump_px": max(emu_jumps) if emu_jumps else None,
        "ball_found": ball_found / ball_frames if ball_frames else None,
        "ball_frames": ball_frames,
        "ball_error_px": {str(h): _median(v) for h, v in ball_err.items()},
        "ball_close_h1": float(np.mean(close_h1)) if close_h1 else None,
        "ball_close_h1_n": len(close_h1),
        "brick_hits": hits,
        "brick_hit_disappears": sum(r.brick_kept for r in records) / hits if hits else None,
    }
    m, c = (float(np.mean(v)) if v else None for v in (tf_model, tf_copy))
    context = {
        "paddle_error_h1_px": m,
        "copy_last_px": c,
        "n": len(tf_model),
        "pass": None if m is None else bool(m <= c + 1e-9),
    }
    return {"control": control, "objects": objects, "context_check": context}
