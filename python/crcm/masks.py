"""One mask language for training, the attention JVP and tests (design §1.2).

A mask is a union of rectangles ``Rect(q0, q1, k0, k1)``: queries in ``[q0, q1)`` may attend
keys in ``[k0, k1)``. Token indices are positions in the packed sequence the attention sees.
Every mask builder here works on *frame* granularity and converts to token ranges with
``tokens_per_frame``; chunks are groups of ``chunk_frames`` consecutive frames.

Inference never builds a mask: the streaming path attends to cached pages plus the chunk's own
tokens, which is block-causal by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "Mask",
    "Rect",
    "block_causal_mask",
    "full_mask",
    "teacher_forcing_mask",
]


class Rect(NamedTuple):
    """Queries ``[q0, q1)`` attend keys ``[k0, k1)`` (token indices, half-open)."""

    q0: int
    q1: int
    k0: int
    k1: int


@dataclass(frozen=True)
class Mask:
    """A union of rectangles over a ``num_q × num_k`` score matrix."""

    num_q: int
    num_k: int
    rects: tuple[Rect, ...]

    def __post_init__(self) -> None:
        if self.num_q <= 0 or self.num_k <= 0:
            raise ValueError(f"mask needs positive sizes, got {self.num_q}x{self.num_k}")
        for r in self.rects:
            if not (0 <= r.q0 < r.q1 <= self.num_q and 0 <= r.k0 < r.k1 <= self.num_k):
                raise ValueError(f"rectangle {r} is empty or outside {self.num_q}x{self.num_k}")

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``[num_q, num_k]`` matrix, True where attention is allowed."""
        allowed = torch.zeros(self.num_q, self.num_k, dtype=torch.bool, device=device)
        for r in self.rects:
            allowed[r.q0 : r.q1, r.k0 : r.k1] = True
        return allowed

    def first_query_seeing(self, key: int) -> int:
        """The first query row allowed to attend some key at or past ``key`` (``num_q`` if none):
        rows before it see only keys before ``key``."""
        return min([self.num_q] + [r.q0 for r in self.rects if r.k1 > key])

    def key_ranges(self) -> list[list[tuple[int, int]]]:
        """Per query row: the key ranges it sees (used by kernels that skip empty tiles)."""
        rows: list[list[tuple[int, int]]] = [[] for _ in range(self.num_q)]
        for r in self.rects:
            for q in range(r.q0, r.q1):
                rows[q].append((r.k0, r.k1))
        return rows

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``int32 [num_rects, 4]`` rows of (q0, q1, k0, k1), for kernels."""
        rows = [tuple(r) for r in self.rects]
        return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 4)


def _check_frames(num_frames: int, chunk_frames: int, tokens_per_frame: int) -> int:
    if num_frames <= 0 or chunk_frames <= 0 or tokens_per_frame <= 0:
        raise ValueError(
            "num_frames, chunk_frames and tokens_per_frame must be positive, got "
            f"{num_frames}, {chunk_frames}, {tokens_per_frame}"
        )
    if num_frames % chunk_frames:
        raise ValueError(
            f"num_frames={num_frames} is not a multiple of chunk_frames={chunk_frames}"
        )
    return num_frames // chunk_frames


def full_mask(num_frames: int, tokens_per_frame: int) -> Mask:
    """Bidirectional attention over the whole clip (the stage-0 base model)."""
    n = num_frames * tokens_per_frame
    _check_frames(num_frames, 1, tokens_per_frame)
    return Mask(n, n, (Rect(0, n, 0, n),))


def block_causal_mask(num_frames: int, chunk_frames: int, tokens_per_frame: int) -> Mask:
    """A token of chunk i attends to every token of chunks ≤ i (DF training, inference)."""
    num_chunks = _check_frames(num_frames, chunk_frames, tokens_per_frame)
    c = chunk_frames * tokens_per_frame
    n = num_frames * tokens_per_frame
    rects = tuple(Rect(i * c, (i + 1) * c, 0, (i + 1) * c) for i in range(num_chunks))
    return Mask(n, n, rects)


def teacher_forcing_mask(num_frames: int, chunk_frames: int, tokens_per_frame: int) -> Mask:
    """Packed ``[clean | noisy]`` sequence of ``2·num_frames`` frames (design §1.2).

    Clean chunk i attends to clean chunks ≤ i; noisy chunk i attends to clean chunks < i and to
    itself. Both halves share RoPE positions (the caller passes the same frame indices twice).
    """
    num_chunks = _check_frames(num_frames, chunk_frames, tokens_per_frame)
    c = chunk_frames * tokens_per_frame
    n = num_frames * tokens_per_frame
    rects: list[Rect] = []
    for i in range(num_chunks):
        rects.append(Rect(i * c, (i + 1) * c, 0, (i + 1) * c))
    for i in range(num_chunks):
        q0, q1 = n + i * c, n + (i + 1) * c
        if i > 0:
            rects.append(Rect(q0, q1, 0, i * c))
        rects.append(Rect(q0, q1, q0, q1))
    return Mask(2 * n, 2 * n, tuple(rects))
