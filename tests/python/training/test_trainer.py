"""The trainer: every stage runs from a config, resumes exactly, and chains into the next."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from crcm.errors import ConfigError
from crcm.masks import block_causal_mask
from crcm.pipeline import Pipeline, load
from crcm.training import distributed as dist_utils
from crcm.training import objectives as obj
from crcm.training import self_forcing as sf
from crcm.training.config import DISTILLATION, STAGES, load_config
from crcm.training.data import Batch
from crcm.training.trainer import (
    _slice,
    _Stage,
    micro_batches,
    noise_seed,
    resolve_precision,
    train,
)

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


@pytest.mark.parametrize("stage", DISTILLATION)
def test_every_distillation_stage_runs_from_the_teacher(tmp_path, teacher, stage):
    """A smoke test: every stage trains, logs, samples and exports. What each stage's loss is
    belongs to the objective tests (and, for joint rCM, to the tests below)."""
    # joint rCM's DMD term needs the bidirectional teacher too (any pipeline runs here)
    dmd = [f'dmd_teacher="{teacher}"'] if stage == "joint-rcm" else []
    cfg = config(
        tmp_path,
        stage,
        stage,
        "steps=2",
        f'init="{teacher}"',
        f'teacher="{teacher}"',
        *dmd,
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


def test_ode_init_solves_the_teachers_trajectories_with_ode_steps(tmp_path, teacher, monkeypatch):
    """``ode_steps`` is the Euler grid of the ODE pairs (each step a teacher forward per
    frame): the stage hands it to the solver."""
    seen: list[int] = []
    solve = sf.generate_ode_pairs

    def counting(*args, num_steps, **kwargs):
        seen.append(num_steps)
        return solve(*args, num_steps=num_steps, **kwargs)

    monkeypatch.setattr(sf, "generate_ode_pairs", counting)
    extra = [f'init="{teacher}"', f'teacher="{teacher}"', "max_steps=2", "ode_steps=3"]
    train(config(tmp_path, "ode", "ode-init", "steps=1", *extra), progress=False)
    assert seen == [3]
    with pytest.raises(ConfigError, match="ode_steps must be >= 1"):
        config(tmp_path, "bad", "ode-init", f'teacher="{teacher}"', "ode_steps=0")


def _random_pipeline(folder, seed: int):
    """A tiny pipeline whose zero-initialised layers (output head, action table) are random, so
    that every model in the joint tests gives its own, non-zero velocities."""
    pipe = Pipeline.from_config("tiny", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return pipe.save(folder)


@pytest.fixture(scope="module")
def joint_models(tmp_path_factory):
    """Three different models: the student's init, the causal teacher, the bidirectional one."""
    tmp = tmp_path_factory.mktemp("joint")
    names = ("student", "causal", "base")
    return {name: _random_pipeline(tmp / name, seed) for seed, name in enumerate(names, 1)}


def _stage(tmp_path, models, stage, *extra):
    links = [f'init="{models["student"]}"', f'teacher="{models["causal"]}"']
    if stage == "joint-rcm":
        links.append(f'dmd_teacher="{models["base"]}"')
    cfg = config(tmp_path, stage, stage, *links, "max_steps=2", "tangent_warmup_steps=0", *extra)
    return _Stage(cfg, dist_utils.setup("cpu"))


