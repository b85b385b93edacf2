"""World-model fidelity against the emulator (design §6): the evaluation runner.

Protocol. Held-out episodes are played live in the emulator with evaluation seeds (the seeds
``EVAL_SEED_BASE + seed + j`` that datasets reserve for their ``eval`` split, with the same
policy assignment, so they are the very episodes a dataset's eval split holds). From each of a
few start points ``t0`` per episode, a model sees the ``k`` ground-truth frames ``t0−k+1 … t0``
with their actions and generates frames ``t0+1 …`` from the episode's real actions; frames at
horizons 1, 8, 32, 128 are compared with the emulator's:

- PSNR / SSIM over the whole frame and over the *dynamic region*: pixels that change in the
  emulator's frames between ``t0`` and ``t0+h``, dilated by one pixel;
- objects (crcm.eval.breakout detector, validated against RAM; a paddle or ball counts only as
  one compact object): paddle x error, ball position error (a frame without the object counts
  as ``MISS_PX``), how often each is found, brick-count error;
- control (crcm.eval.control): from the same context, LEFT held, RIGHT held and LEFT/RIGHT
  alternating for ``control_horizon`` steps, played both by the emulator (restored from a
  snapshot at ``t0``) and by the model, plus the model under a shuffled permutation of those
  actions: paddle x error per horizon, action sensitivity, direction agreement with its
  shuffled control, paddle found / largest jump, ball found / error, knocked-out bricks, and
  the teacher-forced context check; then issue 16's targets, passed or failed
  (crcm.eval.targets), and whether the model is action-blind.
- drift: one long rollout (``long_rollout`` frames, default 1,000) from the first held-out
  episode's opening context, driven by that episode's actions (repeated when the episode is
  shorter), with the pipeline's KV retention (sink + window). Breakout's walls and background
  never change, so a model that drifts shows it there: PSNR over the *static region* (pixels that
  never change in the real episode) per span of the rollout, the share of frames in which the
  paddle is found, and the rollout's frames per second.

Every report includes the copy-last-frame baseline on the same windows: whole-frame PSNR of a
mostly static game flatters any model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.errors import ConfigError
from crcm.eval.breakout import BreakoutDetector, dynamic_mask, psnr, ssim_map
from crcm.eval.control import (
    MISS_PX,
    SCRIPTS,
    measure_start,
    scripted_actions,
    shuffled_actions,
    summarize,
)
from crcm.eval.targets import check_targets, is_action_blind, verdict
from crcm.sampling import DEFAULT_SHIFT

__all__ = [
    "CopyLastFrame",
    "EvalConfig",
    "PipelineModel",
    "WorldModel",
    "evaluate",
    "load_model",
]


class WorldModel:
    """What the harness evaluates: continue ``B`` streams from ground-truth context."""

    name: str = "model"

    def rollout(
        self,
        context_B_K_H_W_C: np.ndarray,
        context_actions_B_K: np.ndarray,
        actions_B_N: np.ndarray,
        seed: int = 0,
    ) -> np.ndarray:
        """Generates ``uint8 [B, N, H, W, C]`` frames following the ``k`` context frames.

        ``context_actions_B_K[:, i]`` is the action taken before context frame ``i`` (``-1``:
        none); ``actions_B_N[:, j]`` the action before generated frame ``j``.
        """
        raise NotImplementedError


class CopyLastFrame(WorldModel):
    """The baseline: every future frame is the last context frame."""

    name = "copy-last-frame"

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        last = context_B_K_H_W_C[:, -1:]
        return np.repeat(last, actions_B_N.shape[1], axis=1)


class PipelineModel(WorldModel):
    """A crcm :class:`~crcm.pipeline.Pipeline` continued from ground-truth context, through the
    streaming runtime itself.

    One runtime, one session per row: each session is opened with its ground-truth context
    (``Runtime.open(context=..., context_actions=...)``: the frames fill its KV cache exactly
    as if the stream had made them, and are its first frames), then takes the real actions, so
    what is measured is what ``crcm play`` serves — the same sampler (consistency or Euler with
    CFG), cache-update / noisy-context rule, sink + window and batched forwards. Row ``b`` uses
    the noise seed ``seed + b``.
    """

    def __init__(self, pipeline, *, sampler=None, steps: int | None = None) -> None:
        self.pipeline = pipeline
        s = sampler or pipeline.sampler
        self.sampler = s if steps is None else s.with_steps(steps)
        self.name = pipeline.name

    @torch.no_grad()
    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        from crcm.runtime import Runtime

        pipe, smp = self.pipeline, self.sampler
        B, K = context_actions_B_K.shape
        N = actions_B_N.shape[1]
        C = smp.chunk_frames
        if K % C or N % C:
            raise ConfigError(f"context ({K}) and horizon ({N}) must be multiples of {C} frames")
        guided = smp.kind == "euler" and smp.cfg_scale != 1.0
        takes_actions = bool(pipe.model.cfg.num_actions)
        window = smp.sink_frames + (smp.window_frames or K + N) + C
        runtime = Runtime(pipe, max_streams=B, context_frames=window, cfg=guided)
        with runtime:
            sessions = []
            for b in range(B):
                session = runtime.open(
                    sampler=smp,
                    seed=seed + b,
                    max_frames=K + N,
                    buffer_frames=K + N,
                    context=np.ascontiguousarray(context_B_K_H_W_C[b]) if K else None,
                    context_actions=[int(a) for a in context_actions_B_K[b]]
                    if takes_actions and K
                    else None,
                )
                if takes_actions:
                    session.push_actions([int(a) for a in actions_B_N[b]])
                sessions.append(session)
            runtime.run_until_idle()
            out = []
            for session in sessions:
                frames = session.read()
                if len(frames) != K + N:
                    raise RuntimeError(f"the runtime made {len(frames)} of {K + N} frames")
                out.append(np.stack(frames[K:]))
        return np.stack(out)


def load_model(
    name_or_path: str,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    shift: float = DEFAULT_SHIFT,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    still_threshold: float | None = None,
) -> WorldModel:
    """``copy-last-frame``, or a pipeline folder / shipped model name (``crcm.load``).

    ``sampler`` names a preset (``consistency``, ``teacher``: Euler with CFG 3) that replaces
    the pipeline's sampler, keeping its chunk size and KV retention (sink + window, what the
    model was trained to see); ``steps`` sets the steps per chunk; ``shift`` warps the teacher's
    Euler grid (match its training ``time_shift``); ``name`` labels the report; ``dtype`` the
    precision the model runs in (``torch.bfloat16``: what ``crcm play`` runs on CPUs that have
    bfloat16 matrix instructions); ``still_threshold`` replaces the sampler's
    (:class:`~crcm.sampling.SamplerConfig`; ``None``: the pipeline's).
    """
    if name_or_path == CopyLastFrame.name:
        return CopyLastFrame()
    from crcm.pipeline import load
    from crcm.sampling import get_preset

    pipe = load(name_or_path, dtype=dtype)
    smp = None
    if sampler is not None:
        base = pipe.sampler
        preset = get_preset(sampler, steps, shift=shift)
        smp = replace(preset.streamed_like(base), chunk_frames=base.chunk_frames)
        steps = None
    if still_threshold is not None:
        smp = replace(smp or pipe.sampler, still_threshold=still_threshold)
    model = PipelineModel(pipe, sampler=smp, steps=steps)
    if name is not None:
        model.name = name
    return model


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation run measures; recorded in its JSON.

    ``control_horizon`` is the length of the scripted-action rollouts (LEFT held, RIGHT held,
    LEFT/RIGHT alternating in blocks of ``alternate_every``), scored at ``control_horizons``;
    ``dead_band_px`` is the paddle motion (native px) below which a step counts as no move.
    """

    game: str = "breakout"
    episodes: int = 8
    starts_per_episode: int = 2
    context_frames: int = 8
    horizons: tuple[int, ...] = (1, 8, 32, 128)
    control_horizon: int = 32
    control_horizons: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    alternate_every: int = 4
    dead_band_px: float = 3.0
    frameskip: int = 4
    frame_hw: tuple[int, int] = (64, 64)
    max_steps: int = 2000
    long_rollout: int = 1000  # frames of the drift rollout (0: none)
    seed: int = 0
    policy_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_POLICY_MIX))


