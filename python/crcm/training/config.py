"""Training configs: one dataclass, one TOML file per stage, ``key=value`` overrides.

    # configs/causal-rcm/2-tf-scm.toml
    stage = "tf-scm"
    init = "runs/teacher"        # the student starts from the causal teacher
    teacher = "runs/teacher"
    steps = 2000
    [data]
    kind = "moving-squares"

Stages (design §1.3): ``base`` (stage 0), ``teacher-tf`` / ``teacher-df`` (stage 1), ``tf-scm`` /
``tf-dcm`` / ``trigflow-scm`` (stage 2), ``sf-dmd`` (stage 3), and the baselines' stages
``df-dmd`` (CausVid-style), ``ode-init`` (Self-Forcing's ODE regression) and ``joint-rcm``
(L_sCM + λ·L_DMD). A recipe is a sequence of stage configs.

Teachers. Every distillation stage names its frozen ``teacher``, guided with ``cfg_scale``: the
causal teacher for the consistency stages (``tf-scm``, ``tf-dcm``, ``trigflow-scm``) and
``ode-init``; the DMD real score, usually the bidirectional base model of stage 0, for ``sf-dmd``
and ``df-dmd`` (their fake score starts as a copy of it). ``joint-rcm`` needs both at once:

    stage = "joint-rcm"
    teacher = "runs/teacher-tf"      # causal TF teacher: the sCM term (clean context), cfg_scale
    dmd_teacher = "runs/base"        # bidirectional base: the DMD term's real score (full mask)
    dmd_cfg_scale = 5.0              #   and its guidance; the fake score starts as a copy of it
    dmd_weight = 0.01                # λ
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from crcm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Stage = Literal[
    "base",
    "teacher-tf",
    "teacher-df",
    "tf-scm",
    "tf-dcm",
    "trigflow-scm",
    "sf-dmd",
    "df-dmd",
    "ode-init",
    "joint-rcm",
]
STAGES: tuple[str, ...] = get_args(Stage)
DISTILLATION = ("tf-scm", "tf-dcm", "trigflow-scm", "sf-dmd", "df-dmd", "ode-init", "joint-rcm")
DMD = ("sf-dmd", "df-dmd", "joint-rcm")


@dataclass(frozen=True)
class DataConfig:
    """Where clips come from: ``moving-squares`` (synthetic, made on the fly) or ``atari`` (a
    dataset written by ``crcm collect`` at ``path``; the game id becomes the class condition
    of a ``cond = "class"`` model)."""

    kind: Literal["moving-squares", "atari"] = "moving-squares"
    frames: int = 6
    seed: int = 0
    path: str | None = None  # the dataset folder of kind "atari"

    def __post_init__(self) -> None:
        if self.kind not in ("moving-squares", "atari"):
            raise ConfigError(f'data.kind must be "moving-squares" or "atari", got {self.kind!r}')
        if self.frames < 1:
            raise ConfigError(f"data.frames must be >= 1, got {self.frames}")
        if (self.kind == "atari") != (self.path is not None):
            raise ConfigError('data.path names the dataset of kind "atari" (and only of it)')


@dataclass(frozen=True)
class TrainConfig:
    stage: Stage
    out: str = "runs/crcm"
    model: str = "tiny"  # a DiT config name, used when nothing is loaded from `init`
    init: str | None = None  # run folder or pipeline to start the student from
    # run folder or pipeline of the frozen teacher (distillation): the causal teacher of the
    # consistency stages, ode-init and joint-rcm's sCM term; the DMD real score of sf-dmd/df-dmd
    teacher: str | None = None
    # joint-rcm only: the DMD term's real score (the bidirectional base model, queried with the
    # full mask), also the fake score's initialisation
    dmd_teacher: str | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    # AdamW betas: (0.9, 0.999) for stages 0-1, (0, 0.999) for distillation (the papers').
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.01
    lr_warmup_steps: int = 0
    ema_decay: float = 0.99
    chunk_frames: int = 1
    # UniformShift(k) of the base and teacher stages' times (and of their sample videos' Euler
    # grid). k = 5 (the papers', for large latent videos) spends most steps at high noise;
    # small pixel-space frames with small objects need the low-noise end too: k = 1 (uniform).
    time_shift: float = 5.0  # crcm.sampling.DEFAULT_SHIFT (this module stays free of torch)
    cond_dropout: float = 0.1
    # Base and teacher stages: each sample loses its actions (→ the null action) with this
    # probability, so the unconditional branch that guidance distils against is a trained one.
    action_dropout: float = 0.0
    # Base and teacher stages: pixels that change from the previous frame weigh 1 + this in the
    # loss (crcm.training.objectives.change_weights): what moves is a small part of a game frame.
    change_weight: float = 0.0
    # Base and teacher stages' loss weight over time: "bell" (0 at s = 0 and s = 1, the paper's
    # for the TF teacher), "uniform" (the plain v-MSE), "x0" (s², which makes it the squared
    # error of the clean frame x0̂ = x_s − s·v, the same at every noise level: for an
    # x0-predicting model the v-MSE would weigh low noise by 1/s², and a 1-step student starts
    # at s ≈ 1), or "default": bell for teacher-tf, uniform for base and teacher-df.
    time_weight: Literal["default", "bell", "uniform", "x0"] = "default"
    # Teacher-forced stages (teacher-tf, tf-scm, tf-dcm): the clean context and previous frames
    # are noised to an RF time U(0, context_noise) per clip (context augmentation).
    context_noise: float = 0.0
    # teacher-tf: each clip's context is, with this probability, the model's own 1-step
    # predictions of its frames (each from the true frames before it, no gradient) instead of
    # the true frames; the targets stay true. It shows the model the frames it will stream
    # from and trains it to pull the next frame back to the data (scheduled sampling).
    self_context: float = 0.0
    # ... and that context is the model's own rollout this many frames deep (1: each frame
    # predicted from true frames; clip frames − 1: the whole clip generated frame by frame).
    self_context_depth: int = 1
    # Teacher-forced stages: with this probability a clip's context carries faint remains of
    # where things were (each frame blended with the mean of the few before it;
    # objectives.ghost_frames), the targets stay true: the model learns to erase what its
    # smeared 1-step frames leave behind.
    context_ghosts: float = 0.0
    # ... and with this probability, dust: the same few pixels of every context frame offset
    # by up to 64 grey levels (objectives.speckle_frames), as a stream's residual noise leaves
    # it once it passes the still threshold.
    context_speckle: float = 0.0
    # The sampler's still threshold (crcm.sampling.SamplerConfig; model space): the run's
    # pipeline streams with it, and teacher-tf's own-rollout context is held the same way.
    # None: the init pipeline's (0 for a model from scratch).
    still_threshold: float | None = None
    # Give the init model a pixel head of this width if it has none (DiTConfig.pixel_head; its
    # output starts at zero, so the model starts as it was). None: keep the model's.
    pixel_head: int | None = None
    # Which weights the stage trains: "all", or "pixel_head" (the rest frozen: a cheap stage
    # that teaches the head what the patch head cannot place, on the frozen network's output).
    trainable: Literal["all", "pixel_head"] = "all"
    # guidance of `teacher`: by default 3 for consistency distillation, ode-init and joint-rcm's
    # sCM term, 5 for the DMD teacher of sf-dmd / df-dmd
    cfg_scale: float | None = None
    dmd_cfg_scale: float | None = None  # joint-rcm only: guidance of `dmd_teacher` (default 5)
    tangent_warmup_steps: int = 1000
    # ode-init: Euler steps of the teacher's trajectories that the student regresses (the
    # student's own times are added to the grid). Each costs a teacher forward per frame.
    ode_steps: int = 48
    # SF-DMD
    fake_score_updates: int = 5
    fake_score_lr: float | None = None
    step_schedule: Literal["cycled", "random"] = "cycled"
    max_steps: int = 4
    cache_update: bool = True
    # Self-forcing rollouts (sf-dmd, joint-rcm) start from this many ground-truth frames of the
    # clip, as a session opened on context does, and generate the rest (0: from nothing).
    rollout_context_frames: int = 0
    replay: bool = False
    dmd_weight: float = 0.01  # λ of joint rCM
    # scale: the global batch is cut into micro-batches of `micro_batch_size` samples (default:
    # one per process); micro-batch i draws its noise from (seed, step, i) and ranks take
    # contiguous micro-batches, so a fixed micro_batch_size gives the same run on any number of
    # processes (up to float reduction order). Gradients are averaged over micro-batches.
    micro_batch_size: int | None = None
    # "bf16": autocast forwards in bfloat16, fp32 master weights and optimizer state.
    # None: bf16 on CUDA, fp32 on CPU.
    precision: Literal["fp32", "bf16"] | None = None
    # bookkeeping
    sample_every: int = 0  # write an EMA sample video every N steps (0 = never)
    checkpoint_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid training config: {msg}")

        need(self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        need(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.chunk_frames >= 1, "chunk_frames must be >= 1")
        need(
            self.data.frames % self.chunk_frames == 0,
            f"data.frames={self.data.frames} is not a multiple of chunk_frames",
        )
        need(0 <= self.cond_dropout < 1, "cond_dropout must be in [0, 1)")
        need(0 <= self.action_dropout < 1, "action_dropout must be in [0, 1)")
        need(self.change_weight >= 0, f"change_weight must be >= 0, got {self.change_weight}")
        need(
            0 <= self.context_noise <= 1,
            f"context_noise must be in [0, 1], got {self.context_noise}",
        )
        need(
            0 <= self.self_context <= 1, f"self_context must be in [0, 1], got {self.self_context}"
        )
        need(
            0 <= self.context_ghosts <= 1,
            f"context_ghosts must be in [0, 1], got {self.context_ghosts}",
        )
        need(
            0 <= self.context_speckle <= 1,
            f"context_speckle must be in [0, 1], got {self.context_speckle}",
        )
        need(
            self.still_threshold is None or 0 <= self.still_threshold < 2,
            f"still_threshold must be in [0, 2) (model space), got {self.still_threshold}",
        )
        need(
            self.self_context_depth >= 1,
            f"self_context_depth must be >= 1, got {self.self_context_depth}",
        )
        need(
            self.time_weight in ("default", "bell", "uniform", "x0"),
            f'time_weight must be "default", "bell", "uniform" or "x0", got {self.time_weight!r}',
        )
        need(self.time_shift > 0, f"time_shift must be positive, got {self.time_shift}")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "intervals must be >= 1")
        need(1 <= self.max_steps <= 4, "max_steps must be between 1 and 4")
        need(self.ode_steps >= 1, f"ode_steps must be >= 1, got {self.ode_steps}")
        need(
            self.precision in (None, "fp32", "bf16"),
            f'precision must be "fp32" or "bf16", got {self.precision!r}',
        )
        need(self.sample_every >= 0, "sample_every must be >= 0 (0 = no samples)")
        need(
            0 <= self.rollout_context_frames < self.data.frames
            and self.rollout_context_frames % self.chunk_frames == 0,
            f"rollout_context_frames={self.rollout_context_frames} must be a multiple of "
            f"chunk_frames below data.frames={self.data.frames}",
        )
        if self.micro_batch_size is not None:
            need(
                self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
                f"micro_batch_size={self.micro_batch_size} must divide batch_size="
                f"{self.batch_size}",
            )
        need(
            self.pixel_head is None or self.pixel_head > 0,
            f"pixel_head must be a width > 0 (or unset), got {self.pixel_head}",
        )
        need(
            self.trainable in ("all", "pixel_head"),
            f'trainable must be "all" or "pixel_head", got {self.trainable!r}',
        )
        need(
            self.trainable == "all" or self.stage not in DMD,
            f"trainable={self.trainable!r}: stage {self.stage} trains its fake score beside the "
            "student; train the pixel head with a teacher-forced stage",
        )
        if self.stage in DISTILLATION:
            need(self.teacher is not None, f"stage {self.stage} needs a teacher")
        if self.stage == "joint-rcm":
            need(
                self.dmd_teacher is not None,
                "stage joint-rcm needs a dmd_teacher (the bidirectional base model that scores "
                "the DMD term) besides its teacher (the causal teacher of the sCM term)",
            )
            need(self.dmd_weight >= 0, f"dmd_weight must be >= 0, got {self.dmd_weight}")
        else:
            for name in ("dmd_teacher", "dmd_cfg_scale"):
                need(
                    getattr(self, name) is None,
                    f"{name} is a setting of stage joint-rcm only; stage {self.stage} "
                    + (
                        "scores DMD with its teacher (and its cfg_scale)"
                        if self.stage in DMD
                        else "has no DMD term"
                    ),
                )
        if self.stage in DMD:
            need(self.fake_score_updates >= 1, "fake_score_updates must be >= 1")
        if self.betas is not None:
            need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "bad betas")

    @property
    def adam_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return tuple(self.betas)  # type: ignore[return-value]
        return (0.0, 0.999) if self.stage in DISTILLATION else (0.9, 0.999)

    @property
    def guidance(self) -> float:
        """Guidance of ``teacher``: ``cfg_scale``, else 5 when the teacher is a DMD real score
        (sf-dmd, df-dmd) and 3 otherwise (consistency distillation, ode-init, joint-rcm's sCM)."""
        if self.cfg_scale is not None:
            return self.cfg_scale
        return 5.0 if self.stage in ("sf-dmd", "df-dmd") else 3.0

    @property
    def dmd_guidance(self) -> float:
        """Guidance of the DMD real score: ``teacher``'s for sf-dmd / df-dmd, ``dmd_teacher``'s
        (``dmd_cfg_scale``, default 5) for joint-rcm."""
        if self.stage != "joint-rcm":
            return self.guidance
        return 5.0 if self.dmd_cfg_scale is None else self.dmd_cfg_scale


RECIPES = Path(__file__).parent / "recipes"


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config file path, or a shipped recipe stage such as ``causal-rcm/2-tf-scm``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES / (str(name_or_path).removesuffix(".toml") + ".toml")
    if shipped.is_file():
        return shipped
    known = sorted(
        str(p.relative_to(RECIPES)).removesuffix(".toml") for p in RECIPES.rglob("*.toml")
    )
    raise ConfigError(f"no config file {name_or_path}; shipped recipes: {', '.join(known)}")


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] = (), stage: str | None = None
) -> TrainConfig:
    """Reads a TOML config (or none) and applies ``key=value`` overrides (``data.frames=8``).

    ``stage``, when given, must agree with the file's ``stage`` (or supplies it)."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
    if stage is not None:
        if raw.get("stage", stage) != stage:
            raise ConfigError(f"{path} is a config for stage {raw['stage']!r}, not {stage!r}")
        raw["stage"] = stage
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word: a string
        target = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = parsed
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(fields)}")
    if "stage" not in raw:
        raise ConfigError('the config needs a stage (e.g. stage = "tf-scm")')
    values = dict(raw)
    data = values.pop("data", {})
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    if not isinstance(data, dict) or set(data) - data_fields:
        raise ConfigError(f"[data] takes {sorted(data_fields)}, got {data!r}")
    if "betas" in values and values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    try:
        return TrainConfig(**values, data=DataConfig(**data))
    except TypeError as err:
        raise ConfigError(f"invalid training config: {err}") from err


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
