"""Paged attention backends of the executor: one protocol, a Triton and a torch implementation.

A backend is prepared once per plan group (the page tables do not change between layers) and
then called once per layer:

    ctx = backend.prepare(rows)               # rows: the page table of every batch row
    o_R_L_H_D = backend.attend(layer, q, k, v, ctx)

Each row's queries attend to its context pages (in order, only their valid tokens) and then to
its own chunk's keys — block-causal by construction, no mask. Implementations:

- :class:`TritonPagedAttention`: the Triton kernel of ``crcm.kernels.paged_attention`` over the
  CSR page table (CUDA; forceable on CPU under the Triton interpreter).
- :class:`TorchPagedAttention`: gathers each row's context tokens with indices computed once per
  plan, then one SDPA call per layer (rows with equal context length are batched). Runs
  anywhere; the CPU path and the oracle.

``select_backend("auto", device)`` picks Triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from crcm.errors import ConfigError
from crcm.kernels import PagedLayout, paged_attention
from crcm.runtime.kv_cache import PagedKVCache


@dataclass(frozen=True)
class RowPages:
    """One batch row's context: page ids, valid tokens per page, and the cache plane."""

    page_ids: np.ndarray  # int32 [n]
    page_lens: np.ndarray  # int32 [n]
    plane: int


class PagedAttentionBackend(Protocol):
    def prepare(self, rows: list[RowPages], tokens_per_row: int) -> object: ...

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: object
    ) -> torch.Tensor:
        """``q, k, v``: ``[R, L, H, D]`` of the rows' own chunks; returns ``o`` like ``q``."""
        ...


def _rows_by_plane(rows: list[RowPages]) -> dict[int, list[int]]:
    planes: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        planes.setdefault(row.plane, []).append(r)
    return planes


class TorchPagedAttention:
    """Gather + SDPA with per-plan gather indices (see the module docs).

    Each group of rows (same plane, same context length) gets K/V buffers ``[R, Lc + L, H, D]``
    once per plan: every layer gathers the context straight into the front of the buffer
    (``index_select(..., out=)``) and copies the chunk's own K/V behind it, so a layer costs one
    copy of the context instead of a gather plus a concatenation.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    def prepare(self, rows: list[RowPages], tokens_per_row: int) -> object:
        dev = self.cache.k.device
        pt = self.cache.page_tokens
        H, D = self.cache.k.shape[-2:]
        groups = []  # (plane, row indices, context indices [R_g, Lc], K buffer, V buffer)
        for plane, members in _rows_by_plane(rows).items():
            by_len: dict[int, list[tuple[int, np.ndarray]]] = {}
            for r in members:
                row = rows[r]
                idx = np.concatenate(
                    [
                        p * pt + np.arange(n)
                        for p, n in zip(row.page_ids, row.page_lens, strict=True)
                    ]
                    or [np.zeros(0, np.int64)]
                ).astype(np.int64)
                by_len.setdefault(len(idx), []).append((r, idx))
            for n_ctx, same in by_len.items():
                index = torch.from_numpy(np.stack([idx for _, idx in same])).to(dev)
                shape = (len(same), n_ctx + tokens_per_row, H, D)
                k_buf = torch.empty(shape, device=dev, dtype=self.cache.k.dtype)
                v_buf = torch.empty_like(k_buf)
                row_idx = torch.tensor([r for r, _ in same], device=dev)
                groups.append((plane, row_idx, index, k_buf, v_buf))
        return groups

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: object
    ) -> torch.Tensor:
        groups = ctx
        out = None if len(groups) == 1 else torch.empty_like(q)
        for plane, row_idx, index_R_Lc, k_buf, v_buf in groups:
            k_pages, v_pages = self.cache.pages(plane, layer)
            H, D = k_pages.shape[-2:]
            n_ctx = index_R_Lc.shape[1]
            rows = slice(None) if out is None else row_idx
            for j in range(index_R_Lc.shape[0]):
                torch.index_select(k_pages.view(-1, H, D), 0, index_R_Lc[j], out=k_buf[j, :n_ctx])
                torch.index_select(v_pages.view(-1, H, D), 0, index_R_Lc[j], out=v_buf[j, :n_ctx])
            k_buf[:, n_ctx:] = k[rows]
            v_buf[:, n_ctx:] = v[rows]
            o = F.scaled_dot_product_attention(
                q[rows].transpose(1, 2), k_buf.transpose(1, 2), v_buf.transpose(1, 2)
            ).transpose(1, 2)
            if out is None:
                return o
            out[row_idx] = o
        return out


class TritonPagedAttention:
    """The Triton paged kernel over CSR page tables, one call per plane and layer."""

    def __init__(self, cache: PagedKVCache, backend: str = "auto") -> None:
        self.cache = cache
        self.backend = backend

    def prepare(self, rows: list[RowPages], tokens_per_row: int) -> object:
        dev = self.cache.k.device
        L = tokens_per_row
        groups = []  # (plane, row indices, whether that is every row, layout)
        for plane, members in _rows_by_plane(rows).items():
            counts = [len(rows[r].page_ids) for r in members]
            layout = PagedLayout(
                np.arange(len(members) + 1) * L,
                np.concatenate([[0], np.cumsum(counts)]),
                np.concatenate([rows[r].page_ids for r in members] or [[]]),
                np.concatenate([rows[r].page_lens for r in members] or [[]]),
                num_pages=self.cache.k.shape[2],
                page_tokens=self.cache.page_tokens,
                device=dev,
            )
            groups.append(
                (plane, torch.tensor(members, device=dev), len(members) == len(rows), layout)
            )
        return groups

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: object
    ) -> torch.Tensor:
        _R, L, H, D = q.shape
        out = None if len(ctx) == 1 else torch.empty_like(q)
        for plane, rows, all_rows, layout in ctx:
            qp, kp, vp = (t if all_rows else t[rows] for t in (q, k, v))
            k_pages, v_pages = self.cache.pages(plane, layer)
            o = paged_attention(
                qp.reshape(-1, H, D),
                kp.reshape(-1, H, D),
                vp.reshape(-1, H, D),
                k_pages,
                v_pages,
                layout,
                backend=self.backend,
            ).view(-1, L, H, D)
            if out is None:
                return o
            out[rows] = o
        return out


def select_backend(name: str, cache: PagedKVCache) -> PagedAttentionBackend:
    """``auto``: Triton on CUDA, torch elsewhere; or ``torch`` / ``triton`` explicitly."""
    if name == "auto":
        # On CUDA the kernel dispatch itself falls back to its reference where Triton has no
        # kernel (fp32, unusual head dims); on CPU the gather + SDPA path is faster.
        if cache.k.is_cuda:
            return TritonPagedAttention(cache, "auto")
        return TorchPagedAttention(cache)
    if name == "torch":
        return TorchPagedAttention(cache)
    if name == "triton":
        return TritonPagedAttention(cache, "triton")
    raise ConfigError(f"attention backend must be 'auto', 'torch' or 'triton', got {name!r}")