def _window_metrics(pred, gt, ctx_last, det: BreakoutDetector, horizons) -> dict:
    """Per-horizon metric lists for one window (pred/gt ``[N, H, W, C]``).

    Object errors count a model frame without the object as ``MISS_PX`` wherever the
    emulator's frame shows it: measured only where the model drew it, a model that rarely
    draws a paddle would look accurate."""
    rows = {}
    idx = [hz - 1 for hz in horizons]
    ssim_all = ssim_map(pred[idx], gt[idx])  # one batched call: torch overhead dominates
    for j, hz in enumerate(horizons):
        p, g = pred[hz - 1 : hz], gt[hz - 1 : hz]
        path = np.concatenate([ctx_last[None], gt[:hz]])
        mask = dynamic_mask(path)[None]
        s = ssim_all[j : j + 1]
        dp, dg = det(p[0]), det(g[0])
        row = {
            "psnr": float(psnr(p, g)[0]),
            "ssim": float(s.mean()),
            "psnr_dynamic": float(psnr(p, g, mask)[0]) if mask.any() else np.nan,
            "ssim_dynamic": float(s[mask].mean()) if mask.any() else np.nan,
            "bricks_error": abs(dp.bricks - dg.bricks),
        }
        if dg.paddle_x is not None:
            row["paddle_found"] = float(dp.paddle_x is not None)
            row["paddle_error_px"] = (
                MISS_PX if dp.paddle_x is None else abs(dp.paddle_x - dg.paddle_x)
            )
        if dg.ball_xy is not None:
            row["ball_found"] = float(dp.ball_xy is not None)
            row["ball_error_px"] = (
                MISS_PX
                if dp.ball_xy is None
                else float(np.hypot(*np.subtract(dp.ball_xy, dg.ball_xy)))
            )
        rows[hz] = row
    return rows


