"""Forward-mode derivative (JVP) of masked softmax attention (design §1.5, §4.2).

For one head with ``S = Q·Kᵀ·scale``, ``P = softmax(S)`` over the allowed keys and ``O = P·V``, the
tangent of ``O`` along ``(tQ, tK, tV)`` is

    tS = (tQ·Kᵀ + Q·tKᵀ)·scale
    tO = P·tV + (P ⊙ tS)·V − rowsum(P ⊙ tS) ⊙ O.

The Triton kernel computes it FlashAttention-2-style in one pass over the keys: beside the online
softmax state (running max m, ℓ = Σ P̃, Õ = Σ P̃·V) it keeps A + B = Σ P̃·tV + Σ (P̃ ⊙ tS)·V and
r = Σ rowsum(P̃ ⊙ tS), all rescaled like Õ, and ends with O = Õ/ℓ, tO = (A + B)/ℓ − (r/ℓ)·O.
A and B are only ever needed summed, so they share one accumulator.

It is forward-only (used under ``torch.no_grad`` by TF-sCM). Masks are :class:`crcm.masks.Mask`
unions of rectangles; query rows with no allowed key get ``O = tO = 0``.

Static tokens. In TF-sCM the clean context does not move: the first ``static_q`` queries and
``static_k`` keys have zero tangents, and in cross-attention no key moves. Per tile the kernel then
skips the products that would multiply zeros: a static key tile needs neither ``Q·tKᵀ`` nor
``P̃·tV``, a static query tile needs no ``tQ·Kᵀ``, and a tile where neither moves is plain
attention. Per score-tile this is 2 matrix products (neither moves), 4 (only the query moves),
5 (only the key) or 6 (both), against the primal's 2: for the TF mask with 3 chunks the JVP does
1.75× the primal's matrix work instead of 3×, and the ratio falls towards 1.5× with more chunks.

Shapes: ``q, t_q, o, t_o``: ``[B, Lq, H, D]``; ``k, v, t_k, t_v``: ``[B, Lk, H, D]``.
"""

import functools

import numpy as np
import torch

from crcm.kernels._common import (
    Backend,
    LaunchConfig,
    LaunchLadder,
    check_scale,
    is_interpreted,
    resolve_backend,
    tl,
    triton,
)
from crcm.masks import Mask

