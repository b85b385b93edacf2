"""End to end on Breakout (slow): collect → the Causal-rCM recipe → evaluate against the emulator.

A narrow version of the shipped ``breakout`` config runs every stage of the shipped model's
recipe (``recipes/breakout``, as ``scripts/train-breakout.sh`` chains them: the five-part TF
teacher, then TF-sCM, then the student's pixel head), with the recipe's settings and fewer
steps, on a few collected episodes of both datasets. The 1-step model, streamed with the still
threshold the chain gives it, must then beat the copy-last-frame baseline on the pixels that
actually change (dynamic-region PSNR) at horizon 1, on held-out episodes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("ale_py")

from crcm.data.dataset import CollectConfig, collect
from crcm.eval.harness import CopyLastFrame, EvalConfig, evaluate, load_model
from crcm.models import configs
from crcm.training.config import load_config
from crcm.training.trainer import train

pytestmark = pytest.mark.slow

# (recipe stage, steps); every other setting is the shipped recipe's.
STAGES = (
    ("1-teacher-tf-motion", 300),
    ("1-teacher-tf-static", 100),
    ("1-teacher-tf-sampling", 100),
    ("1-teacher-tf-keys", 100),
    ("1-teacher-tf", 100),
    ("causal-rcm/2-tf-scm", 100),
    ("causal-rcm/3-pixel-head-tf", 150),
    ("causal-rcm/3-pixel-head", 50),
)


def test_a_small_breakout_model_beats_copying_the_last_frame(tmp_path: Path, monkeypatch) -> None:
    # Fewer layers, same width: an 8×8 RGB patch is 192 numbers, and a model narrower than
    # that squeezes every pixel through a bottleneck (dim 96 had not left the noise after 600
    # teacher steps).
    small = dataclasses.replace(configs.CONFIGS["breakout"], num_layers=2, ffn_dim=512)
    monkeypatch.setitem(configs.CONFIGS, "breakout-e2e", small)
    small_data = CollectConfig(train_episodes=12, eval_episodes=2, max_steps=400)
    datasets = {
        "data/breakout": collect(tmp_path / "data/breakout", small_data, progress=False),
        # the held-keys data of the teacher's last part and TF-sCM (as the script collects it)
        "data/breakout-keys": collect(
            tmp_path / "data/breakout-keys",
            dataclasses.replace(
                small_data, policy_mix=(("tracker", 0.5), ("random", 0.2), ("keys", 0.3))
            ),
            progress=False,
        ),
    }
    monkeypatch.chdir(tmp_path)  # the recipe's paths (runs/…, data/…) are relative
    for stage_file, steps in STAGES:
        cfg = load_config(
            f"breakout/{stage_file}",
            [f"steps={steps}", 'model="breakout-e2e"', "checkpoint_every=1000", "batch_size=8"],
        )
        assert cfg.data.path in datasets, cfg.data.path
        train(cfg, progress=False)
    shipped = "runs/breakout/causal-rcm/pixel-head/pipeline"
    student = load_model(shipped, steps=1, name="student")
    assert student.pipeline.model.cfg.pixel_head > 0
    assert student.pipeline.sampler.still_threshold > 0  # the stream holds still pixels
    report = evaluate(
        [student, CopyLastFrame()],
        EvalConfig(episodes=2, starts_per_episode=2, horizons=(1, 8), long_rollout=100),
        progress=False,
    )
    h1 = {name: m["horizons"]["1"]["psnr_dynamic"] for name, m in report["models"].items()}
    assert h1["student"] > h1["copy-last-frame"], h1
    assert report["drift"]["models"]["student"]["frames"] == 100
