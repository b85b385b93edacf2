"""The per-stage training objectives of the Causal-rCM recipe (design §1.3).

One function per objective, named after it, its equation in the docstring:

  stage 0  ``flow_matching_loss``   bidirectional v-MSE (full mask)
  stage 1  ``tf_teacher_loss``      teacher forcing: packed ``[x0 | x_s]``, bell-weighted v-MSE
           ``df_teacher_loss``      diffusion forcing: block-causal, a time per chunk
  stage 2  ``tf_scm_loss``          TF-sCM, RF-native continuous-time consistency (the paper's)
           ``tf_dcm_loss``          TF-dCM, discrete-time consistency on a 48-step grid
           ``trigflow_scm_loss``    TF-sCM in rCM's TrigFlow parametrisation (an alternative)

Conventions (design §1.1): RF time ``s ∈ [0, 1]``, ``x_s = (1 − s)·x0 + s·ε``, the network
predicts ``v = ε − x0``, the denoiser is ``x0̂ = x_s − s·v``. Tensors are named with their shapes;
``B`` batch, ``T`` frames of the clip, ``2T`` frames of a packed teacher-forcing sequence.

Every loss returns ``(loss, logs)``: a scalar to backpropagate and a small dict of detached
scalar tensors to log (tensors, not floats, so that logging does not synchronise the GPU).

Randomness: every sampler takes ``generator``; the consistency losses also accept explicit times
and noise, so that a fixed validation batch (or a test) can evaluate them deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import jvp

from crcm.kernels._common import Backend
from crcm.masks import Mask, block_causal_mask, teacher_forcing_mask
from crcm.models.dit import CausalDiT
from crcm.sampling import DEFAULT_SHIFT, euler_step, euler_times, hold_still
from crcm.training.jvp import model_jvp
from crcm.training.timesteps import (
    add_noise,
    lognormal,
    rf_to_trigflow,
    trigflow_to_rf,
    trigflow_wrapper_coefficients,
    uniform_shift,
)

__all__ = [
    "TeacherForcingBatch",
    "bell_weight",
    "df_teacher_loss",
    "drop_conditions",
    "flow_matching_loss",
    "guided_velocity",
    "pack_teacher_forcing",
    "scm_regression_loss",
    "tangent_warmup",
    "tf_dcm_loss",
    "tf_scm_loss",
    "tf_teacher_loss",
    "trigflow_scm_loss",
    "x0_weight",
]

Logs = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------
# Shared pieces


@dataclass(frozen=True)
class TeacherForcingBatch:
    """The packed teacher-forcing sequence ``[clean | noisy]`` of ``2T`` frames (design §1.2).

    Both halves carry the same RoPE frame positions, actions and previous frames; under
    ``mask`` a noisy chunk sees the clean chunks before it and itself, so the noisy half's output
    is what the causal model would predict for each chunk given the clean past.
    """

    x_B_2T_C_H_W: Tensor
    s_B_2T: Tensor
    frame_pos_B_2T: Tensor
    actions_B_2T: Tensor | None
    mask: Mask
    num_frames: int  # T: frames per half
    prev_B_2T: Tensor | None = None  # the clean frames before each frame (prev_frames models)

    def noisy_half(self, y_B_2T: Tensor) -> Tensor:
        """Frames ``T..2T`` of a packed tensor (the only half whose output is used)."""
        return y_B_2T[:, self.num_frames :]

    def pack_like(self, clean_B_T: Tensor, noisy_B_T: Tensor) -> Tensor:
        """``[clean | noisy]`` along the frame axis (e.g. tangents ``[0 | v_T]``)."""
        return torch.cat([clean_B_T, noisy_B_T], dim=1)

    def velocity(self, model: CausalDiT, cond: Tensor | None) -> Tensor:
        """The model's velocity on the noisy half, ``[B, T, C, H, W]``."""
        v_B_2T = model(
            self.x_B_2T_C_H_W,
            self.s_B_2T,
            frame_pos_B_T=self.frame_pos_B_2T,
            cond=cond,
            actions_B_T=self.actions_B_2T,
            attention=self.mask,
            prev_B_T_C_H_W=self.prev_B_2T,
        )
        return self.noisy_half(v_B_2T)


def pack_teacher_forcing(
    x0_B_T_C_H_W: Tensor,
    x_s_B_T_C_H_W: Tensor,
    s_B_T: Tensor,
    *,
    chunk_frames: int,
    tokens_per_frame: int,
    actions_B_T: Tensor | None = None,
    frame_pos_B_T: Tensor | None = None,
    s_context_B_T: Tensor | None = None,
    prev_B_T_C_H_W: Tensor | None = None,
) -> TeacherForcingBatch:
    """Pack clean context and noisy frames into one teacher-forcing sequence.

    Args:
        x0_B_T_C_H_W: the clean context (possibly slightly noised: context augmentation).
        x_s_B_T_C_H_W: the noisy frames at RF times ``s_B_T``.
        chunk_frames: frames per autoregressive chunk (``T`` must be a multiple).
        tokens_per_frame: tokens of one frame (``model.tokens_per_frame(H, W)``).
        actions_B_T: per-frame actions (repeated on both halves), or None.
        frame_pos_B_T: RoPE frame positions (default ``0..T−1``), repeated on both halves.
        s_context_B_T: RF time of the context frames (default 0: clean).
        prev_B_T_C_H_W: the clean frames before each frame (``preceding_frames`` of the clip)
            for a model with ``prev_frames``, repeated on both halves; None otherwise.
    """
    if x0_B_T_C_H_W.shape != x_s_B_T_C_H_W.shape or x0_B_T_C_H_W.ndim != 5:
        raise ValueError(
            f"x0 and x_s must both be [B, T, C, H, W] of one shape, got "
            f"{list(x0_B_T_C_H_W.shape)} and {list(x_s_B_T_C_H_W.shape)}"
        )
    B, T = x0_B_T_C_H_W.shape[:2]
    if s_B_T.shape != (B, T):
        raise ValueError(f"s_B_T must be [{B}, {T}], got {list(s_B_T.shape)}")
    device = x0_B_T_C_H_W.device
    if frame_pos_B_T is None:
        frame_pos_B_T = torch.arange(T, device=device).expand(B, T)
    if s_context_B_T is None:
        s_context_B_T = torch.zeros_like(s_B_T)
    return TeacherForcingBatch(
        x_B_2T_C_H_W=torch.cat([x0_B_T_C_H_W, x_s_B_T_C_H_W], dim=1),
        s_B_2T=torch.cat([s_context_B_T.to(s_B_T.dtype), s_B_T], dim=1),
        frame_pos_B_2T=frame_pos_B_T.repeat(1, 2),
        actions_B_2T=None if actions_B_T is None else actions_B_T.repeat(1, 2),
        mask=teacher_forcing_mask(T, chunk_frames, tokens_per_frame),
        num_frames=T,
        prev_B_2T=None if prev_B_T_C_H_W is None else prev_B_T_C_H_W.repeat(1, 2, 1, 1, 1),
    )


