"""The on-disk Atari dataset: sharded ``.npy`` arrays, a JSON manifest, memory-mapped reading.

Layout of a dataset folder::

    manifest.json            format, version, games, frameskip, frame size, the episode plan,
                             the train/eval seed split, counts, per-shard files and sha256
    shard-00000/frames.npy   uint8 [N, H, W, 3]   observed frames, episodes back to back
                actions.npy  int16 [N]            action taken before each frame (-1: reset)
                rewards.npy  float32 [N]          reward of that step
                terminals.npy uint8 [N]           1 where the game is over
                lives.npy    int16 [N]
                ram.npy      uint8 [N, 128]       console RAM after each step
                episodes.npy int64 [E, 3]         (start, length, plan index) within the shard

Collection is *planned* up front: every episode is ``(game, split, seed, policy)`` and is a pure
function of those (the emulator is deterministic; see crcm.data.atari). Shards are written to a
temporary folder, renamed into place, and only then recorded in the manifest, so an interrupted
collection resumes at the first missing shard and never reads a half-written one. Evaluation
seeds are drawn from ``[EVAL_SEED_BASE, …)``, disjoint from training seeds by construction, and
both lists are in the manifest.

No pickles anywhere: arrays load with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crcm.data.atari import (
    DEFAULT_FRAME_HW,
    DEFAULT_FRAMESKIP,
    NO_ACTION,
    POLICIES,
    AtariEnv,
    run_episode,
)
from crcm.errors import ConfigError, CrcmError

__all__ = [
    "EVAL_SEED_BASE",
    "FORMAT",
    "FORMAT_VERSION",
    "AtariClips",
    "AtariDataset",
    "CollectConfig",
    "DatasetError",
    "EpisodeSpec",
    "collect",
    "episode_policy",
    "plan_episodes",
]

FORMAT, FORMAT_VERSION = "crcm-atari-dataset", 1
EVAL_SEED_BASE = 1 << 30  # evaluation episodes use seeds ≥ this; training seeds stay below
ARRAYS = {  # file stem -> (dtype, per-frame trailing shape given the frame size)
    "frames": (np.uint8, lambda hw: (*hw, 3)),
    "actions": (np.int16, lambda hw: ()),
    "rewards": (np.float32, lambda hw: ()),
    "terminals": (np.uint8, lambda hw: ()),
    "lives": (np.int16, lambda hw: ()),
    "ram": (np.uint8, lambda hw: (128,)),
}


class DatasetError(CrcmError, ValueError):
    """A dataset folder is missing, corrupt, or does not match what was asked for."""


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class EpisodeSpec:
    """One planned episode; everything in it is recorded in the manifest."""

    game: str
    split: str  # "train" or "eval"
    seed: int
    policy: str


def episode_policy(game: str, seed: int, mix: dict[str, float]) -> str:
    """The policy of the episode with ``seed``, drawn from ``mix`` (name → weight) among the
    policies that play ``game`` (deterministic, so the harness re-creates eval episodes)."""
    names = [p for p in mix if POLICIES[p][1] is None or game in POLICIES[p][1]]
    if not names:
        raise ConfigError(f"none of the policies {list(mix)} plays {game!r}")
    w = np.array([mix[p] for p in names], np.float64)
    rng = np.random.default_rng([0x9011C7, seed])
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def plan_episodes(
    games: Sequence[str],
    train_episodes: int,
    eval_episodes: int,
    *,
    seed: int = 0,
    policy_mix: dict[str, float] | None = None,
) -> list[EpisodeSpec]:
    """Training episodes use seeds ``seed + i``, evaluation ones ``EVAL_SEED_BASE + seed + j``
    (each game plays every seed of its split)."""
    if train_episodes < 0 or eval_episodes < 0 or train_episodes + eval_episodes == 0:
        raise ConfigError("collect at least one episode")
    if not seed >= 0 or seed + train_episodes > EVAL_SEED_BASE:
        raise ConfigError(f"training seeds must stay in [0, {EVAL_SEED_BASE}); got seed={seed}")
    mix = policy_mix or DEFAULT_POLICY_MIX
    for name in mix:
        if name not in POLICIES:
            raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    plan = []
    for split, count, base in (
        ("train", train_episodes, seed),
        ("eval", eval_episodes, EVAL_SEED_BASE + seed),
    ):
        for i in range(count):
            for game in games:
                s = base + i
                plan.append(EpisodeSpec(game, split, s, episode_policy(game, s, mix)))
    return plan


DEFAULT_POLICY_MIX = {"tracker": 0.75, "random": 0.25}


@dataclass(frozen=True)
class CollectConfig:
    """What a dataset is; a resumed collection must ask for exactly the same."""

    games: tuple[str, ...] = ("breakout",)
    train_episodes: int = 100
    eval_episodes: int = 10
    frameskip: int = DEFAULT_FRAMESKIP
    frame_hw: tuple[int, int] = DEFAULT_FRAME_HW
    max_steps: int = 2000
    seed: int = 0
    episodes_per_shard: int = 16
    policy_mix: tuple[tuple[str, float], ...] = tuple(DEFAULT_POLICY_MIX.items())

    def as_json(self) -> dict:
        return {
            "games": list(self.games),
            "train_episodes": self.train_episodes,
            "eval_episodes": self.eval_episodes,
            "frameskip": self.frameskip,
            "frame_hw": list(self.frame_hw),
            "max_steps": self.max_steps,
            "seed": self.seed,
            "episodes_per_shard": self.episodes_per_shard,
            "policy_mix": {k: v for k, v in self.policy_mix},
        }


# ---------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written manifest


def collect(out: str | os.PathLike[str], cfg: CollectConfig, *, progress: bool = True) -> Path:
    """Collects (or resumes collecting) the dataset ``cfg`` into the folder ``out``.

    Returns the folder. Raises ``DatasetError`` if ``out`` holds a dataset with other settings.
    """
    import ale_py
    from tqdm import tqdm

    folder = Path(out)
    if cfg.episodes_per_shard < 1 or cfg.max_steps < 1:
        raise ConfigError("episodes_per_shard and max_steps must be >= 1")
    envs = {g: AtariEnv(g, frameskip=cfg.frameskip, frame_hw=cfg.frame_hw) for g in cfg.games}
    plan = plan_episodes(
        cfg.games,
        cfg.train_episodes,
        cfg.eval_episodes,
        seed=cfg.seed,
        policy_mix=dict(cfg.policy_mix),
    )
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = _read_manifest(folder)
        if manifest["config"] != cfg.as_json():
            diff = sorted(k for k, v in cfg.as_json().items() if manifest["config"].get(k) != v)
            raise DatasetError(
                f"{folder} holds a dataset collected with other settings ({', '.join(diff)} "
                "differ); collect into another folder or repeat the original settings to resume"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        import ale_py

        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": cfg.as_json(),
            "ale_py_version": ale_py.__version__,
            "games": [
                {"id": i, "name": g, "action_names": list(envs[g].action_names)}
                for i, g in enumerate(cfg.games)
            ],
            "frameskip": cfg.frameskip,
            "frame_hw": list(cfg.frame_hw),
            "splits": {
                split: {"seeds": sorted({e.seed for e in plan if e.split == split})}
                for split in ("train", "eval")
            },
            "plan": [[e.game, e.split, e.seed, e.policy] for e in plan],
            "shards": [],
            "counts": {"episodes": 0, "frames": 0},
        }
        _write_json(manifest_path, manifest)

    per = cfg.episodes_per_shard
    num_shards = -(-len(plan) // per)
    done = len(manifest["shards"])
    bar = tqdm(total=len(plan), initial=min(done * per, len(plan)), unit="ep", disable=not progress)
    with bar:
        for k in range(done, num_shards):
            name = f"shard-{k:05d}"
            tmp = folder / (name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted run
            tmp.mkdir()
            records, index = [], []
            for p in range(k * per, min((k + 1) * per, len(plan))):
                spec = plan[p]
                ep = run_episode(envs[spec.game], spec.policy, spec.seed, max_steps=cfg.max_steps)
                index.append((sum(len(r) for r in records), len(ep), p))
                records.append(ep)
                bar.update(1)
            files = {}
            for stem in ARRAYS:
                arr = np.concatenate([getattr(r, stem) for r in records])
                np.save(tmp / f"{stem}.npy", arr, allow_pickle=False)
            np.save(tmp / "episodes.npy", np.array(index, np.int64), allow_pickle=False)
            for path in sorted(tmp.iterdir()):
                files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
            final = folder / name
            if final.exists():  # written but not recorded: the manifest is the truth
                shutil.rmtree(final)
            os.replace(tmp, final)
            frames = int(sum(len(r) for r in records))
            manifest["shards"].append(
                {"name": name, "episodes": len(records), "frames": frames, "files": files}
            )
            manifest["counts"]["episodes"] += len(records)
            manifest["counts"]["frames"] += frames
            _write_json(manifest_path, manifest)
    return folder


# ---------------------------------------------------------------------------------------------
# Reading


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{folder} is not a crcm Atari dataset (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {manifest.get('version')}; this crcm reads "
            f"version {FORMAT_VERSION}"
        )
    train = set(manifest["splits"]["train"]["seeds"])
    if train & set(manifest["splits"]["eval"]["seeds"]):
        raise DatasetError(f"{path}: training and evaluation seeds overlap")
    return manifest


class AtariDataset:
    """A collected dataset, memory-mapped (nothing is read until a frame is touched).

    Args:
        path: the dataset folder.
        verify: check every shard file's sha256 against the manifest (reads every byte once);
            sizes, dtypes and shapes are always checked.
        frame_hw / frameskip / games: when given, must match the manifest (``DatasetError``).

    Episodes are numbered in plan order; ``episodes_of(split)`` lists a split's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        frame_hw: tuple[int, int] | None = None,
        frameskip: int | None = None,
        games: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = m = _read_manifest(self.path)
        self.frame_hw = (int(m["frame_hw"][0]), int(m["frame_hw"][1]))
        self.frameskip = int(m["frameskip"])
        self.games = [g["name"] for g in m["games"]]
        self.action_names = {g["name"]: tuple(g["action_names"]) for g in m["games"]}
        for what, want, have in (
            ("frame size", frame_hw and tuple(frame_hw), self.frame_hw),
            ("frameskip", frameskip, self.frameskip),
            ("games", games and list(games), self.games),
        ):
            if want is not None and want != have:
                raise DatasetError(f"{self.path}: {what} is {have}, expected {want}")
        self._shards: list[dict[str, np.ndarray]] = []
        rows = []
        for k, shard in enumerate(m["shards"]):
            arrays = self._open_shard(shard, verify)
            self._shards.append(arrays)
            for start, length, p in arrays["episodes"]:
                rows.append((k, start, length, p))
        self._index = np.array(rows, np.int64).reshape(-1, 4)
        plan = m["plan"]
        self.specs = [EpisodeSpec(*plan[int(p)]) for p in self._index[:, 3]]
        self.complete = len(self.specs) == len(plan)

    def _open_shard(self, shard: dict, verify: bool) -> dict[str, np.ndarray]:
        folder = self.path / shard["name"]
        arrays = {}
        for stem in (*ARRAYS, "episodes"):
            name = f"{stem}.npy"
            path = folder / name
            meta = shard["files"].get(name)
            if meta is None or not path.is_file():
                raise DatasetError(f"shard {shard['name']}: {name} is missing")
            if path.stat().st_size != meta["bytes"]:
                raise DatasetError(
                    f"shard {shard['name']}: {name} has {path.stat().st_size} bytes, the "
                    f"manifest says {meta['bytes']} (truncated or replaced)"
                )
            if verify and _sha256(path) != meta["sha256"]:
                raise DatasetError(
                    f"shard {shard['name']}: {name} fails its sha256 check (corrupt); "
                    "delete the shard and its manifest entry, then collect again to resume"
                )
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as err:
                raise DatasetError(f"shard {shard['name']}: cannot read {name}: {err}") from err
            if stem in ARRAYS:
                dtype, trailing = ARRAYS[stem]
                expected = (shard["frames"], *trailing(self.frame_hw))
                if arr.dtype != dtype or arr.shape != expected:
                    raise DatasetError(
                        f"shard {shard['name']}: {name} is {arr.dtype} {list(arr.shape)}, "
                        f"expected {np.dtype(dtype)} {list(expected)}"
                    )
            arrays[stem] = arr
        return arrays

    def __len__(self) -> int:
        """Number of episodes present."""
        return len(self._index)

    @property
    def num_frames(self) -> int:
        return int(self._index[:, 2].sum())

    def episodes_of(self, split: str) -> list[int]:
        if split not in ("train", "eval"):
            raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
        return [i for i, s in enumerate(self.specs) if s.split == split]

    def game_id(self, episode: int) -> int:
        return self.games.index(self.specs[episode].game)

    def episode_length(self, episode: int) -> int:
        return int(self._index[episode, 2])

    def episode(self, episode: int) -> dict[str, np.ndarray]:
        """The episode's arrays (read-only memmap views): frames, actions, rewards, ..."""
        k, start, length, _ = (int(v) for v in self._index[episode])
        return {stem: self._shards[k][stem][start : start + length] for stem in ARRAYS}


