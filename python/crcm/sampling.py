"""Inference samplers: time schedules, per-chunk step schedules and update rules (design §1.4).

RF convention (design §1.1): ``x_s = (1 − s)·x0 + s·ε``, the network predicts ``v = ε − x0``,
the denoiser is ``x0̂ = x_s − s·v``.

- **Consistency** sampling (distilled students): at each step ``x0̂ = x_s − s·v``, then
  re-noise to the next time with fresh noise, ``x_{s'} = (1 − s')·x0̂ + s'·ε'``.
- **Euler** sampling (the teacher): ``x_{s'} = x_s + (s' − s)·v`` on the RF ODE, with
  classifier-free guidance ``v = v_uncond + w·(v_cond − v_uncond)``.

A :class:`SamplerConfig` says how one stream is generated: chunk size (and the first chunk's),
steps per chunk, times (and the times the network is given, where they differ), cache-update
pass or noisy context, and the sink + window of its KV cache. Presets (:func:`get_preset`):
``consistency`` (the design's defaults), ``causal-rcm`` (the design's c1-1 / c3-3 students),
``teacher`` (Euler + CFG) and ``self-forcing`` (the public Self-Forcing release's inference,
reproduced exactly, warped or not, with or without its independent first frame).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from numpy import bool_ as np_bool

from crcm.errors import ConfigError

__all__ = [
    "SamplerConfig",
    "consistency_step",
    "consistency_times",
    "euler_step",
    "euler_times",
    "get_preset",
    "self_forcing_model_times",
    "self_forcing_times",
]

SIGMA_MAX = 1600.0
_U32 = 2**32  # the runtime's counts are u32


def _count(name: str, value: object, low: int) -> int:
    """``value`` as an int in ``[low, 2**32)`` (NumPy integers too, not bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= int(value) < _U32:
        raise ConfigError(f"{name} must be an integer in [{low}, 2**32), got {value}")
    return int(value)


def _sequence(name: str, value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a sequence, got {type(value).__name__} {value!r}")
    return tuple(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be finite, got {value}")
    return float(value)


def consistency_times(steps: int, sigma_max: float = SIGMA_MAX) -> list[float]:
    """The design's multistep consistency times: ``[σmax/(1+σmax), 15/16, 5/6, 5/8][:steps]``."""
    if not 1 <= steps <= 4:
        raise ConfigError(f"consistency sampling takes 1 to 4 steps, got {steps}")
    return [sigma_max / (1 + sigma_max), 15 / 16, 5 / 6, 5 / 8][:steps]


# UniformShift(5), the papers' warp for large latent videos: the default of the base and teacher
# stages' training times (TrainConfig.time_shift) and of the teacher's Euler grid.
DEFAULT_SHIFT = 5.0


def _shift(s: float, shift: float) -> float:
    return shift * s / (1 + (shift - 1) * s)


def euler_times(steps: int, shift: float = DEFAULT_SHIFT) -> list[float]:
    """``steps`` Euler times from 1 towards 0 (0 excluded): a uniform grid warped by ``shift``."""
    if steps < 1:
        raise ConfigError(f"Euler sampling needs at least 1 step, got {steps}")
    if shift <= 0:
        raise ConfigError(f"shift must be positive, got {shift}")
    return [_shift(1 - i / steps, shift) for i in range(steps)]


# The Self-Forcing release's denoising_step_list (its configs, 4 steps).
SELF_FORCING_STEPS = (1000, 750, 500, 250)


def _self_forcing_table() -> torch.Tensor:
    """σ of the release's flow-matching scheduler: shift 5, σ_min 0, one extra step,
    ``set_timesteps(1000, training=True)``: ``σ_i = shift(1 − i/1000)``, i = 0…999, float32."""
    table = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    return 5.0 * table / (1 + 4.0 * table)


def _release_timesteps(steps: object) -> tuple[int, ...]:
    """A denoising_step_list: integers in (0, 1000], strictly decreasing."""
    values = _sequence("timesteps", steps)
    if not values:
        raise ConfigError("timesteps must not be empty")
    out = []
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 < t <= 1000:
            raise ConfigError(f"Self-Forcing timesteps are integers in (0, 1000], got {t!r}")
        out.append(int(t))
    if any(a <= b for a, b in itertools.pairwise(out)):
        raise ConfigError(f"timesteps must be strictly decreasing, got {out}")
    return tuple(out)


def self_forcing_times(
    steps: tuple[int, ...] = SELF_FORCING_STEPS, *, warp: bool = True
) -> list[float]:
    """σ of each step of the Self-Forcing release's timestep list (float32 as there).

    ``warp=True`` (``warp_denoising_step: true``): timestep ``t`` maps to table entry
    ``σ_{1000−t}``, and the network sees ``1000·σ``: the σ is also the network's time.
    ``warp=False``: the network sees ``t`` itself, but the release's x0 conversion and its
    re-noising (``add_noise``) use σ of the table entry NEAREST to ``t``
    (``argmin |1000·σ_i − t|``), which differs from ``t/1000`` by up to ~1.6e-3: this returns
    that σ, and :func:`self_forcing_model_times` the network's ``t/1000``.
    """
    steps = _release_timesteps(steps)
    table = _self_forcing_table()
    if warp:
        return [float(table[1000 - t]) for t in steps]
    # The release's lookup, in its float32 (add_noise; its x0 conversion, in float64, picks
    # the same entries for every integer t).
    t = torch.tensor(steps, dtype=torch.long)
    nearest = torch.argmin(((table * 1000).unsqueeze(0) - t.unsqueeze(1)).abs(), dim=1)
    return [float(table[i]) for i in nearest]


def self_forcing_model_times(steps: tuple[int, ...] = SELF_FORCING_STEPS) -> list[float]:
    """The time the network is given at each step of an UNWARPED release list: ``t/1000``."""
    return [t / 1000 for t in _release_timesteps(steps)]


def consistency_step(
    x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One consistency step: returns ``(x0̂, x_{s_next})``; ``s``/``s_next`` broadcast to x."""
    x0 = x_s - s * v
    return x0, (1 - s_next) * x0 + s_next * noise


def euler_step(
    x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of the RF ODE: returns ``(x0̂, x_{s_next})``."""
    return x_s - s * v, x_s + (s_next - s) * v


def hold_still(x: torch.Tensor, before: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with every pixel that differs from ``before`` by less than ``threshold`` in every
    channel (dim −3) set to ``before``'s value; ``threshold = 0`` returns ``x`` itself.

    Why: an x0-change model adds its predicted change to the last frame, so the small residual
    noise of a 1-step sample is added again at every frame and a static background turns to
    speckle within ~20 frames. In a game frame what really changes, changes by much more."""
    if threshold <= 0:
        return x
    still = (x - before).abs().amax(-3, keepdim=True) < threshold
    return torch.where(still, before.to(x.dtype), x)


def hold_still_pixels(
    x0_T_C_H_W: torch.Tensor, last_C_H_W: torch.Tensor, threshold: float
) -> torch.Tensor:
    """A stream's chunk of generated frames held still (:func:`hold_still`) frame by frame:
    frame 0 against ``last`` (the stream's last finished frame), frame t against the held
    frame t − 1."""
    if threshold <= 0:
        return x0_T_C_H_W
    held = []
    before = last_C_H_W.to(x0_T_C_H_W.dtype)
    for frame in x0_T_C_H_W:
        before = hold_still(frame, before, threshold)
        held.append(before)
    return torch.stack(held)


@dataclass(frozen=True)
class SamplerConfig:
    """How one stream is generated.

    Attributes:
        kind: ``"consistency"`` (students) or ``"euler"`` (teacher, with CFG).
        chunk_frames: frames per autoregressive chunk (1 = c1-1, 3 = c3-3).
        steps_per_chunk: steps of chunk 0, 1, …; the last entry repeats (``(4, 2)``: 4, 2, 2…).
        times: strictly decreasing RF times; a chunk of n steps uses the first n.
        cache_update: ``True`` runs the clean chunk at s = 0 to write its K/V; ``False`` (noisy
            context) keeps the K/V of the chunk's last denoising forward instead.
        cfg_scale: guidance weight ``w`` (Euler only; 1 disables CFG).
        sink_frames / window_frames: the KV cache keeps the first ``sink_frames`` frames and
            the ``window_frames`` most recent earlier frames (``None``: all of them).
        first_chunk_frames: frames of chunk 0 (``None``: ``chunk_frames``). 1 with
            ``chunk_frames=3`` generates the first latent frame alone, then 3 at a time, as the
            Self-Forcing release's ``independent_first_frame`` (chunks 1, 3, 3, …).
        model_times: the time value the network is given at each step, one per entry of
            ``times`` (``None``: ``times`` themselves). ``times`` stay the σ of the update
            rules (``x0̂ = x_s − σ·v``, the re-noising); the unwarped Self-Forcing release feeds
            its network ``t/1000`` while its σ come from the nearest entry of its table.
        still_threshold: generated pixels that differ from the previous frame's by less than
            this (model space, every channel) keep the previous frame's value
            (:func:`hold_still`; 0: off). For world models that predict the change
            from their previous frame (``prev_frames > 0``): the shipped Breakout model
            streams with 16/127.5 (16 grey levels of a pixel codec), which keeps its
            background from drifting.

    Presets describe the denoising only; :meth:`streamed_like` gives one the cache window and
    still threshold of a pipeline's own sampler.
    """

    kind: Literal["consistency", "euler"] = "consistency"
    chunk_frames: int = 1
    steps_per_chunk: tuple[int, ...] = (1,)
    times: tuple[float, ...] = field(default_factory=lambda: tuple(consistency_times(4)))
    cache_update: bool = True
    cfg_scale: float = 1.0
    sink_frames: int = 0
    window_frames: int | None = None
    first_chunk_frames: int | None = None
    model_times: tuple[float, ...] | None = None
    still_threshold: float = 0.0

    def __post_init__(self) -> None:
        # Every field is checked for its type as well as its range (a config may come from a
        # crcm.json file), and normalised: NumPy numbers to Python ones, lists to tuples.
        def norm(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.kind, str) or self.kind not in ("consistency", "euler"):
            raise ConfigError(f"kind must be 'consistency' or 'euler', got {self.kind!r}")
        norm("chunk_frames", _count("chunk_frames", self.chunk_frames, 1))
        steps = _sequence("steps_per_chunk", self.steps_per_chunk)
        if not steps:
            raise ConfigError("steps_per_chunk must be positive, got ()")
        norm("steps_per_chunk", tuple(_count("steps_per_chunk", n, 1) for n in steps))
        times = tuple(_finite("times", t) for t in _sequence("times", self.times))
        norm("times", times)
        if max(self.steps_per_chunk) > len(times):
            raise ConfigError(
                f"{len(times)} times given but a chunk takes {max(self.steps_per_chunk)} steps"
            )
        if any(not 0 < x <= 1 for x in times) or any(a <= b for a, b in itertools.pairwise(times)):
            raise ConfigError(f"times must be strictly decreasing in (0, 1], got {list(times)}")
        if not isinstance(self.cache_update, (bool, np_bool)):
            raise ConfigError(f"cache_update must be true or false, got {self.cache_update!r}")
        norm("cache_update", bool(self.cache_update))
        scale = _finite("cfg_scale", self.cfg_scale)
        if scale < 0 or (self.kind == "consistency" and scale != 1.0):
            raise ConfigError(
                f"cfg_scale applies to Euler sampling only and must be >= 0, got {scale}"
            )
        norm("cfg_scale", scale)
        norm("sink_frames", _count("sink_frames", self.sink_frames, 0))
        if self.window_frames is not None:
            norm("window_frames", _count("window_frames", self.window_frames, 0))
        if self.first_chunk_frames is not None:
            norm("first_chunk_frames", _count("first_chunk_frames", self.first_chunk_frames, 1))
        if self.model_times is not None:
            model = _sequence("model_times", self.model_times)
            model = tuple(_finite("model_times", t) for t in model)
            if len(model) != len(times):
                raise ConfigError(
                    f"model_times must have one entry per time ({len(times)}), got {len(model)}"
                )
            if any(not 0 < x <= 1 for x in model):
                raise ConfigError(f"model_times must be in (0, 1], got {list(model)}")
            norm("model_times", model)
        still = _finite("still_threshold", self.still_threshold)
        if not 0 <= still < 2:
            raise ConfigError(f"still_threshold must be in [0, 2) (model space), got {still}")
        norm("still_threshold", still)

    def streamed_like(self, base: SamplerConfig) -> SamplerConfig:
        """This sampler's denoising with ``base``'s stream settings: its KV-cache sink and
        window and its still threshold (what a preset picked for a pipeline keeps of the
        pipeline's own sampler)."""
        return replace(
            self,
            sink_frames=base.sink_frames,
            window_frames=base.window_frames,
            still_threshold=base.still_threshold,
        )

    def steps_of(self, chunk: int) -> int:
        return self.steps_per_chunk[min(chunk, len(self.steps_per_chunk) - 1)]

    def chunk_frames_of(self, chunk: int) -> int:
        """Frames of chunk ``chunk``: ``first_chunk_frames`` for chunk 0 when set."""
        if chunk == 0 and self.first_chunk_frames is not None:
            return self.first_chunk_frames
        return self.chunk_frames

    @property
    def largest_chunk_frames(self) -> int:
        """The most frames one chunk has (what a stream's pages and buffers must hold)."""
        return max(self.chunk_frames_of(0), self.chunk_frames)

    def model_time_of(self, step: int) -> float:
        """The time the network is given at denoising step ``step`` of a chunk (``times[step]``
        unless ``model_times`` says otherwise); a cache-update pass is given 0."""
        if not 0 <= step < len(self.times):
            raise IndexError(f"step {step} is outside the {len(self.times)} times")
        return (self.times if self.model_times is None else self.model_times)[step]

    def with_steps(self, *steps: int) -> SamplerConfig:
        """The same sampler with another per-chunk step schedule."""
        return replace(self, steps_per_chunk=tuple(steps))


PRESETS = ("consistency", "causal-rcm", "teacher", "self-forcing")


def _spread(steps: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``n`` entries of a timestep list at evenly spaced indices, the first always kept:
    1000/750/500/250 → [1000], [1000, 500], [1000, 750, 500], all four."""
    return tuple(steps[i * len(steps) // n] for i in range(n))


def _preset_count(name: str, value: object, choices: range | tuple[int, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in choices:
        shown = f"{choices[0]} to {choices[-1]}" if isinstance(choices, range) else choices
        raise ConfigError(f"{name} must be one of {shown}, got {value!r}")
    return int(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np_bool)):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def get_preset(
    name: str,
    steps: int | None = None,
    chunk_frames: int | None = None,
    *,
    shift: float = DEFAULT_SHIFT,
    warp: bool | None = None,
    independent_first_frame: bool | None = None,
    timesteps: tuple[int, ...] | None = None,
    noisy_context: bool | None = None,
) -> SamplerConfig:
    """A named sampler. The KV cache's sink + window are the :class:`SamplerConfig` fields
    (defaults: no sink, every frame), set with :func:`dataclasses.replace`.

    - ``consistency``: the design's consistency times, 1–4 steps (default 1), c1-1.
    - ``causal-rcm``: the design's Causal-rCM students: c1-1 or c3-3 (``chunk_frames`` 1, the
      default, or 3), 1–4 steps (default 4) at :func:`consistency_times`, a clean cache-update
      pass after each chunk or, with ``noisy_context=True``, the K/V of the last denoising
      step (``cache_update=False``). All four times are kept, so a per-chunk schedule such as
      ``with_steps(4, 2)`` applies.
    - ``teacher``: Euler with CFG 3, 16 steps by default, on a grid warped by ``shift`` (match
      the teacher's training ``time_shift``).
    - ``self-forcing``: the public Self-Forcing release's inference (its checkpoints):
      ``chunk_frames`` frames per block (``num_frame_per_block``: 3, the default, or 1 for
      frame-wise checkpoints), a clean cache-update pass after each chunk (``context_noise``
      0), and its ``denoising_step_list``: ``timesteps`` given verbatim (e.g. the 5-step
      ``(1000, 750, 500, 250, 125)``), or 1000/750/500/250 with ``steps`` (1–4, default 4)
      taking entries at evenly spaced indices: [1000], [1000, 500], [1000, 750, 500], all
      four (the first is always 1000, pure noise; the last step's x0̂ is the output, so
      fewer steps spread over the list rather than stopping early at a high noise level).
      ``warp`` (default True) is ``warp_denoising_step``: True gives the warped σ (the
      network's time too); False gives the σ of the nearest table entry as ``times`` and
      ``t/1000`` as ``model_times`` (see :func:`self_forcing_times`).
      ``independent_first_frame=True`` generates the first latent frame alone
      (``first_chunk_frames=1``: chunks 1, c, c, …). The release's ``sink_size`` S and
      ``local_attn_size`` L (a cache of L frames that includes the chunk being generated)
      correspond to ``sink_frames=S, window_frames=L − S − chunk_frames`` (``L = -1``:
      ``window_frames=None``).

    ``steps`` and ``chunk_frames`` keep their meaning for every preset (``chunk_frames``
    replaces the preset's chunk size); the other options apply to the presets named above and
    are refused elsewhere.
    """
    options = {
        "warp": (warp, ("self-forcing",)),
        "independent_first_frame": (independent_first_frame, ("self-forcing",)),
        "timesteps": (timesteps, ("self-forcing",)),
        "noisy_context": (noisy_context, ("causal-rcm",)),
    }
    if name not in PRESETS:
        raise ConfigError(f"unknown sampler preset {name!r}; choose one of {', '.join(PRESETS)}")
    for option, (value, presets) in options.items():
        if value is not None and name not in presets:
            raise ConfigError(f"{option} applies to the {' / '.join(presets)} preset only")
    if name == "consistency":
        n = steps or 1
        config = SamplerConfig(steps_per_chunk=(n,), times=tuple(consistency_times(max(n, 1))))
    elif name == "teacher":
        n = steps or 16
        config = SamplerConfig(
            kind="euler", steps_per_chunk=(n,), times=tuple(euler_times(n, shift)), cfg_scale=3.0
        )
    elif name == "causal-rcm":
        n = _preset_count("causal-rcm steps", 4 if steps is None else steps, range(1, 5))
        chunk = _preset_count(
            "causal-rcm chunk_frames", 1 if chunk_frames is None else chunk_frames, (1, 3)
        )
        noisy = _flag("noisy_context", False if noisy_context is None else noisy_context)
        return SamplerConfig(
            chunk_frames=chunk,
            steps_per_chunk=(n,),
            times=tuple(consistency_times(4)),
            cache_update=not noisy,
        )
    else:  # self-forcing
        if timesteps is not None:
            release = _release_timesteps(timesteps)
            if steps is not None and steps != len(release):
                raise ConfigError(
                    f"steps={steps} disagrees with the {len(release)} timesteps given"
                )
        else:
            n = _preset_count("self-forcing steps", 4 if steps is None else steps, range(1, 5))
            release = _spread(SELF_FORCING_STEPS, n)
        warped = _flag("warp", True if warp is None else warp)
        first = _flag(
            "independent_first_frame",
            False if independent_first_frame is None else independent_first_frame,
        )
        return SamplerConfig(
            chunk_frames=3 if chunk_frames is None else chunk_frames,
            first_chunk_frames=1 if first else None,
            steps_per_chunk=(len(release),),
            times=tuple(self_forcing_times(release, warp=warped)),
            model_times=None if warped else tuple(self_forcing_model_times(release)),
            cache_update=True,
        )
    return config if chunk_frames is None else replace(config, chunk_frames=chunk_frames)
