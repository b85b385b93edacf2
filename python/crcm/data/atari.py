"""Atari games through ``ale-py``: an emulator wrapper, data-collection policies, frame resize.

The emulator runs with sticky actions off (``repeat_action_probability = 0``), so an episode is
a pure function of its action sequence: held-out evaluation can replay it exactly, and a model
is never asked to predict randomness it cannot see. Episode variety comes from the policies,
whose randomness is seeded per episode (see :func:`episode_rng`).

One *step* is ``frameskip`` emulator frames with the same action; the observation after a step
is the last emulator frame, area-resized to ``frame_hw``. The model's frame rate is the step
rate: 60 Hz / frameskip (15 Hz at the default 4).

Actions are indices into the game's *minimal* action set (Breakout: NOOP, FIRE, RIGHT, LEFT),
which is what the shipped world model is conditioned on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from crcm.errors import ConfigError

__all__ = [
    "DEFAULT_FRAMESKIP",
    "DEFAULT_FRAME_HW",
    "NATIVE_HW",
    "POLICIES",
    "AtariEnv",
    "EpisodeRecord",
    "area_resize",
    "available_games",
    "episode_rng",
    "make_policy",
    "run_episode",
]

NATIVE_HW = (210, 160)  # every ALE game renders 210 × 160 RGB
DEFAULT_FRAMESKIP = 4  # 15 steps/s; see docs/atari.md for the choice
DEFAULT_FRAME_HW = (64, 64)  # see docs/atari.md (ball contrast per resolution)
NO_ACTION = -1  # the "action" of an episode's first frame (reset; the model's null action)


def _ale():
    try:
        import ale_py
        import ale_py.roms
    except ImportError as err:  # pragma: no cover - ale-py is a dependency
        raise ConfigError("Atari data needs ale-py: pip install 'ale-py>=0.10,<1'") from err
    return ale_py


def available_games() -> list[str]:
    """ROM ids that ship inside the installed ale-py wheel (``breakout``, ``pong``, …)."""
    return sorted(_ale().roms.get_all_rom_ids())


def _rom_path(game: str) -> str:
    games = available_games()
    if game not in games:
        close = [g for g in games if game[:3] and g.startswith(game[:3])][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown Atari game {game!r} ({len(games)} ROMs ship with ale-py{hint})")
    return str(_ale().roms.get_rom_path(game))


# ---------------------------------------------------------------------------------------------
# Frame resize


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``float64 [n_out, n_in]``: fraction of each input pixel inside each output pixel.

    Exact area averaging for any ratio (output pixel i covers input ``[i·r, (i+1)·r)`` with
    ``r = n_in / n_out``), rows summing to 1 — cv2's INTER_AREA without its integer-ratio
    special cases, so frames do not depend on OpenCV.
    """
    r = n_in / n_out
    edges = np.arange(n_out + 1) * r
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)
    return overlap / r


def _sparse_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero taps of :func:`_area_weights`: ``(index [n_out, k], weight [n_out, k])``.

    An output pixel overlaps at most ``ceil(n_in / n_out) + 1`` input pixels, so the resize is
    a few gathers and multiply-adds; dense matmuls went through BLAS, whose threads fight
    torch's for the same cores (10× slower with torch imported on a 2-core machine).
    """
    dense = _area_weights(n_in, n_out)
    k = int((dense > 0).sum(1).max())
    index = np.zeros((n_out, k), np.intp)
    weight = np.zeros((n_out, k), np.float64)
    for i, row in enumerate(dense):
        nz = np.flatnonzero(row)
        index[i, : len(nz)], weight[i, : len(nz)] = nz, row[nz]
    return index, weight


_TAPS: dict[tuple[int, int, int, int], tuple[tuple[np.ndarray, np.ndarray], ...]] = {}


def area_resize(frame_H_W_C: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Area-average resize of a ``uint8 [H, W, C]`` frame to ``uint8 [h, w, C]`` (rounded).

    A feature of ``k`` input pixels keeps its colour only as far as it fills an output pixel,
    which is why the 2 × 4-pixel Breakout ball fades at small sizes (docs/atari.md).
    """
    H, W = frame_H_W_C.shape[:2]
    key = (H, W, int(out_hw[0]), int(out_hw[1]))
    if key not in _TAPS:
        _TAPS[key] = (_sparse_weights(H, key[2]), _sparse_weights(W, key[3]))
    (iy, wy), (ix, wx) = _TAPS[key]
    f = frame_H_W_C.astype(np.float64)
    rows_h_W_C = (f[iy] * wy[:, :, None, None]).sum(1)  # [h, k, W, C] -> [h, W, C]
    out_h_w_C = (rows_h_W_C[:, ix] * wx[None, :, :, None]).sum(2)  # [h, w, k, C] -> [h, w, C]
    return np.rint(out_h_w_C).astype(np.uint8)  # rows of weights sum to 1: stays in [0, 255]


