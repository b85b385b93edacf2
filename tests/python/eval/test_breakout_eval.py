"""The Breakout detector (validated against RAM on emulator frames), metrics and the harness."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.data.atari import AtariEnv, run_episode
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
    assert hz["128"]["ball_presence_agree"] < 1.0 or hz["128"]["ball_error_px"] > 3
    ctrl = r["models"]["copy-last-frame"]["controllability"]
    # A frozen paddle never separates LEFT from RIGHT; NOOP is followed... for one step at most.
    assert ctrl["left_right"]["32"]["n"] > 0 and ctrl["left_right"]["32"]["direction_agree"] == 0
    assert ctrl["sequences"]["LEFT"]["32"]["paddle_error_px"] > 5


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
