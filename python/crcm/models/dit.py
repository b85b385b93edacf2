"""The crcm diffusion transformer: Wan2.1's DiT with per-frame timesteps (design §2).

Reads top to bottom like Wan2.1's ``model.py``: embeddings, attention, block, head, model.
Parameter names are the original Wan names (``patch_embedding``, ``blocks.N.self_attn.q``, …) so
that Wan / Self-Forcing / CausVid checkpoints load with no renaming; crcm adds ``null_text``,
``class_embedding`` and ``action_embedding``, which have no Wan counterpart.

Differences from Wan2.1, all needed for causal video:
  - every frame carries its own RF time ``s`` (hence its own AdaLN modulation), as in
    Self-Forcing's ``CausalWanModel``;
  - RoPE frame positions are given by the caller (the teacher-forcing packed sequence repeats
    them; a stream's positions keep increasing);
  - self-attention goes through one pluggable function (``attn_fn``): a ``Mask`` for training,
    a paged KV cache for streaming, an attention JVP for consistency distillation.

Precision: like Wan, the residual stream, the time embedding, the AdaLN modulation and the head
run in float32 (float64 for a float64 model, for numerical checks); the linear layers follow
autocast (bf16 training) or the weights' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crcm.masks import Mask
from crcm.models.configs import DiTConfig

__all__ = [
    "AttnFn",
    "CausalDiT",
    "CrossKV",
    "apply_rope",
    "preceding_frames",
    "rope_cos_sin",
    "sdpa_attention",
    "sinusoidal_embedding",
]

# The smallest RF time an x0-predicting model divides by when it returns its velocity.
X0_MIN_S = 0.05

# attn_fn(layer_idx, q_B_L_H_D, k_B_L_H_D, v_B_L_H_D) -> o_B_L_H_D; q and k are normalised and
# rotated already. Streaming passes a paged-KV-cache attention, the JVP path an attention JVP.
AttnFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
Attention = Mask | AttnFn | None


# ---------------------------------------------------------------------------------------------
# Embeddings


def preceding_frames(
    x0_B_T_C_H_W: Tensor, k: int, history_B_K_C_H_W: Tensor | None = None
) -> Tensor:
    """For every frame ``t`` of a clean clip, the ``k`` clean frames before it, oldest first,
    concatenated on channels: ``[B, T, k·C, H, W]`` (the ``prev`` input of a model with
    ``prev_frames = k``).

    Frames before the clip come from ``history_B_K_C_H_W`` (the stream's last frames, oldest
    first; only its last ``k`` are read) and are zeros where there is no history: a stream's
    first frame has no past, as a training clip's first frame has none.
    """
    B, T, C, H, W = x0_B_T_C_H_W.shape
    pad_B_k = x0_B_T_C_H_W.new_zeros(B, k, C, H, W)
    if history_B_K_C_H_W is not None and k:
        have = min(k, history_B_K_C_H_W.shape[1])
        if have:
            pad_B_k[:, k - have :] = history_B_K_C_H_W[:, -have:].to(pad_B_k.dtype)
    seq_B_kT = torch.cat([pad_B_k, x0_B_T_C_H_W], dim=1)
    # Frame t reads seq[t .. t+k-1], i.e. clip frames t-k .. t-1.
    return torch.cat([seq_B_kT[:, j : j + T] for j in range(k)], dim=2)


def sinusoidal_embedding(dim: int, t_N: Tensor) -> Tensor:
    """Wan's timestep embedding ``[cos(t·f) | sin(t·f)]``, f = 10000^(−i/(dim/2)); ``[N, dim]``.

    ``t_N`` is in Wan units (1000·s). Computed and returned in float64 (as Wan does).
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t_N.device) / half)
    angle_N_half = torch.outer(t_N.to(torch.float64), freqs)
    return torch.cat([torch.cos(angle_N_half), torch.sin(angle_N_half)], dim=1)


def rope_cos_sin(
    frame_pos_B_T: Tensor,
    grid_hw: tuple[int, int],
    head_dim: int,
    theta: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Wan's 3D RoPE tables for tokens ordered (frame, row, column).

    Each head's ``head_dim/2`` rotation pairs are split Wan's way: ``head_dim//6`` pairs each for
    row and column, the rest for the frame index; each part has its own frequency ladder
    ``theta^(−2i/d_part)``. Angles are formed in float64 because frame positions grow without
    bound in long streams. Returns ``cos, sin``, each ``[B, T·h·w, 1, head_dim/2]`` in ``dtype``.
    """
    h, w = grid_hw
    pairs_hw = head_dim // 6
    pairs_t = head_dim // 2 - 2 * pairs_hw
    device = frame_pos_B_T.device

    def inv_freq(pairs: int) -> Tensor:
        exponent = torch.arange(pairs, dtype=torch.float64, device=device) * 2 / (2 * pairs)
        return theta**-exponent

    B, T = frame_pos_B_T.shape
    ang_t = frame_pos_B_T.to(torch.float64)[..., None] * inv_freq(pairs_t)  # [B, T, pairs_t]
    ang_h = torch.arange(h, dtype=torch.float64, device=device)[:, None] * inv_freq(pairs_hw)
    ang_w = torch.arange(w, dtype=torch.float64, device=device)[:, None] * inv_freq(pairs_hw)
    angle_B_T_h_w_P = torch.cat(
        [
            ang_t[:, :, None, None, :].expand(B, T, h, w, pairs_t),
            ang_h[None, None, :, None, :].expand(B, T, h, w, pairs_hw),
            ang_w[None, None, None, :, :].expand(B, T, h, w, pairs_hw),
        ],
        dim=-1,
    )
    angle_B_L_1_P = angle_B_T_h_w_P.reshape(B, T * h * w, 1, head_dim // 2)
    return angle_B_L_1_P.cos().to(dtype), angle_B_L_1_P.sin().to(dtype)


def apply_rope(x_B_L_H_D: Tensor, cos_B_L_1_P: Tensor, sin_B_L_1_P: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` (Wan's complex-number layout), in float32."""
    x1, x2 = _wide(x_B_L_H_D).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_B_L_1_P, sin_B_L_1_P
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x_B_L_H_D)


