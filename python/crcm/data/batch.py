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
    ``actions_B_T`` (None for models that take no actions).

    ``history_B_K_C_H_W`` holds the ``K`` frames just before each clip (oldest first, model
    space), zeros where the episode had not begun yet; None when the source gives none. A model
    that reads its previous frames on its input channels (``prev_frames``) gets them from here
    for the clip's first frames, as a stream's frame gets its stream's last frames: without
    them every clip would open on a frame with no past, which a stream shows only once.
    """

    x0_B_T_C_H_W: Tensor
    cond: Tensor | None
    actions_B_T: Tensor | None
    history_B_K_C_H_W: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return self.map(lambda t: t.to(device))

    def map(self, fn) -> Batch:
        """A batch of ``fn(tensor)`` for every tensor field (None stays None)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(
            apply(self.x0_B_T_C_H_W),
            apply(self.cond),
            apply(self.actions_B_T),
            apply(self.history_B_K_C_H_W),
        )