# ---------------------------------------------------------------------------------------------
# Emulator


class AtariEnv:
    """One ALE emulator for ``game``, stepping ``frameskip`` frames per action.

    Args:
        game: ROM id (``available_games()``); unknown ids raise ``ConfigError``.
        frameskip: emulator frames per step (the action repeats); the last one is observed.
        frame_hw: size of the observed frames (area resize of the native 210 × 160).
    """

    def __init__(
        self, game: str, *, frameskip: int = DEFAULT_FRAMESKIP, frame_hw=DEFAULT_FRAME_HW
    ) -> None:
        if frameskip < 1:
            raise ConfigError(f"frameskip must be >= 1, got {frameskip}")
        if len(frame_hw) != 2 or min(frame_hw) < 1:
            raise ConfigError(f"frame_hw must be two positive sizes, got {frame_hw}")
        ale_py = _ale()
        path = _rom_path(game)
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per env
        self.ale = ale_py.ALEInterface()
        self.ale.setInt("random_seed", 0)
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.setInt("frame_skip", 1)  # crcm repeats actions itself (see step)
        self.ale.loadROM(path)
        self._actions = list(self.ale.getMinimalActionSet())
        self.game = game
        self.frameskip = frameskip
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))

    @property
    def action_names(self) -> tuple[str, ...]:
        """Names of the minimal action set, in action-id order (Breakout: NOOP FIRE RIGHT LEFT)."""
        return tuple(a.name for a in self._actions)

    @property
    def num_actions(self) -> int:
        return len(self._actions)

    def reset(self) -> np.ndarray:
        """Starts a new game; returns the first observed frame ``uint8 [h, w, 3]``."""
        self.ale.reset_game()
        return self.frame()

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        """Plays ``action`` for ``frameskip`` frames: ``(frame, reward, game_over)``."""
        if not 0 <= action < len(self._actions):
            raise ConfigError(f"action must be in [0, {len(self._actions)}), got {action}")
        reward = 0.0
        for _ in range(self.frameskip):
            reward += self.ale.act(self._actions[action])
            if self.ale.game_over():
                break
        return self.frame(), reward, self.ale.game_over()

    def native_frame(self) -> np.ndarray:
        """The emulator's current screen, ``uint8 [210, 160, 3]``."""
        return self.ale.getScreenRGB()

    def frame(self) -> np.ndarray:
        """The current screen resized to ``frame_hw``, ``uint8 [h, w, 3]``."""
        return area_resize(self.native_frame(), self.frame_hw)

    def ram(self) -> np.ndarray:
        """The console's 128 bytes of RAM, ``uint8 [128]``."""
        return self.ale.getRAM().copy()

    def lives(self) -> int:
        return int(self.ale.lives())

    def clone_state(self):
        """An opaque snapshot to branch alternative futures from (controllability eval)."""
        return self.ale.cloneState()

    def restore_state(self, state) -> None:
        self.ale.restoreState(state)


# ---------------------------------------------------------------------------------------------
# Policies: action = policy(env, rng). Registered by name; the manifest records the names.

Policy = Callable[[AtariEnv, np.random.Generator], int]


def _random_policy(env: AtariEnv, rng: np.random.Generator) -> int:
    """Uniform over the minimal action set at every step."""
    return int(rng.integers(env.num_actions))


# Breakout RAM bytes (validated against the screen in tests/python/eval/test_breakout_eval.py).
_RAM_PADDLE_X, _RAM_BALL_X, _RAM_BALL_Y = 72, 99, 101


@dataclass
class _Tracker:
    """Breakout: move the paddle under the ball (read from RAM), with per-episode noise.

    ``epsilon`` of the steps are uniformly random and the aim point is offset by ``offset``
    paddle-relative pixels, so episodes differ in where the ball is hit and how long the paddle
    survives — different brick patterns, ball angles and speeds. FIRE serves when no ball is in
    play (RAM ball y = 0).
    """

    epsilon: float
    offset: float
    hold: int = 0
    held: int = 0

    def __call__(self, env: AtariEnv, rng: np.random.Generator) -> int:
        if self.hold > 0:  # random actions are held a few steps, like a person's key presses
            self.hold -= 1
            return self.held
        if rng.random() < self.epsilon:
            self.held = int(rng.integers(env.num_actions))
            self.hold = int(rng.integers(0, 4))
            return self.held
        ram = env.ram()
        if ram[_RAM_BALL_Y] == 0:
            return 1  # FIRE
        # Paddle centre and ball centre in screen pixels (offsets from the RAM validation).
        paddle = int(ram[_RAM_PADDLE_X]) - 47 + 8
        ball = int(ram[_RAM_BALL_X]) - 48
        error = ball + self.offset - paddle
        if abs(error) < 3:
            return 0  # NOOP
        return 2 if error > 0 else 3  # RIGHT / LEFT