# ---------------------------------------------------------------------------------------------
# Attention


def sdpa_attention(
    q_B_L_H_D: Tensor, k_B_S_H_D: Tensor, v_B_S_H_D: Tensor, allowed_L_S: Tensor | None = None
) -> Tensor:
    """Softmax attention (PyTorch SDPA) with an optional boolean mask; ``[B, L, H, D]``."""
    o_B_H_L_D = F.scaled_dot_product_attention(
        q_B_L_H_D.transpose(1, 2),
        k_B_S_H_D.transpose(1, 2),
        v_B_S_H_D.transpose(1, 2),
        attn_mask=allowed_L_S,
    )
    return o_B_H_L_D.transpose(1, 2)


def _mask_attn_fn(allowed_L_L: Tensor | None) -> AttnFn:
    def attn_fn(layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa_attention(q, k, v, allowed_L_L)

    return attn_fn


def _resolve_attention(attention: Attention, num_tokens: int, device: torch.device) -> AttnFn:
    """Turn ``forward``'s ``attention`` argument into the one ``attn_fn`` every layer calls."""
    if attention is None:  # full mask: no mask tensor at all, so SDPA can pick a fused kernel
        return _mask_attn_fn(None)
    if isinstance(attention, Mask):
        if attention.num_q != num_tokens or attention.num_k != num_tokens:
            raise ValueError(
                f"attention mask is {attention.num_q}x{attention.num_k} but the sequence has "
                f"{num_tokens} tokens"
            )
        allowed_L_L = attention.dense(device)
        if not bool(allowed_L_L.any(dim=1).all()):
            raise ValueError("attention mask has query rows that see no key (softmax of nothing)")
        return _mask_attn_fn(allowed_L_L)
    if callable(attention):
        return attention
    raise TypeError(f"attention must be a Mask, a callable attn_fn or None, got {type(attention)}")


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in float32, scale by a learned weight; returns ``x``'s dtype
    (so that q, k and v reach ``attn_fn`` in one dtype under autocast)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(_wide(x), (x.shape[-1],), _wide(self.weight), self.eps).type_as(x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's ``WanLayerNorm``); returns float32."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else _wide(self.weight)
        bias = None if self.bias is None else _wide(self.bias)
        return F.layer_norm(_wide(x), self.normalized_shape, weight, bias, self.eps)


class SelfAttention(nn.Module):
    """Self-attention with QK RMSNorm over the whole model dim (across heads, as Wan) and RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.layer_idx = layer_idx
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x_B_L_D: Tensor, rope: tuple[Tensor, Tensor], attn_fn: AttnFn) -> Tensor:
        x_B_L_D = x_B_L_D.to(self.q.weight.dtype)
        heads = (self.num_heads, -1)
        q_B_L_H_D = apply_rope(self.norm_q(self.q(x_B_L_D)).unflatten(-1, heads), *rope)
        k_B_L_H_D = apply_rope(self.norm_k(self.k(x_B_L_D)).unflatten(-1, heads), *rope)
        v_B_L_H_D = self.v(x_B_L_D).unflatten(-1, heads)
        # The one place where training (mask), streaming (KV cache) and the JVP path differ.
        o_B_L_H_D = attn_fn(self.layer_idx, q_B_L_H_D, k_B_L_H_D, v_B_L_H_D)
        if o_B_L_H_D.shape != q_B_L_H_D.shape:
            raise ValueError(
                f"attn_fn returned {tuple(o_B_L_H_D.shape)}, expected {tuple(q_B_L_H_D.shape)}"
            )
        return self.o(o_B_L_H_D.flatten(2))


@dataclass(frozen=True, eq=False)
class CrossKV:
    """The cross-attention K/V of a batch of conditions, one ``(k, v)`` pair per layer
    (:meth:`CausalDiT.cross_kv`): what every forward would otherwise recompute from the
    condition tokens (text-embedding MLP, then each layer's ``k``/``v`` linears and ``norm_k``).

    ``k[i]`` and ``v[i]`` are layer ``i``'s ``[B, Lc, H, D]`` keys and values, in the weights'
    dtype. Read-only: several forwards (and forked streams) may share one; :meth:`cat` makes new
    tensors and nothing writes into them.
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @staticmethod
    def cat(parts: Sequence[CrossKV]) -> CrossKV:
        """The K/V of the rows of ``parts``, in order (concatenated on the batch dim)."""
        if not parts:
            raise ValueError("CrossKV.cat needs at least one part")
        if len(parts) == 1:
            return parts[0]
        return CrossKV(
            tuple(torch.cat(ks) for ks in zip(*(p.k for p in parts), strict=True)),
            tuple(torch.cat(vs) for vs in zip(*(p.v for p in parts), strict=True)),
        )


class CrossAttention(nn.Module):
    """Attention from video tokens to condition tokens (Wan's ``WanT2VCrossAttention``).

    Always SDPA: forward-mode AD (the JVP path) needs ``sdpa_kernel(SDPBackend.MATH)`` around
    the call, since the fused CPU/GPU kernels have no JVP rule.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def kv(self, context_B_Lc_D: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values ``[B, Lc, H, D]`` of the condition tokens."""
        context_B_Lc_D = context_B_Lc_D.to(self.q.weight.dtype)
        heads = (self.num_heads, -1)
        k_B_Lc_H_D = self.norm_k(self.k(context_B_Lc_D)).unflatten(-1, heads)
        v_B_Lc_H_D = self.v(context_B_Lc_D).unflatten(-1, heads)
        return k_B_Lc_H_D, v_B_Lc_H_D

    def forward(
        self,
        x_B_L_D: Tensor,
        context_B_Lc_D: Tensor | None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Attend to ``context_B_Lc_D``, or to its precomputed ``kv`` (:meth:`kv`) if given."""
        x_B_L_D = x_B_L_D.to(self.q.weight.dtype)
        heads = (self.num_heads, -1)
        q_B_L_H_D = self.norm_q(self.q(x_B_L_D)).unflatten(-1, heads)
        k_B_Lc_H_D, v_B_Lc_H_D = self.kv(context_B_Lc_D) if kv is None else kv
        return self.o(sdpa_attention(q_B_L_H_D, k_B_Lc_H_D, v_B_Lc_H_D).flatten(2))


# ---------------------------------------------------------------------------------------------
# Per-frame AdaLN: tokens are ordered frame-major, so a [B, T, D] modulation broadcasts over the
# tokens of each frame after viewing [B, L, D] as [B, T, L/T, D].


def _modulate(x_B_L_D: Tensor, shift_B_T_D: Tensor, scale_B_T_D: Tensor) -> Tensor:
    x_B_T_N_D = _wide(x_B_L_D).unflatten(1, (shift_B_T_D.shape[1], -1))
    return (x_B_T_N_D * (1 + scale_B_T_D[:, :, None]) + shift_B_T_D[:, :, None]).flatten(1, 2)


def _gated_residual(x_B_L_D: Tensor, y_B_L_D: Tensor, gate_B_T_D: Tensor) -> Tensor:
    y_B_T_N_D = _wide(y_B_L_D).unflatten(1, (gate_B_T_D.shape[1], -1))
    return x_B_L_D + (y_B_T_N_D * gate_B_T_D[:, :, None]).flatten(1, 2)


class Block(nn.Module):
    """One Wan block: modulated self-attention, cross-attention, modulated GELU(tanh) FFN.

    ``norm1``/``norm2`` are the parameter-free norms before self-attention and the FFN, ``norm3``
    the (affine) norm before cross-attention — Wan's names (diffusers swaps norm2 and norm3).
    """

    def __init__(self, cfg: DiTConfig, layer_idx: int) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm32(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps, layer_idx)
        self.norm3: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if cfg.cond != "none":
            self.norm3 = (
                LayerNorm32(d, cfg.eps, elementwise_affine=True)
                if cfg.cross_attn_norm
                else nn.Identity()
            )
            self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm32(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self,
        x_B_L_D: Tensor,
        e0_B_T_6_D: Tensor,
        rope: tuple[Tensor, Tensor],
        context_B_Lc_D: Tensor | None,
        attn_fn: AttnFn,
        cross_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``x_B_L_D`` float32 residual stream; ``e0_B_T_6_D`` float32 per-frame modulation;
        ``cross_kv`` this layer's precomputed cross-attention K/V (instead of the context)."""
        mod_B_T_6_D = self.modulation[None] + e0_B_T_6_D
        shift1, scale1, gate1, shift2, scale2, gate2 = mod_B_T_6_D.unbind(2)
        y_B_L_D = self.self_attn(_modulate(self.norm1(x_B_L_D), shift1, scale1), rope, attn_fn)
        x_B_L_D = _gated_residual(x_B_L_D, y_B_L_D, gate1)
        if self.cross_attn is not None:
            y_B_L_D = self.cross_attn(self.norm3(x_B_L_D), context_B_Lc_D, cross_kv)
            x_B_L_D = x_B_L_D + _wide(y_B_L_D)
        h_B_L_D = _modulate(self.norm2(x_B_L_D), shift2, scale2).to(self.ffn[0].weight.dtype)
        return _gated_residual(x_B_L_D, self.ffn(h_B_L_D), gate2)


class Head(nn.Module):
    """Output head: per-frame modulated LayerNorm, then a linear map to patch values."""

    def __init__(self, dim: int, patch_values: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm32(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, patch_values)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x_B_L_D: Tensor, e_B_T_D: Tensor) -> Tensor:
        shift_B_T_D, scale_B_T_D = (self.modulation[None] + e_B_T_D[:, :, None]).unbind(2)
        h_B_L_D = _modulate(self.norm(x_B_L_D), shift_B_T_D, scale_B_T_D)
        return _wide(self.head(h_B_L_D.to(self.head.weight.dtype)))


# ---------------------------------------------------------------------------------------------
# The model


def action_planes(actions_B_T: Tensor | None, num_actions: int, like_B_T_C_H_W: Tensor) -> Tensor:
    """One-hot action planes ``[B, T, num_actions + 1, H, W]`` shaped and typed like ``like``:
    one plane per action id, the last for the null action (``None`` = all null)."""
    B, T, _, H, W = like_B_T_C_H_W.shape
    if actions_B_T is None:
        actions_B_T = torch.full((B, T), num_actions, device=like_B_T_C_H_W.device)
    one_hot = F.one_hot(actions_B_T.long(), num_actions + 1).to(like_B_T_C_H_W.dtype)
    return one_hot[..., None, None].expand(-1, -1, -1, H, W)


class PixelHead(nn.Module):
    """Full-resolution correction of a clean-frame estimate (``DiTConfig.pixel_head``).

    Three 5×5 convolutions and a 3×3 one see ±7 pixels around each pixel of: the estimate
    ``x0̂``, the noisy frame ``x_s``, a plane holding ``s``, the previous frames (for
    ``prev_frames > 0``) and one plane per action id (for ``num_actions > 0``). Its output is
    added to ``x0̂``; the last layer starts at zero.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        width = cfg.pixel_head
        self.num_actions = cfg.num_actions
        self.net = nn.Sequential(
            nn.Conv2d(cfg.pixel_head_inputs, width, 5, padding=2),
            nn.GELU(approximate="tanh"),
            nn.Conv2d(width, width, 5, padding=2),
            nn.GELU(approximate="tanh"),
            nn.Conv2d(width, width, 5, padding=2),
            nn.GELU(approximate="tanh"),
            nn.Conv2d(width, cfg.out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        x0_B_T_C_H_W: Tensor,
        x_B_T_C_H_W: Tensor,
        s_B_T: Tensor,
        prev_B_T_C_H_W: Tensor | None,
        actions_B_T: Tensor | None,
    ) -> Tensor:
        """The corrected estimate, ``[B, T, C, H, W]`` in ``x0``'s dtype."""
        B, T, _, H, W = x0_B_T_C_H_W.shape
        dtype = self.net[0].weight.dtype
        parts = [x0_B_T_C_H_W, x_B_T_C_H_W, s_B_T[:, :, None, None, None].expand(B, T, 1, H, W)]
        if prev_B_T_C_H_W is not None:
            parts.append(prev_B_T_C_H_W)
        if self.num_actions:
            parts.append(action_planes(actions_B_T, self.num_actions, x0_B_T_C_H_W))
        inputs = torch.cat([p.to(dtype) for p in parts], dim=2).flatten(0, 1)
        correction = self.net(inputs).unflatten(0, (B, T))
        return x0_B_T_C_H_W + correction.to(x0_B_T_C_H_W.dtype)


class CausalDiT(nn.Module):
    """Wan2.1-style DiT predicting the RF velocity ``v = ε − x0`` with a noise level per frame.

    ``forward(x_B_T_C_H_W, s_B_T, ...)`` — see its docstring. With ``patch = (pt, ph, pw)`` a
    *model frame* is ``pt`` input frames; every shipped config has ``pt = 1``, so model frames
    and input frames coincide and masks are built with ``tokens_per_frame(H, W)``.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        patch_values = cfg.out_channels * math.prod(cfg.patch)
        self.patch_embedding = nn.Conv3d(cfg.patch_in_channels, d, cfg.patch, stride=cfg.patch)
        if cfg.cond == "text":
            self.text_embedding = nn.Sequential(
                nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
            )
            # Learned null caption for CFG (PixArt-style); zeros = an all-padding prompt.
            self.null_text = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim))
        elif cfg.cond == "class":
            # Row num_classes is the null class.
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.class_tokens * d)
        if cfg.num_actions:
            # Row num_actions is the null action. Zero init: adding actions to a pretrained
            # model starts from that model's behaviour.
            self.action_embedding = nn.Embedding(cfg.num_actions + 1, d)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(d, patch_values, cfg.eps)
        self._init_weights()
        # Built after Wan's initialisation, which would re-initialise its zero output layer.
        self.pixel_head = PixelHead(cfg) if cfg.pixel_head else None

    def _init_weights(self) -> None:
        """Wan2.1's initialisation (zero output head), plus crcm's condition tables."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        mlps = [self.time_embedding]
        if self.cfg.cond == "text":
            mlps.append(self.text_embedding)
        for mlp in mlps:
            for layer in mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
        if self.cfg.cond == "class":
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        if self.cfg.num_actions:
            nn.init.zeros_(self.action_embedding.weight)
        nn.init.zeros_(self.head.head.weight)

    # -- helpers for callers ------------------------------------------------------------------

    @property
    def null_class(self) -> int:
        """The class id meaning "no class" (``cond='class'``)."""
        return self.cfg.num_classes

    @property
    def null_action(self) -> int:
        """The action id meaning "no action" (for action dropout / action CFG)."""
        return self.cfg.num_actions

    def previous_frames(
        self, x0_B_T_C_H_W: Tensor, history_B_K_C_H_W: Tensor | None = None
    ) -> Tensor | None:
        """The ``prev`` input for the clean clip ``x0`` (:func:`preceding_frames` with this
        model's ``prev_frames``), or None for a model without frame conditioning. Training feeds
        clean data here; streaming feeds the stream's own finished frames."""
        k = self.cfg.prev_frames
        return preceding_frames(x0_B_T_C_H_W, k, history_B_K_C_H_W) if k else None

    def next_frame_previous(
        self, history_B_K_C_H_W: Tensor | None, like_B_1_C_H_W: Tensor
    ) -> Tensor | None:
        """The ``prev`` input of a stream's next frame (shaped like ``like``, one frame): its
        last ``prev_frames`` finished frames from ``history`` (oldest first), zeros where the
        stream has fewer; None for a model without frame conditioning."""
        return self.previous_frames(torch.zeros_like(like_B_1_C_H_W), history_B_K_C_H_W)

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one model frame of size ``height × width`` (model space)."""
        _, ph, pw = self.cfg.patch
        return (height // ph) * (width // pw)

    def drop_cond(self, cond: Tensor | None, drop_B: Tensor) -> Tensor | None:
        """Replace the condition of samples with ``drop_B`` True by the null condition.

        Condition dropout for CFG training; ``drop_cond(cond, ones)`` is the unconditional
        branch (``forward(cond=None)`` is the same thing for the whole batch).
        """
        if self.cfg.cond == "none" or cond is None:
            return None
        B = self._check_cond(cond)
        if drop_B.shape != (B,) or drop_B.dtype != torch.bool:
            raise ValueError(f"drop_B must be bool [{B}], got {drop_B.dtype} {list(drop_B.shape)}")
        if self.cfg.cond == "class":
            return torch.where(drop_B, self.null_class, cond)
        return torch.where(drop_B[:, None, None], self.null_text.to(cond.dtype), cond)

    def cross_kv(self, cond: Tensor | None, batch: int = 1) -> CrossKV:
        """The cross-attention K/V of every layer for the condition ``cond`` (as ``forward``
        takes it; ``None`` = the null condition for ``batch`` rows), condition embedding
        included. ``forward(..., cross_kv=model.cross_kv(cond))`` equals
        ``forward(..., cond=cond)`` and skips that work: a stream whose condition does not change
        computes it once. No gradient flows to ``cond`` through a cache computed without one;
        training passes ``cond``.
        """
        if self.cfg.cond == "none":
            raise ValueError("this model has no per-video condition (cond='none')")
        B = batch if cond is None else self._check_cond(cond)
        device = self.patch_embedding.weight.device if cond is None else cond.device
        context_B_Lc_D = self._embed_cond(cond, B, device)
        kvs = [block.cross_attn.kv(context_B_Lc_D) for block in self.blocks]
        return CrossKV(tuple(k for k, _ in kvs), tuple(v for _, v in kvs))

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x_B_T_C_H_W: Tensor,
        s_B_T: Tensor,
        *,
        frame_pos_B_T: Tensor | None = None,
        cond: Tensor | None = None,
        actions_B_T: Tensor | None = None,
        attention: Attention = None,
        prev_B_T_C_H_W: Tensor | None = None,
        cross_kv: CrossKV | None = None,
        check_values: bool = True,
        pixel_head: bool = True,
    ) -> Tensor:
        """Predict the RF velocity ``v = ε − x0`` for every frame.

        Args:
            x_B_T_C_H_W: noisy frames ``x_s = (1 − s)·x0 + s·ε`` in model space, floating.
            s_B_T: RF time of each frame in [0, 1] (0 = clean); enters the network as 1000·s.
            frame_pos_B_T: integer RoPE frame index of each frame (default ``arange(T)``).
                The teacher-forcing packed ``[clean | noisy]`` sequence repeats the positions.
            cond: per-video condition — text tokens ``[B, text_len, text_dim]`` or class ids
                ``[B]`` per the config; ``None`` = the null condition (CFG's unconditional).
            actions_B_T: integer action per frame, ``null_action`` for none; ``None`` = all null.
            attention: a ``crcm.masks.Mask`` over the ``T·tokens_per_frame`` tokens, ``None``
                for the full mask, or ``attn_fn(layer_idx, q, k, v) -> o`` (``[B, L, H, D]``,
                q/k after RMSNorm and RoPE) — e.g. a KV-cache attention for streaming.
            prev_B_T_C_H_W: for a model with ``prev_frames = k > 0`` (and only then), the ``k``
                clean frames before each frame concatenated on channels, ``[B, T, k·C, H, W]``
                (:func:`preceding_frames`); zeros where a frame has no past.
            cross_kv: the condition's precomputed cross-attention K/V (:meth:`cross_kv`, ``B``
                rows), instead of ``cond`` (which must then be None): the same result without
                recomputing them (a stream's condition is the same at every forward).
            check_values: whether to check the values of ``s``, ``frame_pos`` and ``actions``
                (ranges). Each check reads a tensor back to the host — a device sync, and a
                graph break under ``torch.compile`` — so callers whose inputs are valid by
                construction (the runtime's executor) pass False. Shapes are always checked.
            pixel_head: False skips the pixel head (a model with ``pixel_head > 0``): for a
                forward whose output nobody reads, such as the runtime's pass that only writes
                a finished frame's K/V. The attention layers never read the head.
        Returns:
            ``v_B_T_C_H_W`` with ``out_channels`` channels, in ``x``'s dtype.
        With ``pt > 1``, ``s``, ``actions`` and ``frame_pos`` are read once per group of ``pt``
        frames (``s`` and ``actions`` must be constant within a group).
        """
        cfg = self.cfg
        B, T, _, H, W = self._check_x(x_B_T_C_H_W)
        pt, ph, pw = cfg.patch
        s_B_T = self._per_model_frame("s_B_T", self._check_s(s_B_T, B, T, check_values))
        if frame_pos_B_T is None:
            frame_pos_B_T = torch.arange(T, device=x_B_T_C_H_W.device).expand(B, T)
        frame_pos_B_T = self._check_frame_pos(frame_pos_B_T, B, T, check_values)[:, ::pt] // pt
        if actions_B_T is not None:
            actions_B_T = self._per_model_frame(
                "actions_B_T", self._check_actions(actions_B_T, B, T, check_values)
            )
        if cross_kv is None:
            context_B_Lc_D = self._embed_cond(cond, B, x_B_T_C_H_W.device, check_values)
            layer_kv: Sequence[tuple[Tensor, Tensor] | None] = [None] * len(self.blocks)
        else:
            self._check_cross_kv(cross_kv, cond, B)
            context_B_Lc_D = None
            layer_kv = list(zip(cross_kv.k, cross_kv.v, strict=True))

        prev_B_T_C_H_W = self._check_prev(prev_B_T_C_H_W, x_B_T_C_H_W)
        x_B_L_D = self.patchify(x_B_T_C_H_W, prev_B_T_C_H_W, actions_B_T)
        grid_t, grid_h, grid_w = T // pt, H // ph, W // pw

        e_B_T_D, e0_B_T_6_D = self._embed_time(s_B_T, actions_B_T)
        rope = rope_cos_sin(
            frame_pos_B_T, (grid_h, grid_w), cfg.head_dim, cfg.rope_theta, x_B_L_D.dtype
        )
        attn_fn = _resolve_attention(attention, x_B_L_D.shape[1], x_B_L_D.device)
        for block, kv in zip(self.blocks, layer_kv, strict=True):
            x_B_L_D = block(x_B_L_D, e0_B_T_6_D, rope, context_B_Lc_D, attn_fn, kv)
        with torch.autocast(x_B_L_D.device.type, enabled=False):
            patches_B_L_P = self.head(x_B_L_D, e_B_T_D)

        # Unpatchify: patch values are ordered (pt, ph, pw, C), as Wan's head.
        out = patches_B_L_P.reshape(B, grid_t, grid_h, grid_w, pt, ph, pw, cfg.out_channels)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(B, T, cfg.out_channels, H, W)
        v = self.velocity_from_output(
            x_B_T_C_H_W, s_B_T, out, prev_B_T_C_H_W, actions_B_T, pixel_head=pixel_head
        )
        return v.to(x_B_T_C_H_W.dtype)

    def velocity_from_output(
        self,
        x_B_T_C_H_W: Tensor,
        s_B_T: Tensor,
        out: Tensor,
        prev_B_T_C_H_W: Tensor | None,
        actions_B_T: Tensor | None = None,
        *,
        pixel_head: bool = True,
    ) -> Tensor:
        """The velocity from the head's (unpatchified) output: the output itself for a v-head,
        ``(x_s − x0̂)/max(s, X0_MIN_S)`` for an x0-head, where ``x0̂`` is the output
        (``"x0"``) or the last previous frame plus the output (``"x0-change"``), corrected by
        the pixel head if the model has one; so that ``x_s − s·v = x0̂`` wherever
        ``s ≥ X0_MIN_S`` (below it the clamp keeps the division bounded, as at ``s = 0`` for a
        clean context frame, whose output nobody reads). ``s_B_T`` and ``actions_B_T`` per
        model frame; ``pixel_head`` as in :meth:`forward`."""
        if self.cfg.prediction == "v":
            return out
        if self.cfg.prediction == "x0-change":
            last_B_T_C_H_W = prev_B_T_C_H_W[:, :, -self.cfg.in_channels :]
            out = out + last_B_T_C_H_W.to(out.dtype)
        if self.pixel_head is not None and pixel_head:
            out = self.pixel_head(out, _wide(x_B_T_C_H_W), s_B_T, prev_B_T_C_H_W, actions_B_T)
        pt = self.cfg.patch[0]
        s_B_T = s_B_T.repeat_interleave(pt, dim=1) if pt > 1 else s_B_T
        denom = s_B_T.to(out.dtype).clamp_min(X0_MIN_S)[:, :, None, None, None]
        return (_wide(x_B_T_C_H_W).to(out.dtype) - out) / denom

    def patchify(
        self,
        x_B_T_C_H_W: Tensor,
        prev_B_T_C_H_W: Tensor | None,
        actions_B_T: Tensor | None = None,
    ) -> Tensor:
        """Patch embedding: ``[B, T, C, H, W]`` (with the previous frames and, for
        ``action_planes``, the one-hot actions on channels) → tokens ``[B, L, D]`` ordered
        (frame, row, column), float32."""
        if prev_B_T_C_H_W is not None:
            x_B_T_C_H_W = torch.cat([x_B_T_C_H_W, prev_B_T_C_H_W.to(x_B_T_C_H_W.dtype)], dim=2)
        if self.cfg.action_planes:
            planes = action_planes(actions_B_T, self.cfg.num_actions, x_B_T_C_H_W)
            x_B_T_C_H_W = torch.cat([x_B_T_C_H_W, planes], dim=2)
        conv_in = x_B_T_C_H_W.transpose(1, 2).to(self.patch_embedding.weight.dtype)
        tokens_B_D_t_h_w = self.patch_embedding(conv_in)
        return _wide(tokens_B_D_t_h_w.flatten(2).transpose(1, 2))

    def _embed_time(self, s_B_T: Tensor, actions_B_T: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-frame embedding ``e_B_T_D`` (head) and 6-way block modulation ``e0_B_T_6_D``.

        Actions enter here, as DiT's class label does: the action embedding is added to the time
        embedding of its frame, so it modulates every block (and the head) through the shared
        projection. A cross-attention variant would instead add action tokens to the context.
        Computed in float32 with autocast off (Wan keeps this path in float32).
        """
        B, T = s_B_T.shape
        with torch.autocast(s_B_T.device.type, enabled=False):
            sin_N_F = sinusoidal_embedding(self.cfg.freq_dim, 1000.0 * s_B_T.flatten())
            weight = self.time_embedding[0].weight
            e_B_T_D = _wide(self.time_embedding(sin_N_F.to(weight.dtype))).unflatten(0, (B, T))
            if self.cfg.num_actions:
                if actions_B_T is None:
                    actions_B_T = torch.full_like(s_B_T, self.null_action, dtype=torch.long)
                e_B_T_D = e_B_T_D + _wide(self.action_embedding(actions_B_T))
            e0_B_T_6D = _wide(self.time_projection(e_B_T_D.to(weight.dtype)))
        return e_B_T_D, e0_B_T_6D.unflatten(-1, (6, self.cfg.dim))

    def _embed_cond(
        self, cond: Tensor | None, B: int, device: torch.device, check_values: bool = True
    ) -> Tensor | None:
        """Condition tokens ``[B, Lc, D]`` for cross-attention (None when ``cond='none'``)."""
        if self.cfg.cond == "none":
            if cond is not None:
                raise ValueError("this model has no per-video condition (cond='none'); pass None")
            return None
        if cond is None:
            cond = self._null_cond(B, device)
        elif self._check_cond(cond, check_values) != B:
            raise ValueError(f"cond has batch {cond.shape[0]}, x has batch {B}")
        if self.cfg.cond == "class":
            return self.class_embedding(cond).unflatten(-1, (self.cfg.class_tokens, self.cfg.dim))
        return self.text_embedding(cond.to(self.text_embedding[0].weight.dtype))

    def _null_cond(self, B: int, device: torch.device) -> Tensor:
        if self.cfg.cond == "class":
            return torch.full((B,), self.null_class, dtype=torch.long, device=device)
        return self.null_text[None].expand(B, -1, -1)

    # -- input validation ---------------------------------------------------------------------

    def _check_x(self, x: Tensor) -> tuple[int, int, int, int, int]:
        if not isinstance(x, Tensor) or x.ndim != 5 or not x.is_floating_point():
            raise ValueError(f"x must be a floating [B, T, C, H, W] tensor, got {_describe(x)}")
        B, T, channels, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        if channels != self.cfg.in_channels:
            raise ValueError(f"x has {channels} channels, the model expects {self.cfg.in_channels}")
        if T % pt or H % ph or W % pw or min(B, T, H, W) == 0:
            raise ValueError(
                f"x of shape [B, T, C, H, W]={list(x.shape)} must be non-empty and T, H, W "
                f"divisible by the patch {self.cfg.patch}"
            )
        return B, T, channels, H, W

    def _check_prev(self, prev: Tensor | None, x: Tensor) -> Tensor | None:
        k = self.cfg.prev_frames
        if k == 0:
            if prev is not None:
                raise ValueError("this model takes no previous frames (prev_frames=0); pass None")
            return None
        B, T, C, H, W = x.shape
        expected = (B, T, k * C, H, W)
        if not isinstance(prev, Tensor) or not prev.is_floating_point() or prev.shape != expected:
            raise ValueError(
                f"this model conditions on the {k} previous frame(s): prev_B_T_C_H_W must be a "
                f"floating {list(expected)} tensor (crcm.models.dit.preceding_frames), got "
                f"{_describe(prev)}"
            )
        return prev

    @staticmethod
    def _check_s(s: Tensor, B: int, T: int, values: bool) -> Tensor:
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.shape != (B, T):
            raise ValueError(f"s_B_T must be a floating [{B}, {T}] tensor, got {_describe(s)}")
        if values and not bool(((s >= 0) & (s <= 1)).all()):  # also rejects NaN
            raise ValueError("s_B_T (RF time) must lie in [0, 1]")
        return s

    @staticmethod
    def _check_frame_pos(pos: Tensor, B: int, T: int, values: bool) -> Tensor:
        if not isinstance(pos, Tensor) or _is_float_or_bool(pos) or pos.shape != (B, T):
            raise ValueError(
                f"frame_pos_B_T must be an integer [{B}, {T}] tensor, got {_describe(pos)}"
            )
        if values and bool((pos < 0).any()):
            raise ValueError("frame_pos_B_T must be non-negative")
        return pos

    def _check_actions(self, actions: Tensor, B: int, T: int, values: bool) -> Tensor:
        n = self.cfg.num_actions
        if n == 0:
            raise ValueError("this model has no action conditioning (num_actions=0)")
        if not isinstance(actions, Tensor) or _is_float_or_bool(actions) or actions.shape != (B, T):
            raise ValueError(
                f"actions_B_T must be an integer [{B}, {T}] tensor, got {_describe(actions)}"
            )
        if values and bool(((actions < 0) | (actions > n)).any()):
            raise ValueError(f"actions must lie in [0, {n}] ({n} = null action)")
        return actions.long()

    def _check_cross_kv(self, cross_kv: CrossKV, cond: Tensor | None, B: int) -> None:
        if cond is not None:
            raise ValueError("pass cond or cross_kv (the condition's precomputed K/V), not both")
        if self.cfg.cond == "none":
            raise ValueError("this model has no per-video condition (cond='none'); pass None")
        if not isinstance(cross_kv, CrossKV):
            raise ValueError(
                f"cross_kv must be a CrossKV (model.cross_kv), got {_describe(cross_kv)}"
            )
        n = len(self.blocks)
        if len(cross_kv.k) != n or len(cross_kv.v) != n:
            raise ValueError(f"cross_kv has {len(cross_kv.k)} layers, the model has {n}")
        if cross_kv.batch != B:
            raise ValueError(f"cross_kv has batch {cross_kv.batch}, x has batch {B}")

    def _check_cond(self, cond: Tensor, values: bool = True) -> int:
        """Validate a non-null condition (its ids' range too if ``values``); returns its batch
        size."""
        cfg = self.cfg
        if cfg.cond == "class":
            if not isinstance(cond, Tensor) or _is_float_or_bool(cond) or cond.ndim != 1:
                raise ValueError(f"class cond must be integer ids [B], got {_describe(cond)}")
            if values and bool(((cond < 0) | (cond > cfg.num_classes)).any()):
                raise ValueError(f"class ids must lie in [0, {cfg.num_classes}] (last = null)")
            return cond.shape[0]
        expected = (cfg.text_len, cfg.text_dim)
        if not (isinstance(cond, Tensor) and cond.is_floating_point() and cond.ndim == 3):
            raise ValueError(f"text cond must be floating [B, L, D], got {_describe(cond)}")
        if tuple(cond.shape[1:]) != expected:
            raise ValueError(
                f"text cond must be [B, {cfg.text_len}, {cfg.text_dim}] (zero-pad the tokens to "
                f"text_len, as Wan does), got {list(cond.shape)}"
            )
        return cond.shape[0]

    def _per_model_frame(self, name: str, v_B_T: Tensor) -> Tensor:
        """One value per model frame: the first of each group of ``pt`` input frames."""
        pt = self.cfg.patch[0]
        if pt == 1:
            return v_B_T
        grouped = v_B_T.unflatten(1, (-1, pt))
        if not bool((grouped == grouped[:, :, :1]).all()):
            raise ValueError(f"{name} must be constant within each group of pt={pt} frames")
        return grouped[:, :, 0]


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or left in float64 (a float64 model stays float64 end to end)."""
    return x if x.dtype == torch.float64 else x.float()


def _is_float_or_bool(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex() or t.dtype == torch.bool


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
