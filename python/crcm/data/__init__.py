"""Atari data: the ale-py emulator wrapper, collection policies and the on-disk dataset.

``crcm.data.atari`` plays games (``AtariEnv``, ``run_episode``); ``crcm.data.dataset`` writes
and memory-maps datasets (``collect``, ``AtariDataset``, ``AtariClips``). See docs/atari.md.
"""

from crcm.data.atari import AtariEnv, area_resize, available_games, run_episode
from crcm.data.dataset import (
    EVAL_SEED_BASE,
    AtariClips,
    AtariDataset,
    CollectConfig,
    DatasetError,
    collect,
)

__all__ = [
    "EVAL_SEED_BASE",
    "AtariClips",
    "AtariDataset",
    "AtariEnv",
    "CollectConfig",
    "DatasetError",
    "area_resize",
    "available_games",
    "collect",
    "run_episode",
]
