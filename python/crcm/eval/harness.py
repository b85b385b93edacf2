"""World-model fidelity against the emulator (design §6): the evaluation runner.

Protocol. Held-out episodes are played live in the emulator with evaluation seeds (the seeds
``EVAL_SEED_BASE + seed + j`` that datasets reserve for their ``eval`` split, with the same
policy assignment, so they are the very episodes a dataset's eval split holds). From each of a
few start points ``t0`` per episode, a model sees the ``k`` ground-truth frames ``t0−k+1 … t0``
with their actions and generates frames ``t0+1 …`` from the episode's real actions; frames at
horizons 1, 8, 32, 128 are compared with the emulator's:

- PSNR / SSIM over the whole frame and over the *dynamic region*: pixels that change in the
  emulator's frames between ``t0`` and ``t0+h``, dilated by one pixel;
- objects (crcm.eval.breakout detector, validated against RAM): paddle x error, ball position
  error and ball presence agreement, brick-count error;
- controllability: from the same context, the actions LEFT, RIGHT and NOOP held for up to 32
  steps, played both by the emulator (restored from a snapshot at ``t0``) and by the model;
  paddle x error per sequence and whether the model separates LEFT from RIGHT as the emulator
  does.

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

from crcm.data.atari import NO_ACTION, AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.errors import ConfigError
from crcm.eval.breakout import BreakoutDetector, dynamic_mask, psnr, ssim_map
from crcm.sampling import DEFAULT_SHIFT

__all__ = [
    "CONTROL_SEQUENCES",
    "CopyLastFrame",
    "EvalConfig",
    "PipelineModel",
    "WorldModel",
    "evaluate",
    "load_model",
]

CONTROL_SEQUENCES = {"LEFT": 3, "RIGHT": 2, "NOOP": 0}  # Breakout minimal-action ids


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


class _DenseKV:
    """A per-layer contiguous K/V cache with the runtime's retention (sink + window frames).

    Mirrors what the streaming runtime's paged cache holds for one stream, batched over rows
    that all have the same length: each chunk attends to the resident context plus itself.
    """

    def __init__(self, num_layers: int, tokens_per_frame: int, sink: int, window: int | None):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tpf, self.sink, self.window = tokens_per_frame, sink, window
        self.frames_seen = 0

    def attn_fn(self, write: bool):
        from crcm.models.dit import sdpa_attention

        def fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if write:
                self.pending[layer] = (k, v)
            if self.k[layer] is not None:
                k = torch.cat([self.k[layer], k], dim=1)
                v = torch.cat([self.v[layer], v], dim=1)
            return sdpa_attention(q, k, v)

        return fn

    def commit(self, chunk_frames: int) -> None:
        """Appends the pending chunk's K/V, then evicts as the runtime does."""
        for layer, (k, v) in self.pending.items():
            old_k, old_v = self.k[layer], self.v[layer]
            self.k[layer] = k if old_k is None else torch.cat([old_k, k], dim=1)
            self.v[layer] = v if old_v is None else torch.cat([old_v, v], dim=1)
        self.pending.clear()
        self.frames_seen += chunk_frames
        if self.window is None:
            return
        resident = min(self.frames_seen, self.sink) + min(
            max(self.frames_seen - self.sink, 0), self.window
        )
        have = self.k[0].shape[1] // self.tpf
        if have > resident:
            drop = have - resident  # the oldest non-sink frames
            s, e = self.sink * self.tpf, (self.sink + drop) * self.tpf
            for layer in range(len(self.k)):
                self.k[layer] = torch.cat([self.k[layer][:, :s], self.k[layer][:, e:]], dim=1)
                self.v[layer] = torch.cat([self.v[layer][:, :s], self.v[layer][:, e:]], dim=1)


