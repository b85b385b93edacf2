"""The emulator wrapper, the frame resize and the collection policies."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.data.atari import (
    NO_ACTION,
    AtariEnv,
    _area_weights,
    area_resize,
    available_games,
    run_episode,
)
from crcm.errors import ConfigError


@pytest.fixture(scope="module")
def env() -> AtariEnv:
    return AtariEnv("breakout")


def test_roms_ship_with_the_wheel_and_unknown_games_are_refused() -> None:
    assert "breakout" in available_games()
    with pytest.raises(ConfigError, match=r"unknown Atari game 'breakot'.*breakout"):
        AtariEnv("breakot")


def test_breakout_actions_are_the_models(env: AtariEnv) -> None:
    assert env.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    with pytest.raises(ConfigError, match="action must be in"):
        env.step(4)


def test_area_resize_is_exact_area_averaging() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (210, 160, 3), dtype=np.uint8)
    wy, wx = _area_weights(210, 64), _area_weights(160, 64)
    np.testing.assert_allclose(wy.sum(1), 1.0)
    expected = np.einsum("yh,hwc,xw->yxc", wy, frame.astype(np.float64), wx)
    out = area_resize(frame, (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out - expected).max() <= 0.5 + 1e-9  # rounded, never more than half a level
    # A 2x2 block downsample of an integer ratio is the plain block mean.
    small = rng.integers(0, 256, (4, 6, 1), dtype=np.uint8)
    block = small.reshape(2, 2, 3, 2, 1).astype(float).mean((1, 3))
    np.testing.assert_array_equal(area_resize(small, (2, 3)), np.rint(block))


def test_episodes_are_deterministic_in_their_seed(env: AtariEnv) -> None:
    a = run_episode(env, "tracker", 3, max_steps=60)
    b = run_episode(env, "tracker", 3, max_steps=60)
    c = run_episode(env, "tracker", 4, max_steps=60)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert not np.array_equal(a.actions, c.actions)


def test_episode_conventions(env: AtariEnv) -> None:
    ep = run_episode(env, "random", 0, max_steps=2000)
    n = len(ep)
    assert ep.frames.shape == (n, 64, 64, 3) and ep.ram.shape == (n, 128)
    assert ep.actions[0] == NO_ACTION and (ep.actions[1:] >= 0).all()
    # A random Breakout player loses its 5 lives well before 2000 steps: a terminal ends it.
    assert n < 2001 and ep.terminals[-1] == 1 and ep.terminals[:-1].sum() == 0
    assert ep.lives[0] == 5 and ep.lives[-1] == 0
    # Replaying the recorded actions in a fresh emulator gives the recorded frames.
    other = AtariEnv("breakout")
    other.reset()
    for t in range(1, 40):
        frame, reward, _ = other.step(int(ep.actions[t]))
        np.testing.assert_array_equal(frame, ep.frames[t])
        assert reward == ep.rewards[t]


def test_tracker_plays_better_than_random(env: AtariEnv) -> None:
    tracker = sum(run_episode(env, "tracker", s, max_steps=400).rewards.sum() for s in range(2))
    random = sum(run_episode(env, "random", s, max_steps=400).rewards.sum() for s in range(2))
    assert tracker > random + 5


def test_tracker_is_breakout_only() -> None:
    with pytest.raises(ConfigError, match="plays only breakout"):
        run_episode(AtariEnv("pong"), "tracker", 0, max_steps=5)


def test_keys_policy_holds_each_action_like_a_person(env: AtariEnv) -> None:
    """Runs of one action last 1–48 steps, long ones included, and drive the paddle into a
    wall and away from it (what the ball-tracking policy rarely does)."""
    ep = run_episode(env, "keys", 0, max_steps=600)
    actions = np.asarray(ep.actions[1:])  # after the reset frame's
    # Lengths of the runs of one action: the gaps between the steps where it changes.
    changes = np.flatnonzero(np.diff(actions)) + 1
    runs = np.diff(np.concatenate([[0], changes, [len(actions)]]))
    # Consecutive holds can draw the same action, so a run may exceed one hold.
    assert max(runs) >= 20 and np.median(runs) >= 3
    assert set(actions.tolist()) == {0, 1, 2, 3}
    again = run_episode(env, "keys", 0, max_steps=600)
    np.testing.assert_array_equal(again.actions, ep.actions)  # a pure function of the seed