def bell_weight(s: Tensor) -> Tensor:
    """TF teacher loss weight ``w(s) = exp(−2·(s − 0.5)²) − e^(−0.5)``: 0 at s = 0 and 1,
    largest (1 − e^(−0.5) ≈ 0.39) at s = 0.5."""
    return torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)


def x0_weight(s: Tensor) -> Tensor:
    """``w(s) = s²``: times the v-MSE it is the squared error of the clean frame
    ``x0̂ = x_s − s·v``, since ``x0̂ − x0 = −s·(v̂ − v)``; every noise level weighs alike in
    image space (the loss of an x0-predicting model; see ``DiTConfig.prediction``)."""
    return s.square()


def drop_conditions(
    model: CausalDiT,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    *,
    cond_dropout: float,
    action_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Condition dropout for CFG: each sample loses its condition with probability
    ``cond_dropout`` (→ the null condition, ``model.drop_cond``) and, independently, all its
    actions with probability ``action_dropout`` (→ ``model.null_action``)."""
    for name, p in (("cond_dropout", cond_dropout), ("action_dropout", action_dropout)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if cond is not None and cond_dropout > 0:
        B, device = cond.shape[0], cond.device
        drop_B = torch.rand(B, generator=generator, device=device) < cond_dropout
        cond = model.drop_cond(cond, drop_B)
    if actions_B_T is not None and action_dropout > 0:
        B, device = actions_B_T.shape[0], actions_B_T.device
        drop_B = torch.rand(B, generator=generator, device=device) < action_dropout
        actions_B_T = torch.where(drop_B[:, None], model.null_action, actions_B_T)
    return cond, actions_B_T


@torch.no_grad()
def guided_velocity(
    model: CausalDiT, batch: TeacherForcingBatch, cond: Tensor | None, cfg_scale: float
) -> Tensor:
    """Classifier-free guided velocity on the noisy half, ``[B, T, C, H, W]``:

        v = v(x | ∅) + w·(v(x | c) − v(x | ∅)),

    where ∅ is the null per-video condition, or, for models without one (world models), the
    null action on every frame. Both branches run as one batched forward. ``cond=None`` is
    already the null condition, so it gets the plain unconditional velocity.
    """
    if cfg_scale == 1.0 or (model.cfg.cond != "none" and cond is None):
        return batch.velocity(model, cond)
    B = batch.x_B_2T_C_H_W.shape[0]
    actions = batch.actions_B_2T
    if model.cfg.cond != "none":
        all_B = torch.ones(B, dtype=torch.bool, device=batch.s_B_2T.device)
        both_cond = torch.cat([cond, model.drop_cond(cond, all_B)])
        both_actions = None if actions is None else actions.repeat(2, 1)
    elif actions is not None:
        both_cond = None
        both_actions = torch.cat([actions, torch.full_like(actions, model.null_action)])
    else:
        raise ValueError("CFG (cfg_scale != 1) needs a per-video condition or actions to drop")
    both = TeacherForcingBatch(
        x_B_2T_C_H_W=batch.x_B_2T_C_H_W.repeat(2, 1, 1, 1, 1),
        s_B_2T=batch.s_B_2T.repeat(2, 1),
        frame_pos_B_2T=batch.frame_pos_B_2T.repeat(2, 1),
        actions_B_2T=both_actions,
        mask=batch.mask,
        num_frames=batch.num_frames,
        prev_B_2T=None if batch.prev_B_2T is None else batch.prev_B_2T.repeat(2, 1, 1, 1, 1),
    )
    v_cond, v_uncond = both.velocity(model, both_cond).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's tangent warmup ``r = min(1, step / warmup)``; ``warmup = 0`` means ``r = 1``."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step}, {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def scm_regression_loss(
    pred: Tensor, pred_minus: Tensor, g: Tensor, *, norm_eps: float, loss_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The sCM regression shared by both parametrisations (``pred``, ``pred_minus``, ``g``:
    one ``[B, ...]`` shape):

        ĝ = g / (‖g‖₂ + c)                      per sample, unsquared L2 over all elements
        loss_b = λ·Σ (pred − pred⁻ − ĝ)²        summed over elements, per sample

    with ``c = norm_eps`` (0.1) and ``λ = loss_scale`` (100). Its gradient is ``−2λ·ĝ·∂pred/∂θ``:
    a step moves ``pred`` along the normalised tangent. Samples whose ``g`` or ``pred`` is
    non-finite get loss 0 and no gradient (masked before the square, so no NaN flows back).

    Returns ``(loss_B, g_norm_B, finite_B)``.
    """
    B = g.shape[0]
    finite_B = torch.isfinite(g.reshape(B, -1)).all(1)
    finite_B &= torch.isfinite(pred.detach().reshape(B, -1)).all(1)
    g = torch.where(_expand(finite_B, g), g, 0.0)
    g_norm_B = torch.linalg.vector_norm(g.reshape(B, -1).double(), dim=1)
    g_hat = g / _expand((g_norm_B + norm_eps).to(g.dtype), g)
    residual = pred - pred_minus - g_hat.to(pred.dtype)
    residual = torch.where(_expand(finite_B, residual), residual, 0.0)
    loss_B = loss_scale * residual.square().reshape(B, -1).sum(1)
    return loss_B, g_norm_B, finite_B


# ---------------------------------------------------------------------------------------------
# Stage 0 and stage 1: the teachers


def flow_matching_loss(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
    weight: Callable[[Tensor], Tensor] | None = None,
    cond_dropout: float = 0.1,
    action_dropout: float = 0.0,
    change_weight: float = 0.0,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """Stage 0, the bidirectional base model (full mask):

    L = E_{s, ε} w(s)·mean ‖v_θ(x_s, s, c) − (ε − x0)‖²,   s ~ UniformShift(shift), one per clip,

    ``w = weight`` (None = 1, e.g. :func:`x0_weight`); with ``change_weight > 0`` each pixel's
    error is weighted by :func:`change_weights`.
    """
    B, T = _check_video(x0_B_T_C_H_W)
    s_B = uniform_shift((B,), shift, generator=generator, device=x0_B_T_C_H_W.device)
    s_B_T = s_B[:, None].expand(B, T).to(x0_B_T_C_H_W.dtype)
    noise = _randn_like(x0_B_T_C_H_W, generator)
    x_s = add_noise(x0_B_T_C_H_W, noise, s_B_T)
    cond, actions_B_T = drop_conditions(
        model,
        cond,
        actions_B_T,
        cond_dropout=cond_dropout,
        action_dropout=action_dropout,
        generator=generator,
    )
    v_B_T_C_H_W = model(
        x_s,
        s_B_T,
        cond=cond,
        actions_B_T=actions_B_T,
        prev_B_T_C_H_W=model.previous_frames(x0_B_T_C_H_W, history_B_K_C_H_W),
    )
    se = (v_B_T_C_H_W - (noise - x0_B_T_C_H_W)).square()
    mse_B = (change_weights(x0_B_T_C_H_W, change_weight) * se).mean((1, 2, 3, 4))
    w_B = torch.ones_like(s_B) if weight is None else weight(s_B).to(mse_B.dtype)
    loss = (w_B * mse_B).mean()
    return loss, {"loss": loss.detach()}


def tf_teacher_loss(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    chunk_frames: int = 1,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
    weight: Callable[[Tensor], Tensor] | None = bell_weight,
    context_noise: float = 0.0,
    self_context: float = 0.0,
    self_context_depth: int = 1,
    still_threshold: float = 0.0,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
    cond_dropout: float = 0.1,
    action_dropout: float = 0.0,
    change_weight: float = 0.0,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """Stage 1, teacher forcing: the causal teacher on the packed ``[x0 | x_s]`` sequence,

        L = E_{s, ε} Σ_frames w(s)·mean_{C,H,W} (v_θ(x_s | x0_<chunk, s, c) − (ε − x0))²,

    one shared ``s ~ UniformShift(shift)`` per clip, ``w = weight`` (the bell weight by default;
    ``None`` = 1). ``context_noise > 0`` is context augmentation: the clean half is noised to an
    RF time ``U(0, context_noise)`` per clip (and told so through its time input), so that the
    teacher tolerates the imperfect context of its own rollouts. ``self_context > 0`` is
    scheduled sampling: with that probability a clip's context (and previous frames) is the
    model's own 1-step prediction of each frame (:func:`own_predictions`), the targets the true
    frames, so that it learns to continue from what it streams, not only from data.
    ``self_context_depth = d`` makes that context the model's own rollout ``d`` frames deep:
    the predictions are made again from the last predictions, ``d`` times, so that a frame's
    context carries the errors of up to ``d`` generated frames in a row, as a stream's does
    (``d ≥ T − 1`` is the whole clip generated from its history, frame by frame), with the
    sampler's ``still_threshold`` applied to every generated frame as the stream applies it.
    ``context_ghosts > 0``: with that probability a clip's context (after scheduled sampling)
    and history carry faint remains of where things were (:func:`ghost_frames`), the targets
    the true frames, so that the model learns to erase what a smeared frame leaves behind;
    ``context_speckle > 0`` likewise puts dust on them (:func:`speckle_frames`).
    """
    B, _ = _check_video(x0_B_T_C_H_W)
    device, dtype = x0_B_T_C_H_W.device, x0_B_T_C_H_W.dtype
    s_B = uniform_shift((B,), shift, generator=generator, device=device).to(dtype)
    noise = _randn_like(x0_B_T_C_H_W, generator)
    x_s = add_noise(x0_B_T_C_H_W, noise, s_B)
    cond, actions_B_T = drop_conditions(
        model,
        cond,
        actions_B_T,
        cond_dropout=cond_dropout,
        action_dropout=action_dropout,
        generator=generator,
    )
    if not 0.0 <= self_context <= 1.0:
        raise ValueError(f"self_context must lie in [0, 1], got {self_context}")
    context = x0_B_T_C_H_W
    if self_context > 0:
        own = own_rollout(
            model,
            x0_B_T_C_H_W,
            self_context_depth,
            chunk_frames,
            cond,
            actions_B_T,
            history_B_K_C_H_W,
            generator,
            still_threshold=still_threshold,
        )
        pick_B = torch.rand(B, generator=generator, device=device) < self_context
        context = torch.where(pick_B[:, None, None, None, None], own, x0_B_T_C_H_W)
    batch = _pack(
        model,
        context,
        x_s,
        s_B,
        chunk_frames,
        actions_B_T,
        context_noise,
        generator,
        history_B_K_C_H_W,
        context_ghosts,
        context_speckle,
    )
    se = (batch.velocity(model, cond) - (noise - x0_B_T_C_H_W)).square()
    mse_B_T = (change_weights(x0_B_T_C_H_W, change_weight) * se).mean((2, 3, 4))
    w_B = torch.ones_like(s_B) if weight is None else weight(s_B)
    loss = (w_B * mse_B_T.sum(1)).mean()
    return loss, {"loss": loss.detach(), "mse": mse_B_T.detach().mean()}


@torch.no_grad()
def ghost_frames(
    x_B_T_C_H_W: Tensor,
    history_B_K_C_H_W: Tensor | None,
    p: float,
    generator: torch.Generator | None,
    *,
    max_strength: float = 0.5,
    max_lag: int = 4,
) -> tuple[Tensor, Tensor | None]:
    """With probability ``p`` per clip, every frame (of the history and the clip, in order)
    blended with the mean of the ``m`` frames before it, ``m ~ U{1..max_lag}``:

        x'_j = (1 − a)·x_j + a·mean(x_{j−m}, …, x_{j−1}),   a ~ U(0, max_strength),

    one ``(a, m)`` per clip; a frame without ``m`` real frames before it (a history of zeros
    is no past) stays as it is. What this makes is what a 1-step stream leaves behind: faint
    copies of a moving object where it was, a trail along its path, and the object itself a
    little dimmer. Returns the clip and the history (``None`` stays ``None``).

    Why: a 1-step frame that is unsure where the paddle went is the mean of the places, and
    the next frame is generated from it. A model trained only on clean or slightly noised
    context has never been asked to erase such remains, and keeps them."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"context_ghosts must lie in [0, 1], got {p}")
    B = x_B_T_C_H_W.shape[0]
    device, dtype = x_B_T_C_H_W.device, x_B_T_C_H_W.dtype
    K = 0 if history_B_K_C_H_W is None else history_B_K_C_H_W.shape[1]
    seq = x_B_T_C_H_W if K == 0 else torch.cat([history_B_K_C_H_W.to(dtype), x_B_T_C_H_W], 1)
    N = seq.shape[1]
    real_B_N = _real_frames(seq)
    pick_B = torch.rand(B, generator=generator, device=device) < p
    a_B = max_strength * torch.rand(B, generator=generator, device=device)
    m_B = torch.randint(1, max_lag + 1, (B,), generator=generator, device=device)
    past, n_real_B_N = torch.zeros_like(seq), torch.zeros_like(real_B_N, dtype=torch.long)
    for lag in range(1, min(max_lag, N - 1) + 1):
        use_B = lag <= m_B
        past[:, lag:] += use_B[:, None, None, None, None] * seq[:, :-lag]
        n_real_B_N[:, lag:] += use_B[:, None] & real_B_N[:, :-lag]
    past = past / m_B[:, None, None, None, None].to(dtype)
    ok_B_N = pick_B[:, None] & real_B_N & (n_real_B_N == m_B[:, None])
    a = a_B[:, None, None, None, None].to(dtype)
    ghosted = torch.where(ok_B_N[..., None, None, None], (1 - a) * seq + a * past, seq)
    if K == 0:
        return ghosted, history_B_K_C_H_W
    return ghosted[:, K:], ghosted[:, :K].to(history_B_K_C_H_W.dtype)


@torch.no_grad()
def speckle_frames(
    x_B_T_C_H_W: Tensor,
    history_B_K_C_H_W: Tensor | None,
    p: float,
    generator: torch.Generator | None,
    *,
    max_density: float = 0.01,
    max_offset: float = 0.5,
) -> tuple[Tensor, Tensor | None]:
    """With probability ``p`` per clip, dust on every frame of the history and the clip: the
    same pixels of all of them (a fraction ``U(0, max_density)`` of the frame, one draw per
    clip) offset by ``U(−max_offset, max_offset)`` per channel, clamped to ``[−1, 1]``
    (``max_offset = 0.5`` is 64 grey levels). A history of zeros (no past) stays zeros.
    Returns the clip and the history (``None`` stays ``None``).

    Why: a 1-step stream's residual noise now and then passes the still threshold, and an
    x0-change model copies what it is given, so those specks stay for good and pile up over a
    long rollout. The dust is the same in every frame because that is how it sits in a
    stream's context; the targets are clean, so the model learns to remove it."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"context_speckle must lie in [0, 1], got {p}")
    B, _, C, H, W = x_B_T_C_H_W.shape
    device, dtype = x_B_T_C_H_W.device, x_B_T_C_H_W.dtype
    pick_B = torch.rand(B, generator=generator, device=device) < p
    density_B = max_density * torch.rand(B, generator=generator, device=device)
    where = torch.rand(B, 1, 1, H, W, generator=generator, device=device)
    where = (where < density_B[:, None, None, None, None]) & pick_B[:, None, None, None, None]
    u = torch.rand(B, 1, C, H, W, generator=generator, device=device)
    offset = torch.where(where, max_offset * (2 * u - 1), torch.zeros_like(u)).to(dtype)

    def dusty(frames: Tensor) -> Tensor:
        out = (frames + offset.to(frames.dtype)).clamp(-1.0, 1.0)
        return torch.where(_real_frames(frames)[..., None, None, None], out, frames)

    history = None if history_B_K_C_H_W is None else dusty(history_B_K_C_H_W)
    return dusty(x_B_T_C_H_W), history


@torch.no_grad()
def own_rollout(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    depth: int,
    chunk_frames: int,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    history_B_K_C_H_W: Tensor | None,
    generator: torch.Generator | None,
    *,
    still_threshold: float = 0.0,
) -> Tensor:
    """:func:`own_predictions` made again from its own output ``depth`` times: chunk ``n`` is
    then generated from the model's frames of the ``depth − 1`` chunks before it (and true
    frames before those), so ``depth ≥ T / chunk_frames`` is the clip generated chunk by chunk
    from its history alone, as a stream generates it (with fresh noise per pass).
    ``still_threshold`` holds each generated frame's barely changed pixels at the frame it was
    predicted from (:func:`crcm.sampling.hold_still`), as the runtime does."""
    if depth < 1:
        raise ValueError(f"self_context_depth must be >= 1, got {depth}")
    own = x0_B_T_C_H_W
    C = x0_B_T_C_H_W.shape[2]
    for _ in range(depth):
        predicted = own_predictions(
            model, own, chunk_frames, cond, actions_B_T, history_B_K_C_H_W, generator
        )
        if still_threshold > 0:
            last = model.previous_frames(own, history_B_K_C_H_W)[:, :, -C:]
            predicted = hold_still(predicted, last, still_threshold)
        own = predicted
    return own


@torch.no_grad()
def own_predictions(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    chunk_frames: int,
    cond: Tensor | None,
    actions_B_T: Tensor | None,
    history_B_K_C_H_W: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The model's 1-step prediction ``x0̂ = x_1 − v_θ(x_1, 1 | x0_<chunk)`` of every chunk
    of the clip from pure noise, given the frames of ``x0`` before it (one teacher-forced
    forward, no gradient): what 1-step streaming would show in place of each frame."""
    B = x0_B_T_C_H_W.shape[0]
    noise = _randn_like(x0_B_T_C_H_W, generator)
    ones_B = torch.ones(B, dtype=x0_B_T_C_H_W.dtype, device=x0_B_T_C_H_W.device)
    batch = _pack(
        model, x0_B_T_C_H_W, noise, ones_B, chunk_frames, actions_B_T, 0.0, None, history_B_K_C_H_W
    )
    return (noise - batch.velocity(model, cond)).to(x0_B_T_C_H_W.dtype)


def df_teacher_loss(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    chunk_frames: int = 1,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    shift: float = DEFAULT_SHIFT,
    weight: Callable[[Tensor], Tensor] | None = None,
    cond_dropout: float = 0.1,
    action_dropout: float = 0.0,
    change_weight: float = 0.0,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """Stage 1, diffusion forcing: the causal teacher on one noisy clip under the block-causal
    mask, every chunk with its own time,

        L = E w(s)·mean ‖v_θ(x_s | x_{s,<chunk}, s, c) − (ε − x0)‖²,
        s_chunk ~ UniformShift(shift),

    ``w = weight`` per frame (None = 1); ``change_weight`` as in :func:`flow_matching_loss`.
    """
    B, T = _check_video(x0_B_T_C_H_W)
    if T % chunk_frames:
        raise ValueError(f"{T} frames are not a whole number of {chunk_frames}-frame chunks")
    device, dtype = x0_B_T_C_H_W.device, x0_B_T_C_H_W.dtype
    s_B_N = uniform_shift((B, T // chunk_frames), shift, generator=generator, device=device)
    s_B_T = s_B_N.to(dtype).repeat_interleave(chunk_frames, dim=1)
    noise = _randn_like(x0_B_T_C_H_W, generator)
    x_s = add_noise(x0_B_T_C_H_W, noise, s_B_T)
    cond, actions_B_T = drop_conditions(
        model,
        cond,
        actions_B_T,
        cond_dropout=cond_dropout,
        action_dropout=action_dropout,
        generator=generator,
    )
    tpf = model.tokens_per_frame(*x0_B_T_C_H_W.shape[-2:])
    v_B_T_C_H_W = model(
        x_s,
        s_B_T,
        cond=cond,
        actions_B_T=actions_B_T,
        attention=block_causal_mask(T, chunk_frames, tpf),
        prev_B_T_C_H_W=model.previous_frames(x0_B_T_C_H_W, history_B_K_C_H_W),
    )
    se = (v_B_T_C_H_W - (noise - x0_B_T_C_H_W)).square()
    mse_B_T = (change_weights(x0_B_T_C_H_W, change_weight) * se).mean((2, 3, 4))
    w_B_T = torch.ones_like(s_B_T) if weight is None else weight(s_B_T).to(mse_B_T.dtype)
    loss = (w_B_T * mse_B_T).mean()
    return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------------------------------------
# Stage 2: teacher-forcing consistency distillation


def tf_scm_loss(
    student: CausalDiT,
    teacher: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    step: int,
    chunk_frames: int = 1,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = 3.0,
    p_mean: float = -0.8,
    p_std: float = 1.6,
    tangent_warmup_steps: int = 1000,
    norm_eps: float = 0.1,
    loss_scale: float = 100.0,
    context_noise: float = 0.0,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
    jvp_backend: Backend = "auto",
    s_B: Tensor | None = None,
    noise_B_T_C_H_W: Tensor | None = None,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """TF-sCM, the RF-native continuous-time consistency loss (design §1.3, the paper's choice).

    The student's consistency function is its denoiser ``f_θ(x_s, s) = x_s − s·v_θ(x_s, s)``
    (given the clean context, which is fixed and omitted). Along the teacher's probability-flow
    ODE ``dx_s/ds = v_T(x_s, s)`` (CFG ``w``) a consistency function is constant, so the
    student should make

        g = df_θ⁻/ds = dx_s/ds − v_θ⁻ − s·dv_θ⁻/ds
          = −(v_θ⁻ − v_T) − r·s·J,      J = ∂v_θ⁻/∂x·v_T + ∂v_θ⁻/∂s

    vanish. ``J`` is one JVP of the student (``θ⁻``: no gradient) through the packed forward with
    tangents ``[0 | v_T]`` for x and ``[0 | 1]`` for s — clean frames do not move along the
    ODE; the time tangent is per unit of s (the network's 1000·s is differentiated inside).
    ``r = min(1, step / warmup)`` ramps the JVP term in (sCM's tangent warmup).

    Moving ``v_θ`` by ``+δ·g`` moves ``f_θ`` by ``−s·δ·g``, i.e. towards ``f_θ⁻`` at the
    slightly less noisy point ``s − s·δ`` of the same trajectory; so the loss regresses ``v_θ``
    onto ``v_θ⁻ + ĝ``:

        ĝ = g / (‖g‖₂ + 0.1),     L = E_b 100·Σ (v_θ − v_θ⁻ − ĝ)²,     s ~ LogNormal(−0.8, 1.6).

    ``v_θ⁻`` is the detached output of the ordinary (gradient) forward, not the JVP's primal:
    they agree mathematically, but in bf16 the kernel's rounding would be of the order of ĝ
    itself (ĝ's elements are ~1/√numel). Samples whose g or output is non-finite are zeroed.

    Args:
        student, teacher: the model being distilled and the frozen causal teacher.
        x0_B_T_C_H_W: clean clips; ``T`` a multiple of ``chunk_frames``.
        step: optimiser step (for the tangent warmup ``tangent_warmup_steps``; 0 = none).
        cfg_scale: teacher guidance ``w`` (3 in the paper).
        s_B, noise_B_T_C_H_W: explicit RF times / noise (default: sampled).
    Logs: ``loss``, ``g_norm`` (mean ‖g‖₂ over finite samples), ``finite`` (fraction), ``r``.
    """
    B, _ = _check_video(x0_B_T_C_H_W)
    if s_B is None:
        s_B = lognormal((B,), p_mean, p_std, generator=generator, device=x0_B_T_C_H_W.device)
    s_B, _, batch = _noisy_tf_batch(
        student,
        x0_B_T_C_H_W,
        s_B,
        noise_B_T_C_H_W,
        chunk_frames,
        actions_B_T,
        context_noise,
        generator,
        history_B_K_C_H_W,
        context_ghosts,
        context_speckle,
    )
    r = tangent_warmup(step, tangent_warmup_steps)

    v_teacher = guided_velocity(teacher, batch, cond, cfg_scale)
    dv_ds = _noisy_half_jvp(student, batch, cond, v_teacher, torch.ones_like(s_B), jvp_backend)

    v_student = batch.velocity(student, cond)
    v_minus = v_student.detach()
    g = -(v_minus - v_teacher) - r * _expand(s_B, dv_ds) * dv_ds
    loss_B, g_norm_B, finite_B = scm_regression_loss(
        v_student, v_minus, g, norm_eps=norm_eps, loss_scale=loss_scale
    )
    return _scm_result(loss_B, g_norm_B, finite_B, r)


def trigflow_scm_loss(
    student: CausalDiT,
    teacher: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    step: int,
    chunk_frames: int = 1,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = 3.0,
    p_mean: float = -0.8,
    p_std: float = 1.6,
    tangent_warmup_steps: int = 1000,
    norm_eps: float = 0.1,
    loss_scale: float = 100.0,
    context_noise: float = 0.0,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
    jvp_backend: Backend = "auto",
    s_B: Tensor | None = None,
    noise_B_T_C_H_W: Tensor | None = None,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """TF-sCM in TrigFlow form (rCM's bidirectional parametrisation, σ_d = 1), under teacher
    forcing; the paper finds the RF-native :func:`tf_scm_loss` better for causal models.

    TrigFlow time ``t = arctan(s/(1 − s))``, ``x_t = cos t·x0 + sin t·ε = (cos t + sin t)·x_s``.
    The RF network is wrapped (``trigflow_wrapper_coefficients``) as the denoiser
    ``x0̂ = c_skip·x_t + c_out·v_θ(c_in·x_t, c_noise)`` and the TrigFlow velocity
    ``F_θ = (cos t·x_t − x0̂)/sin t``; the consistency function is ``f = cos t·x_t − sin t·F_θ``
    (= x0̂). With the teacher's ``dx_t/dt = F_T`` (CFG ``w``), sCM's tangent is

        g = −cos²t·(F_θ⁻ − F_T) − r·cos t·sin t·(x_t + dF_θ⁻/dt)   (= cos t·df/dt when r = 1)
        ĝ = g / (‖g‖₂ + 0.1),     L = E_b 100·Σ (F_θ − F_θ⁻ − ĝ)²,

    ``dF_θ⁻/dt`` is the chain rule through the wrapper: one student JVP in RF variables with
    tangents ``dx_s/dt = c_in·F_T + c_in'·x_t`` and ``ds/dt = 1/(cos t + sin t)²``, then the
    wrapper's own (elementwise, float64) JVP. Same arguments as :func:`tf_scm_loss`; ``s_B`` is
    still given in RF time (``s ~ LogNormal(μ, σ)`` is ``tan t ~ LogNormal(μ, σ)``).
    """
    B, _ = _check_video(x0_B_T_C_H_W)
    if s_B is None:
        s_B = lognormal((B,), p_mean, p_std, generator=generator, device=x0_B_T_C_H_W.device)
    s_B, x_s, batch = _noisy_tf_batch(
        student,
        x0_B_T_C_H_W,
        s_B,
        noise_B_T_C_H_W,
        chunk_frames,
        actions_B_T,
        context_noise,
        generator,
        history_B_K_C_H_W,
        context_ghosts,
        context_speckle,
    )
    r = tangent_warmup(step, tangent_warmup_steps)

    # TrigFlow quantities in float64 (design §1.1); the network runs in x's dtype.
    dtype = x_s.dtype
    t_B = rf_to_trigflow(s_B)
    cos_t, sin_t = _expand(torch.cos(t_B), x_s), _expand(torch.sin(t_B), x_s)
    x_t = (cos_t + sin_t) * x_s.double()

    with torch.no_grad():
        F_teacher = _trigflow_velocity(x_t, t_B, guided_velocity(teacher, batch, cond, cfg_scale))
        # RF tangents of the TrigFlow trajectory: x_s = c_in(t)·x_t, s = s(t).
        _, (dx_s_dt, ds_dt_B) = jvp(
            _trigflow_to_rf_point, (x_t, t_B), (F_teacher, torch.ones_like(t_B))
        )
        dv_dt = _noisy_half_jvp(
            student, batch, cond, dx_s_dt.to(dtype), ds_dt_B.to(dtype), jvp_backend
        ).double()

    v_student = batch.velocity(student, cond)
    F_student = _trigflow_velocity(x_t, t_B, v_student.double())
    F_minus = F_student.detach()
    with torch.no_grad():
        _, dF_dt = jvp(
            _trigflow_velocity,
            (x_t, t_B, v_student.detach().double()),
            (F_teacher, torch.ones_like(t_B), dv_dt),
        )
        g = -(cos_t**2) * (F_minus - F_teacher) - r * cos_t * sin_t * (x_t + dF_dt)
    loss_B, g_norm_B, finite_B = scm_regression_loss(
        F_student, F_minus, g, norm_eps=norm_eps, loss_scale=loss_scale
    )
    return _scm_result(loss_B.to(dtype), g_norm_B, finite_B, r)


def tf_dcm_loss(
    student: CausalDiT,
    teacher: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    *,
    chunk_frames: int = 1,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    cfg_scale: float = 3.0,
    num_steps: int = 48,
    shift: float = 3.0,
    loss_scale: float = 100.0,
    context_noise: float = 0.0,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
    n_B: Tensor | None = None,
    noise_B_T_C_H_W: Tensor | None = None,
    history_B_K_C_H_W: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Logs]:
    """TF-dCM, the discrete-time consistency baseline (Causal Forcing's stage 2).

    On the RF grid ``s_0 = 1 > s_1 > … > s_N = 0`` (``N = 48`` Euler times with shift 3), from
    a random grid point n the teacher takes one guided Euler step under teacher forcing, and the
    student's denoiser there must match the current student's (no grad) one step later:

        x_{s_{n+1}} = x_{s_n} + (s_{n+1} − s_n)·v_T(x_{s_n}, s_n)
        L = E_b 100·Σ_frames mean_{C,H,W} ‖x0̂_θ(x_{s_n}, s_n) − sg(x0̂_θ(x_{s_{n+1}}, s_{n+1}))‖²

    with ``x0̂(x, s) = x − s·v``; at ``s_N = 0`` the target is ``x_{s_N}`` itself (the boundary
    condition). ``n_B`` (indices in ``[0, N)``) and the noise may be given explicitly.
    """
    B, T = _check_video(x0_B_T_C_H_W)
    device, dtype = x0_B_T_C_H_W.device, x0_B_T_C_H_W.dtype
    grid_N1 = torch.tensor([*euler_times(num_steps, shift), 0.0], dtype=dtype, device=device)
    if n_B is None:
        n_B = torch.randint(0, num_steps, (B,), generator=generator, device=device)
    s_B, s_next_B = grid_N1[n_B], grid_N1[n_B + 1]
    s_B, x_s, batch = _noisy_tf_batch(
        student,
        x0_B_T_C_H_W,
        s_B,
        noise_B_T_C_H_W,
        chunk_frames,
        actions_B_T,
        context_noise,
        generator,
        history_B_K_C_H_W,
        context_ghosts,
        context_speckle,
    )
    s_col, s_next_col = _expand(s_B, x_s), _expand(s_next_B, x_s)
    with torch.no_grad():
        v_teacher = guided_velocity(teacher, batch, cond, cfg_scale)
        _, x_next = euler_step(x_s, v_teacher, s_col, s_next_col)
        next_batch = replace(
            batch,
            x_B_2T_C_H_W=batch.pack_like(batch.x_B_2T_C_H_W[:, :T], x_next),
            s_B_2T=batch.pack_like(batch.s_B_2T[:, :T], s_next_B[:, None].expand(B, T)),
        )  # the same (possibly augmented) clean half, the noisy half one teacher step later
        x0_target = x_next - s_next_col * next_batch.velocity(student, cond)
    x0_pred = x_s - s_col * batch.velocity(student, cond)
    mse_B_T = (x0_pred - x0_target).square().mean((2, 3, 4))
    loss = loss_scale * mse_B_T.sum(1).mean()
    return loss, {"loss": loss.detach()}


# ---------------------------------------------------------------------------------------------
# Helpers


def _trigflow_to_rf_point(x_t: Tensor, t_B: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_s, s)`` of the TrigFlow point ``(x_t, t)``: ``x_s = c_in·x_t``, ``s = s(t)``."""
    c_in = trigflow_wrapper_coefficients(t_B)[2]
    return _expand(c_in, x_t) * x_t, trigflow_to_rf(t_B)


def _trigflow_velocity(x_t: Tensor, t_B: Tensor, v: Tensor) -> Tensor:
    """``F = (cos t·x_t − x0̂)/sin t`` with ``x0̂ = c_skip·x_t + c_out·v`` (the RF-wrapped
    TrigFlow denoiser); ``t_B`` per sample, broadcast over the rest."""
    c_skip, c_out, _, _ = trigflow_wrapper_coefficients(t_B)
    x0_hat = _expand(c_skip, x_t) * x_t + _expand(c_out, v) * v
    return (_expand(torch.cos(t_B), x_t) * x_t - x0_hat) / _expand(torch.sin(t_B), x_t)


def _noisy_tf_batch(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    s_B: Tensor,
    noise_B_T_C_H_W: Tensor | None,
    chunk_frames: int,
    actions_B_T: Tensor | None,
    context_noise: float,
    generator: torch.Generator | None,
    history_B_K_C_H_W: Tensor | None = None,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
) -> tuple[Tensor, Tensor, TeacherForcingBatch]:
    """``(s_B, x_s, batch)``: the clip noised to one time per clip, packed behind its context."""
    B, _ = _check_video(x0_B_T_C_H_W)
    if s_B.shape != (B,):
        raise ValueError(f"s_B must be [{B}], got {list(s_B.shape)}")
    s_B = s_B.to(x0_B_T_C_H_W.dtype)
    if noise_B_T_C_H_W is None:
        noise_B_T_C_H_W = _randn_like(x0_B_T_C_H_W, generator)
    x_s = add_noise(x0_B_T_C_H_W, noise_B_T_C_H_W, s_B)
    batch = _pack(
        model,
        x0_B_T_C_H_W,
        x_s,
        s_B,
        chunk_frames,
        actions_B_T,
        context_noise,
        generator,
        history_B_K_C_H_W,
        context_ghosts,
        context_speckle,
    )
    return s_B, x_s, batch


@torch.no_grad()
def _noisy_half_jvp(
    model: CausalDiT,
    batch: TeacherForcingBatch,
    cond: Tensor | None,
    t_x_B_T_C_H_W: Tensor,
    t_s_B: Tensor,
    backend: Backend,
) -> Tensor:
    """JVP of the packed forward's noisy half along tangents ``(t_x, t_s)`` of the noisy half
    (one time tangent per clip); the clean context has zero tangents: it does not move, and
    ``static_frames`` lets the attention JVPs skip the products with those zeros."""
    B, T = t_x_B_T_C_H_W.shape[:2]
    t_s_B_T = t_s_B[:, None].expand(B, T)
    _, t_v_B_2T = model_jvp(
        model,
        batch.x_B_2T_C_H_W,
        batch.s_B_2T,
        batch.pack_like(torch.zeros_like(t_x_B_T_C_H_W), t_x_B_T_C_H_W),
        batch.pack_like(torch.zeros_like(t_s_B_T), t_s_B_T),
        frame_pos_B_T=batch.frame_pos_B_2T,
        cond=cond,
        actions_B_T=batch.actions_B_2T,
        mask=batch.mask,
        static_frames=T,
        backend=backend,
        prev_B_T_C_H_W=batch.prev_B_2T,
    )
    return batch.noisy_half(t_v_B_2T)


def _pack(
    model: CausalDiT,
    x0_B_T_C_H_W: Tensor,
    x_s_B_T_C_H_W: Tensor,
    s_B: Tensor,
    chunk_frames: int,
    actions_B_T: Tensor | None,
    context_noise: float,
    generator: torch.Generator | None,
    history_B_K_C_H_W: Tensor | None = None,
    context_ghosts: float = 0.0,
    context_speckle: float = 0.0,
) -> TeacherForcingBatch:
    """The TF batch of a clip with one time per clip, with optional context augmentation
    (:func:`ghost_frames`, :func:`speckle_frames`, then noise); ``history`` (the frames before
    the clip, for the first frames' previous frames) is augmented with the context."""
    B, T = x0_B_T_C_H_W.shape[:2]
    if not 0.0 <= context_noise <= 1.0:
        raise ValueError(f"context_noise must lie in [0, 1], got {context_noise}")
    if context_ghosts > 0:
        x0_B_T_C_H_W, history_B_K_C_H_W = ghost_frames(
            x0_B_T_C_H_W, history_B_K_C_H_W, context_ghosts, generator
        )
    if context_speckle > 0:
        x0_B_T_C_H_W, history_B_K_C_H_W = speckle_frames(
            x0_B_T_C_H_W, history_B_K_C_H_W, context_speckle, generator
        )
    context, s_context_B_T = x0_B_T_C_H_W, None
    if context_noise > 0:
        device = x0_B_T_C_H_W.device
        s_ctx_B = context_noise * torch.rand(B, generator=generator, device=device)
        s_ctx_B = s_ctx_B.to(x0_B_T_C_H_W.dtype)
        context = add_noise(x0_B_T_C_H_W, _randn_like(x0_B_T_C_H_W, generator), s_ctx_B)
        s_context_B_T = s_ctx_B[:, None].expand(B, T)
        if history_B_K_C_H_W is not None:
            # Zeros (no past) stay zeros: noise is added only where a frame exists.
            exists = _real_frames(history_B_K_C_H_W)
            noisy = add_noise(history_B_K_C_H_W, _randn_like(history_B_K_C_H_W, generator), s_ctx_B)
            history_B_K_C_H_W = torch.where(exists[..., None, None, None], noisy, history_B_K_C_H_W)
    return pack_teacher_forcing(
        context,
        x_s_B_T_C_H_W,
        s_B[:, None].expand(B, T),
        chunk_frames=chunk_frames,
        tokens_per_frame=model.tokens_per_frame(*x0_B_T_C_H_W.shape[-2:]),
        actions_B_T=actions_B_T,
        s_context_B_T=s_context_B_T,
        # The previous frames are the context's own frames, noised with it: the model learns
        # to continue from frames that are not quite right, as its own are in a rollout.
        prev_B_T_C_H_W=model.previous_frames(context, history_B_K_C_H_W),
    )


def change_weights(x0_B_T_C_H_W: Tensor, change_weight: float) -> Tensor:
    """Per-pixel loss weights ``1 + change_weight·m`` where ``m`` marks the pixels of a frame
    that differ from the frame before (any channel, dilated by one pixel), ``[B, T, 1, H, W]``;
    the scalar 1 when ``change_weight = 0``.

    A game frame is mostly static: Breakout's paddle and ball are < 0.5 % of the pixels, so an
    unweighted mean lets the network ignore exactly what the action and the context decide.
    The first frame of a clip has no predecessor and keeps weight 1."""
    if change_weight < 0:
        raise ValueError(f"change_weight must be >= 0, got {change_weight}")
    if change_weight == 0:
        return torch.ones((), dtype=x0_B_T_C_H_W.dtype, device=x0_B_T_C_H_W.device)
    with torch.no_grad():
        diff_B_T1_H_W = (x0_B_T_C_H_W[:, 1:] - x0_B_T_C_H_W[:, :-1]).abs().amax(2)
        changed = (diff_B_T1_H_W > 1e-3).to(x0_B_T_C_H_W.dtype)
        changed = torch.nn.functional.max_pool2d(changed, 3, stride=1, padding=1)
        m_B_T_H_W = torch.cat([torch.zeros_like(changed[:, :1]), changed], dim=1)
        return (1 + change_weight * m_B_T_H_W)[:, :, None]


def _scm_result(
    loss_B: Tensor, g_norm_B: Tensor, finite_B: Tensor, r: float
) -> tuple[Tensor, Logs]:
    loss = loss_B.mean()
    finite = finite_B.float()
    g_norm = (g_norm_B * finite).sum() / finite.sum().clamp_min(1)
    logs = {"loss": loss.detach(), "g_norm": g_norm.float(), "finite": finite.mean()}
    return loss, logs | {"r": torch.tensor(r)}


def _real_frames(x_B_N_C_H_W: Tensor) -> Tensor:
    """``[B, N]``: which frames exist; a history frame of zeros means "no past" (an episode's
    start), and context augmentation leaves it so."""
    return x_B_N_C_H_W.flatten(2).abs().amax(2) > 0


def _check_video(x0_B_T_C_H_W: Tensor) -> tuple[int, int]:
    if not isinstance(x0_B_T_C_H_W, Tensor) or x0_B_T_C_H_W.ndim != 5:
        raise ValueError(f"x0 must be a [B, T, C, H, W] tensor, got {type(x0_B_T_C_H_W)}")
    if not x0_B_T_C_H_W.is_floating_point():
        raise ValueError(f"x0 must be floating, got {x0_B_T_C_H_W.dtype}")
    return x0_B_T_C_H_W.shape[0], x0_B_T_C_H_W.shape[1]


def _expand(v_B: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``[B]`` value viewed to broadcast against ``like`` (``[B, ...]``)."""
    return v_B.reshape(v_B.shape[0], *([1] * (like.ndim - 1)))


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
