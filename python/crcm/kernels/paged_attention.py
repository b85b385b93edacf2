"""Paged block-causal attention for the streaming runtime (design §3, §4.1).

One call serves the current chunks of many streams at once. The queries, keys and values of the
chunks are packed along the token axis (varlen, like flash-attn): item ``i`` owns rows
``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of ``q``, ``k_new`` and ``v_new``. Its queries attend to

    (its cached tokens, page by page, in page-table order) ++ (all rows of its own chunk)

which is block-causal by construction: no mask is built. The page table is CSR: item ``i``'s
pages are ``kv_page_ids[kv_indptr[i]:kv_indptr[i+1]]`` in order, and ``kv_page_lens`` (parallel
to ``kv_page_ids``) says how many leading tokens of each page are valid; the rest of a page is
padding and is never read. Pages evicted by a sliding window are simply absent from the table.

The row offsets and the page table travel together as a :class:`PagedLayout`, built once per
streaming step from host arrays and shared by every layer: it is validated on the host and
copied to the device once, so a call of :func:`paged_attention` never waits for the GPU (no
device-to-host copy; capturing a step in a CUDA graph would need that too). On an H200 the two
syncs per call that validating device tensors cost made a 1-frame chunk with no context 3.2×
slower than SDPA.

Split context (flash-decoding). One program per (query tile, item, head) leaves most of a GPU
idle when few streams run: one stream's 1-frame chunk of Wan2.1-1.3B is 13 × 12 = 156 programs
for 132 SMs, so a second, nearly empty wave doubles the time. The Triton path then splits each
item's context ("units": its pages, then its own chunk) into ``kv_splits`` contiguous parts run
by separate programs, and merges their partial softmax states (running max, sum, unnormalised
output) afterwards.

Shapes: ``q, k_new, v_new, o``: ``[total_q, H, D]``; ``k_pages, v_pages``:
``[num_pages, page_tokens, H, D]`` (one layer); index tensors int32.
"""

import functools
from collections.abc import Sequence

import numpy as np
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

__all__ = ["PagedLayout", "paged_attention", "paged_attention_reference"]

IndexArray = Sequence[int] | np.ndarray | torch.Tensor