__all__ = ["attention_jvp", "attention_jvp_reference"]


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    t_v: torch.Tensor,
    mask: Mask,
    scale: float | None = None,
    backend: Backend = "auto",
    *,
    static_q: int = 0,
    static_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention and its JVP: ``(O, tO)``, both ``[B, Lq, H, D]`` in ``q``'s dtype.

    Args:
        q, t_q: ``[B, Lq, H, D]`` queries and their tangent.
        k, v, t_k, t_v: ``[B, Lk, H, D]`` keys, values and their tangents.
        mask: a ``Mask`` of size ``Lq × Lk`` (the same for every batch element and head).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: "triton", "torch" or "auto" (see :mod:`crcm.kernels`).
        static_q: the first ``static_q`` queries do not move: their tangents are taken as zero
            and never read (TF-sCM's clean context). In ``[0, Lq]``.
        static_k: the same for the first ``static_k`` keys and values (``t_k`` and ``t_v``);
            ``Lk`` means no key moves, as in cross-attention to a fixed condition.

    Example — the JVP of one TF-sCM self-attention, whose clean half does not move::

        mask = teacher_forcing_mask(num_frames=9, chunk_frames=3, tokens_per_frame=64)
        clean = mask.num_q // 2
        o, t_o = attention_jvp(q, k, v, t_q, t_k, t_v, mask, static_q=clean, static_k=clean)
    """
    scale = _check_inputs(q, k, v, t_q, t_k, t_v, mask, scale)
    static_q = _check_static("static_q", static_q, q.shape[1])
    static_k = _check_static("static_k", static_k, k.shape[1])
    impl = resolve_backend(backend, _attention_jvp_kernel, q.device, q.dtype, q.shape[-1])
    run = _attention_jvp_triton if impl == "triton" else _attention_jvp_torch
    return run(q, k, v, t_q, t_k, t_v, mask, scale, static_q, static_k)


def attention_jvp_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    t_k: torch.Tensor,
    t_v: torch.Tensor,
    mask: Mask,
    scale: float | None = None,
    *,
    static_q: int = 0,
    static_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the explicit formula with the dense mask, in fp32 (fp64 for fp64 inputs).

    Same arguments and results as :func:`attention_jvp`. Materialises ``[B, H, Lq, Lk]`` scores:
    meant for tests and small CPU models, not for long sequences.
    """
    scale = _check_inputs(q, k, v, t_q, t_k, t_v, mask, scale)
    static_q = _check_static("static_q", static_q, q.shape[1])
    static_k = _check_static("static_k", static_k, k.shape[1])
    return _attention_jvp_torch(q, k, v, t_q, t_k, t_v, mask, scale, static_q, static_k)


def _attention_jvp_torch(q, k, v, t_q, t_k, t_v, mask, scale, static_q, static_k):
    compute = torch.promote_types(q.dtype, torch.float32)
    # [B, L, H, D] -> [B, H, L, D]
    q_, k_, v_, tq_, tk_, tv_ = (x.to(compute).transpose(1, 2) for x in (q, k, v, t_q, t_k, t_v))
    allowed = mask.dense(q.device)
    s = (q_ @ k_.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    # A row with no allowed key is all -inf, which softmax turns into NaN: define it as 0.
    p = torch.where(allowed.any(-1, keepdim=True), p, 0.0)
    o = p @ v_

    # Static tokens' tangents are zero, so only rows from `first` on can move (queries at or
    # past static_q, or seeing a key at or past static_k), and only keys from static_k on
    # contribute through tK and tV: the products below skip the rest, as the kernel does.
    first = min(static_q, mask.first_query_seeing(static_k))
    p_m, o_m, q_m = p[..., first:, :], o[..., first:, :], q_[..., first:, :]
    tq_m = tq_[..., first:, :]
    if static_q > first:  # rows [first, static_q) are static queries seeing moving keys
        tq_m = torch.cat([torch.zeros_like(tq_m[..., : static_q - first, :]),
                          tq_m[..., static_q - first :, :]], -2)  # fmt: skip
    t_s = tq_m @ k_.transpose(-1, -2)
    if static_k < k.shape[1]:
        t_s[..., static_k:] += q_m @ tk_[..., static_k:, :].transpose(-1, -2)
    p_ts = p_m * (t_s * scale)
    t_o_m = p_ts @ v_ - p_ts.sum(-1, keepdim=True) * o_m
    if static_k < k.shape[1]:
        t_o_m += p_m[..., static_k:] @ tv_[..., static_k:, :]
    t_o = torch.cat([torch.zeros_like(o[..., :first, :]), t_o_m], -2)
    return o.transpose(1, 2).to(q.dtype), t_o.transpose(1, 2).to(q.dtype)


def _rungs(head_dim: int) -> tuple[LaunchConfig, ...]:
    """GPU launch configurations, preferred first (see :class:`LaunchLadder`). The JVP holds two
    ``BLOCK_M × D`` fp32 accumulators (Õ and A + B) and up to three score tiles (S, tS, P ⊙ tS)
    where FlashAttention holds one and one, and streams four key-side tiles (K, V, tK, tV).

    At D=128 the order comes from timing eleven configurations on an H200 (Wan2.1-1.3B shapes,
    benches/results/kernels-nvidia-h200.json): 128-row tiles with 8 warps (two warpgroups of 64
    rows, the shape Hopper's matrix instructions want) ran the TF-sCM JVP 1.8× faster than the
    64-row tiles once first here, despite spilling a few registers. Each later rung is the
    fastest measured that needs less shared memory than the one before; in an offline sm_90
    compile (benches/kernel_resources.py, Triton 3.6) the moving-query variant takes 200, 164,
    98 and 64 KiB: the first fits sm_90 (227 KiB), the third sm_80 and sm_86/sm_89 (163 and
    99 KiB). At D=64: 104, 68 and 32 KiB."""
    if head_dim <= 64:
        return (
            LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
            LaunchConfig(block_m=128, block_n=32, num_warps=8, num_stages=2),
            LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=1),
        )
    return (
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
        LaunchConfig(block_m=128, block_n=32, num_warps=8, num_stages=3),
        LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
        LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=1),
    )


_LADDER = LaunchLadder("attention JVP", _rungs)