class PipelineModel(WorldModel):
    """A crcm :class:`~crcm.pipeline.Pipeline` continued from ground-truth context.

    The streaming runtime has no way to seed a session's KV cache with given frames, so this
    runs the model directly: the context is *prefilled* chunk by chunk at ``s = 0`` (exactly the
    runtime's cache-update pass, as if the stream had generated those frames), then chunks are
    sampled with the pipeline's sampler (consistency or Euler with CFG, same times, same
    cache-update / noisy-context rule, same sink + window retention). With an empty context and
    one row it reproduces ``crcm.generate`` for the same seed (a test checks this).
    """

    def __init__(self, pipeline, *, sampler=None, steps: int | None = None) -> None:
        self.pipeline = pipeline
        s = sampler or pipeline.sampler
        self.sampler = s if steps is None else s.with_steps(steps)
        self.name = pipeline.name

    @torch.no_grad()
    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        pipe, smp = self.pipeline, self.sampler
        model, codec = pipe.model, pipe.codec
        cfg = model.cfg
        C = smp.chunk_frames
        B, K = context_actions_B_K.shape
        N = actions_B_N.shape[1]
        if K % C or N % C:
            raise ConfigError(f"context ({K}) and horizon ({N}) must be multiples of {C} frames")
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        guided = smp.kind == "euler" and smp.cfg_scale != 1.0
        if guided and cfg.cond != "none":
            raise ConfigError("guided evaluation is implemented for action-only models")
        rows = 2 * B if guided else B

        def actions(a_B_T: np.ndarray) -> torch.Tensor | None:
            if not cfg.num_actions:
                return None
            a = np.where(a_B_T == NO_ACTION, model.null_action, a_B_T).astype(np.int64)
            t = torch.from_numpy(a)
            if guided:  # the unconditional rows see the null action (executor's convention)
                t = torch.cat([t, torch.full_like(t, model.null_action)])
            return t.to(device)

        _, h, w = pipe.latent_chw
        cache = _DenseKV(
            cfg.num_layers, model.tokens_per_frame(h, w), smp.sink_frames, smp.window_frames
        )

        def forward(x, s: float, start: int, a, write: bool) -> torch.Tensor:
            T = x.shape[1]
            s_R_T = torch.full((rows, T), s, device=device, dtype=dtype)
            pos = torch.arange(start, start + T, device=device).expand(rows, T)
            return model(x, s_R_T, frame_pos_B_T=pos, actions_B_T=a, attention=cache.attn_fn(write))

        if K:
            ctx = codec.encode(torch.from_numpy(np.ascontiguousarray(context_B_K_H_W_C)))
            ctx = ctx.to(device, dtype)
            if guided:
                ctx = torch.cat([ctx, ctx])
            a_ctx = actions(context_actions_B_K)
        for c0 in range(0, K, C):
            a = None if a_ctx is None else a_ctx[:, c0 : c0 + C]
            forward(ctx[:, c0 : c0 + C], 0.0, c0, a, write=True)
            cache.commit(C)

        gen = torch.Generator().manual_seed(seed)
        latent = pipe.latent_chw
        noise = lambda: torch.randn((B, C, *latent), generator=gen).to(device, dtype)  # noqa: E731
        a_all = actions(actions_B_N)
        out = []
        for chunk, c0 in enumerate(range(0, N, C)):
            a = None if a_all is None else a_all[:, c0 : c0 + C]
            n = smp.steps_of(chunk)
            x = noise()
            for i in range(n):
                s, s_next = smp.times[i], (smp.times[i + 1] if i + 1 < n else 0.0)
                last = i + 1 == n
                xr = torch.cat([x, x]) if guided else x
                v = forward(xr, s, K + c0, a, write=last and not smp.cache_update)
                if guided:
                    v = v[B:] + smp.cfg_scale * (v[:B] - v[B:])
                if smp.kind == "euler":
                    x0, x = x - s * v, x + (s_next - s) * v
                else:
                    x0 = x - s * v
                    x = (1 - s_next) * x0 + s_next * noise() if s_next > 0 else x0
            if smp.cache_update:
                forward(torch.cat([x0, x0]) if guided else x0, 0.0, K + c0, a, write=True)
            cache.commit(C)
            out.append(codec.decode(x0).cpu().numpy())
        return np.concatenate(out, axis=1)


