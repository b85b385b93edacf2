"""Paged block-causal attention for the streaming runtime (design §3, §4.1).

One call serves the current chunks of many streams at once. The queries, keys and values of the
chunks are packed along the token axis (varlen, like flash-attn): item ``i`` owns rows
``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of ``q``, ``k_new`` and ``v_new``. Its queries attend to

    (its cached tokens, page by page, in page-table order) ++ (all rows of its own chunk)

which is block-causal by construction: no mask is built. The page table is CSR: item ``i``'s
pages are ``kv_page_ids[kv_indptr[i]:kv_indptr[i+1]]`` in order, and ``kv_page_lens`` (parallel
to ``kv_page_ids``) says how many leading tokens of each page are valid; the rest of a page is
padding and is never read. Pages evicted by a sliding window are simply absent from the table.

Shapes: ``q, k_new, v_new, o``: ``[total_q, H, D]``; ``k_pages, v_pages``:
``[num_pages, page_tokens, H, D]`` (one layer); index tensors int32.
"""

import torch
import torch.nn.functional as F

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

__all__ = ["paged_attention", "paged_attention_reference"]


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_page_ids: torch.Tensor,
    kv_page_lens: torch.Tensor,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of packed chunk queries over their paged KV cache plus their own chunk.

    Args:
        q, k_new, v_new: ``[total_q, H, D]``, the current chunks of all items packed.
        cu_seqlens_q: int32 ``[n_items + 1]``, item ``i`` owns rows ``cu[i]:cu[i+1]``.
        k_pages, v_pages: ``[num_pages, page_tokens, H, D]``, contiguous, same dtype as ``q``.
        kv_indptr: int32 ``[n_items + 1]``, CSR offsets into ``kv_page_ids``.
        kv_page_ids: int32 ``[n_pages_used]``, page ids in ``[0, num_pages)``, in context order.
        kv_page_lens: int32 ``[n_pages_used]``, valid tokens per page, in ``[1, page_tokens]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: "triton", "torch" or "auto" (see :mod:`crcm.kernels`).

    Returns:
        ``o``: ``[total_q, H, D]`` in ``q``'s dtype (accumulated in fp32).

    Validation copies the index tensors to the host: one device sync per call (the Triton path
    adds a second to size its grid).
    """
    scale = _check_inputs(
        q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
    )
    impl = resolve_backend(backend, _paged_attention_kernel, q.device, q.dtype, q.shape[-1])
    run = _paged_attention_triton if impl == "triton" else _paged_attention_torch
    return run(
        q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
    )


def paged_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_page_ids: torch.Tensor,
    kv_page_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The oracle: gather each item's pages, append its chunk, run SDPA in fp32 per item.

    Same arguments and result as :func:`paged_attention`; runs on any device.
    """
    scale = _check_inputs(
        q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
    )
    return _paged_attention_torch(
        q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
    )


def _paged_attention_torch(
    q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
) -> torch.Tensor:
    cu_q = cu_seqlens_q.tolist()
    indptr = kv_indptr.tolist()
    page_tokens = k_pages.shape[1]
    slot = torch.arange(page_tokens, device=q.device)
    o = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        q0, q1 = cu_q[i], cu_q[i + 1]
        if q0 == q1:
            continue
        ids = kv_page_ids[indptr[i] : indptr[i + 1]].long()
        valid = (slot[None, :] < kv_page_lens[indptr[i] : indptr[i + 1], None]).flatten()
        # [n_pages·page_tokens, H, D] with padding slots dropped, then the chunk's own tokens.
        k = torch.cat([k_pages[ids].flatten(0, 1)[valid], k_new[q0:q1]])
        v = torch.cat([v_pages[ids].flatten(0, 1)[valid], v_new[q0:q1]])
        # SDPA wants [H, L, D]; fp32 so that the oracle is more precise than the kernel.
        o_i = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1).float(),
            k.transpose(0, 1).float(),
            v.transpose(0, 1).float(),
            scale=scale,
        )
        o[q0:q1] = o_i.transpose(0, 1).to(q.dtype)
    return o


