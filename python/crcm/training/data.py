"""Training data sources. Every batch is a pure function of (seed, step): resuming needs no
iterator state, and N steps straight equal N/2 + resume + N/2.

A source returns model-space clips ``x0_B_T_C_H_W`` plus per-video conditions and per-frame
actions (None where the model takes none). ``rows`` selects part of the global batch (a
process's share under ``torchrun``): the rows are those of the whole batch, but a source only
needs to load them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from crcm.codec import Codec
from crcm.data.batch import Batch  # the data layer owns the type; re-exported here
from crcm.errors import ConfigError
from crcm.models.configs import DiTConfig
from crcm.training.config import DataConfig

__all__ = ["Batch", "DataSource", "MovingSquares", "make_source"]


class DataSource(Protocol):
    action_names: tuple[str, ...]  # names of the actions (empty when unnamed)

    def batch(self, step: int, batch_size: int, rows: slice | None = None) -> Batch: ...


def make_source(data: DataConfig, codec: Codec, model: DiTConfig) -> DataSource:
    """The configured source for a model: its actions, classes and frame size must match."""
    if model.cond == "text":
        raise ConfigError("training on text conditions needs a text dataset (not shipped)")
    classes = model.num_classes if model.cond == "class" else 0
    if data.kind == "moving-squares":
        return MovingSquares(
            codec,
            frames=data.frames,
            num_actions=model.num_actions,
            num_classes=classes,
            seed=data.seed,
        )
    from crcm.data.dataset import AtariClips, AtariDataset

    dataset = AtariDataset(data.path)
    if classes and classes < len(dataset.games):
        raise ConfigError(f"{data.path} holds {len(dataset.games)} games; the model has {classes}")
    clips = AtariClips(
        dataset,
        codec,
        frames=data.frames,
        game_cond=bool(classes),
        seed=data.seed,
        history=model.prev_frames,
    )
    if clips.num_actions != model.num_actions:
        raise ConfigError(
            f"{data.path} has {clips.num_actions} actions per game; the model takes "
            f"{model.num_actions}"
        )
    return clips


class MovingSquares:
    """A tiny controllable world: a square moves under per-frame actions, another bounces.

    Actions: 0 = stay, 1 = up, 2 = down, 3 = left, 4 = right … (``num_actions`` of them, the
    first five move the square). An optional class condition picks the bouncing square's
    colour. Frames are uint8 ``[H, W, C]`` encoded by ``codec``, so a model learns pixels through
    the same path as at inference.
    """

    def __init__(
        self,
        codec: Codec,
        *,
        frames: int,
        num_actions: int = 0,
        num_classes: int = 0,
        seed: int = 0,
    ) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.codec = codec
        self.frames = frames
        self.num_actions = num_actions
        self.num_classes = num_classes
        self.seed = seed
        self.action_names: tuple[str, ...] = ()

    def batch(self, step: int, batch_size: int, rows: slice | None = None) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        h, w = self.codec.frame_hw
        c = self.codec.frame_channels
        size = max(2, h // 8)
        video = np.zeros((batch_size, self.frames, h, w, c), np.uint8)
        actions = (
            rng.integers(0, self.num_actions, (batch_size, self.frames))
            if self.num_actions
            else None
        )
        classes = rng.integers(0, self.num_classes, batch_size) if self.num_classes else None
        moves = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)])
        for b in range(batch_size):
            player = rng.integers(0, [h - size, w - size])
            ball = rng.uniform(0, [h - size, w - size])
            vel = rng.choice([-1.0, 1.0], 2) * rng.uniform(0.5, 1.5, 2)
            shade = 255 if classes is None else 96 + 159 * classes[b] // max(self.num_classes, 1)
            for t in range(self.frames):
                if actions is not None:
                    step_ = moves[actions[b, t] % len(moves)] * max(1, size // 2)
                    player = np.clip(player + step_, 0, [h - size, w - size])
                ball = ball + vel
                for axis, limit in enumerate((h - size, w - size)):
                    if not 0 <= ball[axis] <= limit:
                        vel[axis] *= -1
                        ball[axis] = np.clip(ball[axis], 0, limit)
                y, x = ball.astype(int)
                video[b, t, y : y + size, x : x + size] = shade
                py, px = player
                video[b, t, py : py + size, px : px + size, 0] = 200
        # Every row is drawn (one generator walks them in order); only ``rows`` are encoded.
        rows = rows or slice(None)
        x0 = self.codec.encode(torch.from_numpy(video[rows]))
        return Batch(
            x0,
            None if classes is None else torch.from_numpy(classes[rows]),
            None if actions is None else torch.from_numpy(actions[rows]),
        )
