"""The trainer: every stage runs from a config, resumes exactly, and chains into the next."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from crcm.errors import ConfigError
from crcm.pipeline import load
from crcm.training.config import STAGES, load_config
from crcm.training.trainer import train

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
    )
    run = train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (run / "pipeline" / "model.safetensors").is_file()
    before, after = weights(teacher), weights(run)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the student moved


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
    with pytest.raises(ConfigError, match="shipped recipes: causal-forcing/0-base"):
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
