"""The training batch: what a data source hands the trainer.

It lives in the data layer because the data layer makes it (``AtariClips.batch``): ``crcm.data``
never imports ``crcm.training``, which builds on it (``crcm.training.data`` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["Batch"]


@dataclass
class Batch:
    """Model-space clips with their conditions: ``x0_B_T_C_H_W``, a per-video condition
    (class ids ``[B]`` or text embeddings; None without one) and per-frame action ids
    ``actions_B_T`` (None for models that take no actions)."""

    x0_B_T_C_H_W: Tensor
    cond: Tensor | None
    actions_B_T: Tensor | None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.x0_B_T_C_H_W), move(self.cond), move(self.actions_B_T))
