"""The trainer: runs one stage of the recipe from a :class:`TrainConfig`, resumably.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per logged step),
``checkpoints/`` (see :mod:`crcm.training.checkpoint`), ``samples/step-XXXXXXXX.npy`` (EMA
sample videos, uint8 ``[T, H, W, C]``, every ``sample_every`` steps) and, at the end,
``pipeline/``: the EMA student as a pipeline that ``crcm.load`` and later stages
(``init=``/``teacher=``) read.

Every step draws its batch from ``(data.seed, step)`` and its noise from generators seeded by
``(seed, step, micro-batch)``, so a run stopped at any checkpoint and resumed produces exactly the
weights of an uninterrupted run.

Under ``torchrun`` (see :mod:`crcm.training.distributed`) the student, EMA and fake score are
FSDP2-sharded; every rank loads only its contiguous micro-batches of the global batch, and the
gradients are averaged over all micro-batches of all ranks. Files are written by rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crcm.errors import ConfigError
from crcm.masks import block_causal_mask
from crcm.models import CausalDiT
from crcm.pipeline import Pipeline, load
from crcm.sampling import SamplerConfig, consistency_times, get_preset
from crcm.training import distributed as dist_utils
from crcm.training import objectives as obj
from crcm.training import self_forcing as sf
from crcm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from crcm.training.config import DMD, TrainConfig, config_to_dict
from crcm.training.data import Batch, make_source

__all__ = ["load_stage_model", "train"]


def load_stage_model(path: str) -> Pipeline:
    """A pipeline from a run folder (its ``pipeline/``) or a pipeline folder / shipped name."""
    folder = Path(path)
    if (folder / "pipeline" / "crcm.json").is_file():
        return load(folder / "pipeline")
    return load(path)


TEACHER_STAGES = ("base", "teacher-tf", "teacher-df")
# Stages whose loss reads the student's weights outside ``student(...)`` (the layer-wise JVP):
# under FSDP their weights are gathered around the loss (distributed.gathered_params).
JVP_STAGES = ("tf-scm", "trigflow-scm", "joint-rcm")
SAMPLE_EULER_STEPS = 16  # teachers' sample videos: Euler steps per chunk (with CFG 3)


def with_pixel_head(model: CausalDiT, width: int, seed: int) -> CausalDiT:
    """``model`` with a new pixel head of ``width`` channels (zero output: the same model)."""
    torch.manual_seed(seed)
    like = next(model.parameters())
    grown = CausalDiT(replace(model.cfg, pixel_head=width)).to(like.device, like.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pixel_head.") for k in missing):
        raise ConfigError(f"cannot add a pixel head: weights {missing + unexpected} do not match")
    return grown


def noise_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of micro-batch ``micro_batch``'s noise generator at ``step``.

    Micro-batch 0 keeps the single-process seed ``seed·1000003 + step``; the others are offset
    by 2^40 each (far above any step count), so their streams never coincide with it."""
    return (seed * 1_000_003 + step + micro_batch * (1 << 40)) % (1 << 63)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.precision``, or bf16 on CUDA and fp32 elsewhere."""
    if cfg.precision is not None:
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return batch.map(lambda t: t[start:stop])


def micro_batches(
    batch: Batch, *, step: int, seed: int, size: int, rank: int, per_rank: int, device: torch.device
) -> list[tuple[Batch, torch.Generator]]:
    """Rank ``rank``'s micro-batches: ``batch`` holds the rank's rows of the global batch
    (:meth:`_Stage.rank_rows`), the contiguous micro-batches ``rank·per_rank …
    (rank+1)·per_rank − 1`` of ``size`` samples; each gets the noise generator of its global
    index (:func:`noise_seed`)."""
    out = []
    for local, index in enumerate(range(rank * per_rank, (rank + 1) * per_rank)):
        gen = torch.Generator(device=device).manual_seed(noise_seed(seed, step, index))
        out.append((_slice(batch, local * size, (local + 1) * size), gen))
    return out


def _scale_grads(module: torch.nn.Module, factor: float) -> None:
    """Gradients summed over micro-batches → their mean (FSDP averages over ranks itself)."""
    if factor != 1.0:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


def _mean_logs(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


class _Stage:
    """The models, optimisers and step function of one stage."""

    def __init__(self, cfg: TrainConfig, env: dist_utils.DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        device = env.device
        self.device = device
        self.precision = resolve_precision(cfg, device)
        world = env.world_size
        self.micro_batch_size = cfg.micro_batch_size or cfg.batch_size // world
        count = cfg.batch_size // max(1, self.micro_batch_size)
        if (
            self.micro_batch_size < 1
            or count * self.micro_batch_size != cfg.batch_size
            or count % world
        ):
            raise ConfigError(
                f"batch_size={cfg.batch_size} does not split evenly over {world} processes in "
                f"micro-batches of {cfg.micro_batch_size or 'batch_size / processes'} samples"
            )
        self.micro_batches_per_rank = count // world
        if cfg.init is not None:
            self.pipeline = load_stage_model(cfg.init)
        else:
            # A model trained on clips of F frames has seen at most F − C earlier frames: that is
            # the window it streams with (later stages inherit the pipeline's sampler).
            window = cfg.data.frames - cfg.chunk_frames
            self.pipeline = Pipeline.from_config(
                cfg.model, seed=cfg.seed, sampler=SamplerConfig(window_frames=max(window, 1))
            )
        if cfg.still_threshold is not None:
            self.pipeline.sampler = replace(
                self.pipeline.sampler, still_threshold=cfg.still_threshold
            )
        if cfg.pixel_head is not None and not self.pipeline.model.cfg.pixel_head:
            self.pipeline.model = with_pixel_head(self.pipeline.model, cfg.pixel_head, cfg.seed)
        self.student = self.pipeline.model.to(device).train()
        if cfg.trainable == "pixel_head":
            if self.student.pixel_head is None:
                raise ConfigError(
                    'trainable = "pixel_head" needs a model with a pixel head: set pixel_head '
                    "(its width) to add one"
                )
            self.student.requires_grad_(False)
            self.student.pixel_head.requires_grad_(True)
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)

        def frozen(path: str | None, what: str) -> torch.nn.Module | None:
            if path is None:
                return None
            model = load_stage_model(path).model.to(device).eval().requires_grad_(False)
            if model.cfg != self.student.cfg:
                raise ConfigError(f"the {what} and the student must share one DiT config")
            return model

        # The frozen teachers: `teacher` (the causal teacher, or for sf-dmd / df-dmd the DMD
        # real score) and, for joint rCM, `dmd_teacher` (the bidirectional base model that scores
        # the DMD term while the causal teacher scores the sCM term).
        self.teacher = frozen(cfg.teacher, "teacher")
        self.dmd_teacher = frozen(cfg.dmd_teacher, "dmd_teacher")
        # The DMD real score, queried with the full mask; the fake score starts as a copy of it.
        self.real_score = self.dmd_teacher if cfg.stage == "joint-rcm" else self.teacher
        self.fake_score = None
        if cfg.stage in DMD:
            self.fake_score = sf.fake_score_from_teacher(self.real_score).train()
        if env.distributed:
            # Shard before the optimisers exist: they must hold the DTensor shards. The frozen
            # teacher stays replicated (see crcm.training.distributed).
            for module in (self.student, self.ema, self.fake_score):
                if module is not None:
                    dist_utils.shard(module, env)
        self.modules: dict[str, torch.nn.Module] = {"student": self.student, "ema": self.ema}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "student": torch.optim.AdamW(
                [p for p in self.student.parameters() if p.requires_grad],
                lr=cfg.lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
            )
        }
        if self.fake_score is not None:
            self.modules["fake_score"] = self.fake_score
            self.optimizers["fake_score"] = torch.optim.AdamW(
                self.fake_score.parameters(),
                lr=cfg.fake_score_lr or cfg.lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
            )
        self.data = make_source(cfg.data, self.pipeline.codec, self.student.cfg)
        if not self.pipeline.action_names:  # e.g. the game's action names of an Atari dataset
            self.pipeline.action_names = self.data.action_names
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forwards when ``precision = "bf16"`` (weights stay fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def rank_rows(self) -> slice:
        """This rank's rows of the global batch: only these are loaded."""
        per_rank = self.micro_batches_per_rank * self.micro_batch_size
        return slice(self.env.rank * per_rank, (self.env.rank + 1) * per_rank)

    def micro_batches(self, step: int, batch: Batch) -> list[tuple[Batch, torch.Generator]]:
        """This rank's micro-batches of its rows ``batch`` with their noise generators."""
        return micro_batches(
            batch,
            step=step,
            seed=self.cfg.seed,
            size=self.micro_batch_size,
            rank=self.env.rank,
            per_rank=self.micro_batches_per_rank,
            device=self.device,
        )

    def step(self, step: int, shards: list[tuple[Batch, torch.Generator]]) -> dict[str, float]:
        """One optimisation step over this rank's micro-batches; returns what to log (averaged
        over the micro-batches of every rank)."""
        student = self.student
        opt = self.optimizers["student"]
        opt.zero_grad(set_to_none=True)
        fake_loss = None
        if self.cfg.stage in DMD:
            fake_loss = self._fake_score_updates(step, shards)
        records = []
        for batch, gen in shards:
            gather = self.env.distributed and self.cfg.stage in JVP_STAGES
            with (
                self.autocast(),
                dist_utils.gathered_params(student) if gather else contextlib.nullcontext(),
            ):
                loss, logs = self._loss(step, batch, gen)
                if loss.requires_grad:  # sf_dmd_step has already run backward
                    loss.backward()
            records.append({"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}})
        _scale_grads(student, 1.0 / len(shards))
        grads = [dist_utils.local(p.grad) for p in student.parameters() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        # Every rank must take the same decision, or the shards of one model would diverge.
        finite = dist_utils.all_true(finite, self.device)
        if finite:
            opt.step()
            self._update_ema()
        else:
            # A sample that overflowed poisons the whole step (0·inf inside the network is NaN
            # even when its loss was zeroed): skip it, log it, keep the weights.
            opt.zero_grad(set_to_none=True)
        logs = {**_mean_logs(records), "skipped": 0.0 if finite else 1.0}
        if fake_loss is not None:
            logs = {**logs, "fake_score_loss": fake_loss}
        return dist_utils.all_reduce_mean(logs, self.device)

    def _loss(self, step: int, batch: Batch, gen: torch.Generator) -> tuple[Tensor, dict]:
        """The student's loss on one micro-batch (for sf-dmd: after its own backward)."""
        cfg, student = self.cfg, self.student
        common = {"cond": batch.cond, "actions_B_T": batch.actions_B_T, "generator": gen}
        # The frames before the clip, for the previous-frame inputs of its first frames (the
        # teacher-forcing objectives; self-forced rollouts make their own past).
        past = {"history_B_K_C_H_W": batch.history_B_K_C_H_W}
        # How the teacher-forced stages augment the clean context (docs/training.md).
        augment = {
            "context_noise": cfg.context_noise,
            "context_ghosts": cfg.context_ghosts,
            "context_speckle": cfg.context_speckle,
        }
        x0 = batch.x0_B_T_C_H_W
        logs: dict[str, Tensor] = {}
        weights = {"bell": obj.bell_weight, "uniform": None, "x0": obj.x0_weight}
        default = "bell" if cfg.stage == "teacher-tf" else "uniform"
        teacher_terms = {
            "cond_dropout": cfg.cond_dropout,
            "action_dropout": cfg.action_dropout,
            "change_weight": cfg.change_weight,
            "weight": weights[default if cfg.time_weight == "default" else cfg.time_weight],
        }
        if cfg.stage == "base":
            loss, logs = obj.flow_matching_loss(
                student, x0, shift=cfg.time_shift, **teacher_terms, **common, **past
            )
        elif cfg.stage in ("teacher-tf", "teacher-df"):
            fn = obj.tf_teacher_loss if cfg.stage == "teacher-tf" else obj.df_teacher_loss
            extra = (
                {
                    "self_context": cfg.self_context,
                    "self_context_depth": cfg.self_context_depth,
                    "still_threshold": self.pipeline.sampler.still_threshold,
                    **augment,
                }
                if cfg.stage == "teacher-tf"
                else {}
            )
            loss, logs = fn(
                student,
                x0,
                chunk_frames=cfg.chunk_frames,
                shift=cfg.time_shift,
                **teacher_terms,
                **extra,
                **common,
                **past,
            )
        elif cfg.stage in ("tf-scm", "trigflow-scm", "joint-rcm"):
            fn = obj.trigflow_scm_loss if cfg.stage == "trigflow-scm" else obj.tf_scm_loss
            loss, logs = fn(
                student,
                self.teacher,
                x0,
                step=step,
                chunk_frames=cfg.chunk_frames,
                cfg_scale=cfg.guidance,
                tangent_warmup_steps=cfg.tangent_warmup_steps,
                **augment,
                **common,
                **past,
            )
            if cfg.stage == "joint-rcm":
                # L = L_sCM + λ·L_DMD. The sCM term above: the causal teacher under teacher
                # forcing (clean context), guidance cfg_scale. The DMD term: SF-DMD on a
                # grad-carrying self-forced rollout, real score = the bidirectional teacher
                # (dmd_teacher) with the full mask and dmd_cfg_scale, against the fake score.
                # Noise continues from the same generator, after the sCM term's draws.
                rollout = sf.self_forcing_rollout(
                    student,
                    self._sampler_for(step, x0.shape[1]),
                    x0.shape[0],
                    x0.shape[1],
                    cond=batch.cond,
                    actions_B_T=batch.actions_B_T,
                    generator=gen,
                    context_B_K_C_H_W=self._rollout_context(x0),
                )
                dmd = sf.sf_dmd_loss(
                    rollout,
                    self.real_score,
                    self.fake_score,
                    cfg_scale=cfg.dmd_guidance,
                    attention=None,  # full mask: the bidirectional teacher's own
                    **common,
                )
                scm = loss
                loss = scm + cfg.dmd_weight * dmd
                logs = {**logs, "loss": loss.detach(), "scm": scm.detach(), "dmd": dmd.detach()}
        elif cfg.stage == "tf-dcm":
            loss, logs = obj.tf_dcm_loss(
                student,
                self.teacher,
                x0,
                chunk_frames=cfg.chunk_frames,
                cfg_scale=cfg.guidance,
                **augment,
                **common,
                **past,
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
                context_B_K_C_H_W=self._rollout_context(x0),
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
                num_steps=cfg.ode_steps,
                cfg_scale=cfg.guidance,
                cond=batch.cond,
                actions_B_T=batch.actions_B_T,
                attention=mask,
            )
            loss = sf.ode_regression_loss(student, xs, target, times, cfg.chunk_frames, **common)
        else:  # pragma: no cover - the config validates the stage
            raise ConfigError(f"unknown stage {cfg.stage}")
        return loss, logs

    def _rollout_context(self, x0_B_T_C_H_W: Tensor) -> Tensor | None:
        """The ground-truth frames a self-forcing rollout starts from (``rollout_context_frames``
        of the clip), or None: roll out from nothing."""
        n = self.cfg.rollout_context_frames
        return x0_B_T_C_H_W[:, :n] if n else None

    def _sampler_for(self, step: int, frames: int) -> SamplerConfig:
        num_chunks = frames // self.cfg.chunk_frames
        return self.sampler(self.schedule.steps(step, num_chunks))

    def _fake_score_updates(self, step: int, shards: list[tuple[Batch, torch.Generator]]) -> float:
        fake_opt = self.optimizers["fake_score"]
        total = 0.0
        for _ in range(self.cfg.fake_score_updates):
            fake_opt.zero_grad(set_to_none=True)
            loss = 0.0
            for batch, gen in shards:
                with self.autocast():
                    loss += self._fake_score_loss(step, batch, gen) / len(shards)
            _scale_grads(self.fake_score, 1.0 / len(shards))
            fake_opt.step()
            total += loss
        return total / self.cfg.fake_score_updates

    def _fake_score_loss(self, step: int, batch: Batch, gen: torch.Generator) -> float:
        """One micro-batch of a fake-score update: fresh student samples, v-MSE, backward."""
        cfg, x0 = self.cfg, batch.x0_B_T_C_H_W
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
                    context_B_K_C_H_W=self._rollout_context(x0),
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
        loss = sf.fake_score_loss(
            self.fake_score,
            samples,
            cond=batch.cond,
            actions_B_T=batch.actions_B_T,
            generator=gen,
        )
        loss.backward()
        return float(loss.detach())

    def plain_ema(self) -> torch.nn.Module | None:
        """The EMA student as an ordinary module: on rank 0 a gathered copy (every rank must
        call this: gathering is a collective), None on the other ranks."""
        if not dist_utils.is_sharded(self.ema):
            return copy.deepcopy(self.ema)  # the runtime moves and re-modes what it is given
        full = {k: dist_utils.full_tensor(v) for k, v in self.ema.state_dict().items()}
        if not self.env.is_main:
            return None
        model = type(self.pipeline.model)(self.student.cfg)
        model.load_state_dict(full)
        return model.to(self.device).eval().requires_grad_(False)

    def pipeline_of(self, model: torch.nn.Module) -> Pipeline:
        sampler = self.pipeline.sampler
        if self.cfg.stage in ("sf-dmd", "joint-rcm"):
            # A self-forced student streams the way its rollouts ran: cache update or noisy
            # context.
            sampler = replace(sampler, cache_update=self.cfg.cache_update)
        return Pipeline(
            model=model,
            codec=self.pipeline.codec,
            sampler=sampler,
            action_names=self.pipeline.action_names,
            name=f"{self.pipeline.name}",
        )

    @torch.no_grad()
    def sample_video(self, model: torch.nn.Module) -> np.ndarray:
        """A short rollout of ``model`` through the streaming runtime, ``uint8 [T, H, W, C]``.

        Distilled stages stream with the consistency sampler (``max_steps`` steps per chunk);
        teachers with Euler + CFG, the bidirectional base model as one chunk of the whole clip.
        Conditions (actions, class) are those of the first clip of step 0 and the noise seed is
        the run's, so successive samples differ only by the weights."""
        from crcm.runtime import Runtime

        cfg = self.cfg
        frames = cfg.data.frames
        if cfg.stage in TEACHER_STAGES:
            chunk = frames if cfg.stage == "base" else cfg.chunk_frames
            if model.cfg.prev_frames:  # a frame-conditioned model streams frame by frame
                chunk = 1
            preset = get_preset("teacher", SAMPLE_EULER_STEPS, shift=cfg.time_shift)
            sampler = replace(preset, chunk_frames=chunk)
        else:
            sampler = self.sampler((cfg.max_steps,))
        first = self.data.batch(0, 1)
        runtime = Runtime(
            self.pipeline_of(model),
            max_streams=1,
            context_frames=frames + sampler.chunk_frames,
            cfg=sampler.kind == "euler" and sampler.cfg_scale != 1.0,
            device=self.device,
        )
        with runtime:
            session = runtime.open(
                sampler=sampler,
                cond=None if first.cond is None else int(first.cond[0]),
                seed=cfg.seed,
                max_frames=frames,
            )
            if first.actions_B_T is not None:
                session.push_actions([int(a) for a in first.actions_B_T[0]])
            video = np.stack(list(itertools.islice(session.frames(), frames)))
        return video.astype(np.uint8, copy=False)

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
    early after that many steps of this call (a checkpoint is written), as a crash would.

    Under ``torchrun`` every rank calls this; the process group is joined here (and left at the
    end when it was joined here). Progress, metrics, samples and files come from rank 0;
    ``on_step`` is called on every rank with the logs averaged over ranks."""
    env = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, env, progress=progress, stop_after=stop_after, on_step=on_step)
    finally:
        dist_utils.teardown(env)


# Keys a resumed run may change: how long it runs and how often it writes samples.
_RESUMABLE_CHANGES = ("steps", "sample_every")


def _check_config(out: Path, meta: dict) -> None:
    config_file = out / "config.json"
    if not config_file.is_file():
        return
    previous = json.loads(config_file.read_text())
    # Keys added after a run started compare as their defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = sorted(
        k
        for k in meta
        if previous.get(k, defaults.get(k)) != meta[k] and k not in _RESUMABLE_CHANGES
    )
    if changed:
        raise ConfigError(
            f"{out} holds a run with a different config ({', '.join(changed)}); use a new "
            "out folder or the same config"
        )


def _train(
    cfg: TrainConfig,
    env: dist_utils.DistEnv,
    *,
    progress: bool,
    stop_after: int | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> Path:
    out = Path(cfg.out)
    meta = config_to_dict(cfg)
    _check_config(out, meta)  # on every rank: they all raise the same error
    dist_utils.barrier()  # …before rank 0 rewrites the file
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(meta, indent=2))
    stage = _Stage(cfg, env)
    start = 0
    dist_utils.barrier()
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, stage.modules, stage.optimizers).step
    from tqdm import tqdm

    main = env.is_main
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not (progress and main), desc=cfg.stage, unit="step"
    )
    metrics = (out / "metrics.jsonl").open("a") if main else None
    done_here = 0
    t_last, samples = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            for group in stage.optimizers["student"].param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
            # The global batch is a pure function of (data seed, step); each rank loads and
            # trains on its own rows of it.
            batch = stage.data.batch(step, cfg.batch_size, stage.rank_rows).to(env.device)
            logs = stage.step(step, stage.micro_batches(step, batch))
            samples += cfg.batch_size
            done_here += 1
            if on_step is not None:
                on_step(step, logs)
            if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                now = time.perf_counter()
                record = {"step": step + 1, **logs, "samples_per_s": samples / (now - t_last)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                t_last, samples = now, 0
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
            bar.update(1)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                _write_sample(stage, out, step + 1)
            last = step + 1 == cfg.steps or (stop_after is not None and done_here >= stop_after)
            if (step + 1) % cfg.checkpoint_every == 0 or last:
                save_checkpoint(
                    out, step + 1, stage.modules, stage.optimizers, keep=cfg.keep_checkpoints
                )
            if last:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if (latest := latest_checkpoint(out)) is not None and latest.name == f"step-{cfg.steps:08d}":
        ema = stage.plain_ema()  # every rank: gathering the shards is a collective
        if ema is not None:
            stage.pipeline_of(ema).save(out / "pipeline")
        dist_utils.barrier()
    return out


def _write_sample(stage: _Stage, out: Path, step: int) -> None:
    """``<run>/samples/step-XXXXXXXX.npy``: a uint8 EMA video, written atomically, no pickle."""
    ema = stage.plain_ema()  # every rank (a collective); rank 0 renders
    if ema is not None:
        video = stage.sample_video(ema)
        folder = out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".step-{step:08d}.npy.tmp"
        with tmp.open("wb") as f:
            np.save(f, video, allow_pickle=False)
        os.replace(tmp, folder / f"step-{step:08d}.npy")
    dist_utils.barrier()
