"""The trainer: every stage runs from a config, resumes exactly, and chains into the next."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from crcm.errors import ConfigError
from crcm.pipeline import load
from crcm.training.config import STAGES, load_config
from crcm.training.data import Batch
from crcm.training.trainer import _slice, micro_batches, noise_seed, resolve_precision, train

BASE = ["data.frames=2", "batch_size=2", "log_every=1", "checkpoint_every=2", "lr=1e-3"]


def config(tmp_path, name, stage, *extra):
    return load_config(None, [f'out="{tmp_path / name}"', *BASE, *extra], stage=stage)


def weights(run):
    return load(run / "pipeline").model.state_dict()


def test_resume_continues_exactly(tmp_path):
    straight = train(config(tmp_path, "a", "teacher-tf", "steps=4"), progress=False)
    cut = config(tmp_path, "b", "teacher-tf", "steps=4")
    train(cut, progress=False, stop_after=2)  # "crashes" after its step-2 checkpoint
    assert not (tmp_path / "b" / "pipeline").exists()
    resumed = train(cut, progress=False)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return train(config(tmp, "teacher", "teacher-tf", "steps=2"), progress=False)


@pytest.mark.parametrize(
    "stage", ["tf-scm", "tf-dcm", "trigflow-scm", "sf-dmd", "df-dmd", "ode-init", "joint-rcm"]
)
def test_every_distillation_stage_runs_from_the_teacher(tmp_path, teacher, stage):
    cfg = config(
        tmp_path,
        stage,
        stage,
        "steps=2",
        f'init="{teacher}"',
        f'teacher="{teacher}"',
        "fake_score_updates=1",
        "max_steps=2",
        "sample_every=2",
    )
    run = train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (run / "pipeline" / "model.safetensors").is_file()
    # a consistency-sampled EMA video: uint8 [frames, H, W, C], no pickle
    video = np.load(run / "samples" / "step-00000002.npy", allow_pickle=False)
    assert video.dtype == np.uint8 and video.shape == (2, *load(run / "pipeline").frame_shape)
    before, after = weights(teacher), weights(run)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student moved


def test_micro_batches_split_the_global_batch_over_ranks():
    batch = Batch(torch.arange(8.0).reshape(4, 2), torch.arange(4), None)
    seeds = lambda parts: [g.initial_seed() for _, g in parts]  # noqa: E731
    one = micro_batches(batch, step=3, seed=1, size=1, rank=0, per_rank=4, device="cpu")
    ranks = [  # each rank holds its own rows of the global batch
        micro_batches(rows, step=3, seed=1, size=1, rank=r, per_rank=2, device="cpu")
        for r, rows in enumerate((_slice(batch, 0, 2), _slice(batch, 2, 4)))
    ]
    both = ranks[0] + ranks[1]
    assert seeds(both) == seeds(one) and len(set(seeds(one))) == 4
    assert torch.equal(torch.cat([b.x0_B_T_C_H_W for b, _ in both]), batch.x0_B_T_C_H_W)
    assert torch.equal(torch.cat([b.cond for b, _ in both]), batch.cond)
    whole = micro_batches(batch, step=3, seed=1, size=4, rank=0, per_rank=1, device="cpu")
    assert seeds(whole) == [noise_seed(1, 3, 0)] == [1 * 1_000_003 + 3]  # single-process seed


def test_micro_batch_size_is_validated_and_draws_its_own_noise(tmp_path):
    # 2 micro-batches of 2 = 2 processes of 2: the same noise per micro-batch, gradients averaged
    a = train(config(tmp_path, "a", "teacher-df", "steps=2", "batch_size=4", "micro_batch_size=2"),
              progress=False)  # fmt: skip
    b = train(config(tmp_path, "b", "teacher-df", "steps=2", "batch_size=4"), progress=False)
    wa, wb = weights(a), weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # other noise: another run
    with pytest.raises(ConfigError, match="micro_batch_size=3 must divide"):
        config(tmp_path, "c", "base", "micro_batch_size=3")


def test_sample_videos_and_bf16(tmp_path):
    assert resolve_precision(config(tmp_path, "p", "base"), torch.device("cpu")) == "fp32"
    assert resolve_precision(config(tmp_path, "p", "base"), torch.device("cuda")) == "bf16"
    fp32 = train(config(tmp_path, "f", "teacher-tf", "steps=2"), progress=False)
    # Samples must not disturb training: same weights with and without them.
    sampled = train(config(tmp_path, "s", "teacher-tf", "steps=2", "sample_every=1"),
                    progress=False)  # fmt: skip
    assert all(torch.equal(v, weights(sampled)[k]) for k, v in weights(fp32).items())
    names = sorted(p.name for p in (sampled / "samples").iterdir())
    assert names == ["step-00000001.npy", "step-00000002.npy"]
    video = np.load(sampled / "samples" / names[-1], allow_pickle=False)
    assert video.dtype == np.uint8 and video.shape == (2, *load(sampled / "pipeline").frame_shape)
    bf16 = train(config(tmp_path, "b", "teacher-tf", "steps=2", 'precision="bf16"'),
                 progress=False)  # fmt: skip
    records = [json.loads(line) for line in (bf16 / "metrics.jsonl").open()]
    assert all(np.isfinite(r["loss"]) for r in records)
    w32, w16 = weights(fp32), weights(bf16)
    assert all(v.dtype == torch.float32 for v in w16.values())  # fp32 master weights
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # autocast did run in bf16


def test_teacher_loss_goes_down(tmp_path):
    losses = []
    cfg = config(
        tmp_path, "t", "teacher-df", "steps=40", "batch_size=4", "cond_dropout=0.0", "lr=3e-3"
    )
    train(cfg, progress=False, on_step=lambda step, logs: losses.append(logs["loss"]))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(None, [], stage="tf-scm")
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_config(None, ["stepz=3"], stage="base")
    with pytest.raises(ConfigError, match="not a multiple of chunk_frames"):
        load_config(None, ["chunk_frames=3", "data.frames=4"], stage="base")
    bad = tmp_path / "c.toml"
    bad.write_text('stage = "base"\nsteps = 3\n')
    with pytest.raises(ConfigError, match="not 'teacher-tf'"):
        load_config(bad, [], stage="teacher-tf")
    assert load_config(bad, ["batch_size=4"], stage="base").steps == 3
    run = train(config(tmp_path, "r", "base", "steps=1"), progress=False)
    with pytest.raises(ConfigError, match="different config"):
        train(load_config(None, [f'out="{run}"', "lr=0.5"], stage="base"), progress=False)


def test_time_shift_defaults_agree():
    # The config and the CLI stay free of torch, so they spell the default out: keep it one.
    import argparse

    from crcm.cli_data import add_eval_parser
    from crcm.sampling import DEFAULT_SHIFT

    assert load_config(None, stage="base").time_shift == DEFAULT_SHIFT
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    assert parser.parse_args(["eval", "--model", "m", "--out", "o.json"]).shift == DEFAULT_SHIFT


def test_shipped_recipe_configs_parse():
    from pathlib import Path

    import crcm.training

    tomls = sorted((Path(crcm.training.__file__).parent / "recipes").rglob("*.toml"))
    assert tomls, "the baselines ship as config files"
    stages = set()
    for path in tomls:
        stages.add(load_config(path, []).stage)
    assert {"teacher-tf", "tf-scm", "sf-dmd", "tf-dcm", "teacher-df", "joint-rcm"} <= stages
    assert stages <= set(STAGES)
    assert load_config("causal-rcm/2-tf-scm", []).stage == "tf-scm"  # by recipe name
    with pytest.raises(ConfigError, match=r"shipped recipes: breakout/0-base, .*causal-forcing/0"):
        load_config("no/such-recipe", [])


def test_cli_train(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "crcm.cli",
            "train",
            "base",
            f'out="{tmp_path / "cli"}"',
            "steps=2",
            *BASE,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "trained pipeline" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "crcm.cli", "train", "tf-scm", "steps=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "needs a teacher" in result.stderr
    assert "Traceback" not in result.stderr
