"""Inference samplers: time schedules, per-chunk step schedules and update rules (design §1.4).

RF convention (design §1.1): ``x_s = (1 − s)·x0 + s·ε``, the network predicts ``v = ε − x0``,
the denoiser is ``x0̂ = x_s − s·v``.

- **Consistency** sampling (distilled students): at each step ``x0̂ = x_s − s·v``, then
  re-noise to the next time with fresh noise, ``x_{s'} = (1 − s')·x0̂ + s'·ε'``.
- **Euler** sampling (the teacher): ``x_{s'} = x_s + (s' − s)·v`` on the RF ODE, with
  classifier-free guidance ``v = v_uncond + w·(v_cond − v_uncond)``.

A :class:`SamplerConfig` says how one stream is generated: chunk size, steps per chunk,
times, cache-update pass or noisy context, and the sink + window of its KV cache. Presets:
``consistency`` (the design's defaults), ``teacher`` (Euler + CFG) and ``self-forcing``
(the public Self-Forcing release's inference, reproduced exactly).
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


def self_forcing_times(steps: tuple[int, ...] = (1000, 750, 500, 250)) -> list[float]:
    """The Self-Forcing release's times: its timestep list warped through its 1000-entry table.

    That release's flow-matching scheduler (shift 5, σ_min 0, one extra step) has
    ``σ_i = shift(1 − i/1000)`` for i = 0…999; timestep ``t`` of the list maps to
    ``σ_{1000−t}`` (and the network sees ``1000·σ``). Computed in float32 as there.
    """
    table = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    table = 5.0 * table / (1 + 4.0 * table)
    for t in steps:
        if not 0 < t <= 1000:
            raise ConfigError(f"Self-Forcing timesteps are in (0, 1000], got {t}")
    return [float(table[1000 - t]) for t in steps]


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
    """

    kind: Literal["consistency", "euler"] = "consistency"
    chunk_frames: int = 1
    steps_per_chunk: tuple[int, ...] = (1,)
    times: tuple[float, ...] = field(default_factory=lambda: tuple(consistency_times(4)))
    cache_update: bool = True
    cfg_scale: float = 1.0
    sink_frames: int = 0
    window_frames: int | None = None

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

    def steps_of(self, chunk: int) -> int:
        return self.steps_per_chunk[min(chunk, len(self.steps_per_chunk) - 1)]

    def with_steps(self, *steps: int) -> SamplerConfig:
        """The same sampler with another per-chunk step schedule."""
        return replace(self, steps_per_chunk=tuple(steps))


def get_preset(
    name: str,
    steps: int | None = None,
    chunk_frames: int | None = None,
    *,
    shift: float = DEFAULT_SHIFT,
) -> SamplerConfig:
    """A named sampler: ``consistency`` (1–4 steps), ``teacher`` (Euler, CFG 3, 16 steps by
    default, on a grid warped by ``shift``: match the teacher's training ``time_shift``) or
    ``self-forcing`` (the Self-Forcing release: c3-3, 4 steps, its warped times)."""
    if name == "consistency":
        n = steps or 1
        config = SamplerConfig(steps_per_chunk=(n,), times=tuple(consistency_times(max(n, 1))))
    elif name == "teacher":
        n = steps or 16
        config = SamplerConfig(
            kind="euler", steps_per_chunk=(n,), times=tuple(euler_times(n, shift)), cfg_scale=3.0
        )
    elif name == "self-forcing":
        n = steps or 4
        times = self_forcing_times()
        if not 1 <= n <= len(times):
            raise ConfigError(f"the self-forcing preset takes 1 to 4 steps, got {n}")
        config = SamplerConfig(chunk_frames=3, steps_per_chunk=(n,), times=tuple(times))
    else:
        raise ConfigError(
            f"unknown sampler preset {name!r}; choose consistency, teacher or self-forcing"
        )
    return config if chunk_frames is None else replace(config, chunk_frames=chunk_frames)