def _rungs(head_dim: int) -> tuple[LaunchConfig, ...]:
    """GPU launch configurations, preferred first (see :class:`LaunchLadder`). The first was
    timed on an H200 (benches/results/kernels-nvidia-h200.json); the rest step down in shared
    memory, as an offline sm_90 compile (benches/kernel_resources.py, Triton 3.9) counts it: at
    D=128, 128, 96, 64 and 48 KiB, none spilling registers; at D=64 half of that."""
    del head_dim  # the same tiles serve D=64 and D=128
    return (
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
        LaunchConfig(block_m=128, block_n=32, num_warps=8, num_stages=2),
        LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=1),
    )


_LADDER = LaunchLadder("paged attention", _rungs)


def _paged_attention_triton(
    q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
) -> torch.Tensor:
    # The kernel assumes dense [tokens, H, D] rows; chunk tensors are small next to the cache so a
    # copy of a strided view (e.g. q out of a fused qkv projection) is cheap.
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    o = torch.empty_like(q)
    _, num_heads, head_dim = q.shape
    max_len_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_len_q == 0:
        return o

    def launch(cfg: LaunchConfig) -> None:
        grid = (triton.cdiv(max_len_q, cfg.block_m), cu_seqlens_q.numel() - 1, num_heads)
        _paged_attention_kernel[grid](
            q, k_new, v_new, o, k_pages, v_pages,
            cu_seqlens_q, kv_indptr, kv_page_ids, kv_page_lens,
            k_pages.shape[1], scale,
            H=num_heads, HEAD_DIM=head_dim, **cfg.kwargs(),
        )  # fmt: skip

    _LADDER.launch(
        launch,
        device=q.device,
        head_dim=head_dim,
        interpreted=is_interpreted(_paged_attention_kernel),
        specialisation=(q.dtype, num_heads),
    )
    return o


