"""Property tests of the time maps and training-time samplers (design §1.1)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crcm.training.timesteps import (
    add_noise,
    lognormal,
    rf_to_trigflow,
    shift,
    trigflow_to_rf,
    trigflow_wrapper_coefficients,
    uniform_shift,
)

FAST = settings(max_examples=60, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False)
quarter_turn = st.floats(0.0, math.pi / 2, allow_nan=False)
shifts = st.floats(0.05, 20.0, allow_nan=False)


def t64(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# -- RF <-> TrigFlow ------------------------------------------------------------------------------


@FAST
@given(unit)
def test_rf_trigflow_round_trip_and_ranges(s):
    t = rf_to_trigflow(t64(s))
    assert t.dtype == torch.float64
    assert 0.0 <= t.item() <= math.pi / 2
    assert trigflow_to_rf(t).item() == pytest.approx(s, abs=1e-12)


@FAST
@given(quarter_turn)
def test_trigflow_rf_round_trip(t):
    s = trigflow_to_rf(t64(t))
    assert 0.0 <= s.item() <= 1.0
    assert rf_to_trigflow(s).item() == pytest.approx(t, abs=1e-12)


@FAST
@given(unit, unit)
def test_rf_to_trigflow_is_monotone(a, b):
    lo, hi = sorted((a, b))
    assert rf_to_trigflow(t64(lo)).item() <= rf_to_trigflow(t64(hi)).item()


@FAST
@given(quarter_turn, st.integers(0, 2**31 - 1))
def test_trigflow_point_is_a_scaled_rf_point(t, seed):
    """x_t = cos t·x0 + sin t·ε is (cos t + sin t)·x_s at the matching RF time."""
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    s = trigflow_to_rf(t64(t))
    x_t = math.cos(t) * x0 + math.sin(t) * eps
    x_s = add_noise(x0, eps, s)
    torch.testing.assert_close(x_t, (math.cos(t) + math.sin(t)) * x_s)


@FAST
@given(st.floats(1e-4, math.pi / 2, allow_nan=False), st.integers(0, 2**31 - 1))
def test_trigflow_wrapper_is_the_rf_consistency_map(t, seed):
    """c_skip·x_t + c_out·v_θ(c_in·x_t, c_noise) = x_s − s·v_θ(x_s, s) for any network v_θ."""
    gen = torch.Generator().manual_seed(seed)
    x0, eps, w = torch.randn(3, 6, generator=gen, dtype=torch.float64)

    def network(x_s, wan_time):  # an arbitrary nonlinear "network" of (x, 1000·s)
        return torch.tanh(w * x_s) + torch.sin(wan_time / 1000 * 7)

    t_ = t64(t)
    c_skip, c_out, c_in, c_noise = trigflow_wrapper_coefficients(t_)
    assert all(c.dtype == torch.float64 for c in (c_skip, c_out, c_in, c_noise))
    s = trigflow_to_rf(t_)
    x_t = math.cos(t) * x0 + math.sin(t) * eps
    x_s = add_noise(x0, eps, s)
    torch.testing.assert_close(c_noise, 1000 * s)
    torch.testing.assert_close(c_in * x_t, x_s)
    wrapped = c_skip * x_t + c_out * network(c_in * x_t, c_noise)
    torch.testing.assert_close(wrapped, x_s - s * network(x_s, 1000 * s))


# -- shift and samplers ---------------------------------------------------------------------------


@FAST
@given(unit, unit, shifts)
def test_shift_is_monotone_and_fixes_the_ends(a, b, k):
    lo, hi = sorted((a, b))
    assert shift(t64(lo), k).item() <= shift(t64(hi), k).item() + 1e-15
    assert shift(t64(0.0), k).item() == 0.0
    assert shift(t64(1.0), k).item() == pytest.approx(1.0, abs=1e-15)
    # k > 1 moves every time towards noise, k < 1 towards data.
    u = t64(lo)
    if k > 1:
        assert shift(u, k).item() >= lo - 1e-15
    else:
        assert shift(u, k).item() <= lo + 1e-15


def test_shift_rejects_non_positive():
    with pytest.raises(ValueError):
        shift(t64(0.5), 0.0)


@FAST
@given(shifts, st.integers(0, 2**31 - 1))
def test_uniform_shift_range_dtype_and_median(k, seed):
    gen = torch.Generator().manual_seed(seed)
    s = uniform_shift((4000,), k, generator=gen)
    assert s.dtype == torch.float32 and s.shape == (4000,)
    assert ((s >= 0) & (s <= 1)).all()
    # The median of UniformShift(k) is shift(1/2, k) = k/(k+1); loose: ±0.05 in u.
    lo, hi = shift(t64(0.45), k).item(), shift(t64(0.55), k).item()
    assert lo <= s.median().item() <= hi


@FAST
@given(
    st.floats(-2.0, 1.0, allow_nan=False),
    st.floats(0.0, 2.0, allow_nan=False),
    st.integers(0, 2**31 - 1),
)
def test_lognormal_range_and_distribution(mean, std, seed):
    gen = torch.Generator().manual_seed(seed)
    s = lognormal((4000,), mean, std, generator=gen)
    assert s.dtype == torch.float32
    assert ((s > 0) & (s < 1)).all()
    # log σ = log(s/(1−s)) ~ N(mean, std²): loose moment checks.
    log_sigma = torch.log(s.double() / (1 - s.double()))
    assert log_sigma.mean().item() == pytest.approx(mean, abs=0.1 + 0.1 * std)
    assert log_sigma.std().item() == pytest.approx(std, abs=0.05 + 0.1 * std)


def test_lognormal_defaults_of_tf_scm_favour_mid_noise():
    """TF-sCM's LogNormal(−0.8, 1.6): median s = e^−0.8/(1 + e^−0.8) ≈ 0.31."""
    s = lognormal((20000,), -0.8, 1.6, generator=torch.Generator().manual_seed(0))
    median = math.exp(-0.8) / (1 + math.exp(-0.8))
    assert s.median().item() == pytest.approx(median, abs=0.02)


def test_lognormal_rejects_negative_std():
    with pytest.raises(ValueError):
        lognormal((3,), 0.0, -1.0)