@functools.lru_cache(maxsize=64)
def _block_map(
    mask: Mask, block_m: int, block_n: int, static_k: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Block-sparse form of ``mask`` for the kernel, built once per (mask, tiles, static keys,
    device).

    Why a per-query-tile list of key tiles rather than the raw rectangles: rectangles that touch
    one query tile can overlap in keys (a tile straddling two block-causal chunks sees both
    chunks' prefixes), so looping over rectangles would visit a key tile twice. The list visits
    each touched key tile exactly once and skips untouched ones (the sparsity of block-causal and
    TF masks); tiles the union covers completely are flagged "full" and skip the per-element mask,
    which is then needed only on the diagonal tiles of the chunk boundaries.

    Returns int32 tensors:
        ``blocks_indptr [n_q_tiles + 1]``, ``blocks [nnz]`` (key tile index, ascending per query
        tile), ``blocks_full [nnz]`` (1 if every in-range element of the tile is allowed),
        ``blocks_moving [n_q_tiles]`` (index into ``blocks`` of the query tile's first key tile
        with a key at or past ``static_k``: the list is ascending, so the static key tiles come
        first), ``rects_indptr [n_q_tiles + 1]``, ``rects [n, 4]`` (the rectangles touching each
        query tile, to evaluate the per-element mask of partial tiles).
    """
    num_q, num_k = mask.num_q, mask.num_k
    rects = np.array(mask.rects, dtype=np.int64).reshape(-1, 4)
    q_tiles = np.arange(0, num_q, block_m)
    k_tiles = np.arange(0, num_k, block_n)
    # Compress coordinates to every tile and rectangle edge: cell (a, b) of the compressed grid is
    # rows [qs[a], qs[a+1]) × keys [ks[b], ks[b+1]), and each cell is wholly in or out of the mask.
    # The grid is O((tiles + rects)²), never O(Lq·Lk).
    qs = np.unique(np.concatenate([q_tiles, [num_q], rects[:, 0], rects[:, 1]]))
    ks = np.unique(np.concatenate([k_tiles, [num_k], rects[:, 2], rects[:, 3]]))
    a0, a1 = np.searchsorted(qs, rects[:, 0]), np.searchsorted(qs, rects[:, 1])
    b0, b1 = np.searchsorted(ks, rects[:, 2]), np.searchsorted(ks, rects[:, 3])
    # 2-D difference array: after two prefix sums, a cell holds how many rectangles cover it.
    cover = np.zeros((len(qs), len(ks)), dtype=np.int64)
    np.add.at(cover, (a0, b0), 1)
    np.add.at(cover, (a1, b0), -1)
    np.add.at(cover, (a0, b1), -1)
    np.add.at(cover, (a1, b1), 1)
    covered = cover.cumsum(0).cumsum(1)[:-1, :-1] > 0
    rows_at, cols_at = np.searchsorted(qs, q_tiles), np.searchsorted(ks, k_tiles)
    touched = np.logical_or.reduceat(np.logical_or.reduceat(covered, rows_at, 0), cols_at, 1)
    full = np.logical_and.reduceat(np.logical_and.reduceat(covered, rows_at, 0), cols_at, 1)
    if num_k % block_n:
        # The last key tile runs past Lk; only the per-element mask keeps its phantom keys out.
        full[:, -1] = False

    tile_end = np.minimum(q_tiles + block_m, num_q)
    touches = (rects[None, :, 0] < tile_end[:, None]) & (rects[None, :, 1] > q_tiles[:, None])
    blocks_indptr = np.concatenate([[0], np.cumsum(touched.sum(1))])
    static_tiles = touched & (k_tiles + block_n <= static_k)[None, :]
    arrays = (
        blocks_indptr,
        np.nonzero(touched)[1],
        full[touched],
        blocks_indptr[:-1] + static_tiles.sum(1),
        np.concatenate([[0], np.cumsum(touches.sum(1))]),
        rects[np.nonzero(touches)[1]],
    )
    return tuple(torch.from_numpy(np.ascontiguousarray(x, np.int32)).to(device) for x in arrays)


def _attention_jvp_triton(q, k, v, t_q, t_k, t_v, mask, scale, static_q, static_k):
    # Dense [B, L, H, D] inputs let the kernel share one offset formula for q/tq and k/v/tk/tv;
    # .contiguous() is free in the usual case and the copies are O(L·D), not O(L²).
    q, k, v, t_q, t_k, t_v = (x.contiguous() for x in (q, k, v, t_q, t_k, t_v))
    batch, len_q, num_heads, head_dim = q.shape
    o, t_o = torch.empty_like(q), torch.empty_like(q)
    # Which of the two compiled variants run depends on static_q and the tile height; a rung
    # found to fit one variant says nothing about the other (it needs more shared memory).
    variants = (static_q > 0, static_q < len_q)

    def launch(cfg: LaunchConfig) -> None:
        block_map = _block_map(mask, cfg.block_m, cfg.block_n, static_k, q.device)
        # Query tiles wholly before static_q run in a launch compiled without query tangents,
        # the rest in one with them. One kernel branching per tile instead would hold both
        # variants' pipeline buffers at once (272 KiB of shared memory at D=128 on sm_90).
        num_tiles = triton.cdiv(len_q, cfg.block_m)
        static_tiles = static_q // cfg.block_m
        for first, count, q_moves in (
            (0, static_tiles, False),
            (static_tiles, num_tiles - static_tiles, True),
        ):
            if count:
                _attention_jvp_kernel[(count, batch * num_heads)](
                    q, k, v, t_q, t_k, t_v, o, t_o, *block_map,
                    first, len_q, k.shape[1], static_q, static_k, scale,
                    H=num_heads, HEAD_DIM=head_dim, Q_MOVES=q_moves, **cfg.kwargs(),
                )  # fmt: skip

    _LADDER.launch(
        launch,
        device=q.device,
        head_dim=head_dim,
        interpreted=is_interpreted(_attention_jvp_kernel),
        specialisation=(q.dtype, num_heads, variants),
    )
    return o, t_o


@triton.jit
def _attention_jvp_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, to_ptr,
    blocks_indptr_ptr, blocks_ptr, blocks_full_ptr, blocks_moving_ptr, rects_indptr_ptr, rects_ptr,
    first_tile, len_q, len_k, static_q, static_k, scale,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_MOVES: tl.constexpr,
):  # fmt: skip
    """Grid ``(query tiles from first_tile on, B·H)``; one program = one query tile of one
    (batch, head). ``Q_MOVES``: whether the launch's query tiles hold any moving query.

    The key tiles run in two loops, static keys first, each specialised at compile time on
    whether the key tiles move, so that no product with a zero tangent is computed and no zero
    tangent is loaded.
    """
    tile = first_tile + tl.program_id(0)
    batch = tl.program_id(1) // H
    head = tl.program_id(1) % H
    token_stride: tl.constexpr = H * HEAD_DIM
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_offs = (batch * len_q + rows).to(tl.int64)[:, None] * token_stride + head * HEAD_DIM + dims
    row_ok = rows[:, None] < len_q
    q = tl.load(q_ptr + q_offs, mask=row_ok, other=0.0)
    # Batch b, head h, key 0: the key-side tensors share this offset.
    kv_base = batch.to(tl.int64) * len_k * token_stride + head * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # ℓ = Σ P̃
    r_i = tl.zeros([BLOCK_M], tl.float32)  # r = Σ P̃ ⊙ tS
    acc_o = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # Õ = Σ P̃·V
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # A + B = Σ P̃·tV + Σ (P̃ ⊙ tS)·V

    lo = tl.load(blocks_indptr_ptr + tile)
    moving = tl.load(blocks_moving_ptr + tile)
    hi = tl.load(blocks_indptr_ptr + tile + 1)
    rect_lo = tl.load(rects_indptr_ptr + tile)
    rect_hi = tl.load(rects_indptr_ptr + tile + 1)
    if Q_MOVES:
        tq = tl.load(tq_ptr + q_offs, mask=row_ok & (rows[:, None] >= static_q), other=0.0)
    else:
        tq = q  # never read
    m_i, l_i, r_i, acc_o, acc_t = _jvp_key_tiles(
        q, tq, rows, m_i, l_i, r_i, acc_o, acc_t, lo, moving,
        k_ptr + kv_base, v_ptr + kv_base, tk_ptr + kv_base, tv_ptr + kv_base,
        blocks_ptr, blocks_full_ptr, rects_ptr, rect_lo, rect_hi, len_k, static_k, scale,
        token_stride, HEAD_DIM, BLOCK_N, Q_MOVES=Q_MOVES, K_MOVES=False,
    )  # fmt: skip
    m_i, l_i, r_i, acc_o, acc_t = _jvp_key_tiles(
        q, tq, rows, m_i, l_i, r_i, acc_o, acc_t, moving, hi,
        k_ptr + kv_base, v_ptr + kv_base, tk_ptr + kv_base, tv_ptr + kv_base,
        blocks_ptr, blocks_full_ptr, rects_ptr, rect_lo, rect_hi, len_k, static_k, scale,
        token_stride, HEAD_DIM, BLOCK_N, Q_MOVES=Q_MOVES, K_MOVES=True,
    )  # fmt: skip

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o = acc_o * inv_l[:, None]
    t_o = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o
    tl.store(o_ptr + q_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok)
    tl.store(to_ptr + q_offs, t_o.to(to_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _jvp_key_tiles(
    q, tq, rows, m_i, l_i, r_i, acc_o, acc_t, lo, hi,
    k_ptr, v_ptr, tk_ptr, tv_ptr,
    blocks_ptr, blocks_full_ptr, rects_ptr, rect_lo, rect_hi, len_k, static_k, scale,
    TOKEN_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_MOVES: tl.constexpr, K_MOVES: tl.constexpr,
):  # fmt: skip
    """Online-softmax steps over key tiles ``blocks[lo:hi]``, updating ``(m, ℓ, r, Õ, A + B)``.

    ``Q_MOVES``/``K_MOVES`` say whether the query tile / these key tiles hold any moving token;
    ``tq`` is only read when ``Q_MOVES``. Without either, ``r`` and ``A + B`` are left alone: the
    static key tiles run first, so they are still zero then and need no rescaling.
    """
    qk_scale = scale * 1.4426950408889634  # log2(e): the softmax runs in base 2
    dims = tl.arange(0, HEAD_DIM)
    for j in range(lo, hi):
        cols = tl.load(blocks_ptr + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_offs = cols.to(tl.int64)[:, None] * TOKEN_STRIDE + dims[None, :]
        col_ok = cols[:, None] < len_k
        k = tl.load(k_ptr + k_offs, mask=col_ok, other=0.0)
        v = tl.load(v_ptr + k_offs, mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if tl.load(blocks_full_ptr + j) == 0:
            allowed = tl.zeros([q.shape[0], BLOCK_N], tl.int1)
            for r in range(rect_lo, rect_hi):
                q0 = tl.load(rects_ptr + 4 * r)
                q1 = tl.load(rects_ptr + 4 * r + 1)
                k0 = tl.load(rects_ptr + 4 * r + 2)
                k1 = tl.load(rects_ptr + 4 * r + 3)
                in_q = (rows >= q0) & (rows < q1)
                in_k = (cols >= k0) & (cols < k1)
                allowed = allowed | (in_q[:, None] & in_k[None, :])
            s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far has m = -inf; subtracting 0 instead keeps exp2 at 0
        # (not NaN), so such rows end with ℓ = 0 and are written as zeros.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_in = p.to(v.dtype)
        acc_o = acc_o * alpha[:, None] + tl.dot(p_in, v)
        if Q_MOVES or K_MOVES:
            if K_MOVES:
                # A tile straddling static_k reads only its moving keys' tangents.
                moves = col_ok & (cols[:, None] >= static_k)
                tk = tl.load(tk_ptr + k_offs, mask=moves, other=0.0)
                tv = tl.load(tv_ptr + k_offs, mask=moves, other=0.0)
                t_s = tl.dot(q, tl.trans(tk))
                if Q_MOVES:
                    t_s = tl.dot(tq, tl.trans(k), t_s)
                acc_t = tl.dot(p_in, tv, acc_t * alpha[:, None])
            else:
                t_s = tl.dot(tq, tl.trans(k))
                acc_t = acc_t * alpha[:, None]
            p_ts = p * (t_s * scale)
            r_i = r_i * alpha + tl.sum(p_ts, 1)
            acc_t = tl.dot(p_ts.to(v.dtype), v, acc_t)
        m_i = m_new
    return m_i, l_i, r_i, acc_o, acc_t


def _check_static(name: str, value: int, length: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= length:
        raise ValueError(f"{name} must lie in [0, {length}], got {value}")
    return value


def _check_inputs(q, k, v, t_q, t_k, t_v, mask, scale) -> float:
    """Validate shapes, dtypes, devices and the mask size; return the softmax scale."""
    tensors = {"q": q, "k": k, "v": v, "t_q": t_q, "t_k": t_k, "t_v": t_v}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, D], got shape {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    batch, len_q, num_heads, head_dim = q.shape
    len_k = k.shape[1]
    for name, x in tensors.items():
        want = (batch, len_q if name in ("q", "t_q") else len_k, num_heads, head_dim)
        if x.shape != want:
            raise ValueError(f"{name} must have shape {want} (from q and k), got {tuple(x.shape)}")
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a crcm.masks.Mask, got {type(mask).__name__}")
    if (mask.num_q, mask.num_k) != (len_q, len_k):
        raise ValueError(f"mask is {mask.num_q}x{mask.num_k} but Lq x Lk is {len_q}x{len_k}")
    return check_scale(scale, head_dim)
