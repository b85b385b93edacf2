"""Stage 3 — self forcing with distribution matching (SF-DMD), and its baselines (design §1.3).

The student rolls out a video autoregressively exactly as the streaming runtime does: chunk by
chunk, a few consistency steps per chunk over a KV cache of the earlier chunks. DMD then pulls the
rolled-out video towards the teacher's distribution:

    s_D ~ UniformShift(5),  x = (1 − s_D)·x0_θ + s_D·ε
    x0_real = teacher denoiser with CFG w,  x0_fake = fake-score denoiser (no CFG)
    grad    = (x0_fake − x0_real) / mean|x0_θ − x0_real|            (per sample)
    L_DMD   = Σ (x0_θ − sg(x0_θ − grad))²

while the fake score tracks the student's distribution with the flow-matching v-MSE on detached
student samples (several updates per student update).

What the trainer calls per iteration (Causal-rCM's stage 3; optimisers zeroed before each use):

    steps = schedule.steps(iteration, num_chunks, generator)      # cycled or random exit
    sampler = SamplerConfig(chunk_frames=…, steps_per_chunk=steps, cache_update=…, sink/window)
    for _ in range(fake_updates):                                  # 5 in the paper
        with torch.no_grad():
            x0 = self_forcing_rollout(student, sampler, B, F, …)   # fresh on-policy samples
        fake_score_loss(fake_score, x0, …).backward(); fake_opt.step()
    sf_dmd_step(student, teacher, fake_score, sampler, B, F, …, replay=…)  # backward inside
    student_opt.step()

Joint rCM (L_sCM + λ·L_DMD) uses ``sf_dmd_loss`` on a grad-carrying rollout instead of
``sf_dmd_step``, so that both terms share one backward.

Baselines are configurations of the same pieces:
  - **Self-Forcing**: ``RandomExitSchedule`` instead of ``CycledStepSchedule``; initialised by
    ODE regression (``generate_ode_pairs`` + ``ode_regression_loss``) or from a DF teacher.
  - **CausVid-style DF-DMD**: ``sf_dmd_loss`` on ``diffusion_forcing_outputs`` (student outputs
    from data-noised inputs under the block-causal mask) instead of a self-forced rollout.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from crcm.errors import ConfigError
from crcm.masks import block_causal_mask
from crcm.models.dit import Attention, AttnFn, CausalDiT, sdpa_attention
from crcm.sampling import SamplerConfig, euler_times
from crcm.training.timesteps import add_noise, uniform_shift

__all__ = [
    "CycledStepSchedule",
    "DenseKVCache",
    "RandomExitSchedule",
    "diffusion_forcing_outputs",
    "dmd_direction",
    "dmd_gradient",
    "fake_score_from_teacher",
    "fake_score_loss",
    "generate_ode_pairs",
    "ode_regression_loss",
    "self_forcing_rollout",
    "sf_dmd_loss",
    "sf_dmd_step",
]

DMD_TIME_SHIFT = 5.0  # s_D ~ UniformShift(5)
DMD_CFG_SCALE = 5.0  # the paper's teacher guidance for DMD
DMD_MIN_NORMALISER = 1e-5


# ---------------------------------------------------------------------------------------------
# Steps per chunk


@dataclass(frozen=True)
class CycledStepSchedule:
    """Causal-rCM: the per-chunk step pattern cycles over iterations.

    With the default cycle, iterations 0, 1, 2, 3, 4, … roll out with ``[1, 1, …]``,
    ``[2, 2, …]``, ``[3, 2, …]``, ``[4, 2, …]``, ``[1, 1, …]``, …; a pattern's last entry repeats
    for the remaining chunks (as ``SamplerConfig.steps_per_chunk``). ``every`` iterations share
    one pattern.
    """

    cycle: tuple[tuple[int, ...], ...] = ((1,), (2,), (3, 2), (4, 2))
    every: int = 1

    def __post_init__(self) -> None:
        if not self.cycle or any(not p or min(p) < 1 for p in self.cycle):
            raise ConfigError(f"cycle must hold non-empty positive step patterns, got {self.cycle}")
        if self.every < 1:
            raise ConfigError(f"every must be >= 1, got {self.every}")

    def steps(
        self, iteration: int, num_chunks: int, generator: torch.Generator | None = None
    ) -> tuple[int, ...]:
        """Steps of chunk 0 … ``num_chunks − 1`` at ``iteration`` (``generator`` is unused)."""
        _check_positive(num_chunks=num_chunks)
        pattern = self.cycle[(iteration // self.every) % len(self.cycle)]
        return tuple(pattern[min(i, len(pattern) - 1)] for i in range(num_chunks))


@dataclass(frozen=True)
class RandomExitSchedule:
    """Self-Forcing: each rollout exits after a random step ``n ~ U{1, …, max_steps}``.

    ``same_across_chunks=True`` (Self-Forcing's default) draws one ``n`` for the whole video;
    ``False`` draws one per chunk.
    """

    max_steps: int = 4
    same_across_chunks: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")

    def steps(
        self, iteration: int, num_chunks: int, generator: torch.Generator | None = None
    ) -> tuple[int, ...]:
        """Steps of chunk 0 … ``num_chunks − 1`` (``iteration`` is unused)."""
        _check_positive(num_chunks=num_chunks)
        draws = 1 if self.same_across_chunks else num_chunks
        n = torch.randint(
            1, self.max_steps + 1, (draws,), generator=generator, device=_device_of(generator)
        ).tolist()
        return tuple(n * num_chunks) if self.same_across_chunks else tuple(n)


# ---------------------------------------------------------------------------------------------
# A dense, training-side KV cache


@dataclass(frozen=True)
class _FrameKV:
    """One earlier frame's keys (after RoPE) and values, per layer; detached."""

    index: int
    k_B_N_H_D: tuple[Tensor, ...]
    v_B_N_H_D: tuple[Tensor, ...]


class DenseKVCache:
    """K/V of the frames generated so far, per frame and layer, with inference's sink + window.

    Unlike the runtime's paged cache it holds plain (detached) tensors, so a chunk's context can
    be kept by reference for replayed backprop. After every append it keeps the first
    ``sink_frames`` frames and the ``window_frames`` most recent others (all when ``None``):
    exactly the frames the runtime lets the next chunk see.
    """

    def __init__(self, sink_frames: int = 0, window_frames: int | None = None) -> None:
        if sink_frames < 0 or (window_frames is not None and window_frames < 0):
            raise ConfigError("sink_frames and window_frames must be >= 0")
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.frames: list[_FrameKV] = []

    def append(self, frame0: int, kv: dict[int, tuple[Tensor, Tensor]], num_frames: int) -> None:
        """Store frames ``frame0 …`` from a chunk forward's ``{layer: (k_B_L_H_D, v_B_L_H_D)}``."""
        layers = range(len(kv))
        ks = [kv[i][0].detach().unflatten(1, (num_frames, -1)) for i in layers]
        vs = [kv[i][1].detach().unflatten(1, (num_frames, -1)) for i in layers]
        for f in range(num_frames):
            self.frames.append(
                _FrameKV(frame0 + f, tuple(k[:, f] for k in ks), tuple(v[:, f] for v in vs))
            )
        sinks = [fr for fr in self.frames if fr.index < self.sink_frames]
        others = [fr for fr in self.frames if fr.index >= self.sink_frames]
        if self.window_frames is not None:
            others = others[max(0, len(others) - self.window_frames) :]
        self.frames = sinks + others

    def context(self) -> tuple[_FrameKV, ...]:
        """The frames the next chunk attends to (a snapshot: later appends do not change it)."""
        return tuple(self.frames)


def _cached_attention(
    context: Sequence[_FrameKV], capture: dict[int, tuple[Tensor, Tensor]] | None
) -> AttnFn:
    """``attn_fn`` for one chunk forward: its queries see the context frames and the chunk.

    Block-causal by construction, as in the runtime. ``capture`` receives the chunk's own K/V
    per layer (to append to the cache afterwards).
    """
    k_ctx = [torch.cat(ks, dim=1) for ks in zip(*(f.k_B_N_H_D for f in context), strict=True)]
    v_ctx = [torch.cat(vs, dim=1) for vs in zip(*(f.v_B_N_H_D for f in context), strict=True)]

    def attn_fn(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if capture is not None:
            capture[layer] = (k, v)
        if context:
            k = torch.cat([k_ctx[layer].to(k.dtype), k], dim=1)
            v = torch.cat([v_ctx[layer].to(v.dtype), v], dim=1)
        return sdpa_attention(q, k, v)

    return attn_fn


# ---------------------------------------------------------------------------------------------
# The self-forcing rollout


@dataclass(frozen=True)
class _ChunkRecord:
    """What replayed backprop needs to recompute a chunk's final step."""

    frame0: int
    x_B_T_C_H_W: Tensor  # input of the chunk's final denoising step (detached)
    s: float  # its time
    context: tuple[_FrameKV, ...]  # earlier frames' K/V it attended to (detached)
    prev_B_T_C_H_W: Tensor | None  # the frames before it, for prev_frames models (detached)


def _student_x0(
    student: CausalDiT,
    x_B_T_C_H_W: Tensor,
    s: float,
    frame0: int,
    context: Sequence[_FrameKV],
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    capture: dict[int, tuple[Tensor, Tensor]] | None = None,
    prev_B_T_C_H_W: Tensor | None = None,
) -> Tensor:
    """One chunk's denoised frames ``f_θ(x_s, s | KV) = x_s − s·v_θ``; ``[B, T, C, H, W]``."""
    B, T = x_B_T_C_H_W.shape[:2]
    dev = x_B_T_C_H_W.device
    s_B_T = torch.full((B, T), s, device=dev)
    frame_pos_B_T = (frame0 + torch.arange(T, device=dev)).expand(B, T)
    actions = None if actions_B_T is None else actions_B_T[:, frame0 : frame0 + T]
    v_B_T_C_H_W = student(
        x_B_T_C_H_W,
        s_B_T,
        frame_pos_B_T=frame_pos_B_T,
        cond=cond,
        actions_B_T=actions,
        attention=_cached_attention(context, capture),
        prev_B_T_C_H_W=prev_B_T_C_H_W,
    )
    return x_B_T_C_H_W - s * v_B_T_C_H_W


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    # Drawn on the generator's device and moved, as the runtime does, so that a seed gives the
    # same video on every device.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=gen_device)
    return noise.to(like.device, like.dtype)


def _rollout(
    student: CausalDiT,
    sampler: SamplerConfig,
    batch_size: int,
    num_frames: int,
    *,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    generator: torch.Generator | None,
    frame_hw: tuple[int, int] | None,
    grad: bool,
    records: list[_ChunkRecord] | None,
    context_B_K_C_H_W: Tensor | None = None,
) -> Tensor:
    if sampler.kind != "consistency":
        raise ConfigError(f"the student rolls out with consistency steps, not {sampler.kind!r}")
    _check_positive(batch_size=batch_size, num_frames=num_frames)
    T = sampler.chunk_frames
    if num_frames % T:
        raise ConfigError(f"num_frames={num_frames} is not a multiple of chunk_frames={T}")
    if actions_B_T is not None and tuple(actions_B_T.shape) != (batch_size, num_frames):
        raise ValueError(
            f"actions_B_T must be [{batch_size}, {num_frames}], got {list(actions_B_T.shape)}"
        )
    H, W = frame_hw or student.cfg.frame_hw
    chunk_shape = (batch_size, T, student.cfg.in_channels, H, W)
    like = next(student.parameters())
    k_prev = student.cfg.prev_frames
    if k_prev and T != 1:
        raise ConfigError(
            f"a model conditioned on its previous frames streams one frame per chunk, not {T}"
        )
    given = 0 if context_B_K_C_H_W is None else context_B_K_C_H_W.shape[1]
    if (
        given % T
        or given >= num_frames
        or (given and tuple(context_B_K_C_H_W.shape) != (batch_size, given, *chunk_shape[2:]))
    ):
        raise ConfigError(
            f"context frames must be [{batch_size}, K, {', '.join(map(str, chunk_shape[2:]))}] "
            f"with K a multiple of {T} below num_frames={num_frames}"
        )

    cache = DenseKVCache(sampler.sink_frames, sampler.window_frames)
    chunks_x0: list[Tensor] = []
    for chunk in range(num_frames // T):
        frame0 = chunk * T
        context = cache.context()
        n = sampler.steps_of(chunk)
        times = sampler.times[:n]
        x = _randn(chunk_shape, generator, like)
        prev = None
        if k_prev:  # the stream's own finished frames, as at inference (detached)
            history = torch.cat(chunks_x0[-k_prev:], dim=1).detach() if chunks_x0 else None
            prev = student.next_frame_previous(history, x)
        captured: dict[int, tuple[Tensor, Tensor]] = {}
        if frame0 < given:
            # A ground-truth context chunk, as the runtime prefills one: its clean frames at
            # s = 0 fill the cache (one noise draw per chunk, as there), nothing is sampled.
            x0 = context_B_K_C_H_W[:, frame0 : frame0 + T].to(like.dtype)
            with torch.no_grad():
                _student_x0(student, x0, 0.0, frame0, context, cond, actions_B_T, captured, prev)
            chunks_x0.append(x0)
            cache.append(frame0, captured, T)
            continue
        for k, s in enumerate(times):
            last = k == n - 1
            if last and records is not None:
                records.append(_ChunkRecord(frame0, x, s, context, prev))
            # Only the chunk's final step builds a graph: earlier steps (and, through the
            # detached cache, earlier chunks) are constants of this chunk's loss.
            with torch.set_grad_enabled(grad and last):
                x0 = _student_x0(
                    student,
                    x,
                    s,
                    frame0,
                    context,
                    cond,
                    actions_B_T,
                    capture=captured if last and not sampler.cache_update else None,
                    prev_B_T_C_H_W=prev,
                )
            if not last:
                s_next = times[k + 1]
                x = (1 - s_next) * x0 + s_next * _randn(chunk_shape, generator, like)
        chunks_x0.append(x0)
        if chunk == num_frames // T - 1:
            break  # nothing attends to the last chunk
        if sampler.cache_update:
            # The cache holds the clean chunk as inference sees it: one extra forward at s = 0.
            with torch.no_grad():
                _student_x0(
                    student, x0.detach(), 0.0, frame0, context, cond, actions_B_T, captured, prev
                )
        # Noisy context: the K/V of the chunk's last denoising forward (N, not N + 1 forwards).
        cache.append(frame0, captured, T)
    return torch.cat(chunks_x0, dim=1)


def self_forcing_rollout(
    student: CausalDiT,
    sampler: SamplerConfig,
    batch_size: int,
    num_frames: int,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    frame_hw: tuple[int, int] | None = None,
    context_B_K_C_H_W: Tensor | None = None,
) -> Tensor:
    """Roll the student out autoregressively, exactly as streaming inference does.

    Chunk by chunk (``sampler.chunk_frames`` frames), with ``n = sampler.steps_of(chunk)``
    consistency steps at times ``s_0 > … > s_{n−1}`` (``sampler.times[:n]``) from pure noise:

        x0̂ = f_θ(x_{s_k}, s_k | KV of earlier chunks) = x_{s_k} − s_k·v_θ
        x_{s_{k+1}} = (1 − s_{k+1})·x0̂ + s_{k+1}·ε

    The chunk's output is the x0̂ of its last step, the only step that carries gradient (when
    grad is enabled); earlier steps and the cached K/V of earlier chunks are detached. After each
    chunk, a cache-update forward of the clean chunk at s = 0 appends its K/V
    (``sampler.cache_update``); otherwise (noisy context) the K/V of the chunk's last denoising
    forward is kept. The cache keeps ``sampler.sink_frames`` + ``sampler.window_frames`` frames;
    RoPE positions are absolute frame indices.

    Noise is drawn from ``generator`` in the runtime's order (each chunk: its initial noise, then
    one re-noise per non-final step), so with ``batch_size = 1`` a seed gives the runtime's video.

    Args:
        sampler: a ``kind="consistency"`` sampler; draw ``steps_per_chunk`` from a step schedule.
        batch_size, num_frames: video shape (``num_frames`` a multiple of ``chunk_frames``).
        cond: per-video condition (``[B]`` class ids or ``[B, L, D]`` text), ``None`` = null.
        actions_B_T: integer action per frame for all ``num_frames``, or ``None``.
        frame_hw: model-space frame size (default the config's ``frame_hw``).
        context_B_K_C_H_W: ground-truth frames the rollout starts from (a session opened with
            ``context=``): they fill the cache at s = 0 and are the video's first ``K`` frames
            (constants: no gradient), and the student continues from them.
    Returns:
        ``x0_B_T_C_H_W``, the rolled-out video in model space (context frames included).
    """
    return _rollout(
        student,
        sampler,
        batch_size,
        num_frames,
        cond=cond,
        actions_B_T=actions_B_T,
        generator=generator,
        frame_hw=frame_hw,
        grad=torch.is_grad_enabled(),
        records=None,
        context_B_K_C_H_W=context_B_K_C_H_W,
    )


# ---------------------------------------------------------------------------------------------
# Distribution matching


def _guided_velocity(
    model: CausalDiT,
    x_B_T_C_H_W: Tensor,
    s_B_T: Tensor,
    *,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    attention: Attention,
    cfg_scale: float,
    prev_B_T_C_H_W: Tensor | None = None,
    frame_pos_B_T: Tensor | None = None,
) -> Tensor:
    """CFG velocity ``v(x | ∅) + w·(v(x | c) − v(x | ∅))``, both branches in one forward
    (the conditioned rows first: an ``attention`` callable sees them in that order).

    ∅ follows ``objectives.guided_velocity``: the null per-video condition (actions kept), or,
    for models without one (world models), the null action on every frame. ``cond=None`` on a
    conditioned model is already ∅: plain velocity.
    """
    prev = prev_B_T_C_H_W
    if cfg_scale == 1.0 or (model.cfg.cond != "none" and cond is None):
        return model(
            x_B_T_C_H_W,
            s_B_T,
            cond=cond,
            actions_B_T=actions_B_T,
            attention=attention,
            prev_B_T_C_H_W=prev,
            frame_pos_B_T=frame_pos_B_T,
        )
    B = x_B_T_C_H_W.shape[0]
    if model.cfg.cond != "none":
        both_cond = torch.cat(
            [cond, model.drop_cond(cond, torch.ones(B, dtype=torch.bool, device=cond.device))]
        )
        both_actions = None if actions_B_T is None else actions_B_T.repeat(2, 1)
    elif actions_B_T is not None:
        both_cond = None
        both_actions = torch.cat([actions_B_T, torch.full_like(actions_B_T, model.null_action)])
    else:
        raise ValueError("CFG (cfg_scale != 1) needs a per-video condition or actions to drop")
    v_cond, v_uncond = model(
        x_B_T_C_H_W.repeat(2, 1, 1, 1, 1),
        s_B_T.repeat(2, 1),
        cond=both_cond,
        actions_B_T=both_actions,
        attention=attention,
        prev_B_T_C_H_W=None if prev is None else prev.repeat(2, 1, 1, 1, 1),
        frame_pos_B_T=None if frame_pos_B_T is None else frame_pos_B_T.repeat(2, 1),
    ).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def dmd_direction(x0_B_T_C_H_W: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The DMD update direction ``grad = (x0_fake − x0_real) / mean|x0_θ − x0_real|``.

    The normaliser is one number per sample (mean over T, C, H, W), clamped at ≥ 1e-5 so that a
    student already on the teacher's manifold does not divide by zero. ``[B, T, C, H, W]``.
    """
    dims = tuple(range(1, x0_B_T_C_H_W.ndim))
    normaliser_B = (x0_B_T_C_H_W - x0_real).abs().mean(dim=dims, keepdim=True)
    return (x0_fake - x0_real) / normaliser_B.clamp_min(DMD_MIN_NORMALISER)


@torch.no_grad()
def dmd_gradient(
    x0_B_T_C_H_W: Tensor,
    teacher: CausalDiT,
    fake_score: CausalDiT,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = DMD_CFG_SCALE,
    time_shift: float = DMD_TIME_SHIFT,
    attention: Attention = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DMD's ``grad`` for a batch of student videos (no graph).

    One ``s_D ~ UniformShift(time_shift)`` per sample for all its frames, ``x = noise(x0_θ, s_D)``;
    ``x0_real = x − s_D·v_teacher`` with CFG ``cfg_scale``, ``x0_fake = x − s_D·v_fake`` without;
    returns ``dmd_direction(x0_θ, x0_real, x0_fake)``. ``attention`` is the teacher's (and fake
    score's) mask: ``None`` for the bidirectional stage-0 teacher, a ``block_causal_mask`` for a
    causal one. Draws ``s_D`` then ``ε`` from ``generator``.
    """
    x0 = x0_B_T_C_H_W.detach()
    B, T = x0.shape[:2]
    s_B = uniform_shift((B,), time_shift, generator=generator, device=_gen_device(generator))
    s_B_T = s_B.to(x0.device)[:, None].expand(B, T).contiguous()
    # Mix in x0's precision (the network sees float32 times either way).
    x = add_noise(x0, _randn(tuple(x0.shape), generator, x0), s_B_T.to(x0.dtype))
    s_b = s_B_T[:, :, None, None, None].to(x0.dtype)
    common = dict(
        cond=cond,
        actions_B_T=actions_B_T,
        attention=attention,
        prev_B_T_C_H_W=teacher.previous_frames(x0),
    )
    v_real = _guided_velocity(teacher, x, s_B_T, cfg_scale=cfg_scale, **common)
    v_fake = _guided_velocity(fake_score, x, s_B_T, cfg_scale=1.0, **common)
    return dmd_direction(x0, x - s_b * v_real, x - s_b * v_fake)


def _dmd_regression(x0_B_T_C_H_W: Tensor, target_B_T_C_H_W: Tensor) -> Tensor:
    """``Σ_{T,C,H,W}(x0_θ − target)²``, mean over the batch."""
    B = x0_B_T_C_H_W.shape[0]
    return (x0_B_T_C_H_W - target_B_T_C_H_W).square().sum() / B


def sf_dmd_loss(
    x0_B_T_C_H_W: Tensor,
    teacher: CausalDiT,
    fake_score: CausalDiT,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = DMD_CFG_SCALE,
    time_shift: float = DMD_TIME_SHIFT,
    attention: Attention = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The DMD loss on the student's videos: ``L = Σ (x0_θ − sg(x0_θ − grad))²``.

    ``grad`` is ``dmd_gradient`` (see there for ``s_D``, CFG and the teacher's mask). Reduced by
    a sum over T, C, H, W and a mean over the batch, so ``∂L/∂x0_θ = 2·grad/B``: the student
    moves along ``−grad``, from the fake score's denoising towards the teacher's.
    ``x0_B_T_C_H_W`` is a rolled-out video (``self_forcing_rollout``) for SF-DMD, or
    ``diffusion_forcing_outputs`` for CausVid-style DF-DMD. Returns a scalar.
    """
    grad = dmd_gradient(
        x0_B_T_C_H_W,
        teacher,
        fake_score,
        cond=cond,
        actions_B_T=actions_B_T,
        cfg_scale=cfg_scale,
        time_shift=time_shift,
        attention=attention,
        generator=generator,
    )
    return _dmd_regression(x0_B_T_C_H_W, (x0_B_T_C_H_W - grad).detach())


def sf_dmd_step(
    student: CausalDiT,
    teacher: CausalDiT,
    fake_score: CausalDiT,
    sampler: SamplerConfig,
    batch_size: int,
    num_frames: int,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = DMD_CFG_SCALE,
    time_shift: float = DMD_TIME_SHIFT,
    teacher_attention: Attention = None,
    generator: torch.Generator | None = None,
    frame_hw: tuple[int, int] | None = None,
    replay: bool = False,
    context_B_K_C_H_W: Tensor | None = None,
) -> Tensor:
    """One SF-DMD student step: roll out, compute ``sf_dmd_loss`` and backpropagate into
    ``student``'s ``.grad`` (accumulating; the caller zeroes and steps the optimiser).

    ``replay=False`` backpropagates through the whole rollout at once: the graphs of every
    chunk's final step are alive together. ``replay=True`` (replayed backprop) rolls out without
    a graph, keeping for each chunk the input and time of its final step and the (detached) K/V
    it attended to; computes the DMD target ``x0_θ − grad`` on the whole video; then recomputes
    each chunk's final step with a graph and backpropagates its share of the loss, one chunk at a
    time — peak activation memory of one chunk forward. Both give the same gradients (the loss
    is a sum over chunks and each chunk's graph starts at detached inputs).

    ``context_B_K_C_H_W``: ground-truth frames the rollout starts from (see
    ``self_forcing_rollout``); the DMD loss then scores the whole clip, context included, and
    only the generated frames carry gradient.

    Draws the rollout's noise, then ``s_D`` and ``ε`` from ``generator``. Returns the loss value
    (detached scalar).
    """
    dmd = dict(
        cond=cond,
        actions_B_T=actions_B_T,
        cfg_scale=cfg_scale,
        time_shift=time_shift,
        attention=teacher_attention,
        generator=generator,
    )
    rollout = dict(
        cond=cond,
        actions_B_T=actions_B_T,
        generator=generator,
        frame_hw=frame_hw,
        context_B_K_C_H_W=context_B_K_C_H_W,
    )
    if not replay:
        with torch.enable_grad():
            x0 = self_forcing_rollout(student, sampler, batch_size, num_frames, **rollout)
            loss = sf_dmd_loss(x0, teacher, fake_score, **dmd)
            loss.backward()
        return loss.detach()

    records: list[_ChunkRecord] = []
    x0 = _rollout(student, sampler, batch_size, num_frames, grad=False, records=records, **rollout)
    target_B_T_C_H_W = x0 - dmd_gradient(x0, teacher, fake_score, **dmd)
    total = torch.zeros((), device=x0.device, dtype=x0.dtype)
    for rec in records:
        frames = slice(rec.frame0, rec.frame0 + rec.x_B_T_C_H_W.shape[1])
        with torch.enable_grad():
            x0_chunk = _student_x0(
                student,
                rec.x_B_T_C_H_W,
                rec.s,
                rec.frame0,
                rec.context,
                cond,
                actions_B_T,
                prev_B_T_C_H_W=rec.prev_B_T_C_H_W,
            )
            loss = _dmd_regression(x0_chunk, target_B_T_C_H_W[:, frames])
            loss.backward()
        total += loss.detach()
    return total


# ---------------------------------------------------------------------------------------------
# The fake score


def fake_score_from_teacher(teacher: CausalDiT) -> CausalDiT:
    """The fake score's initialisation: a trainable copy of the teacher."""
    fake = copy.deepcopy(teacher)
    fake.requires_grad_(True)
    return fake


def fake_score_loss(
    fake_score: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    time_shift: float = DMD_TIME_SHIFT,
    attention: Attention = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flow matching on the student's (detached) samples: ``mean (v_φ(x_s, s) − (ε − x0))²``.

    One ``s ~ UniformShift(time_shift)`` per sample (the distribution DMD queries the fake score
    at), ``x_s = (1 − s)·x0 + s·ε``; mean over every element. ``attention`` as the teacher's.
    The trainer calls it (with fresh no-grad rollouts) several times per student update (5 in
    the paper). Draws ``s`` then ``ε`` from ``generator``. Returns a scalar.
    """
    x0 = x0_B_T_C_H_W.detach()
    B, T = x0.shape[:2]
    s_B = uniform_shift((B,), time_shift, generator=generator, device=_gen_device(generator))
    s_B_T = s_B.to(x0.device)[:, None].expand(B, T).contiguous()
    eps = _randn(tuple(x0.shape), generator, x0)
    v_B_T_C_H_W = fake_score(
        add_noise(x0, eps, s_B_T.to(x0.dtype)),
        s_B_T,
        cond=cond,
        actions_B_T=actions_B_T,
        attention=attention,
        prev_B_T_C_H_W=fake_score.previous_frames(x0),
    )
    return (v_B_T_C_H_W - (eps - x0)).square().mean()


# ---------------------------------------------------------------------------------------------
# Baselines


def diffusion_forcing_outputs(
    student: CausalDiT,
    x0_data_B_T_C_H_W: Tensor,
    times: Sequence[float],
    chunk_frames: int,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CausVid-style DF-DMD inputs: the student's x0̂ from data-noised chunks (with grad).

    Each chunk of each sample gets its own time ``s`` drawn uniformly from the student's
    ``times``; ``x_s = (1 − s)·x0_data + s·ε``; one forward under the block-causal mask, so a
    chunk sees the *noisy* data chunks before it — training-time context, not the student's own
    rollout (the exposure bias self forcing removes). Feed the result to ``sf_dmd_loss``.
    Draws the time indices then ``ε`` from ``generator``. Returns ``x0_B_T_C_H_W``.
    """
    s_B_T = _chunk_times(x0_data_B_T_C_H_W, times, chunk_frames, generator)
    eps = _randn(tuple(x0_data_B_T_C_H_W.shape), generator, x0_data_B_T_C_H_W)
    x_s = add_noise(x0_data_B_T_C_H_W, eps, s_B_T.to(x0_data_B_T_C_H_W.dtype))
    prev = student.previous_frames(x0_data_B_T_C_H_W)
    return _block_causal_x0(student, x_s, s_B_T, chunk_frames, cond, actions_B_T, prev)


@torch.no_grad()
def generate_ode_pairs(
    teacher: CausalDiT,
    noise_B_T_C_H_W: Tensor,
    times: Sequence[float],
    *,
    num_steps: int = 48,
    shift: float = 5.0,
    cfg_scale: float = 3.0,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    attention: Attention = None,
) -> tuple[Tensor, Tensor]:
    """Self-Forcing's ODE-regression data: teacher Euler trajectories sampled at the student's
    times.

    Euler on the RF ODE with CFG from ``x_1 = ε`` over ``euler_times(num_steps, shift)`` with the
    student's ``times`` inserted into the grid, so that the trajectory passes through each of
    them exactly; ``attention`` is the teacher's mask (``None`` for the bidirectional teacher).
    Returns ``(x_B_K_T_C_H_W, x0_B_T_C_H_W)``: the states at ``times[k]`` (K = len(times)) and
    the trajectory's end point at s = 0.
    """
    times = _check_times(times)
    grid = [*sorted(set(euler_times(num_steps, shift)) | set(times), reverse=True), 0.0]
    B, T = noise_B_T_C_H_W.shape[:2]
    guided = dict(cond=cond, cfg_scale=cfg_scale)
    if teacher.cfg.prev_frames:
        return _sequential_ode_pairs(teacher, noise_B_T_C_H_W, times, grid, actions_B_T, guided)
    x = noise_B_T_C_H_W
    states: dict[float, Tensor] = {}
    for s, s_next in itertools.pairwise(grid):
        if s in times:
            states[s] = x
        s_B_T = torch.full((B, T), s, device=x.device)
        v = _guided_velocity(
            teacher, x, s_B_T, actions_B_T=actions_B_T, attention=attention, **guided
        )
        x = x + (s_next - s) * v
    return torch.stack([states[s] for s in times], dim=1), x


def _sequential_ode_pairs(
    teacher: CausalDiT,
    noise_B_T_C_H_W: Tensor,
    times: list[float],
    grid: list[float],
    actions_B_T: Tensor | None,
    guided: dict,
) -> tuple[Tensor, Tensor]:
    """``generate_ode_pairs`` for a teacher conditioned on its previous frames: a frame's
    trajectory needs the finished frames before it, so frames are solved one after another,
    each behind the clean frames already solved (what the teacher sees when it streams).

    As in the self-forcing rollout, the finished frames' keys and values sit in a
    :class:`DenseKVCache`, written by one forward of each finished frame at s = 0, and every
    Euler step runs the frame being solved only: ``T`` frame-forwards per step for a clip of
    ``T`` frames instead of ``T(T + 1)/2``. Guidance runs both branches in each forward, so
    the cache holds both."""
    B, T = noise_B_T_C_H_W.shape[:2]
    dev = noise_B_T_C_H_W.device
    cache = DenseKVCache()
    done: list[Tensor] = []  # finished frames, [B, 1, C, H, W] each
    states_by_frame: list[Tensor] = []  # [B, K, 1, C, H, W] per frame
    for t in range(T):
        x = noise_B_T_C_H_W[:, t : t + 1]
        frame = {
            "actions_B_T": None if actions_B_T is None else actions_B_T[:, t : t + 1],
            # the frame's previous frames are the finished ones (its own value is not read)
            "prev_B_T_C_H_W": None
            if not teacher.cfg.prev_frames
            else teacher.previous_frames(torch.cat([*done, x], dim=1))[:, t : t + 1],
            "frame_pos_B_T": torch.full((B, 1), t, device=dev),
            **guided,
        }
        context = cache.context()
        attention = _cached_attention(context, None)  # the context's K/V joined once a frame
        states: dict[float, Tensor] = {}
        for s, s_next in itertools.pairwise(grid):
            if s in times:
                states[s] = x
            s_B_1 = torch.full((B, 1), s, device=dev)
            v = _guided_velocity(teacher, x, s_B_1, attention=attention, **frame)
            x = x + (s_next - s) * v
        captured: dict[int, tuple[Tensor, Tensor]] = {}
        attention = _cached_attention(context, captured)
        _guided_velocity(teacher, x, torch.zeros(B, 1, device=dev), attention=attention, **frame)
        cache.append(t, captured, 1)
        done.append(x)
        states_by_frame.append(torch.stack([states[s] for s in times], dim=1))
    return torch.cat(states_by_frame, dim=2), torch.cat(done, dim=1)


def ode_regression_loss(
    student: CausalDiT,
    x_B_K_T_C_H_W: Tensor,
    x0_B_T_C_H_W: Tensor,
    times: Sequence[float],
    chunk_frames: int,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Self-Forcing's ODE-regression init: ``mean (f_θ(x_{s_k}, s_k) − x0_ODE)²``.

    Every chunk of every sample takes the teacher trajectory's state at its own student time
    ``s_k`` (k uniform over ``times``), as diffusion forcing does; one forward under the
    block-causal mask; regress the student's x0̂ onto the trajectory's end point. Mean over
    every element. Draws the time indices from ``generator``. Returns a scalar.
    """
    times = _check_times(times)
    B, K, T = x_B_K_T_C_H_W.shape[:3]
    if len(times) != K or x0_B_T_C_H_W.shape != x_B_K_T_C_H_W[:, 0].shape:
        raise ValueError(
            f"x_B_K_T_C_H_W {list(x_B_K_T_C_H_W.shape)} must hold one state per time "
            f"({len(times)}) of the videos x0_B_T_C_H_W {list(x0_B_T_C_H_W.shape)}"
        )
    k_B_T = _chunk_time_indices(B, T, len(times), chunk_frames, generator).to(x0_B_T_C_H_W.device)
    s_B_T = torch.tensor(times, device=x0_B_T_C_H_W.device)[k_B_T]
    index = k_B_T[:, None, :, None, None, None].expand(-1, 1, -1, *x_B_K_T_C_H_W.shape[3:])
    x_s = x_B_K_T_C_H_W.gather(1, index)[:, 0]
    prev = student.previous_frames(x0_B_T_C_H_W)
    x0_hat = _block_causal_x0(student, x_s, s_B_T, chunk_frames, cond, actions_B_T, prev)
    return (x0_hat - x0_B_T_C_H_W).square().mean()


# ---------------------------------------------------------------------------------------------
# Helpers


def _block_causal_x0(
    student: CausalDiT,
    x_B_T_C_H_W: Tensor,
    s_B_T: Tensor,
    chunk_frames: int,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    prev_B_T_C_H_W: Tensor | None = None,
) -> Tensor:
    T, _, H, W = x_B_T_C_H_W.shape[1:]
    mask = block_causal_mask(T, chunk_frames, student.tokens_per_frame(H, W))
    v = student(
        x_B_T_C_H_W,
        s_B_T,
        cond=cond,
        actions_B_T=actions_B_T,
        attention=mask,
        prev_B_T_C_H_W=prev_B_T_C_H_W,
    )
    return x_B_T_C_H_W - s_B_T[:, :, None, None, None].to(v.dtype) * v


def _chunk_time_indices(
    B: int, T: int, num_times: int, chunk_frames: int, generator: torch.Generator | None
) -> Tensor:
    """An index into the student's times per (sample, chunk), repeated over the chunk's frames."""
    _check_positive(chunk_frames=chunk_frames)
    if T % chunk_frames:
        raise ConfigError(f"T={T} is not a multiple of chunk_frames={chunk_frames}")
    k = torch.randint(
        0, num_times, (B, T // chunk_frames), generator=generator, device=_device_of(generator)
    )
    return k.repeat_interleave(chunk_frames, dim=1)


def _device_of(generator: torch.Generator | None) -> torch.device | None:
    """Where draws from ``generator`` must be made (the trainer's generators live on its device,
    and torch refuses a CUDA generator for a CPU tensor)."""
    return None if generator is None else generator.device


def _chunk_times(
    x_B_T_C_H_W: Tensor,
    times: Sequence[float],
    chunk_frames: int,
    generator: torch.Generator | None,
) -> Tensor:
    times = _check_times(times)
    B, T = x_B_T_C_H_W.shape[:2]
    k_B_T = _chunk_time_indices(B, T, len(times), chunk_frames, generator)
    return torch.tensor(times, device=x_B_T_C_H_W.device)[k_B_T.to(x_B_T_C_H_W.device)]


def _check_times(times: Sequence[float]) -> list[float]:
    times = [float(s) for s in times]
    if not times or any(not 0 < s <= 1 for s in times):
        raise ConfigError(f"student times must be non-empty and in (0, 1], got {times}")
    return times


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