@triton.jit
def _attend_tile(
    q, k_ptr, v_ptr, tokens, n_valid, m_i, l_i, acc, qk_scale,
    TOKEN_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over the key/value rows ``tokens`` (those ``< n_valid`` count).

    ``k_ptr``/``v_ptr`` point at token 0, head h, dim 0; softmax runs in base 2 (exp2) with
    ``qk_scale = scale·log2(e)``.
    """
    dims = tl.arange(0, HEAD_DIM)
    valid = tokens < n_valid
    offs = tokens[:, None].to(tl.int64) * TOKEN_STRIDE + dims[None, :]
    k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    # Every visited tile holds at least one valid key, so m_new is finite for every row.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_new_ptr, v_new_ptr, o_ptr, k_pages_ptr, v_pages_ptr,
    cu_seqlens_q_ptr, kv_indptr_ptr, kv_page_ids_ptr, kv_page_lens_ptr,
    page_tokens, scale,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid ``(query tiles of the longest item, n_items, H)``; one program = one query tile of one
    item and head. Tiles past an item's length exit at once (varlen packing, as in flash-attn)."""
    tile = tl.program_id(0)
    item = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + item).to(tl.int64)
    q_len = (tl.load(cu_seqlens_q_ptr + item + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len:
        return

    token_stride: tl.constexpr = H * HEAD_DIM
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_offs = (q_start + rows[:, None]) * token_stride + head * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + row_offs, mask=rows[:, None] < q_len, other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # The cached context, page by page; a page holds page_tokens slots of which the first
    # n_valid are tokens, so the padding is never loaded.
    page_lo = tl.load(kv_indptr_ptr + item)
    page_hi = tl.load(kv_indptr_ptr + item + 1)
    for j in range(page_lo, page_hi):
        page = tl.load(kv_page_ids_ptr + j).to(tl.int64)
        n_valid = tl.load(kv_page_lens_ptr + j)
        page_off = (page * page_tokens) * token_stride + head * HEAD_DIM
        for start in range(0, n_valid, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, k_pages_ptr + page_off, v_pages_ptr + page_off,
                start + tl.arange(0, BLOCK_N), n_valid, m_i, l_i, acc, qk_scale,
                token_stride, HEAD_DIM,
            )  # fmt: skip

    # The chunk's own tokens: it sees itself fully.
    chunk_off = q_start * token_stride + head * HEAD_DIM
    for start in range(0, q_len, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, k_new_ptr + chunk_off, v_new_ptr + chunk_off,
            start + tl.arange(0, BLOCK_N), q_len, m_i, l_i, acc, qk_scale,
            token_stride, HEAD_DIM,
        )  # fmt: skip

    o = acc / l_i[:, None]
    tl.store(o_ptr + row_offs, o.to(o_ptr.dtype.element_ty), mask=rows[:, None] < q_len)


def _check_inputs(
    q, k_new, v_new, cu_seqlens_q, k_pages, v_pages, kv_indptr, kv_page_ids, kv_page_lens, scale
) -> float:
    """Validate shapes, dtypes, devices and index ranges; return the softmax scale."""
    for name, x in {"q": q, "k_new": k_new, "v_new": v_new, "k_pages": k_pages,
                    "v_pages": v_pages, "cu_seqlens_q": cu_seqlens_q, "kv_indptr": kv_indptr,
                    "kv_page_ids": kv_page_ids, "kv_page_lens": kv_page_lens}.items():  # fmt: skip
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, H, D], got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, x in {"k_new": k_new, "v_new": v_new}.items():
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    total_q, num_heads, head_dim = q.shape
    if k_pages.dim() != 4 or k_pages.shape[2:] != (num_heads, head_dim):
        raise ValueError(
            f"k_pages must be [num_pages, page_tokens, {num_heads}, {head_dim}], "
            f"got shape {tuple(k_pages.shape)}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}"
        )
    for name, x in {"k_new": k_new, "v_new": v_new, "k_pages": k_pages, "v_pages": v_pages}.items():
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    for name, x in {"k_pages": k_pages, "v_pages": v_pages}.items():
        # A hidden .contiguous() would copy the whole cache on every call.
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (one layer's slice of the page tensor)")
    num_pages, page_tokens = k_pages.shape[:2]
    if num_pages == 0 or page_tokens == 0:
        raise ValueError(
            f"k_pages needs at least one page of one token, got {tuple(k_pages.shape)}"
        )

    for name, x in {"cu_seqlens_q": cu_seqlens_q, "kv_indptr": kv_indptr,
                    "kv_page_ids": kv_page_ids, "kv_page_lens": kv_page_lens}.items():  # fmt: skip
        if x.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    n_items = cu_seqlens_q.numel() - 1
    if n_items < 1:
        raise ValueError("cu_seqlens_q needs at least two entries (one item)")
    if kv_indptr.numel() != n_items + 1:
        raise ValueError(
            f"kv_indptr must have n_items + 1 = {n_items + 1} entries, got {kv_indptr.numel()}"
        )
    if kv_page_lens.numel() != kv_page_ids.numel():
        raise ValueError(
            f"kv_page_lens must parallel kv_page_ids ({kv_page_ids.numel()} entries), "
            f"got {kv_page_lens.numel()}"
        )
    # One device-to-host copy for all index checks (one sync per call on GPU).
    cu_q, indptr, ids, lens = (
        torch.cat([cu_seqlens_q, kv_indptr, kv_page_ids, kv_page_lens])
        .cpu()
        .split([n_items + 1, n_items + 1, kv_page_ids.numel(), kv_page_lens.numel()])
    )
    _check_offsets("cu_seqlens_q", cu_q, total_q)
    _check_offsets("kv_indptr", indptr, ids.numel())
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"kv_page_ids must lie in [0, {num_pages}), got range [{lo}, {hi}]")
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 1 or hi > page_tokens:
            raise ValueError(f"kv_page_lens must lie in [1, {page_tokens}], got range [{lo}, {hi}]")
    return check_scale(scale, head_dim)


def _check_offsets(name: str, offsets: torch.Tensor, total: int) -> None:
    """CSR offsets: start at 0, never decrease, end at ``total``."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != total:
        raise ValueError(f"{name} must start at 0 and end at {total}, got {first}..{last}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {offsets.tolist()}")
