"""The honesty check of issue 16: every control/object metric fails on a broken world model.

Fake :class:`WorldModel` s that are broken in the ways real ones are (blank frames, noise,
speckle over the right background, action-blind ones) and an oracle that returns the
emulator's own frames run through the same ``evaluate`` on a few short windows. The oracle must
meet every target it was measured on; each broken model must fail the targets that its failure
is about, and the action-blind ones must be called action-blind.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.data.atari import NATIVE_HW, AtariEnv, run_episode
from crcm.data.dataset import EVAL_SEED_BASE, episode_policy
from crcm.eval.control import LEFT, RIGHT, scripted_actions, shuffled_actions
from crcm.eval.harness import CopyLastFrame, EvalConfig, WorldModel, evaluate
from crcm.eval.targets import TARGETS, is_action_blind, verdict

CFG = EvalConfig(
    episodes=3,
    starts_per_episode=2,
    horizons=(1, 8),
    control_horizon=8,
    control_horizons=(1, 2, 4, 8),
    max_steps=150,
    long_rollout=0,
)


def _key(context_K_H_W_C: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(context_K_H_W_C).tobytes()).hexdigest()


class _Emulator(WorldModel):
    """The emulator itself as a world model: it finds the held-out episode state the context
    came from (every frame of the evaluation episodes is snapshotted) and plays the actions.

    ``keys`` decides what it plays: the actions it is given (the oracle), NOOP whatever it is
    given (action-blind, but with the game's real ball and bricks), or random LEFT/RIGHT drawn
    from the seed (a paddle that moves, but not because of the actions).
    """

    def __init__(self, name: str, cfg: EvalConfig, keys: str = "given") -> None:
        self.name, self.keys = name, keys
        self.env = AtariEnv(cfg.game, frameskip=cfg.frameskip, frame_hw=cfg.frame_hw)
        self.states = {}
        K = cfg.context_frames
        for j in range(cfg.episodes):
            seed = EVAL_SEED_BASE + cfg.seed + j
            policy = episode_policy(cfg.game, seed, cfg.policy_mix)
            n = len(run_episode(self.env, policy, seed, max_steps=cfg.max_steps))
            ep = run_episode(
                self.env, policy, seed, max_steps=cfg.max_steps, snapshot_at=set(range(n))
            )
            for t in range(K - 1, n):
                self.states.setdefault(_key(ep.frames[t - K + 1 : t + 1]), ep.states[t])

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        out = []
        rng = np.random.default_rng(seed)
        random_keys = rng.choice([LEFT, RIGHT], actions_B_N.shape)
        for b, ctx in enumerate(context_B_K_H_W_C):
            self.env.restore_state(self.states[_key(ctx)])
            if self.keys == "given":
                actions = actions_B_N[b]
            elif self.keys == "noop":
                actions = np.zeros_like(actions_B_N[b])
            else:
                actions = random_keys[b]
            out.append(np.stack([self.env.step(int(a))[0] for a in actions]))
        return np.stack(out)


class _Blank(WorldModel):
    name = "blank"

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        return np.zeros((*actions_B_N.shape, *context_B_K_H_W_C.shape[2:]), np.uint8)


class _Noise(WorldModel):
    name = "noise"

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        shape = (*actions_B_N.shape, *context_B_K_H_W_C.shape[2:])
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class _Speckle(WorldModel):
    """What the shipped model drew (issue 16): the right static background (walls, score,
    bricks) with no paddle or ball, under coloured speckle."""

    name = "speckle"

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        rng = np.random.default_rng(seed)
        N = actions_B_N.shape[1]
        h = context_B_K_H_W_C.shape[2]
        below_bricks = int(np.ceil(93 * h / NATIVE_HW[0]))
        out = np.repeat(context_B_K_H_W_C[:, -1:], N, axis=1).copy()
        out[:, :, below_bricks:] = 0  # no paddle, no ball
        specks = rng.random(out.shape[:4]) < 0.03
        out[specks] = rng.integers(0, 256, (int(specks.sum()), 3), dtype=np.uint8)
        return out


@pytest.fixture(scope="module")
def report() -> dict:
    models = [
        _Emulator("oracle", CFG),
        _Emulator("noop-future", CFG, keys="noop"),
        _Emulator("random-keys", CFG, keys="random"),
        CopyLastFrame(),
        _Blank(),
        _Noise(),
        _Speckle(),
    ]
    return evaluate(models, CFG, progress=False)


def _targets(report: dict, name: str) -> dict[str, bool | None]:
    return {k: t["pass"] for k, t in report["models"][name]["targets"].items()}


def test_the_oracle_meets_every_target_it_was_measured_on(report: dict) -> None:
    oracle = report["models"]["oracle"]
    passed = _targets(report, "oracle")
    assert passed.pop("paddle_h32") is None  # the control horizon here is 8
    assert all(passed.values()), passed
    assert oracle["targets_met"] == len(TARGETS) - 1
    control, objects = oracle["control"], oracle["objects"]
    assert control["paddle_error_px"]["all"] == {"1": 0.0, "2": 0.0, "4": 0.0, "8": 0.0}
    assert control["sensitivity"] == pytest.approx(1.0)
    assert control["direction_agree"] == 1.0 and control["direction_steps"] >= 20
    assert control["direction_agree_shuffled"] <= 0.55  # part of the direction target
    assert objects["paddle_found"] == 1.0 and objects["ball_found"] == 1.0
    assert objects["ball_close_h1_n"] >= 6
    assert objects["paddle_max_jump_px"] == objects["emulator_max_jump_px"] <= 32
    assert oracle["context_check"]["pass"] and oracle["context_check"]["paddle_error_h1_px"] == 0
    assert not oracle["action_blind"] and "follows" in oracle["verdict"]


@pytest.mark.parametrize("name", ["blank", "noise", "speckle"])
def test_models_without_objects_fail_the_object_and_control_targets(
    report: dict, name: str
) -> None:
    entry = report["models"][name]
    passed = _targets(report, name)
    for key in ("paddle_h8", "sensitivity", "direction", "paddle_found", "ball_found", "ball_h1"):
        assert passed[key] is False, (key, entry["targets"][key])
    assert passed["context_check"] is False and passed["dyn_psnr"] is False
    assert passed["paddle_jump"] is None  # no paddle to jump: not measured, so never met
    # Nothing is found, so every error is a miss: 160 px, never a lucky small number.
    assert entry["control"]["paddle_error_px"]["all"]["8"] == 160.0
    assert entry["objects"]["paddle_found"] == 0.0 and entry["objects"]["ball_found"] == 0.0
    assert entry["objects"]["ball_error_px"]["1"] == 160.0
    assert entry["horizons"]["8"]["paddle_error_px"] == 160.0
    assert entry["control"]["direction_agree"] == 0.0
    assert entry["objects"]["brick_hits"] > 0 and entry["objects"]["brick_hit_disappears"] == 0
    assert entry["action_blind"] and "action-blind" in entry["verdict"]
    # No target is met; the shuffled control alone (a paddle that never moves never moves the
    # wrong way) would have been, which is why it is judged only with the agreement beside it.
    assert entry["control"]["direction_agree_shuffled"] == 0.0
    assert not any(passed.values()) and entry["targets_met"] == 0


@pytest.mark.parametrize("name", ["copy-last-frame", "noop-future", "random-keys"])
def test_action_blind_models_are_called_action_blind(report: dict, name: str) -> None:
    entry = report["models"][name]
    control = entry["control"]
    passed = _targets(report, name)
    assert passed["sensitivity"] is False and passed["direction"] is False
    assert entry["action_blind"] and "action-blind" in entry["verdict"]
    if name == "random-keys":
        # Its paddle moves, so it agrees with the emulator by chance on some steps; the
        # shuffled control shows that chance is all it is (same frames, same agreement).
        assert control["direction_agree"] > 0.1
        assert control["direction_agree_shuffled"] == control["direction_agree"]
        assert abs(control["sensitivity"]) < 0.5
    else:
        # The paddle stays put (NOOP: it only coasts a step or two): ~no agreement, no spread.
        assert control["direction_agree"] <= 0.1 and control["sensitivity"] == 0.0
    # They draw the real game, so the object metrics alone would not have caught them.
    assert passed["paddle_found"] and passed["ball_found"] and passed["paddle_jump"]


def test_the_errors_separate_what_the_rates_cannot(report: dict) -> None:
    """Real frames under the wrong actions: paddle found 100 %, but the paddle is elsewhere;
    the emulator's own ball and bricks are right whatever the keys."""
    noop, oracle = report["models"]["noop-future"], report["models"]["oracle"]
    copy = report["models"]["copy-last-frame"]
    assert noop["control"]["paddle_error_px"]["all"]["8"] > 20
    assert oracle["control"]["paddle_error_px"]["all"]["8"] == 0
    assert noop["objects"]["ball_close_h1"] == 1.0 and copy["objects"]["ball_close_h1"] < 0.8
    assert oracle["objects"]["brick_hits"] > 0
    assert oracle["objects"]["brick_hit_disappears"] == 1.0
    assert copy["objects"]["brick_hit_disappears"] == 0.0
    # Copy-last-frame is the context check's reference: equal to it, so it passes.
    ctx = copy["context_check"]
    assert ctx["pass"] and ctx["paddle_error_h1_px"] == ctx["copy_last_px"] > 0


def test_scripted_and_shuffled_actions() -> None:
    assert scripted_actions("LEFT", 3).tolist() == [LEFT] * 3
    assert scripted_actions("ALTERNATE", 10, 4).tolist() == [3, 3, 3, 3, 2, 2, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="unknown scripted sequence"):
        scripted_actions("UP", 3)
    scripts = {n: scripted_actions(n, 8) for n in ("LEFT", "RIGHT", "ALTERNATE")}
    shuffled = shuffled_actions(scripts, np.random.default_rng(0))
    assert {k: len(v) for k, v in shuffled.items()} == {"LEFT": 8, "RIGHT": 8, "ALTERNATE": 8}
    pooled = np.concatenate(list(shuffled.values()))
    assert sorted(pooled) == sorted(np.concatenate(list(scripts.values())))
    assert not np.array_equal(shuffled["LEFT"], scripts["LEFT"])  # a held key is broken up


def test_action_blind_rule() -> None:
    assert is_action_blind(None) and is_action_blind({"sensitivity": None})
    good = {"sensitivity": 0.9, "direction_agree": 0.97, "direction_agree_shuffled": 0.4}
    assert not is_action_blind(good)
    assert is_action_blind({**good, "sensitivity": 0.1})
    assert is_action_blind({**good, "direction_agree": 0.2})
    assert is_action_blind({**good, "direction_agree_shuffled": 0.9})
    assert "partly" in verdict({"control": good, "targets": {}})
    # Steps that follow the keys but no spread at the end: still counted blind, and said so.
    lost = verdict({"control": {**good, "sensitivity": 0.0}, "targets": {}})
    assert "step by step at first" in lost and "counted action-blind" in lost
    blind = {"sensitivity": 0.0, "direction_agree": 0.3, "direction_agree_shuffled": 0.25}
    assert "is action-blind" in verdict({"control": blind, "targets": {}})