class AtariClips:
    """Training clips from an :class:`AtariDataset`, as a ``crcm.training.data`` source
    (batches are :class:`crcm.data.batch.Batch`).

    Every batch is a pure function of ``(seed, step)`` (resuming needs no iterator state).
    Each clip is ``frames`` consecutive frames of one training episode; the reset frame's
    action (-1) becomes the model's null action (``num_actions``). With ``game_cond`` the game
    id is the per-video class condition (several games in one dataset). With ``history = k``
    each batch also carries the ``k`` frames before every clip (``Batch.history_B_K_C_H_W``,
    zeros before the episode's first frame), for models that read their previous frames.
    """

    def __init__(
        self,
        dataset: AtariDataset,
        codec,
        *,
        frames: int,
        split: str = "train",
        game_cond: bool = False,
        seed: int = 0,
        history: int = 0,
    ) -> None:
        if history < 0:
            raise ConfigError(f"history must be >= 0 frames, got {history}")
        if tuple(codec.frame_hw) != dataset.frame_hw:
            raise ConfigError(
                f"the codec takes {codec.frame_hw} frames, the dataset has {dataset.frame_hw}"
            )
        self.dataset, self.codec, self.frames = dataset, codec, frames
        self.game_cond, self.seed, self.history = game_cond, seed, history
        eps = [e for e in dataset.episodes_of(split) if dataset.episode_length(e) >= frames]
        if not eps:
            raise DatasetError(f"no {split} episode has {frames} frames")
        self.episodes = np.array(eps)
        # Clip starts are drawn uniformly over all valid positions, not per episode.
        self._starts = np.array([dataset.episode_length(e) - frames + 1 for e in eps])
        self._cum = np.cumsum(self._starts)
        self.num_actions = max(len(a) for a in dataset.action_names.values())
        names = set(dataset.action_names.values())
        # One game (or games sharing a set): the model's actions have names.
        self.action_names: tuple[str, ...] = names.pop() if len(names) == 1 else ()

    def picks(self, step: int, batch_size: int, rows: slice | None = None) -> list[tuple[int, int]]:
        """``(episode, first frame)`` of the clips ``rows`` of step ``step``'s batch: drawn for
        the whole batch, uniformly over every valid clip position."""
        rng = np.random.default_rng([self.seed, step])
        out = []
        for pick in rng.integers(0, self._cum[-1], batch_size)[rows or slice(None)]:
            j = int(np.searchsorted(self._cum, pick, side="right"))
            out.append((int(self.episodes[j]), int(pick - (self._cum[j - 1] if j else 0))))
        return out

    def batch(self, step: int, batch_size: int, rows: slice | None = None):
        """Clips ``rows`` (default: all) of step ``step``'s batch of ``batch_size`` (only the
        selected clips are read)."""
        import torch

        from crcm.data.batch import Batch

        picks = self.picks(step, batch_size, rows)
        video, actions, games, past = [], [], [], []
        k = self.history
        for episode, start in picks:
            ep = self.dataset.episode(episode)
            video.append(np.asarray(ep["frames"][start : start + self.frames]))
            past.append(np.array(ep["frames"][max(0, start - k) : start]))
            a = np.asarray(ep["actions"][start : start + self.frames]).astype(np.int64)
            actions.append(np.where(a == NO_ACTION, self.num_actions, a))
            games.append(self.dataset.game_id(episode))
        x0 = self.codec.encode(torch.from_numpy(np.stack(video)))
        cond = torch.tensor(games) if self.game_cond else None
        history = None
        if k:
            # Model-space zeros where the episode had not begun: a stream's first frames see
            # the same (``preceding_frames``), not black frames.
            history = x0.new_zeros(len(picks), k, *x0.shape[2:])
            for b, frames in enumerate(past):
                if len(frames):
                    encoded = self.codec.encode(torch.from_numpy(frames)[None])[0]
                    history[b, k - len(frames) :] = encoded
        return Batch(x0, cond, torch.from_numpy(np.stack(actions)), history)