def _perturb(model, seed=7):
    """The fake score after some updates: no longer the teacher it was copied from."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _joint_replay(stage, step, batch, causal, real_score, *, scm_cfg, dmd_cfg, attention=None):
    """The joint stage's two terms built from the public objectives, drawing the micro-batch's
    noise in the trainer's order (the sCM term's, then the rollout's and the DMD term's)."""
    gen = torch.Generator().manual_seed(noise_seed(stage.cfg.seed, step, 0))
    common = dict(cond=batch.cond, actions_B_T=batch.actions_B_T, generator=gen)
    x0 = batch.x0_B_T_C_H_W
    B, T = x0.shape[:2]
    scm, _ = obj.tf_scm_loss(
        stage.student, causal, x0, step=step, chunk_frames=1, cfg_scale=scm_cfg,
        tangent_warmup_steps=0, **common,
    )  # fmt: skip
    rollout = sf.self_forcing_rollout(
        stage.student, stage._sampler_for(step, T), B, T, cond=batch.cond,
        actions_B_T=batch.actions_B_T, generator=gen,
    )  # fmt: skip
    dmd = sf.sf_dmd_loss(
        rollout, real_score, stage.fake_score, cfg_scale=dmd_cfg, attention=attention, **common
    )
    return scm, dmd


def test_joint_rcm_scores_sCM_with_the_causal_teacher_and_DMD_with_the_bidirectional_one(
    tmp_path, joint_models
):
    """L = L_sCM(causal teacher, cfg_scale) + λ·L_DMD(bidirectional teacher, full mask,
    dmd_cfg_scale): value, both terms and gradient equal the objectives computed alone on the
    same draws; the DMD term is not the one the causal teacher (or a causal mask) would give."""
    stage = _stage(
        tmp_path, joint_models, "joint-rcm", "dmd_weight=0.5", "cfg_scale=2.0", "dmd_cfg_scale=4.0"
    )
    causal = load(joint_models["causal"]).model.eval().requires_grad_(False)
    base = load(joint_models["base"]).model.eval().requires_grad_(False)
    # The fake score starts as a copy of the bidirectional teacher (the DMD real score).
    fake0 = stage.fake_score.state_dict()
    assert all(torch.equal(v, fake0[k]) for k, v in base.state_dict().items())
    _perturb(stage.fake_score)

    step = 3
    batch = stage.data.batch(step, 2)
    gen = torch.Generator().manual_seed(noise_seed(0, step, 0))
    stage.student.zero_grad(set_to_none=True)
    loss, logs = stage._loss(step, batch, gen)
    loss.backward()
    got = _grads(stage.student)

    stage.student.zero_grad(set_to_none=True)
    terms = dict(scm_cfg=2.0, dmd_cfg=4.0)
    scm, dmd = _joint_replay(stage, step, batch, causal, base, **terms)
    (scm + 0.5 * dmd).backward()
    want = _grads(stage.student)

    assert float(dmd.detach()) > 0 and float(scm.detach()) > 0  # both terms are live
    torch.testing.assert_close(logs["scm"], scm.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logs["dmd"], dmd.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), (scm + 0.5 * dmd).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logs["loss"], loss.detach())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)

    # The DMD term tells the teachers and masks apart (so the checks above can fail).
    with torch.no_grad():
        _, dmd_causal = _joint_replay(stage, step, batch, causal, causal, **terms)
        mask = block_causal_mask(
            2, 1, stage.student.tokens_per_frame(*batch.x0_B_T_C_H_W.shape[-2:])
        )
        _, dmd_masked = _joint_replay(stage, step, batch, causal, base, **terms, attention=mask)
    value = float(dmd.detach())
    assert abs(float(dmd_causal) - value) > 1e-3 * value
    assert abs(float(dmd_masked) - value) > 1e-3 * value


def test_joint_rcm_with_zero_dmd_weight_is_tf_scm(tmp_path, joint_models):
    """λ = 0: the joint loss and its gradient are TF-sCM's on the same micro-batch and seed,
    though the DMD term (logged) is not zero."""
    joint = _stage(tmp_path, joint_models, "joint-rcm", "dmd_weight=0")
    scm = _stage(tmp_path, joint_models, "tf-scm")
    _perturb(joint.fake_score)
    step = 2
    batch = joint.data.batch(step, 2)
    results = []
    for stage in (joint, scm):
        gen = torch.Generator().manual_seed(noise_seed(0, step, 0))
        loss, logs = stage._loss(step, batch, gen)
        loss.backward()
        results.append((loss.detach(), logs, _grads(stage.student)))
    (loss_j, logs_j, grads_j), (loss_s, _, grads_s) = results
    assert float(logs_j["dmd"]) > 0
    assert torch.equal(loss_j, loss_s)
    assert all(torch.equal(a, b) for a, b in zip(grads_j, grads_s, strict=True))


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
    """2 micro-batches of 2 on one process = 2 processes of 2: micro-batch i holds rows
    2i, 2i+1 of the global batch (what rank i loads) and the noise generator of global index i,
    and the step's gradient is the mean of the gradients the two processes compute."""
    env = dist_utils.setup("cpu")
    cut = _Stage(config(tmp_path, "a", "teacher-df", "batch_size=4", "micro_batch_size=2"), env)
    step = 1
    batch = cut.data.batch(step, 4, cut.rank_rows)
    shards = cut.micro_batches(step, batch)
    seeds = [g.initial_seed() for _, g in shards]
    assert seeds == [noise_seed(0, step, i) for i in (0, 1)] and seeds[0] != seeds[1]
    # One process of 2 per micro-batch: rank i's own rows of the global batch and its noise.
    alone = _Stage(config(tmp_path, "b", "teacher-df", "batch_size=2"), env)
    alone.student.load_state_dict(cut.student.state_dict())
    want = [torch.zeros_like(p) for p in alone.student.parameters()]
    for i, (part, _) in enumerate(shards):
        rows = cut.data.batch(step, 4, slice(2 * i, 2 * i + 2))  # what rank i loads
        assert torch.equal(rows.x0_B_T_C_H_W, part.x0_B_T_C_H_W)
        assert torch.equal(rows.actions_B_T, part.actions_B_T)
        gen = torch.Generator().manual_seed(noise_seed(0, step, i))
        alone.student.zero_grad(set_to_none=True)
        alone._loss(step, rows, gen)[0].backward()
        for w, p in zip(want, alone.student.parameters(), strict=True):
            w += p.grad / 2  # gradients averaged over the processes
    logs = cut.step(step, shards)  # the optimiser step leaves .grad in place
    assert logs["skipped"] == 0.0
    got = [p.grad for p in cut.student.parameters()]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert sum(float(w.norm()) for w in want) > 0  # not vacuous
    # One micro-batch of 4 draws one noise stream for all four samples: another gradient.
    whole = _Stage(config(tmp_path, "c", "teacher-df", "batch_size=4"), env)
    whole.student.load_state_dict(cut.student.state_dict())
    (whole_shard,) = whole.micro_batches(step, batch)
    whole.student.zero_grad(set_to_none=True)
    cut.student.zero_grad(set_to_none=True)
    whole._loss(step, *whole_shard)[0].backward()
    for part, gen in cut.micro_batches(step, batch):
        (cut._loss(step, part, gen)[0] / 2).backward()
    assert any(
        not torch.allclose(a.grad, b.grad)
        for a, b in zip(whole.student.parameters(), cut.student.parameters(), strict=True)
    )
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
    with pytest.raises(ConfigError, match="joint-rcm needs a dmd_teacher"):
        load_config(None, ['teacher="t"'], stage="joint-rcm")
    with pytest.raises(ConfigError, match="dmd_weight must be >= 0"):
        load_config(None, ['teacher="t"', 'dmd_teacher="b"', "dmd_weight=-1"], stage="joint-rcm")
    for stage in ("sf-dmd", "tf-scm"):
        with pytest.raises(ConfigError, match="dmd_teacher is a setting of stage joint-rcm only"):
            load_config(None, ['teacher="t"', 'dmd_teacher="b"'], stage=stage)
    with pytest.raises(ConfigError, match="dmd_cfg_scale is a setting of stage joint-rcm only"):
        load_config(None, ['teacher="t"', "dmd_cfg_scale=5.0"], stage="sf-dmd")
    with pytest.raises(ConfigError, match="fake_score_updates must be >= 1"):
        load_config(None, ['teacher="t"', "fake_score_updates=0"], stage="sf-dmd")
    joint = load_config(None, ['teacher="t"', 'dmd_teacher="b"'], stage="joint-rcm")
    assert (joint.guidance, joint.dmd_guidance) == (3.0, 5.0)  # sCM's and DMD's defaults
    dmd = load_config(None, ['teacher="t"'], stage="sf-dmd")
    assert dmd.guidance == dmd.dmd_guidance == 5.0
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
    # every stage but the TrigFlow variant ships (tests/python/training/test_recipes.py pins them)
    assert stages == set(STAGES) - {"trigflow-scm"}
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