def _aggregate(per_window: list[dict], horizons) -> dict:
    out = {}
    for hz in horizons:
        keys = sorted({k for w in per_window for k in w[hz]})
        stats = {}
        for k in keys:
            vals = np.array([w[hz][k] for w in per_window if k in w[hz]], np.float64)
            vals = vals[~np.isnan(vals)]
            stats[k] = float(vals.mean()) if len(vals) else None
            stats[f"{k}_n"] = len(vals)
        out[str(hz)] = stats
    return out


DRIFT_SPANS = ((0, 100), (100, 500), (500, 1000), (1000, None))


def _drift(models: Sequence[WorldModel], ep, cfg: EvalConfig, det: BreakoutDetector) -> dict:
    """The long rollout of every model from the opening of episode ``ep`` (see module doc)."""
    K, n = cfg.context_frames, cfg.long_rollout
    static = ~(ep.frames != ep.frames[:1]).any(axis=(0, 3))  # never changes in the real game
    reference = ep.frames[K - 1]
    ctx, ctx_a = ep.frames[None, :K], ep.actions[None, :K].astype(np.int64)
    future = ep.actions[K:].astype(np.int64)
    actions = np.resize(future, n)[None]  # the episode's actions, repeated to n steps
    out = {}
    for m in models:
        t0 = time.perf_counter()
        video = m.rollout(ctx, ctx_a, actions, seed=0)[0]
        seconds = time.perf_counter() - t0
        score = psnr(
            video, np.broadcast_to(reference, video.shape), np.broadcast_to(static, video.shape[:3])
        )
        spans = {}
        for lo, hi in DRIFT_SPANS:
            part = score[lo:hi]
            if len(part):
                spans[f"{lo}-{min(hi or n, n)}"] = float(np.nanmean(part))
        found = [det.paddle_x(f) is not None for f in video[:: max(1, n // 200)]]
        out[m.name] = {
            "frames": n,
            "psnr_static": spans,
            "paddle_found": float(np.mean(found)),
            "frames_per_s": round(n / seconds, 2),
        }
    return out


def evaluate(
    models: Sequence[WorldModel], cfg: EvalConfig = EvalConfig(), *, progress: bool = True
) -> dict:
    """Runs every model on the same windows; returns the JSON-ready report.

    ``models`` should include :class:`CopyLastFrame` (the CLI always adds it); the targets'
    copy-last-frame comparison is computed on the same windows either way.
    """
    from tqdm import tqdm

    if cfg.game != "breakout":
        raise ConfigError(
            "the object detector and controllability are Breakout's; game must be breakout"
        )
    H = max(cfg.horizons)
    Hc = cfg.control_horizon
    K = cfg.context_frames
    if K < 1 or min(cfg.horizons) < 1 or cfg.episodes < 1 or cfg.starts_per_episode < 1:
        raise ConfigError("context_frames, horizons, episodes and starts must be >= 1")
    if Hc < 1:
        raise ConfigError("control_horizon must be >= 1")
    ctrl_h = tuple(h for h in cfg.control_horizons if 1 <= h <= Hc)
    for m in models:
        hw = getattr(getattr(m, "pipeline", None), "frame_shape", None)
        if hw is not None and tuple(hw[:2]) != tuple(cfg.frame_hw):
            raise ConfigError(f"{m.name} makes {hw[:2]} frames; evaluation uses {cfg.frame_hw}")
    env = AtariEnv(cfg.game, frameskip=cfg.frameskip, frame_hw=cfg.frame_hw)
    det = BreakoutDetector(cfg.frame_hw)
    scripts = {name: scripted_actions(name, Hc, cfg.alternate_every) for name in SCRIPTS}
    windows = {m.name: [] for m in models}
    records = {m.name: [] for m in models}
    baseline = []  # copy-last-frame's per-window metrics, for the targets
    used, skipped, seeds = [], [], []
    timings = {m.name: 0.0 for m in models}
    for j in tqdm(range(cfg.episodes), unit="ep", disable=not progress):
        seed = EVAL_SEED_BASE + cfg.seed + j
        seeds.append(seed)
        policy = episode_policy(cfg.game, seed, cfg.policy_mix)
        # Replaying to find the length first keeps start points a function of the episode.
        probe = run_episode(env, policy, seed, max_steps=cfg.max_steps)
        n = len(probe)
        if n < K + H:
            skipped.append({"seed": seed, "frames": n})
            continue
        lo, hi = K - 1, n - 1 - H
        # Evenly spread window centres, away from the episode's static first frames (serve).
        centres = (np.arange(cfg.starts_per_episode) + 0.5) / cfg.starts_per_episode
        starts = np.unique((lo + centres * (hi - lo)).round().astype(int))
        ep = run_episode(env, policy, seed, max_steps=cfg.max_steps, snapshot_at=set(starts))
        used.append({"seed": seed, "policy": policy, "frames": n, "starts": starts.tolist()})
        B = len(starts)
        ctx = np.stack([ep.frames[t - K + 1 : t + 1] for t in starts])
        ctx_a = np.stack([ep.actions[t - K + 1 : t + 1] for t in starts]).astype(np.int64)
        fut_a = np.stack([ep.actions[t + 1 : t + 1 + H] for t in starts]).astype(np.int64)
        gt = np.stack([ep.frames[t + 1 : t + 1 + H] for t in starts])
        # The emulator's futures under the scripted actions, from snapshots at each start.
        emu = {}
        for name, a in scripts.items():
            frames = []
            for t in starts:
                env.restore_state(ep.states[int(t)])
                frames.append(np.stack([env.step(int(x))[0] for x in a]))
            emu[name] = np.stack(frames)
        # The shuffled control's actions: one permutation per start, fixed by the episode.
        rng = np.random.default_rng([cfg.seed, seed])
        shuffles = [shuffled_actions(scripts, rng) for _ in starts]
        shuf_a = {name: np.stack([s[name] for s in shuffles]) for name in scripts}
        for b in range(B):
            copy = np.repeat(ctx[b, -1:], H, axis=0)
            baseline.append(_window_metrics(copy, gt[b], ctx[b, -1], det, cfg.horizons))
        for m in models:
            t0 = time.perf_counter()
            pred = m.rollout(ctx, ctx_a, fut_a, seed=seed)
            # Same context and seed for every sequence: only the actions differ, so any
            # difference between the rollouts is the actions' doing.
            ctrl = {
                name: m.rollout(ctx, ctx_a, np.tile(a, (B, 1)), seed=seed)
                for name, a in scripts.items()
            }
            shuf = {name: m.rollout(ctx, ctx_a, a, seed=seed) for name, a in shuf_a.items()}
            timings[m.name] += time.perf_counter() - t0
            for b in range(B):
                windows[m.name].append(
                    _window_metrics(pred[b], gt[b], ctx[b, -1], det, cfg.horizons)
                )
                rollouts = {"real": (pred[b], gt[b])}
                rollouts.update({name: (ctrl[name][b], emu[name][b]) for name in scripts})
                shuffled = {name: shuf[name][b] for name in scripts}
                records[m.name].append(measure_start(det, ctx[b, -1], rollouts, shuffled))
    if not used:
        raise ConfigError(
            f"no evaluation episode reached {K + H} frames; use more episodes or shorter horizons"
        )
    base = _aggregate(baseline, cfg.horizons)
    base_dyn = {h: base[str(h)].get("psnr_dynamic") for h in cfg.horizons}
    report = {
        "game": cfg.game,
        "frame_hw": list(cfg.frame_hw),
        "frameskip": cfg.frameskip,
        "context_frames": K,
        "horizons": list(cfg.horizons),
        "control_horizon": Hc,
        "control_horizons": list(ctrl_h),
        "control_sequences": {name: a.tolist() for name, a in scripts.items()},
        "eval_seeds": seeds,
        "episodes": used,
        "skipped_episodes": skipped,
        "windows": sum(len(e["starts"]) for e in used),
        "baseline_psnr_dynamic": {str(h): v for h, v in base_dyn.items()},
        "models": {},
    }
    if cfg.long_rollout:
        first = used[0]
        ep = run_episode(env, first["policy"], first["seed"], max_steps=cfg.max_steps)
        report["drift"] = {"seed": first["seed"], "models": _drift(models, ep, cfg, det)}
    for m in models:
        smp = getattr(m, "sampler", None)
        entry = {
            "sampler": None
            if smp is None
            else {
                "kind": smp.kind,
                "steps": smp.steps_of(0),
                "cfg_scale": smp.cfg_scale,
                "still_threshold": smp.still_threshold,
            },
            "horizons": _aggregate(windows[m.name], cfg.horizons),
            **summarize(records[m.name], ctrl_h, cfg.dead_band_px),
            "seconds": round(timings[m.name], 3),
        }
        entry["targets"] = check_targets(entry, report["baseline_psnr_dynamic"])
        entry["targets_met"] = sum(t["pass"] is True for t in entry["targets"].values())
        entry["action_blind"] = is_action_blind(entry["control"])
        entry["verdict"] = verdict(entry)
        report["models"][m.name] = entry
    return report