class PagedLayout:
    """Which packed rows belong to which item and which cached pages each item attends to.

    Build it once per step from host data (lists, NumPy arrays or CPU tensors; CUDA tensors
    work too but cost a device sync here): it checks everything on the host and copies the
    index arrays to ``device`` as int32, so that :func:`paged_attention` can trust them.

    Args:
        cu_seqlens_q: ``[n_items + 1]`` row offsets: item ``i`` owns rows ``cu[i]:cu[i+1]`` of
            the packed ``q``, ``k_new`` and ``v_new``.
        kv_indptr: ``[n_items + 1]`` CSR offsets into ``kv_page_ids``.
        kv_page_ids: the pages of all items, in context order, ids in ``[0, num_pages)``.
        kv_page_lens: valid tokens of each page (parallel to ``kv_page_ids``), in
            ``[1, page_tokens]``.
        num_pages, page_tokens: the shape of the page pool the ids index
            (``k_pages.shape[:2]``).
        device: where the kernel runs.

    Example — two streams: a 3-token chunk over pages 4 and 0 (16 and 5 tokens) and a 2-token
    chunk with nothing cached::

        layout = PagedLayout([0, 3, 5], [0, 2, 2], [4, 0], [16, 5],
                             num_pages=8, page_tokens=16, device="cuda")
        o = paged_attention(q, k_new, v_new, k_pages, v_pages, layout)
    """

    def __init__(
        self,
        cu_seqlens_q: IndexArray,
        kv_indptr: IndexArray,
        kv_page_ids: IndexArray,
        kv_page_lens: IndexArray,
        *,
        num_pages: int,
        page_tokens: int,
        device: torch.device | str = "cpu",
    ) -> None:
        cu_q, indptr, ids, lens = (
            _host_indices(name, x)
            for name, x in (("cu_seqlens_q", cu_seqlens_q), ("kv_indptr", kv_indptr),
                            ("kv_page_ids", kv_page_ids), ("kv_page_lens", kv_page_lens))
        )  # fmt: skip
        for name, x in (("num_pages", num_pages), ("page_tokens", page_tokens)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        n_items = len(cu_q) - 1
        if n_items < 1:
            raise ValueError("cu_seqlens_q needs at least two entries (one item)")
        if len(indptr) != n_items + 1:
            raise ValueError(
                f"kv_indptr must have n_items + 1 = {n_items + 1} entries, got {len(indptr)}"
            )
        if len(lens) != len(ids):
            raise ValueError(
                f"kv_page_lens must parallel kv_page_ids ({len(ids)} entries), got {len(lens)}"
            )
        _check_offsets("cu_seqlens_q", cu_q, None)
        _check_offsets("kv_indptr", indptr, len(ids))
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= num_pages:
                raise ValueError(
                    f"kv_page_ids must lie in [0, {num_pages}), got range [{lo}, {hi}]"
                )
            lo, hi = int(lens.min()), int(lens.max())
            if lo < 1 or hi > page_tokens:
                raise ValueError(
                    f"kv_page_lens must lie in [1, {page_tokens}], got range [{lo}, {hi}]"
                )
        self.num_pages, self.page_tokens = num_pages, page_tokens
        self.total_q = int(cu_q[-1])
        self.max_len_q = int(np.diff(cu_q).max())
        self.max_pages = int(np.diff(indptr).max())
        # Host copies for the torch path, which slices per item.
        self.cu_q_host, self.indptr_host = cu_q.tolist(), indptr.tolist()
        # One upload for all four; the views share its storage.
        packed = torch.from_numpy(np.concatenate([cu_q, indptr, ids, lens]).astype(np.int32))
        device = torch.device(device)
        if device.type == "cuda":
            packed = packed.pin_memory()  # lets the copy below run without blocking the host
        self.cu_seqlens_q, self.kv_indptr, self.kv_page_ids, self.kv_page_lens = packed.to(
            device, non_blocking=True
        ).split([n_items + 1, n_items + 1, len(ids), len(lens)])
        self.device = self.cu_seqlens_q.device  # "cuda" resolved to "cuda:<current>"

    @property
    def n_items(self) -> int:
        return len(self.cu_q_host) - 1

    def __repr__(self) -> str:
        return (
            f"PagedLayout(items={self.n_items}, rows={self.total_q}, "
            f"pages={self.kv_page_ids.numel()} of {self.num_pages}x{self.page_tokens}, "
            f"device={self.device})"
        )


def _host_indices(name: str, x: IndexArray) -> np.ndarray:
    """``x`` as a 1-D int64 NumPy array on the host (a CUDA tensor is copied: one sync)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if len(arr) and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} must fit in int32")
    return arr


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    layout: PagedLayout,
    scale: float | None = None,
    backend: Backend = "auto",
    *,
    kv_splits: int | None = None,
) -> torch.Tensor:
    """Attention of packed chunk queries over their paged KV cache plus their own chunk.

    Args:
        q, k_new, v_new: ``[total_q, H, D]``, the current chunks of all items packed.
        k_pages, v_pages: ``[num_pages, page_tokens, H, D]``, contiguous, same dtype as ``q``.
        layout: the items' rows and pages (:class:`PagedLayout`), on ``q``'s device.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: "triton", "torch" or "auto" (see :mod:`crcm.kernels`).
        kv_splits: Triton path only: programs per (query tile, item, head), each over a part of
            the context; ``None`` picks it from the GPU's SM count and the context length (1 in
            the interpreter).

    Returns:
        ``o``: ``[total_q, H, D]`` in ``q``'s dtype (accumulated in fp32).

    The checks here read only shapes, dtypes and devices (the layout's indices were checked
    when it was built), so the call never waits for the GPU.
    """
    scale = _check_inputs(q, k_new, v_new, k_pages, v_pages, layout, scale)
    if kv_splits is not None and (
        isinstance(kv_splits, bool)
        or not isinstance(kv_splits, int)
        or not 1 <= kv_splits <= _MAX_KV_SPLITS
    ):
        raise ValueError(
            f"kv_splits must be an int in [1, {_MAX_KV_SPLITS}] or None, got {kv_splits!r}"
        )
    impl = resolve_backend(backend, _paged_attention_kernel, q.device, q.dtype, q.shape[-1])
    if impl == "torch":
        return _paged_attention_torch(q, k_new, v_new, k_pages, v_pages, layout, scale)
    return _paged_attention_triton(q, k_new, v_new, k_pages, v_pages, layout, scale, kv_splits)


def paged_attention_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    layout: PagedLayout,
    scale: float | None = None,
) -> torch.Tensor:
    """The oracle: gather each item's pages, append its chunk, run SDPA in fp32 per item.

    Same arguments and result as :func:`paged_attention`; runs on any device.
    """
    scale = _check_inputs(q, k_new, v_new, k_pages, v_pages, layout, scale)
    return _paged_attention_torch(q, k_new, v_new, k_pages, v_pages, layout, scale)


def _paged_attention_torch(q, k_new, v_new, k_pages, v_pages, layout, scale) -> torch.Tensor:
    cu_q, indptr = layout.cu_q_host, layout.indptr_host
    slot = torch.arange(layout.page_tokens, device=q.device)
    o = torch.empty_like(q)
    for i in range(layout.n_items):
        q0, q1 = cu_q[i], cu_q[i + 1]
        if q0 == q1:
            continue
        ids = layout.kv_page_ids[indptr[i] : indptr[i + 1]].long()
        valid = (slot[None, :] < layout.kv_page_lens[indptr[i] : indptr[i + 1], None]).flatten()
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
    """GPU launch configurations, preferred first (see :class:`LaunchLadder`). At D=128 on an
    H200 (Wan2.1-1.3B shapes, benches/results/kernels-nvidia-h200.json) the first was the
    fastest or within 2 % of it for 1 and 16 streams; 64-row tiles with 4 warps and three
    stages tied it at 16 streams and are the next rung. Each rung needs less shared memory than
    the one before: in an offline sm_90 compile (benches/kernel_resources.py, Triton 3.6), at
    D=128, 128, 112, 80 and 48 KiB, none spilling registers; at D=64 half of that."""
    del head_dim  # the same tiles serve D=64 and D=128
    return (
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
        LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
        LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
        LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=1),
    )


_LADDER = LaunchLadder("paged attention", _rungs)


def _paged_attention_triton(
    q, k_new, v_new, k_pages, v_pages, layout, scale, kv_splits
) -> torch.Tensor:  # fmt: skip
    # The kernel assumes dense [tokens, H, D] rows; chunk tensors are small next to the cache so a
    # copy of a strided view (e.g. q out of a fused qkv projection) is cheap.
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    total_q, num_heads, head_dim = q.shape
    n_items, max_len_q, max_pages = layout.n_items, layout.max_len_q, layout.max_pages
    o = torch.empty_like(q)
    if max_len_q == 0:
        return o
    interpreted = is_interpreted(_paged_attention_kernel)

    def launch(cfg: LaunchConfig) -> None:
        tiles = triton.cdiv(max_len_q, cfg.block_m)
        splits = kv_splits or _choose_kv_splits(
            tiles * n_items * num_heads, max_pages, k_pages.shape[1], q.device, interpreted
        )
        if splits == 1:
            out, row_max, row_sum = o, o, o  # the state is not written without splits
        else:
            f32 = {"device": q.device, "dtype": torch.float32}
            out = torch.empty(splits, total_q, num_heads, head_dim, **f32)
            row_max, row_sum = torch.empty(2, splits, total_q, num_heads, **f32)
        _paged_attention_kernel[(tiles, n_items, num_heads * splits)](
            q, k_new, v_new, out, row_max, row_sum, k_pages, v_pages,
            layout.cu_seqlens_q, layout.kv_indptr, layout.kv_page_ids, layout.kv_page_lens,
            k_pages.shape[1], total_q, scale,
            H=num_heads, HEAD_DIM=head_dim, SPLITS=splits, **cfg.kwargs(),
        )  # fmt: skip
        if splits > 1:
            # Each part's state is relative to its own running max (base 2); rescale all to the
            # overall max. Parts that saw no key have m = -inf and weigh exp2(-inf) = 0.
            weight = torch.exp2(row_max - row_max.amax(0))
            o.copy_((weight[..., None] * out).sum(0) / (weight * row_sum).sum(0)[..., None])

    _LADDER.launch(
        launch,
        device=q.device,
        head_dim=head_dim,
        interpreted=interpreted,
        specialisation=(q.dtype, num_heads),
    )
    return o


# Below this many keys per part a split is not worth its merge (a few small torch kernels on
# [splits, total_q, H, D]): an estimate, to be checked with benches/bench_kernels.py.
_MIN_KEYS_PER_SPLIT = 4096
# The grid's third dimension is H · splits, which CUDA caps at 65,535.
_MAX_KV_SPLITS = 64


def _choose_kv_splits(
    programs: int, max_pages: int, page_tokens: int, device: torch.device, interpreted: bool
) -> int:
    """Context splits for ``programs`` programs per split and a longest context of
    ``max_pages`` pages: the fewest that fill the last wave of programs over the SMs to 90 %,
    at most 8, one per unit of context (a page or the chunk) and one per
    ``_MIN_KEYS_PER_SPLIT`` cached keys.

    Waves assume one program per SM at a time, which is what the preferred launch
    configurations' registers allow (over 128 per thread at 8 warps).
    """
    most = min(8, max_pages + 1, max_pages * page_tokens // _MIN_KEYS_PER_SPLIT)
    if interpreted or most <= 1:
        return 1
    sms = _sm_count(device)
    best, best_fill = 1, 0.0
    for splits in range(1, most + 1):
        total = programs * splits
        fill = total / (triton.cdiv(total, sms) * sms)
        if fill >= 0.9:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    q_ptr, k_new_ptr, v_new_ptr, o_ptr, m_ptr, l_ptr, k_pages_ptr, v_pages_ptr,
    cu_seqlens_q_ptr, kv_indptr_ptr, kv_page_ids_ptr, kv_page_lens_ptr,
    page_tokens, total_q, scale,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """Grid ``(query tiles of the longest item, n_items, H · SPLITS)``; one program = one query
    tile of one item and head, over one of ``SPLITS`` parts of its context. Tiles past an item's
    length exit at once (varlen packing, as in flash-attn).

    Without splits it writes ``o`` in the output dtype. With them it writes its part's state,
    fp32: the unnormalised output to ``o_ptr[split]`` (``[SPLITS, total_q, H, D]``) and the
    running max (base 2) and sum to ``m_ptr[split]`` and ``l_ptr[split]`` (``[SPLITS, total_q,
    H]``), for the caller to merge.
    """
    tile = tl.program_id(0)
    item = tl.program_id(1)
    head = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    q_start = tl.load(cu_seqlens_q_ptr + item).to(tl.int64)
    q_len = (tl.load(cu_seqlens_q_ptr + item + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len:
        return

    token_stride: tl.constexpr = H * HEAD_DIM
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_offs = (q_start + rows[:, None]) * token_stride + head * HEAD_DIM + dims[None, :]
    row_ok = rows[:, None] < q_len
    q = tl.load(q_ptr + row_offs, mask=row_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # The context is units: the cached pages in order, then the chunk's own tokens. This
    # program's part is units [u0, u1).
    page_lo = tl.load(kv_indptr_ptr + item)
    n_pages = tl.load(kv_indptr_ptr + item + 1) - page_lo
    per_split = tl.cdiv(n_pages + 1, SPLITS)
    u0 = split * per_split
    u1 = tl.minimum(u0 + per_split, n_pages + 1)
    chunk_off = q_start * token_stride + head * HEAD_DIM
    # A page holds page_tokens slots of which the first n_valid are tokens, so the padding is
    # never loaded.
    for j in range(page_lo + u0, page_lo + tl.minimum(u1, n_pages)):
        page = tl.load(kv_page_ids_ptr + j).to(tl.int64)
        n_valid = tl.load(kv_page_lens_ptr + j)
        page_off = (page * page_tokens) * token_stride + head * HEAD_DIM
        m_i, l_i, acc = _attend_run(
            q, k_pages_ptr + page_off, v_pages_ptr + page_off, n_valid, m_i, l_i, acc, qk_scale,
            token_stride, HEAD_DIM, BLOCK_N,
        )  # fmt: skip
    if SPLITS == 1:  # the chunk's own tokens: it sees itself fully
        m_i, l_i, acc = _attend_run(
            q, k_new_ptr + chunk_off, v_new_ptr + chunk_off, q_len, m_i, l_i, acc, qk_scale,
            token_stride, HEAD_DIM, BLOCK_N,
        )  # fmt: skip
        o = acc / l_i[:, None]
        tl.store(o_ptr + row_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok)
    else:
        if u1 == n_pages + 1 and u0 < u1:
            m_i, l_i, acc = _attend_run(
                q, k_new_ptr + chunk_off, v_new_ptr + chunk_off, q_len, m_i, l_i, acc,
                qk_scale, token_stride, HEAD_DIM, BLOCK_N,
            )  # fmt: skip
        part = split.to(tl.int64) * total_q
        state_offs = (part + q_start + rows) * H + head
        tl.store(o_ptr + part * token_stride + row_offs, acc, mask=row_ok)
        tl.store(m_ptr + state_offs, m_i, mask=rows < q_len)
        tl.store(l_ptr + state_offs, l_i, mask=rows < q_len)


@triton.jit
def _attend_run(
    q, k_ptr, v_ptr, n_tokens, m_i, l_i, acc, qk_scale,
    TOKEN_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online-softmax steps over ``n_tokens`` consecutive tokens, a page's valid ones or the
    chunk's own (``k_ptr``/``v_ptr`` at the first token, head h)."""
    for start in range(0, n_tokens, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, k_ptr, v_ptr, start + tl.arange(0, BLOCK_N), n_tokens, m_i, l_i, acc, qk_scale,
            TOKEN_STRIDE, HEAD_DIM,
        )  # fmt: skip
    return m_i, l_i, acc


