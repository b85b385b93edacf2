"""The JVP of the whole DiT for TF-sCM, one layer at a time (design §1.3, §1.5).

TF-sCM needs ``J = dv_θ/ds`` along the teacher's ODE: the directional derivative of the network
output along the tangents ``(t_x, t_s)`` of its input and its RF time. ``torch.func.jvp`` of the
whole model would do, but (a) PyTorch's fused attention has no forward-mode rule, and (b) the
attention is the one place where a dedicated kernel pays. So the forward is walked layer by layer:

  - every layer except attention: ``torch.func.jvp`` of that layer's own forward, giving its
    output and output tangent together;
  - self-attention and cross-attention: :func:`crcm.kernels.attention_jvp` (the Triton kernel on
    CUDA fp16/bf16, the explicit-formula torch reference elsewhere). Cross-attention is the same
    formula with ``t_K = t_V = 0``, since the condition tokens do not depend on ``x`` or ``s``.

Static frames. In TF-sCM the clean context does not move (zero tangents) and, under the TF mask,
attends only to itself, so its tangents stay zero through every layer. ``static_frames`` says so,
and the attention JVPs then skip every product with those zeros (see
:func:`crcm.kernels.attention_jvp.attention_jvp`): for the TF mask this cuts the attention JVP's
matrix work from 3× the primal's to 1.5–1.75×.

Tangents leave each layer as plain tensors (no autograd graph, everything under ``no_grad``), so
memory stays that of a few activations, not of a whole forward-mode trace.

The time tangent is a derivative with respect to the RF time ``s`` itself: the network sees
``1000·s``, and that factor of 1000 is inside the differentiated time embedding, so ``t_s = 1``
means "per unit of s" and ``t_v`` is ``∂v/∂x·t_x + ∂v/∂s·t_s``.

The code mirrors ``CausalDiT.forward`` and ``Block.forward`` step for step (tests check the result
against ``torch.func.jvp`` of the whole model); if those change, this file must follow.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp

from crcm.kernels._common import Backend
from crcm.kernels.attention_jvp import attention_jvp
from crcm.masks import Mask, Rect
from crcm.models.dit import (
    Block,
    CausalDiT,
    _gated_residual,
    _modulate,
    _wide,
    apply_rope,
    rope_cos_sin,
)

__all__ = ["model_jvp"]


@torch.no_grad()
def model_jvp(
    model: CausalDiT,
    x_B_T_C_H_W: Tensor,
    s_B_T: Tensor,
    t_x_B_T_C_H_W: Tensor,
    t_s_B_T: Tensor,
    *,
    frame_pos_B_T: Tensor | None = None,
    cond: Tensor | None = None,
    actions_B_T: Tensor | None = None,
    mask: Mask | None = None,
    static_frames: int = 0,
    backend: Backend = "auto",
    prev_B_T_C_H_W: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The velocity ``v = v_θ(x, s)`` and its JVP ``t_v = ∂v/∂x·t_x + ∂v/∂s·t_s``.

    Args:
        model: the network; its parameters are held fixed (the JVP is in the inputs only).
        x_B_T_C_H_W, s_B_T, frame_pos_B_T, cond, actions_B_T, prev_B_T_C_H_W: as in
            ``CausalDiT.forward``; the previous frames are clean data (zero tangent).
        t_x_B_T_C_H_W: tangent of ``x`` (same shape).
        t_s_B_T: tangent of the RF time ``s`` (same shape), in units of ``s`` (not ``1000·s``).
        mask: the self-attention mask over the ``T·tokens_per_frame`` tokens; ``None`` = full.
        static_frames: the first ``static_frames`` frames do not move: their tangents are taken
            as zero (whatever ``t_x``/``t_s`` hold there), and ``mask`` must keep their tokens
            from attending to later ones. A multiple of the temporal patch size.
        backend: attention JVP implementation, "auto" / "triton" / "torch"
            (see :func:`crcm.kernels.attention_jvp.attention_jvp`).
    Returns:
        ``(v_B_T_C_H_W, t_v_B_T_C_H_W)`` in ``x``'s dtype; no autograd graph.
    """
    cfg = model.cfg
    B, T, _, H, W = model._check_x(x_B_T_C_H_W)
    _check_tangent("t_x_B_T_C_H_W", t_x_B_T_C_H_W, x_B_T_C_H_W)
    model._check_s(s_B_T, B, T, values=True)
    _check_tangent("t_s_B_T", t_s_B_T, s_B_T)
    pt = cfg.patch[0]
    if isinstance(static_frames, bool) or not isinstance(static_frames, int):
        raise TypeError(f"static_frames must be an int, got {type(static_frames).__name__}")
    if not (0 <= static_frames <= T and static_frames % pt == 0):
        raise ValueError(
            f"static_frames must be a multiple of the temporal patch {pt} in [0, {T}], "
            f"got {static_frames}"
        )
    if static_frames:
        t_x_B_T_C_H_W = t_x_B_T_C_H_W.clone()
        t_x_B_T_C_H_W[:, :static_frames] = 0
        t_s_B_T = t_s_B_T.clone()
        t_s_B_T[:, :static_frames] = 0
    s_B_T = model._per_model_frame("s_B_T", s_B_T)
    t_s_B_T = model._per_model_frame("t_s_B_T", t_s_B_T.to(s_B_T.dtype))
    device = x_B_T_C_H_W.device
    if frame_pos_B_T is None:
        frame_pos_B_T = torch.arange(T, device=device).expand(B, T)
    frame_pos_B_T = model._check_frame_pos(frame_pos_B_T, B, T, values=True)[:, ::pt] // pt
    if actions_B_T is not None:
        actions_B_T = model._per_model_frame(
            "actions_B_T", model._check_actions(actions_B_T, B, T, values=True)
        )
    context_B_Lc_D = model._embed_cond(cond, B, device)

    # Patch embedding (a convolution: its JVP is the convolution of the tangent, without bias).
    prev_B_T_C_H_W = model._check_prev(prev_B_T_C_H_W, x_B_T_C_H_W)

    def patchify(x: Tensor) -> Tensor:
        return model.patchify(x, prev_B_T_C_H_W, actions_B_T)

    x_B_L_D, t_x_B_L_D = jvp(patchify, (x_B_T_C_H_W,), (t_x_B_T_C_H_W.to(x_B_T_C_H_W.dtype),))
    grid_h, grid_w = H // cfg.patch[1], W // cfg.patch[2]

    # Time embedding: the only place s enters, and where the 1000·s scaling lives.
    (e_B_T_D, e0_B_T_6_D), (t_e_B_T_D, t_e0_B_T_6_D) = jvp(
        lambda s: model._embed_time(s, actions_B_T), (s_B_T,), (t_s_B_T,)
    )

    num_tokens = x_B_L_D.shape[1]
    if mask is None:
        mask = Mask(num_tokens, num_tokens, (Rect(0, num_tokens, 0, num_tokens),))
    if (mask.num_q, mask.num_k) != (num_tokens, num_tokens):
        raise ValueError(
            f"mask is {mask.num_q}x{mask.num_k} but the sequence has {num_tokens} tokens"
        )
    static_tokens = static_frames // pt * grid_h * grid_w
    first_seeing_moving = mask.first_query_seeing(static_tokens)
    if first_seeing_moving < static_tokens:
        raise ValueError(
            f"static_frames={static_frames}: the mask lets static tokens attend to moving ones "
            f"(query {first_seeing_moving} sees keys from {static_tokens} on), so their tangents "
            "would not stay zero"
        )
    rope = rope_cos_sin(
        frame_pos_B_T, (grid_h, grid_w), cfg.head_dim, cfg.rope_theta, x_B_L_D.dtype
    )
    for block in model.blocks:
        x_B_L_D, t_x_B_L_D = _block_jvp(
            block,
            (x_B_L_D, t_x_B_L_D),
            (e0_B_T_6_D, t_e0_B_T_6_D),
            rope,
            context_B_Lc_D,
            mask,
            static_tokens,
            backend,
        )
    with torch.autocast(device.type, enabled=False):
        patches_B_L_P, t_patches_B_L_P = jvp(model.head, (x_B_L_D, e_B_T_D), (t_x_B_L_D, t_e_B_T_D))

    def unpatchify(patches_B_L_P: Tensor) -> Tensor:
        _, ph, pw = cfg.patch
        out = patches_B_L_P.reshape(B, T // pt, grid_h, grid_w, pt, ph, pw, cfg.out_channels)
        return out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(B, T, cfg.out_channels, H, W)

    # The head's output to the velocity (an x0-head's v depends on x and s directly too).
    v, t_v = jvp(
        lambda x, s, out: model.velocity_from_output(x, s, out, prev_B_T_C_H_W, actions_B_T),
        (x_B_T_C_H_W, s_B_T, unpatchify(patches_B_L_P)),
        (t_x_B_T_C_H_W.to(x_B_T_C_H_W.dtype), t_s_B_T, unpatchify(t_patches_B_L_P)),
    )
    return v.to(x_B_T_C_H_W.dtype), t_v.to(x_B_T_C_H_W.dtype)


def _block_jvp(
    block: Block,
    x: tuple[Tensor, Tensor],
    e0: tuple[Tensor, Tensor],
    rope: tuple[Tensor, Tensor],
    context_B_Lc_D: Tensor | None,
    mask: Mask,
    static_tokens: int,
    backend: Backend,
) -> tuple[Tensor, Tensor]:
    """``Block.forward`` and its JVP; ``x`` and ``e0`` are (primal, tangent) pairs; the first
    ``static_tokens`` tokens have zero tangents.

    Split at the attentions: the pieces between them go through ``torch.func.jvp``, the
    attentions through the attention-JVP kernel.
    """
    attn = block.self_attn
    heads = (attn.num_heads, -1)

    def modulation(e0_B_T_6_D: Tensor) -> tuple[Tensor, ...]:
        return (block.modulation[None] + e0_B_T_6_D).unbind(2)

    def self_attn_qkv(x_B_L_D: Tensor, e0_B_T_6_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shift1, scale1, *_ = modulation(e0_B_T_6_D)
        h_B_L_D = _modulate(block.norm1(x_B_L_D), shift1, scale1).to(attn.q.weight.dtype)
        q_B_L_H_D = apply_rope(attn.norm_q(attn.q(h_B_L_D)).unflatten(-1, heads), *rope)
        k_B_L_H_D = apply_rope(attn.norm_k(attn.k(h_B_L_D)).unflatten(-1, heads), *rope)
        return q_B_L_H_D, k_B_L_H_D, attn.v(h_B_L_D).unflatten(-1, heads)

    def self_attn_residual(x_B_L_D: Tensor, e0_B_T_6_D: Tensor, o_B_L_H_D: Tensor) -> Tensor:
        gate1 = modulation(e0_B_T_6_D)[2]
        return _gated_residual(x_B_L_D, attn.o(o_B_L_H_D.flatten(2)), gate1)

    def ffn_residual(x_B_L_D: Tensor, e0_B_T_6_D: Tensor) -> Tensor:
        *_, shift2, scale2, gate2 = modulation(e0_B_T_6_D)
        h_B_L_D = _modulate(block.norm2(x_B_L_D), shift2, scale2).to(block.ffn[0].weight.dtype)
        return _gated_residual(x_B_L_D, block.ffn(h_B_L_D), gate2)

    qkv, t_qkv = jvp(self_attn_qkv, (x[0], e0[0]), (x[1], e0[1]))
    o_B_L_H_D, t_o_B_L_H_D = attention_jvp(
        *qkv, *t_qkv, mask, backend=backend, static_q=static_tokens, static_k=static_tokens
    )
    x = jvp(self_attn_residual, (x[0], e0[0], o_B_L_H_D), (x[1], e0[1], t_o_B_L_H_D))
    if block.cross_attn is not None:
        if context_B_Lc_D is None:
            raise ValueError("this model has cross-attention but no condition tokens were made")
        x = _cross_attention_jvp(block, x, context_B_Lc_D, static_tokens, backend)
    return jvp(ffn_residual, (x[0], e0[0]), (x[1], e0[1]))


def _cross_attention_jvp(
    block: Block,
    x: tuple[Tensor, Tensor],
    context_B_Lc_D: Tensor,
    static_tokens: int,
    backend: Backend,
) -> tuple[Tensor, Tensor]:
    """``x + CrossAttention(norm3(x), context)`` and its JVP (the context has no tangent)."""
    cross = block.cross_attn
    assert cross is not None and block.norm3 is not None
    heads = (cross.num_heads, -1)
    dtype = cross.q.weight.dtype

    def query(x_B_L_D: Tensor) -> Tensor:
        return cross.norm_q(cross.q(block.norm3(x_B_L_D).to(dtype))).unflatten(-1, heads)

    q_B_L_H_D, t_q_B_L_H_D = jvp(query, (x[0],), (x[1],))
    context_B_Lc_D = context_B_Lc_D.to(dtype)
    k_B_Lc_H_D = cross.norm_k(cross.k(context_B_Lc_D)).unflatten(-1, heads)
    v_B_Lc_H_D = cross.v(context_B_Lc_D).unflatten(-1, heads)
    L, Lc = q_B_L_H_D.shape[1], k_B_Lc_H_D.shape[1]
    every_key = Mask(L, Lc, (Rect(0, L, 0, Lc),))
    zero_B_Lc_H_D = torch.zeros_like(k_B_Lc_H_D)
    o_B_L_H_D, t_o_B_L_H_D = attention_jvp(
        q_B_L_H_D,
        k_B_Lc_H_D,
        v_B_Lc_H_D,
        t_q_B_L_H_D,
        zero_B_Lc_H_D,
        zero_B_Lc_H_D,
        every_key,
        backend=backend,
        static_q=static_tokens,
        static_k=Lc,
    )
    y_B_L_D, t_y_B_L_D = jvp(lambda o: cross.o(o.flatten(2)), (o_B_L_H_D,), (t_o_B_L_H_D,))
    return x[0] + _wide(y_B_L_D), x[1] + _wide(t_y_B_L_D)


def _check_tangent(name: str, tangent: Tensor, primal: Tensor) -> None:
    if not isinstance(tangent, Tensor) or not tangent.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {type(tangent).__name__}")
    if tangent.shape != primal.shape or tangent.device != primal.device:
        raise ValueError(
            f"{name} must match its primal ({list(primal.shape)} on {primal.device}), got "
            f"{list(tangent.shape)} on {tangent.device}"
        )
