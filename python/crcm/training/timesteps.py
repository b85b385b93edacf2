"""Time conventions and training-time samplers (design §1.1).

- Rectified flow (RF) time ``s ∈ [0, 1]``: ``x_s = (1 − s)·x0 + s·ε``, velocity ``v = ε − x0``.
- TrigFlow time ``t ∈ [0, π/2]``: ``x_t = cos t·x0 + sin t·ε``; ``s = sin t / (cos t + sin t)``,
  ``t = arctan(s / (1 − s))``. The conversions run in float64.
- Samplers: ``UniformShift(k)``: ``u ~ U(0, 1)``, ``s = k·u / (1 + (k − 1)·u)``;
  ``LogNormal(μ, σ)``: ``σ_t = exp(N(μ, σ²))``, ``s = σ_t / (1 + σ_t)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "add_noise",
    "lognormal",
    "rf_to_trigflow",
    "shift",
    "trigflow_to_rf",
    "trigflow_wrapper_coefficients",
    "uniform_shift",
]


def shift(u: Tensor, k: float) -> Tensor:
    """The time shift ``k·u / (1 + (k − 1)·u)`` (monotone, fixes 0 and 1)."""
    if k <= 0:
        raise ValueError(f"shift must be positive, got {k}")
    return k * u / (1 + (k - 1) * u)


def uniform_shift(
    shape: tuple[int, ...],
    k: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``UniformShift(k)`` RF times in [0, 1), float32."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    return shift(u, k).float()


def lognormal(
    shape: tuple[int, ...],
    mean: float,
    std: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``LogNormal(μ, σ)`` RF times in (0, 1), float32 (TF-sCM uses μ = −0.8, σ = 1.6)."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    n = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    sigma = torch.exp(mean + std * n)
    return (sigma / (1 + sigma)).float()


def rf_to_trigflow(s: Tensor) -> Tensor:
    """TrigFlow time of RF time ``s`` (computed in float64): ``t = arctan(s / (1 − s))``."""
    s64 = s.double()
    return torch.atan2(s64, 1 - s64)


def trigflow_to_rf(t: Tensor) -> Tensor:
    """RF time of TrigFlow time ``t`` (float64): ``s = sin t / (cos t + sin t)``."""
    t64 = t.double()
    return torch.sin(t64) / (torch.cos(t64) + torch.sin(t64))


def trigflow_wrapper_coefficients(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` that wrap an RF network as a TrigFlow denoiser.

    ``x0̂ = c_skip·x_t + c_out·v_θ(c_in·x_t, c_noise)`` with ``c_skip = c_in = 1/(cos t + sin t)``,
    ``c_out = −sin t/(cos t + sin t)`` and ``c_noise = 1000·s`` (float64): since
    ``c_in·x_t = x_s``, this is exactly the RF denoiser ``x_s − s·v_θ(x_s, s)``.
    """
    t64 = t.double()
    denom = torch.cos(t64) + torch.sin(t64)
    c_in = 1 / denom
    return c_in, -torch.sin(t64) / denom, c_in, 1000 * trigflow_to_rf(t64)


def add_noise(x0: Tensor, noise: Tensor, s: Tensor) -> Tensor:
    """``x_s = (1 − s)·x0 + s·ε``; ``s`` (``[B]`` or ``[B, T]``) broadcasts over the rest."""
    while s.ndim < x0.ndim:
        s = s.unsqueeze(-1)
    return (1 - s) * x0 + s * noise