def _check_inputs(q, k_new, v_new, k_pages, v_pages, layout, scale) -> float:
    """Validate shapes, dtypes and devices against each other and the layout; return the softmax
    scale. Reads no tensor's values: the layout's were checked when it was built."""
    for name, x in {"q": q, "k_new": k_new, "v_new": v_new, "k_pages": k_pages,
                    "v_pages": v_pages}.items():  # fmt: skip
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if not isinstance(layout, PagedLayout):
        raise TypeError(f"layout must be a PagedLayout, got {type(layout).__name__}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, H, D], got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, x in {"k_new": k_new, "v_new": v_new}.items():
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    total_q, num_heads, head_dim = q.shape
    if total_q != layout.total_q:
        raise ValueError(f"q has {total_q} rows but the layout's items own {layout.total_q}")
    pool = (layout.num_pages, layout.page_tokens, num_heads, head_dim)
    if k_pages.shape != pool:
        raise ValueError(
            f"k_pages must be [num_pages, page_tokens, H, D] = {pool} (the layout's page pool, "
            f"q's heads and head dim), got shape {tuple(k_pages.shape)}"
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
    return check_scale(scale, head_dim)


def _check_offsets(name: str, offsets: np.ndarray, total: int | None) -> None:
    """CSR offsets: start at 0, never decrease, and end at ``total`` when it is given."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or (total is not None and last != total):
        end = "" if total is None else f" and end at {total}"
        raise ValueError(f"{name} must start at 0{end}, got {first}..{last}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {offsets.tolist()}")
