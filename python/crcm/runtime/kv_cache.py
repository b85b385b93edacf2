"""The paged KV cache: torch tensors indexed by the page ids the Rust page pool hands out.

``k[plane, layer, page, page_tokens, heads, head_dim]`` (and ``v``). A frame owns
``pages_per_frame`` whole pages; its ``tokens_per_frame`` tokens fill them in order and the last
page is padded. ``plane`` is the guidance branch: plane 0 holds the conditional K/V, plane 1
the unconditional K/V of streams sampled with classifier-free guidance (the same page id
addresses the same slot in both planes, so the page pool needs no notion of branches).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_tokens: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        planes: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if min(num_layers, num_pages, page_tokens, tokens_per_frame, num_heads, head_dim) < 1:
            raise ValueError("every KV cache size must be positive")
        if planes not in (1, 2):
            raise ValueError(f"planes must be 1 or 2 (CFG), got {planes}")
        shape = (planes, num_layers, num_pages, page_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.page_tokens = page_tokens
        self.tokens_per_frame = tokens_per_frame
        self.pages_per_frame = -(-tokens_per_frame // page_tokens)
        token = torch.arange(tokens_per_frame, device=device)
        # Page (within its frame) and slot (within its page) of each token of a frame.
        self._page_of_token = token // page_tokens
        self._slot_of_token = token % page_tokens

    @property
    def planes(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def pages(self, plane: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_pages, v_pages)`` of one layer: views ``[num_pages, page_tokens, H, D]``."""
        return self.k[plane, layer], self.v[plane, layer]

    def token_slots(self, frame_pages: torch.Tensor) -> torch.Tensor:
        """Flat slot (``page·page_tokens + offset``) of every token of the given frames.

        ``frame_pages``: int ``[F, pages_per_frame]`` page ids; returns int64 ``[F·tokens]`` in
        token order, for :meth:`write`.
        """
        pages_F_T = frame_pages.long()[:, self._page_of_token]
        return (pages_F_T * self.page_tokens + self._slot_of_token).flatten()

    def write(
        self,
        plane: int,
        layer: int,
        slots: torch.Tensor,
        k_N_H_D: torch.Tensor,
        v_N_H_D: torch.Tensor,
    ) -> None:
        """Stores K/V of ``N`` tokens at the flat ``slots`` of :meth:`token_slots`."""
        k_pages, v_pages = self.pages(plane, layer)
        heads_dim = k_pages.shape[-2:]
        k_pages.view(-1, *heads_dim).index_copy_(0, slots, k_N_H_D.to(k_pages.dtype))
        v_pages.view(-1, *heads_dim).index_copy_(0, slots, v_N_H_D.to(v_pages.dtype))
