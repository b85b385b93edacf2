"""The Breakout detector (validated against RAM on emulator frames), metrics and the harness."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.data.atari import AtariEnv, area_resize, run_episode
from crcm.eval.breakout import (
    PSNR_CAP_DB,
    BreakoutDetector,
    dynamic_mask,
    psnr,
    ram_objects,
    ssim_map,
)
from crcm.eval.harness import CopyLastFrame, EvalConfig, PipelineModel, evaluate


def _frames_with_native(seeds, hw):
    """Emulator frames at ``hw``, their native screens and RAM, from tracker episodes."""
    env = AtariEnv("breakout", frame_hw=hw)
    out = []
    for seed in seeds:
        ep = run_episode(env, "tracker", seed, max_steps=250)
        replay = AtariEnv("breakout", frame_hw=hw)
        replay.reset()
        natives = [replay.native_frame().copy()]
        for a in ep.actions[1:]:
            replay.step(int(a))
            natives.append(replay.native_frame().copy())
        out += list(zip(ep.frames, natives, ep.ram, strict=True))
    return out


@pytest.mark.parametrize("hw", [(64, 64), (96, 96)])
def test_detector_agrees_with_ram_on_emulator_frames(hw) -> None:
    det = BreakoutDetector(hw)
    frame_px = 160 / hw[1]  # native pixels per frame pixel (x); y is 210 / h
    paddle_err, ball_err, false_pos, missed, in_field, brick_err = [], [], 0, 0, 0, []
    for frame, native, ram in _frames_with_native([0, 1, 2], hw):
        found = det(frame)
        paddle_true, ball_true = ram_objects(ram)
        red = (native[189:193, 8:152, 0] == 200) & (native[189:193, 8:152, 1] == 72)
        if red.any(0).sum() >= 14:  # the full paddle (not the short one, not hidden)
            assert found.paddle_x is not None
            paddle_err.append(abs(found.paddle_x - paddle_true))
        if ball_true is None:
            false_pos += found.ball_xy is not None
        else:
            top = ball_true[1] - 2
            # Clear of the rows the detector does not search (red bricks, paddle) by a pixel.
            if (79 <= top <= 181) or (32 <= top <= 49):
                in_field += 1
                if found.ball_xy is None:
                    missed += 1
                else:
                    ball_err.append(np.abs(np.subtract(found.ball_xy, ball_true)))
        truth = sum(
            bool(native[57 + 6 * r + 3, 12 + 8 * c].any()) for r in range(6) for c in range(18)
        )
        brick_err.append(abs(found.bricks - truth))
    paddle_err, ball_err = np.array(paddle_err), np.array(ball_err)
    assert len(paddle_err) > 300 and in_field > 300
    # Within a frame pixel everywhere, well under half a frame pixel typically.
    assert paddle_err.max() < frame_px and np.median(paddle_err) < 0.25 * frame_px
    assert ball_err.max() < frame_px
    assert np.median(ball_err[:, 0]) < 0.25 * frame_px
    assert np.median(ball_err[:, 1]) < 0.25 * 210 / hw[0]
    assert false_pos == 0 and missed <= 0.05 * in_field
    assert np.mean(np.array(brick_err) == 0) > 0.99 and max(brick_err) <= 1


def test_brick_count_follows_the_game() -> None:
    env = AtariEnv("breakout")
    det = BreakoutDetector((64, 64))
    ep = run_episode(env, "tracker", 0, max_steps=400)
    counts = np.array([det.bricks(f) for f in ep.frames])
    assert counts[0] == 108
    # Each brick hit scores: bricks lost == reward events (1, 4 or 7 points per brick).
    hits = int((ep.rewards > 0).sum())
    assert hits > 3 and counts[-1] == 108 - hits


@pytest.fixture(scope="module")
def native_scene() -> tuple[np.ndarray, np.ndarray]:
    """A native emulator screen with paddle and ball in the open, and the same screen with
    both removed (the walls, score and bricks a model gets right while it draws speckle)."""
    env = AtariEnv("breakout")
    ep = run_episode(env, "tracker", 0, max_steps=120, snapshot_at={100})
    env.restore_state(ep.states[100])
    env.step(0)
    screen = env.native_frame().copy()
    empty = screen.copy()
    red = (empty[..., 0] == 200) & (empty[..., 1] == 72)
    red[:75], red[:, 152:] = False, False  # the red bricks and the right wall's foot stay
    empty[red] = 0
    return screen, empty


@pytest.mark.parametrize("hw", [(64, 64), (96, 96)])
def test_detector_reports_none_on_frames_without_one_object(native_scene, hw) -> None:
    """A detector that returns something on any frame makes speckle look like a paddle: the
    paddle and the ball are each found only as one compact object of their size and colour."""
    screen, empty = native_scene
    det = BreakoutDetector(hw)
    real, background = area_resize(screen, hw), area_resize(empty, hw)
    found = det(real)
    assert found.paddle_x is not None and found.ball_xy is not None  # the control
    rng = np.random.default_rng(0)
    frames = {
        "blank": np.zeros((*hw, 3), np.uint8),
        "uniform noise": rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
        "background": background,
    }
    for density in (0.01, 0.03, 0.1):
        specks = rng.random(hw) < density
        colour = background.copy()  # random colours, as the shipped model's speckle
        colour[specks] = rng.integers(0, 256, (int(specks.sum()), 3), dtype=np.uint8)
        salt = background.copy()  # salt-and-pepper: every channel 0 or 255
        salt[specks] = rng.choice(np.array([0, 255], np.uint8), (int(specks.sum()), 3))
        red = background.copy()  # specks of the objects' own red, at any brightness
        shade = rng.uniform(0.3, 1.0, (int(specks.sum()), 1))
        red[specks] = (np.array([200.0, 72.0, 72.0]) * shade).astype(np.uint8)
        frames |= {f"speckle {density}": colour, f"salt {density}": salt, f"red {density}": red}
    for name, frame in frames.items():
        got = det(frame)
        assert got.paddle_x is None and got.ball_xy is None, name

    def drawn(*paint) -> np.ndarray:
        native = screen.copy()
        for ys, xs in paint:
            native[ys, xs] = (200, 72, 72)
        return area_resize(native, hw)

    # Two paddles: neither is "the" paddle; the ball is still one object.
    two = det(drawn((slice(189, 193), slice(30, 46))))
    assert two.paddle_x is None and two.ball_xy == pytest.approx(found.ball_xy)
    # Two balls: neither is "the" ball; the paddle is still found.
    two = det(drawn((slice(130, 134), slice(40, 42))))
    assert two.ball_xy is None and two.paddle_x == pytest.approx(found.paddle_x)
    # Shapes of the right colour but the wrong size: a tall bar, a bar across the field, a
    # streak instead of a ball.
    assert det(drawn((slice(150, 196), slice(60, 76)))).paddle_x is None
    assert det(area_resize(np.where(_rows(189, 193, 20, 140), _RED, empty), hw)).paddle_x is None
    assert det(drawn((slice(100, 130), slice(40, 42)))).ball_xy is None
    # A little noise of a good model is no clutter: both are still found, in place.
    noisy = np.clip(real + rng.normal(0, 3, real.shape), 0, 255).astype(np.uint8)
    got = det(noisy)
    assert abs(got.paddle_x - found.paddle_x) < 1
    assert np.hypot(*np.subtract(got.ball_xy, found.ball_xy)) < 1.5


_RED = np.array([200, 72, 72], np.uint8)


def _rows(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``bool [210, 160, 1]``: a native rectangle."""
    m = np.zeros((210, 160, 1), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_detector_finds_the_paddle_at_both_walls() -> None:
    """LEFT or RIGHT held pins the paddle to a wall (in a few steps at frameskip 4); the right
    wall's foot is red beside the paddle rows, which must not read as paddle."""
    for hw in ((64, 64), (96, 96)):
        env = AtariEnv("breakout", frame_hw=hw)
        det = BreakoutDetector(hw)
        run_episode(env, "tracker", 0, max_steps=60)
        for action in (3, 2, 3):
            for _ in range(8):
                frame = env.step(action)[0]
            paddle, _ = ram_objects(env.ram())
            assert det.paddle_x(frame) == pytest.approx(paddle, abs=160 / hw[1])


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert (psnr(a, a) == 100.0).all()
    b = a.astype(np.int64)
    b[0] = np.clip(b[0] + 10, 0, 255)  # clipped near 255: compute the MSE directly
    mse = ((b[0] - a[0].astype(np.int64)) ** 2).mean()
    assert psnr(a, b.astype(np.uint8))[0] == pytest.approx(10 * np.log10(255**2 / mse))
    mask = np.zeros((2, 16, 16), bool)
    mask[:, :4] = True
    assert psnr(a, b.astype(np.uint8), mask)[1] == 100.0
    assert np.isnan(psnr(a, a, np.zeros_like(mask))).all()
    np.testing.assert_allclose(ssim_map(a, a), 1.0)
    # Flat frames: only the luminance term is left, (2·μa·μb + C1) / (μa² + μb² + C1).
    flat = np.full((1, 16, 16, 3), 100, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    np.testing.assert_allclose(ssim_map(flat, flat + 50), expected)
    noise = [np.clip(a + rng.normal(0, sd, a.shape), 0, 255).astype(np.uint8) for sd in (10, 40)]
    s10, s40 = (ssim_map(a, n) for n in noise)
    assert s10.shape == (2, 16, 16) and 1 > s10.mean() > s40.mean() > 0


def test_dynamic_mask_is_what_changed_dilated() -> None:
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[2, 4, 4] = 200
    assert dynamic_mask(frames, dilate=0).sum() == 1
    m = dynamic_mask(frames, dilate=1)
    assert m.sum() == 9 and m[3:6, 3:6].all()


@pytest.fixture(scope="module")
def copy_report() -> dict:
    cfg = EvalConfig(
        episodes=2, starts_per_episode=2, max_steps=300, horizons=(1, 8, 32, 128), long_rollout=600
    )
    return evaluate([CopyLastFrame(), _Snow()], cfg, progress=False)


class _Snow(CopyLastFrame):
    """A model that forgets the game: uniform noise frames."""

    name = "snow"

    def rollout(self, context_B_K_H_W_C, context_actions_B_K, actions_B_N, seed=0):
        shape = (*actions_B_N.shape, *context_B_K_H_W_C.shape[2:])
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_long_rollout_measures_drift_on_the_static_region(copy_report: dict) -> None:
    drift = copy_report["drift"]["models"]
    copy, snow = drift["copy-last-frame"], drift["snow"]
    assert copy["frames"] == snow["frames"] == 600
    assert set(copy["psnr_static"]) == {"0-100", "100-500", "500-600"}
    # The copied frame keeps the walls and background exactly; noise keeps none of them.
    assert min(copy["psnr_static"].values()) >= PSNR_CAP_DB
    assert max(snow["psnr_static"].values()) < 12
    assert copy["paddle_found"] == 1.0 and copy["frames_per_s"] > 0


def test_copy_last_frame_report(copy_report: dict) -> None:
    r = copy_report
    assert r["windows"] == 4 and all(s >= 2**30 for s in r["eval_seeds"])
    hz = r["models"]["copy-last-frame"]["horizons"]
    assert set(hz) == {"1", "8", "32", "128"}
    # The static background flatters the whole frame: the dynamic region shows the truth.
    for h in ("8", "32", "128"):
        assert hz[h]["psnr_dynamic"] < hz[h]["psnr"] - 5
        assert hz[h]["ssim_dynamic"] < hz[h]["ssim"]
    assert hz["128"]["psnr"] < hz["1"]["psnr"]
    assert hz["128"]["ball_error_px"] > 3
    copy = r["models"]["copy-last-frame"]
    ctrl = copy["control"]
    # A frozen paddle never follows LEFT or RIGHT: no spread, no agreement.
    assert ctrl["horizons"] == [1, 2, 4, 8, 16, 32] and ctrl["direction_steps"] > 0
    assert ctrl["sensitivity"] == 0 and ctrl["direction_agree"] == 0
    assert ctrl["paddle_error_px"]["LEFT"]["32"] > 5
    assert copy["action_blind"] and copy["targets"]["sensitivity"]["pass"] is False
    # The copied frame is the context check's reference and the dynamic-PSNR baseline.
    assert copy["context_check"]["pass"] and copy["targets"]["dyn_psnr"]["value"] == 0
    assert set(r["baseline_psnr_dynamic"]) == {"1", "8", "32", "128"}


def test_pipeline_rollout_matches_the_runtime() -> None:
    """With no context, the harness's prefill/KV path reproduces crcm.generate exactly."""
    import torch

    import crcm
    from crcm.models import get_config
    from crcm.sampling import SamplerConfig

    cfg = get_config("breakout").replace(dim=24, num_layers=2, num_heads=2, ffn_dim=48)
    sampler = SamplerConfig(steps_per_chunk=(2,), sink_frames=1, window_frames=2)
    pipe = crcm.Pipeline.from_config(cfg, sampler=sampler, seed=0)
    torch.manual_seed(1)
    for p in pipe.model.parameters():  # untrained heads are zero: make frames depend on things
        p.data.add_(0.05 * torch.randn_like(p))
    actions = [0, 2, 3, 1, 2, 2]
    ref = np.stack(list(crcm.generate(pipe, 6, actions=actions, seed=5)))
    model = PipelineModel(pipe)
    empty = np.zeros((1, 0, 64, 64, 3), np.uint8)
    out = model.rollout(empty, np.zeros((1, 0), np.int64), np.array([actions]), seed=5)[0]
    assert ref.std() > 10
    np.testing.assert_array_equal(out, ref)
    # Context prefill: continuing from the first 3 generated frames changes the future
    # (the model sees them) and the batch rows are independent.
    ctx = np.stack([ref[None, :3], np.zeros_like(ref[None, :3])])[:, 0]
    cont = model.rollout(ctx, np.array([actions[:3]] * 2), np.array([actions[3:]] * 2), seed=5)
    assert cont.shape == (2, 3, 64, 64, 3) and not np.array_equal(cont[0], cont[1])


def test_eval_command_writes_json(tmp_path: Path) -> None:
    from crcm.cli_data import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "copy-last-frame", "--episodes", "1", "--out", str(out)]
    args = parser.parse_args([*argv, "--horizons", "1,8", "--max-steps", "100", "--quiet"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "copy-last-frame" and report["horizons"] == [1, 8]


def test_load_model_sets_the_still_threshold() -> None:
    """The shipped model streams with its still threshold; ``crcm eval --still-grey`` (and a
    preset by name) replaces or keeps it."""
    from crcm.cli_data import add_eval_parser
    from crcm.eval.harness import load_model

    shipped = load_model("breakout")
    assert shipped.sampler.still_threshold == pytest.approx(16 / 127.5)
    assert load_model("breakout", sampler="consistency", steps=1).sampler.still_threshold == (
        shipped.sampler.still_threshold
    )
    assert load_model("breakout", still_threshold=0.0).sampler.still_threshold == 0.0
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", "--model", "breakout", "--out", "r.json", "--still-grey", "8"]
    )
    assert args.still_grey == 8.0