@dataclass
class _HeldKeys:
    """A person at the keyboard: one action held for 1–48 steps (log-uniform, so short taps
    and multi-second holds are both common), then another. In Breakout it drives the paddle
    into a wall and keeps it there, then away from it, which the ball-tracking policy rarely
    does and ``crcm play`` users do all the time."""

    held: int = 0
    left: int = 0

    def __call__(self, env: AtariEnv, rng: np.random.Generator) -> int:
        if self.left <= 0:
            self.held = int(rng.integers(env.num_actions))
            self.left = int(np.exp(rng.uniform(0.0, np.log(49.0))))
        self.left -= 1
        return self.held


def _keys_factory(rng: np.random.Generator) -> Policy:
    return _HeldKeys()


def _tracker_factory(rng: np.random.Generator) -> Policy:
    return _Tracker(epsilon=float(rng.uniform(0.05, 0.4)), offset=float(rng.uniform(-7, 7)))


def _random_factory(rng: np.random.Generator) -> Policy:
    return _random_policy


# name -> (factory building a per-episode policy from the episode's rng, games it supports)
POLICIES: dict[str, tuple[Callable[[np.random.Generator], Policy], tuple[str, ...] | None]] = {
    "random": (_random_factory, None),
    "tracker": (_tracker_factory, ("breakout",)),
    "keys": (_keys_factory, None),
}


def make_policy(name: str, game: str, rng: np.random.Generator) -> Policy:
    """A fresh policy ``name`` for one episode of ``game``; its noise draws from ``rng``."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    factory, games = POLICIES[name]
    if games is not None and game not in games:
        raise ConfigError(f"policy {name!r} plays only {', '.join(games)}, not {game!r}")
    return factory(rng)


def episode_rng(seed: int) -> np.random.Generator:
    """The policy randomness of the episode with this seed (the only randomness there is)."""
    return np.random.default_rng([0xC0C0, seed])


# ---------------------------------------------------------------------------------------------
# Episodes


@dataclass
class EpisodeRecord:
    """One episode of ``n`` observed frames (``n − 1`` steps).

    ``actions[i]`` is the action taken just before ``frames[i]`` was observed (``-1`` for the
    reset frame), ``rewards[i]`` the reward gained in that step, ``terminals[i]`` whether the
    game is over at ``frames[i]``; an episode that hits ``max_steps`` ends without a terminal.
    ``states`` holds emulator snapshots at the requested frame indices (for branching).
    """

    frames: np.ndarray  # uint8 [n, h, w, 3]
    actions: np.ndarray  # int16 [n]
    rewards: np.ndarray  # float32 [n]
    terminals: np.ndarray  # uint8 [n]
    lives: np.ndarray  # int16 [n]
    ram: np.ndarray  # uint8 [n, 128]
    states: dict[int, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


def run_episode(
    env: AtariEnv,
    policy: str,
    seed: int,
    *,
    max_steps: int,
    noop_max: int = 30,
    snapshot_at: frozenset[int] | set[int] = frozenset(),
) -> EpisodeRecord:
    """Plays one episode with ``policy`` seeded by ``seed``; deterministic in (game, policy,
    seed, frameskip, max_steps).

    The episode starts with ``0…noop_max`` NOOP steps (drawn from the seed), the classic way to
    vary Atari start states; they are recorded like any other step.
    """
    rng = episode_rng(seed)
    act = make_policy(policy, env.game, rng)
    noops = int(rng.integers(0, noop_max + 1))
    n_max = max_steps + 1
    h, w = env.frame_hw
    frames = np.empty((n_max, h, w, 3), np.uint8)
    actions = np.full(n_max, NO_ACTION, np.int16)
    rewards = np.zeros(n_max, np.float32)
    terminals = np.zeros(n_max, np.uint8)
    lives = np.zeros(n_max, np.int16)
    ram = np.empty((n_max, 128), np.uint8)
    states: dict[int, object] = {}

    frames[0] = env.reset()
    lives[0], ram[0] = env.lives(), env.ram()
    n = 1
    while n < n_max:
        if n - 1 in snapshot_at:
            states[n - 1] = env.clone_state()
        a = 0 if n <= noops else act(env, rng)
        frames[n], rewards[n], over = env.step(a)
        actions[n], terminals[n], lives[n], ram[n] = a, over, env.lives(), env.ram()
        n += 1
        if over:
            break
    if n - 1 in snapshot_at:
        states[n - 1] = env.clone_state()
    return EpisodeRecord(
        frames[:n], actions[:n], rewards[:n], terminals[:n], lives[:n], ram[:n], states
    )