def load_model(
    name_or_path: str,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    shift: float = DEFAULT_SHIFT,
    name: str | None = None,
) -> WorldModel:
    """``copy-last-frame``, or a pipeline folder / shipped model name (``crcm.load``).

    ``sampler`` names a preset (``consistency``, ``teacher``: Euler with CFG 3) that replaces
    the pipeline's sampler, keeping its chunk size and KV retention (sink + window, what the
    model was trained to see); ``steps`` sets the steps per chunk; ``shift`` warps the teacher's
    Euler grid (match its training ``time_shift``); ``name`` labels the report.
    """
    if name_or_path == CopyLastFrame.name:
        return CopyLastFrame()
    from crcm.pipeline import load
    from crcm.sampling import get_preset

    pipe = load(name_or_path)
    smp = None
    if sampler is not None:
        base = pipe.sampler
        preset = get_preset(sampler, steps, shift=shift)
        smp = replace(
            preset,
            chunk_frames=base.chunk_frames,
            sink_frames=base.sink_frames,
            window_frames=base.window_frames,
        )
        steps = None
    model = PipelineModel(pipe, sampler=smp, steps=steps)
    if name is not None:
        model.name = name
    return model


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation run measures; recorded in its JSON."""

    game: str = "breakout"
    episodes: int = 8
    starts_per_episode: int = 2
    context_frames: int = 8
    horizons: tuple[int, ...] = (1, 8, 32, 128)
    control_horizon: int = 32
    frameskip: int = 4
    frame_hw: tuple[int, int] = (64, 64)
    max_steps: int = 2000
    long_rollout: int = 1000  # frames of the drift rollout (0: none)
    seed: int = 0
    policy_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_POLICY_MIX))


def _window_metrics(pred, gt, ctx_last, det: BreakoutDetector, horizons) -> dict:
    """Per-horizon metric lists for one window (pred/gt ``[N, H, W, C]``)."""
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
            "ball_presence_agree": float((dp.ball_xy is None) == (dg.ball_xy is None)),
        }
        if dg.paddle_x is not None:
            row["paddle_found"] = float(dp.paddle_x is not None)
            if dp.paddle_x is not None:
                row["paddle_error_px"] = abs(dp.paddle_x - dg.paddle_x)
        if dp.ball_xy is not None and dg.ball_xy is not None:
            row["ball_error_px"] = float(np.hypot(*np.subtract(dp.ball_xy, dg.ball_xy)))
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

    ``models`` should include :class:`CopyLastFrame` (the CLI always adds it).
    """
    from tqdm import tqdm

    if cfg.game != "breakout":
        raise ConfigError(
            "the object detector and controllability are Breakout's; game must be breakout"
        )
    H = max(cfg.horizons)
    Hc = min(cfg.control_horizon, H)
    K = cfg.context_frames
    if K < 1 or min(cfg.horizons) < 1 or cfg.episodes < 1 or cfg.starts_per_episode < 1:
        raise ConfigError("context_frames, horizons, episodes and starts must be >= 1")
    for m in models:
        hw = getattr(getattr(m, "pipeline", None), "frame_shape", None)
        if hw is not None and tuple(hw[:2]) != tuple(cfg.frame_hw):
            raise ConfigError(f"{m.name} makes {hw[:2]} frames; evaluation uses {cfg.frame_hw}")
    env = AtariEnv(cfg.game, frameskip=cfg.frameskip, frame_hw=cfg.frame_hw)
    det = BreakoutDetector(cfg.frame_hw)
    results = {
        m.name: {"windows": [], "control": {k: [] for k in CONTROL_SEQUENCES}} for m in models
    }
    control_sep = {m.name: [] for m in models}
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
        ctx = np.stack([ep.frames[t - K + 1 : t + 1] for t in starts])
        ctx_a = np.stack([ep.actions[t - K + 1 : t + 1] for t in starts]).astype(np.int64)
        fut_a = np.stack([ep.actions[t + 1 : t + 1 + H] for t in starts]).astype(np.int64)
        gt = np.stack([ep.frames[t + 1 : t + 1 + H] for t in starts])
        # The emulator's futures under the control sequences, from snapshots at each start.
        ctrl_gt = {}
        for name, a in CONTROL_SEQUENCES.items():
            frames = []
            for t in starts:
                env.restore_state(ep.states[int(t)])
                frames.append(np.stack([env.step(a)[0] for _ in range(Hc)]))
            ctrl_gt[name] = np.stack(frames)
        for m in models:
            t0 = time.perf_counter()
            pred = m.rollout(ctx, ctx_a, fut_a, seed=seed)
            ctrl = {
                name: m.rollout(ctx, ctx_a, np.full((len(starts), Hc), a), seed=seed)
                for name, a in CONTROL_SEQUENCES.items()
            }
            timings[m.name] += time.perf_counter() - t0
            for b in range(len(starts)):
                results[m.name]["windows"].append(
                    _window_metrics(pred[b], gt[b], ctx[b, -1], det, cfg.horizons)
                )
                sep = {}
                for name in CONTROL_SEQUENCES:
                    rows = {}
                    for hz in [h for h in cfg.horizons if h <= Hc]:
                        pm = det.paddle_x(ctrl[name][b, hz - 1])
                        pe = det.paddle_x(ctrl_gt[name][b, hz - 1])
                        rows[hz] = (
                            {} if pm is None or pe is None else {"paddle_error_px": abs(pm - pe)}
                        )
                        sep.setdefault(hz, {})[name] = (pm, pe)
                    results[m.name]["control"][name].append(rows)
                control_sep[m.name].append(sep)
    if not used:
        raise ConfigError(
            f"no evaluation episode reached {K + H} frames; use more episodes or shorter horizons"
        )
    report = {
        "game": cfg.game,
        "frame_hw": list(cfg.frame_hw),
        "frameskip": cfg.frameskip,
        "context_frames": K,
        "horizons": list(cfg.horizons),
        "control_horizon": Hc,
        "eval_seeds": seeds,
        "episodes": used,
        "skipped_episodes": skipped,
        "windows": sum(len(e["starts"]) for e in used),
        "models": {},
    }
    if cfg.long_rollout:
        first = used[0]
        ep = run_episode(env, first["policy"], first["seed"], max_steps=cfg.max_steps)
        report["drift"] = {"seed": first["seed"], "models": _drift(models, ep, cfg, det)}
    ctrl_h = [h for h in cfg.horizons if h <= Hc]
    for m in models:
        r = results[m.name]
        control = {name: _aggregate(rows, ctrl_h) for name, rows in r["control"].items()}
        agree = {}
        for hz in ctrl_h:
            votes = []
            for sep in control_sep[m.name]:
                (lm, le), (rm, re_) = sep[hz]["LEFT"], sep[hz]["RIGHT"]
                if le is None or re_ is None or abs(re_ - le) < 2.0:
                    continue  # the emulator itself did not separate them (paddle at a wall)
                ok = lm is not None and rm is not None and np.sign(rm - lm) == np.sign(re_ - le)
                votes.append(float(ok))
            agree[str(hz)] = {
                "direction_agree": float(np.mean(votes)) if votes else None,
                "n": len(votes),
            }
        smp = getattr(m, "sampler", None)
        report["models"][m.name] = {
            "sampler": None
            if smp is None
            else {"kind": smp.kind, "steps": smp.steps_of(0), "cfg_scale": smp.cfg_scale},
            "horizons": _aggregate(r["windows"], cfg.horizons),
            "controllability": {"sequences": control, "left_right": agree},
            "seconds": round(timings[m.name], 3),
        }
    return report
