"""Every shipped recipe stage is the baseline its README row says it is.

One test per TOML under ``crcm/training/recipes/`` (the Breakout ones included) pins the settings
that define the stage: its place in the chain (which stage's run it starts from, ``init``), the
teacher of the stage (which stage's run, and so whether it is the bidirectional base model, the
TF or the DF causal teacher), the step schedule (Self-Forcing's random exit step vs Causal-rCM's
cycled one), the context of the rollout (clean cache-update pass vs noisy context) and the
guidance. An edit that turns one baseline into another fails here; so does a new recipe file
that nobody pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from crcm.training.config import RECIPES, TrainConfig, load_config


@dataclass(frozen=True)
class Pin:
    """What defines one stage config. Links name other recipe files (relative, no ``.toml``):
    the config's ``init`` / ``teacher`` / ``dmd_teacher`` must be that file's ``out``."""

    stage: str
    init: str | None = None
    teacher: str | None = None
    dmd_teacher: str | None = None  # joint rCM's DMD real score
    guidance: float | None = None  # cfg.guidance: of `teacher`
    dmd_guidance: float | None = None  # cfg.dmd_guidance: of the DMD real score
    schedule: str | None = None  # step_schedule of a self-forced rollout
    max_steps: int | None = None  # random exit's n ~ U{1..max_steps}, DF-DMD's / ODE's times
    cache_update: bool | None = None  # rollout context: clean pass (True) or noisy (False)
    dmd_weight: float | None = None
    fake_score_updates: int | None = None
    context_noise: float = 0.0  # context augmentation of a teacher-forced stage
    trainable: str = "all"  # "pixel_head": a stage that trains the added pixel head alone


def _moving_squares_recipes() -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for recipe, teacher in (
        ("causal-rcm", "tf"),
        ("self-forcing", "df"),
        ("causal-forcing", "tf"),
        ("causvid", "df"),
        ("joint-rcm", "tf"),
    ):
        pins[f"{recipe}/0-base"] = Pin("base")
        pins[f"{recipe}/1-teacher-{teacher}"] = Pin(f"teacher-{teacher}", init=f"{recipe}/0-base")
    base = lambda r: f"{r}/0-base"  # noqa: E731
    tf = lambda r: f"{r}/1-teacher-tf"  # noqa: E731
    df = lambda r: f"{r}/1-teacher-df"  # noqa: E731
    sf_dmd = dict(guidance=5.0, cache_update=True, fake_score_updates=5)
    pins |= {
        # Causal-rCM: TF-sCM from the TF teacher (CFG 3), then SF-DMD with cycled steps.
        "causal-rcm/2-tf-scm": Pin(
            "tf-scm", init=tf("causal-rcm"), teacher=tf("causal-rcm"), guidance=3.0
        ),
        "causal-rcm/3-sf-dmd": Pin(
            "sf-dmd",
            init="causal-rcm/2-tf-scm",
            teacher=base("causal-rcm"),
            schedule="cycled",
            **sf_dmd,
        ),
        # Self-Forcing: ODE-regression init from the DF teacher, SF-DMD with a random exit step.
        "self-forcing/2-ode-init": Pin(
            "ode-init",
            init=df("self-forcing"),
            teacher=df("self-forcing"),
            guidance=3.0,
            max_steps=4,
        ),
        "self-forcing/3-sf-dmd": Pin(
            "sf-dmd",
            init="self-forcing/2-ode-init",
            teacher=base("self-forcing"),
            schedule="random",
            max_steps=4,
            **sf_dmd,
        ),
        # Causal Forcing: TF-dCM from the TF teacher, then SF-DMD (cycled).
        "causal-forcing/2-tf-dcm": Pin(
            "tf-dcm", init=tf("causal-forcing"), teacher=tf("causal-forcing"), guidance=3.0
        ),
        "causal-forcing/3-sf-dmd": Pin(
            "sf-dmd",
            init="causal-forcing/2-tf-dcm",
            teacher=base("causal-forcing"),
            schedule="cycled",
            **sf_dmd,
        ),
        # CausVid-style: DF-DMD from the DF teacher, scored by the base model; no rollout.
        "causvid/2-df-dmd": Pin(
            "df-dmd",
            init=df("causvid"),
            teacher=base("causvid"),
            guidance=5.0,
            max_steps=4,
            fake_score_updates=5,
        ),
        # Joint rCM: sCM against the TF teacher, DMD against the base model, in one stage.
        "joint-rcm/2-joint-rcm": Pin(
            "joint-rcm",
            init=tf("joint-rcm"),
            teacher=tf("joint-rcm"),
            dmd_teacher=base("joint-rcm"),
            guidance=3.0,
            dmd_guidance=5.0,
            schedule="cycled",
            cache_update=True,
            dmd_weight=0.01,
            fake_score_updates=5,
        ),
    }
    return pins


def _breakout_recipes() -> dict[str, Pin]:
    b = "breakout"
    base, tf, df = f"{b}/0-base", f"{b}/1-teacher-tf", f"{b}/1-teacher-df"
    keys = f"{b}/1-teacher-tf-keys"
    # Breakout's stages distil the teacher unguided (an action-only world model), and the DMD
    # stages roll out with noisy context (1-step play at 60 frames/s on 2 cores).
    dmd = dict(guidance=1.0, cache_update=False, fake_score_updates=5)
    return {
        base: Pin("base"),
        # From scratch: its input carries the previous frames. Context noise: fed back its own
        # frames the model must not break down (docs/breakout-model.md). Five parts: moving
        # pixels weigh 41×, then 5×, then scheduled sampling, then data with held keys, then
        # dust in the context.
        f"{b}/1-teacher-tf-motion": Pin("teacher-tf", context_noise=0.1),
        f"{b}/1-teacher-tf-static": Pin(
            "teacher-tf", init=f"{b}/1-teacher-tf-motion", context_noise=0.1
        ),
        f"{b}/1-teacher-tf-sampling": Pin(
            "teacher-tf", init=f"{b}/1-teacher-tf-static", context_noise=0.1
        ),
        # The fourth part, on data with keys held as a person holds them (every later stage's
        # data); the recorded recipe comparison was distilled from it.
        keys: Pin("teacher-tf", init=f"{b}/1-teacher-tf-sampling", context_noise=0.1),
        # The last part (every later stage's teacher): the fourth with dust in its context.
        tf: Pin("teacher-tf", init=keys, context_noise=0.1),
        df: Pin("teacher-df", init=base),
        f"{b}/causal-rcm/2-tf-scm": Pin(
            "tf-scm", init=tf, teacher=tf, guidance=1.0, context_noise=0.1
        ),
        f"{b}/causal-rcm/3-sf-dmd": Pin(
            "sf-dmd", init=f"{b}/causal-rcm/2-tf-scm", teacher=base, schedule="cycled", **dmd
        ),
        # The shipped model: the TF-sCM student with a pixel head trained alone, on true
        # context, then on its own frames.
        f"{b}/causal-rcm/3-pixel-head-tf": Pin(
            "teacher-tf",
            init=f"{b}/causal-rcm/2-tf-scm",
            context_noise=0.1,
            trainable="pixel_head",
        ),
        f"{b}/causal-rcm/3-pixel-head": Pin(
            "teacher-tf",
            init=f"{b}/causal-rcm/3-pixel-head-tf",
            context_noise=0.1,
            trainable="pixel_head",
        ),
        f"{b}/self-forcing/2-ode-init": Pin(
            "ode-init", init=df, teacher=df, guidance=1.0, max_steps=4
        ),
        f"{b}/self-forcing/3-sf-dmd": Pin(
            "sf-dmd",
            init=f"{b}/self-forcing/2-ode-init",
            teacher=base,
            schedule="random",
            max_steps=4,
            **dmd,
        ),
        f"{b}/causal-forcing/2-tf-dcm": Pin("tf-dcm", init=tf, teacher=tf, guidance=1.0),
        f"{b}/causal-forcing/3-sf-dmd": Pin(
            "sf-dmd", init=f"{b}/causal-forcing/2-tf-dcm", teacher=base, schedule="cycled", **dmd
        ),
        f"{b}/joint-rcm/2-joint-rcm": Pin(
            "joint-rcm",
            init=tf,
            teacher=tf,
            dmd_teacher=base,
            guidance=1.0,
            dmd_guidance=1.0,
            schedule="cycled",
            cache_update=False,
            dmd_weight=0.01,
            fake_score_updates=5,
        ),
    }


PINS = _moving_squares_recipes() | _breakout_recipes()
SHIPPED = sorted(str(p.relative_to(RECIPES)).removesuffix(".toml") for p in RECIPES.rglob("*.toml"))

# Which kind of model each link must be, whatever the recipe: the stage of the linked config.
TEACHER_KIND = {
    "tf-scm": "teacher-tf",  # consistency distillation: the TF causal teacher, clean context
    "tf-dcm": "teacher-tf",
    "ode-init": "teacher-df",  # Self-Forcing's ODE pairs: the DF causal teacher
    "sf-dmd": "base",  # DMD's real score: the bidirectional base model
    "df-dmd": "base",
    "joint-rcm": "teacher-tf",  # its sCM term; its dmd_teacher is the base model
}


def _load(name: str) -> TrainConfig:
    return load_config(name, [])


def test_every_shipped_recipe_is_pinned():
    assert set(SHIPPED) == set(PINS), (
        f"unpinned: {sorted(set(SHIPPED) - set(PINS))}; gone: {sorted(set(PINS) - set(SHIPPED))}"
    )
    readme = (RECIPES / "README.md").read_text()
    for recipe in {name.split("/")[0] for name in SHIPPED if not name.startswith("breakout/")}:
        assert f"| `{recipe}` |" in readme, f"{recipe} has no row in the recipes README"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_stage_is_its_baseline(name):
    pin, cfg = PINS[name], _load(name)
    assert cfg.stage == pin.stage
    assert cfg.trainable == pin.trainable, f"{name}: trainable"

    # The chain: each link is the run folder (`out`) of the named stage config.
    for field in ("init", "teacher", "dmd_teacher"):
        link = getattr(pin, field)
        want = None if link is None else _load(link).out
        assert getattr(cfg, field) == want, f"{name}: {field}"
    if pin.teacher is not None:
        assert _load(pin.teacher).stage == TEACHER_KIND[cfg.stage], f"{name}: kind of teacher"
    if pin.dmd_teacher is not None:
        assert _load(pin.dmd_teacher).stage == "base"  # bidirectional, full mask
    if pin.stage in ("base", "teacher-tf", "teacher-df"):
        assert cfg.teacher is None
    if pin.stage in ("base", "teacher-tf", "teacher-df", "tf-scm", "tf-dcm"):
        assert cfg.context_noise == pin.context_noise, f"{name}: context noise"

    # Guidance of each teacher.
    if pin.guidance is not None:
        assert cfg.guidance == pin.guidance, f"{name}: guidance"
    if pin.dmd_guidance is not None:
        assert cfg.dmd_guidance == pin.dmd_guidance, f"{name}: DMD guidance"
    if pin.dmd_weight is not None:
        assert cfg.dmd_weight == pin.dmd_weight

    # The self-forced rollout: step schedule and context.
    if pin.stage in ("sf-dmd", "joint-rcm"):
        assert cfg.step_schedule == pin.schedule, f"{name}: step schedule"
        assert cfg.cache_update == pin.cache_update, f"{name}: context"
        assert not cfg.replay  # replayed backprop changes memory, not the baseline
    if pin.max_steps is not None:
        assert cfg.max_steps == pin.max_steps
    if pin.fake_score_updates is not None:
        assert cfg.fake_score_updates == pin.fake_score_updates

    # Every stage of a recipe family trains on the same dataset and model, so results compare;
    # only the earlier parts of a stage (`N-name-part`, continued by `N-name`) may have used
    # another dataset of the same kind.
    family = "breakout/0-base" if name.startswith("breakout/") else f"{name.split('/')[0]}/0-base"
    ref = _load(family)
    earlier_part = any(
        Path(name).name.startswith(Path(other).name + "-")
        and Path(other).parent == Path(name).parent
        for other in SHIPPED
    )
    assert (cfg.data.kind, cfg.data.seed) == (ref.data.kind, ref.data.seed)
    assert earlier_part or cfg.data.path == ref.data.path, f"{name}: dataset"
    assert cfg.chunk_frames == ref.chunk_frames
    if cfg.init is None:
        assert cfg.model == ref.model


def test_recipe_folders_are_ordered_chains():
    """Within a folder, stage N starts from a stage < N of the same recipe family, or from an
    earlier part of stage N itself (``N-name-part`` → ``N-name``)."""
    for name in SHIPPED:
        link = PINS[name].init
        if link is None:
            continue
        n, m = Path(name).name.split("-")[0], Path(link).name.split("-")[0]
        part_of = Path(link).name.startswith(Path(name).name + "-") or (
            Path(name).name.rsplit("-", 1)[0] == Path(link).name.rsplit("-", 1)[0] != n
        )
        assert int(m) < int(n) or (m == n and part_of), f"{name} starts from a later stage {link}"
        assert link.split("/")[0] == name.split("/")[0], f"{name} crosses recipe families"
