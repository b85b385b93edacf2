"""The trainer: runs one stage of the recipe from a :class:`TrainConfig`, resumably.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per logged step),
``checkpoints/`` (see :mod:`crcm.training.checkpoint`) and, at the end, ``pipeline/``: the EMA
student as a pipeline that ``crcm.load`` and later stages (``init=``/``teacher=``) read.

Every step draws its batch and its noise from generators seeded by ``(seed, step)``, so a run
stopped at any checkpoint and resumed produces exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from crcm.errors import ConfigError
from crcm.masks import block_causal_mask
from crcm.pipeline import Pipeline, load
from crcm.sampling import SamplerConfig, consistency_times
from crcm.training import objectives as obj
from crcm.training import self_forcing as sf
from crcm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from crcm.training.config import DMD, TrainConfig, config_to_dict
from crcm.training.data import Batch, MovingSquares

__all__ = ["load_stage_model", "train"]


def load_stage_model(path: str) -> Pipeline:
    """A pipeline from a run folder (its ``pipeline/``) or a pipeline folder / shipped name."""
    folder = Path(path)
    if (folder / "pipeline" / "crcm.json").is_file():
        return load(folder / "pipeline")
    return load(path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Stage:
    """The models, optimisers and step function of one stage."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        if cfg.init is not None:
            self.pipeline = load_stage_model(cfg.init)
        else:
            torch.manual_seed(cfg.seed)
            self.pipeline = Pipeline.from_config(cfg.model, seed=cfg.seed)
        self.student = self.pipeline.model.to(device).train()
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher = None
        if cfg.teacher is not None:
            self.teacher = load_stage_model(cfg.teacher).model.to(device).eval()
            self.teacher.requires_grad_(False)
            if self.teacher.cfg != self.student.cfg:
                raise ConfigError("the teacher and the student must share one DiT config")
        self.modules: dict[str, torch.nn.Module] = {"student": self.student, "ema": self.ema}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "student": torch.optim.AdamW(
                self.student.parameters(),
                lr=cfg.lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
            )
        }
        if cfg.stage in DMD:
            self.fake_score = sf.fake_score_from_teacher(self.teacher).train()
            self.modules["fake_score"] = self.fake_score
            self.optimizers["fake_score"] = torch.optim.AdamW(
                self.fake_score.parameters(),
                lr=cfg.fake_score_lr or cfg.lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
            )
        model_cfg = self.student.cfg
        self.data = MovingSquares(
            self.pipeline.codec,
            frames=cfg.data.frames,
            num_actions=model_cfg.num_actions,
            num_classes=model_cfg.num_classes if model_cfg.cond == "class" else 0,
            seed=cfg.data.seed,
        )
        if model_cfg.cond == "text":
            raise ConfigError("training on text conditions needs a text dataset (not shipped)")
        self.schedule = (
            sf.CycledStepSchedule()
            if cfg.step_schedule == "cycled"
            else sf.RandomExitSchedule(max_steps=cfg.max_steps)
        )
        self.times = tuple(consistency_times(4))

    def sampler(self, steps: tuple[int, ...]) -> SamplerConfig:
        return replace(
            self.pipeline.sampler,
            kind="consistency",
            cfg_scale=1.0,
            chunk_frames=self.cfg.chunk_frames,
            steps_per_chunk=steps,
            times=self.times,
            cache_update=self.cfg.cache_update,
        )

    def step(self, step: int, batch: Batch, gen: torch.Generator) -> dict[str, float]:
        """One optimisation step; returns what to log."""
        cfg, student = self.cfg, self.student
        common = {"cond": batch.cond, "actions_B_T": batch.actions_B_T, "generator": gen}
        x0 = batch.x0_B_T_C_H_W
        opt = self.optimizers["student"]
        opt.zero_grad(set_to_none=True)
        logs: dict[str, Tensor] = {}
        fake_loss = None
        if cfg.stage in DMD:
            fake_loss = self._fake_score_updates(step, batch, gen)
        if cfg.stage == "base":
            loss, logs = obj.flow_matching_loss(
                student, x0, cond_dropout=cfg.cond_dropout, **common
            )
        elif cfg.stage in ("teacher-tf", "teacher-df"):
            fn = obj.tf_teacher_loss if cfg.stage == "teacher-tf" else obj.df_teacher_loss
            extra = {"context_noise": cfg.context_noise} if cfg.stage == "teacher-tf" else {}
            loss, logs = fn(
                student,
                x0,
                chunk_frames=cfg.chunk_frames,
                cond_dropout=cfg.cond_dropout,
                **extra,
                **common,
            )
        elif cfg.stage in ("tf-scm", "trigflow-scm", "joint-rcm"):
            fn = obj.trigflow_scm_loss if cfg.stage == "trigflow-scm" else obj.tf_scm_loss
            loss, logs = fn(
                student,
                self.teacher,
                x0,
                step=step,
                chunk_frames=cfg.chunk_frames,
                cfg_scale=3.0 if cfg.stage == "joint-rcm" else cfg.guidance,
                tangent_warmup_steps=cfg.tangent_warmup_steps,
                context_noise=cfg.context_noise,
                **common,
            )
            if cfg.stage == "joint-rcm":
                rollout = sf.self_forcing_rollout(
                    student,
                    self._sampler_for(step, x0.shape[1]),
                    x0.shape[0],
                    x0.shape[1],
                    cond=batch.cond,
                    actions_B_T=batch.actions_B_T,
                    generator=gen,
                )
                dmd = sf.sf_dmd_loss(
                    rollout, self.teacher, self.fake_score, cfg_scale=cfg.guidance, **common
                )
                logs = {**logs, "dmd": dmd.detach()}
                loss = loss + cfg.dmd_weight * dmd
        elif cfg.stage == "tf-dcm":
            loss, logs = obj.tf_dcm_loss(
                student,
                self.teacher,
                x0,
                chunk_frames=cfg.chunk_frames,
                cfg_scale=cfg.guidance,
                context_noise=cfg.context_noise,
                **common,
            )
        elif cfg.stage == "sf-dmd":
            loss = sf.sf_dmd_step(
                student,
                self.teacher,
                self.fake_score,
                self._sampler_for(step, x0.shape[1]),
                x0.shape[0],
                x0.shape[1],
                cfg_scale=cfg.guidance,
                replay=cfg.replay,
                **common,
            )
        elif cfg.stage == "df-dmd":
            outputs = sf.diffusion_forcing_outputs(
                student,
                x0,
                self.times[: cfg.max_steps],
                cfg.chunk_frames,
                cond=batch.cond,
                actions_B_T=batch.actions_B_T,
                generator=gen,
            )
            loss = sf.sf_dmd_loss(
                outputs, self.teacher, self.fake_score, cfg_scale=cfg.guidance, **common
            )
        elif cfg.stage == "ode-init":
            noise = torch.randn(x0.shape, generator=gen, device=x0.device)
            times = self.times[: cfg.max_steps]
            mask = block_causal_mask(
                x0.shape[1], cfg.chunk_frames, student.tokens_per_frame(*x0.shape[-2:])
            )
            xs, target = sf.generate_ode_pairs(
                self.teacher,
                noise,
                times,
                cfg_scale=cfg.guidance,
                cond=batch.cond,
                actions_B_T=batch.actions_B_T,
                attention=mask,
            )
            loss = sf.ode_regression_loss(student, xs, target, times, cfg.chunk_frames, **common)
        else:  # pragma: no cover - the config validates the stage
            raise ConfigError(f"unknown stage {cfg.stage}")
        if loss.requires_grad:  # sf_dmd_step has already run backward
            loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            opt.step()
            self._update_ema()
        else:
            # A sample that overflowed poisons the whole step (0·inf inside the network is NaN
            # even when its loss was zeroed): skip it, log it, keep the weights.
            opt.zero_grad(set_to_none=True)
        logs = {**logs, "skipped": torch.tensor(0.0 if finite else 1.0)}
        if fake_loss is not None:
            logs = {**logs, "fake_score_loss": fake_loss}
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}

    def _sampler_for(self, step: int, frames: int) -> SamplerConfig:
        num_chunks = frames // self.cfg.chunk_frames
        return self.sampler(self.schedule.steps(step, num_chunks))

    def _fake_score_updates(self, step: int, batch: Batch, gen: torch.Generator) -> Tensor:
        cfg, x0 = self.cfg, batch.x0_B_T_C_H_W
        fake_opt = self.optimizers["fake_score"]
        total = torch.zeros(())
        for _ in range(cfg.fake_score_updates):
            with torch.no_grad():
                if cfg.stage != "df-dmd":  # sf-dmd and joint rCM: self-forced samples
                    samples = sf.self_forcing_rollout(
                        self.student,
                        self._sampler_for(step, x0.shape[1]),
                        x0.shape[0],
                        x0.shape[1],
                        cond=batch.cond,
                        actions_B_T=batch.actions_B_T,
                        generator=gen,
                    )
                else:
                    samples = sf.diffusion_forcing_outputs(
                        self.student,
                        x0,
                        self.times[: cfg.max_steps],
                        cfg.chunk_frames,
                        cond=batch.cond,
                        actions_B_T=batch.actions_B_T,
                        generator=gen,
                    )
            fake_opt.zero_grad(set_to_none=True)
            loss = sf.fake_score_loss(
                self.fake_score,
                samples,
                cond=batch.cond,
                actions_B_T=batch.actions_B_T,
                generator=gen,
            )
            loss.backward()
            fake_opt.step()
            total = total + loss.detach().cpu()
        return total / cfg.fake_score_updates

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.ema_decay
        for p_ema, p in zip(self.ema.parameters(), self.student.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - decay)


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Runs (or resumes) the stage; returns the run folder. ``stop_after`` ends the process
    early after that many steps of this call (a checkpoint is written), as a crash would."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    meta = config_to_dict(cfg)
    if config_file.is_file():
        previous = json.loads(config_file.read_text())
        changed = sorted(k for k in meta if previous.get(k) != meta[k] and k != "steps")
        if changed:
            raise ConfigError(
                f"{out} holds a run with a different config ({', '.join(changed)}); use a new "
                "out folder or the same config"
            )
    config_file.write_text(json.dumps(meta, indent=2))
    device = _device(cfg.device)
    stage = _Stage(cfg, device)
    start = 0
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, stage.modules, stage.optimizers).step
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=cfg.stage, unit="step")
    metrics = (out / "metrics.jsonl").open("a")
    done_here = 0
    t_last, samples = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            for group in stage.optimizers["student"].param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
            batch = stage.data.batch(step, cfg.batch_size).to(device)
            logs = stage.step(step, batch, gen)
            samples += cfg.batch_size
            done_here += 1
            if on_step is not None:
                on_step(step, logs)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.perf_counter()
                record = {"step": step + 1, **logs, "samples_per_s": samples / (now - t_last)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                t_last, samples = now, 0
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
            bar.update(1)
            last = step + 1 == cfg.steps or (stop_after is not None and done_here >= stop_after)
            if (step + 1) % cfg.checkpoint_every == 0 or last:
                save_checkpoint(
                    out, step + 1, stage.modules, stage.optimizers, keep=cfg.keep_checkpoints
                )
            if last:
                break
    finally:
        bar.close()
        metrics.close()
    if (latest := latest_checkpoint(out)) is not None and latest.name == f"step-{cfg.steps:08d}":
        final = Pipeline(
            model=stage.ema,
            codec=stage.pipeline.codec,
            sampler=stage.pipeline.sampler,
            action_names=stage.pipeline.action_names,
            name=f"{stage.pipeline.name}",
        )
        final.save(out / "pipeline")
    return out
