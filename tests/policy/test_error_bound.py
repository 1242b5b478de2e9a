"""Dynamic-ResQ's policy (eq. 10-11) against an independent per-pixel loop, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resq_brevitas.config import ErrorBoundPolicy
from resq_brevitas.nn import mix_pool
from resq_brevitas.policy import (
    ErrorBoundSelector,
    aggregate_errors,
    error_maps_eq10,
    expand_units,
    fit_error_polynomial,
    predict_error_rrm_eq8,
    select_eq11,
)
from resq_brevitas.quant import quantize_eq1


def apply_error_bound_policy(delta, quantized, weight_norm, policy, channel_dim=1):
    """The selector's decisions and the mixed residual they send."""
    index, units = ErrorBoundSelector(policy).select(delta, quantized, weight_norm, channel_dim)
    return mix_pool(quantized, index, channel_dim), index, units

POOL = (0, 4, 8)


def _pool(delta: torch.Tensor, thresholds: tuple[float, ...]) -> list[torch.Tensor]:
    """Eq. 1 quantizers of the pool (a 0-bit quantizer returns zeros)."""
    out = []
    for bits, threshold in zip(POOL, thresholds):
        scale = 2 * threshold / (2**bits - 1) if bits else 1.0
        out.append(quantize_eq1(delta, scale, bits))
    return out


def _brute_force(delta: torch.Tensor, quantized: list[torch.Tensor], weight_norm: float,
                 tau: float, granularity: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 and eq. 11 with explicit Python loops over rows, decision units and pixels, in
    float64. Returns (index map [R, H, W], margin map: the smallest |gap - tau| among the
    comparisons made, where float32 and float64 sums could decide differently)."""
    rows, _, height, width = delta.shape
    n = len(quantized)
    index = torch.empty(rows, height, width, dtype=torch.long)
    margin = torch.full((rows, height, width), math.inf, dtype=torch.float64)
    if granularity == "pixel":
        blocks = [[(h, w)] for h in range(height) for w in range(width)]
    elif granularity == "region":
        blocks = [[(h, w) for h in range(h0, min(h0 + k, height))
                   for w in range(w0, min(w0 + k, width))]
                  for h0 in range(0, height, k) for w0 in range(0, width, k)]
    else:
        blocks = [[(h, w) for h in range(height) for w in range(width)]]
    d = delta.double().tolist()
    qs = [q.double().tolist() for q in quantized]
    channels = delta.shape[1]
    for r in range(rows):
        for block in blocks:
            errors = []
            for q in qs:
                total = 0.0
                for h, w in block:
                    sq = sum((d[r][c][h][w] - q[r][c][h][w]) ** 2 for c in range(channels))
                    total += math.sqrt(sq) * weight_norm
                errors.append(total)
            choice, closest = n - 1, math.inf
            for i in range(n - 1):
                gap = errors[i] - errors[i + 1]
                if errors[i] != errors[i + 1]:  # equal sums come from equal values: exact
                    closest = min(closest, abs(gap - tau))
                if gap < tau:
                    choice = i
                    break
            for h, w in block:
                index[r, h, w] = choice
                margin[r, h, w] = closest
    return index, margin


@pytest.mark.parametrize("granularity,k", [("pixel", 1), ("region", 2), ("region", 4),
                                           ("frame", 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_equals_brute_force_eq11(granularity: str, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # Residuals of varying magnitude per pixel, so that every pool member gets chosen somewhere.
    delta = torch.randn(2, 5, 7, 6, generator=g) * torch.rand(2, 1, 7, 6, generator=g).pow(3) * 2
    thresholds = (1.0, float(torch.rand(1, generator=g)) + 0.5, float(torch.rand(1, generator=g)))
    quantized = _pool(delta, thresholds)
    weight_norm = float(torch.rand(1, generator=g)) + 0.5
    errors = error_maps_eq10(delta, quantized, weight_norm)
    units = aggregate_errors(errors, granularity, k)
    gaps = (units[:-1] - units[1:]).flatten()
    chosen = set()
    for tau in (0.0, *torch.quantile(gaps.abs(), torch.tensor([0.25, 0.5, 0.75])).tolist(), 1e9):
        policy = ErrorBoundPolicy(tau=tau, granularity=granularity, k=k)
        mixed, index, _ = apply_error_bound_policy(delta, quantized, weight_norm, policy)
        expected, margin = _brute_force(delta, quantized, weight_norm, tau, granularity, k)
        # float32 vs float64 error sums may round differently only where a gap ties with tau
        decisive = margin > 1e-4 * max(1.0, float(units.abs().max()))
        assert decisive.float().mean() > 0.9
        assert torch.equal(index[decisive], expected[decisive]), (granularity, tau)
        chosen |= set(index.unique().tolist())
        # the mixed residual is the chosen quantizer's output at every pixel
        for i, q in enumerate(quantized):
            sel = (index == i).unsqueeze(1).expand_as(q)
            assert torch.equal(mixed[sel], q[sel])
    # the taus span real decisions (pixel decisions see every pool member)
    assert len(chosen) >= 2 and (granularity != "pixel" or chosen == {0, 1, 2})


def test_linear_tokens_are_pixels() -> None:
    """For Linear inputs [R, tokens, F] the norm runs over features, one decision per token."""
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(2, 9, 4, generator=g) * torch.rand(2, 9, 1, generator=g)
    quantized = _pool(delta, (1.0, 1.0, 0.5))
    errors = error_maps_eq10(delta, quantized, 2.0, channel_dim=-1)
    assert errors.shape == (3, 2, 9)
    for i, q in enumerate(quantized):
        expected = (delta - q).norm(dim=-1) * 2.0
        torch.testing.assert_close(errors[i], expected)
    policy = ErrorBoundPolicy(tau=float(errors.std()), granularity="pixel")
    mixed, index, units = apply_error_bound_policy(delta, quantized, 2.0, policy, channel_dim=-1)
    assert index.shape == (2, 9) and units == 9
    torch.testing.assert_close(mixed, mix_pool(quantized, index, channel_dim=-1))


def _nested_pool(delta: torch.Tensor) -> list[torch.Tensor]:
    # Same threshold for 4 and 8 bits: s4 = 17 * s8, so every 4-bit level is an 8-bit level, and
    # with |delta| <= 0.9 T neither quantizer clips: more bits never increase a pixel's error.
    threshold = float(delta.abs().max()) / 0.9
    return _pool(delta, (1.0, threshold, threshold))


def test_tau_zero_selects_highest_and_huge_tau_lowest() -> None:
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(3, 4, 8, 8, generator=g)
    delta[:, :, :2] = 0  # static pixels: all errors equal, the strict inequality moves up
    quantized = _nested_pool(delta)
    errors = error_maps_eq10(delta, quantized, 1.3)
    assert bool((errors[:-1] >= errors[1:]).all())
    for granularity in ("pixel", "region", "frame"):
        units = aggregate_errors(errors, granularity, 3)
        assert bool((select_eq11(units, 0.0) == 2).all()), granularity
        assert bool((select_eq11(units, 1e30) == 0).all()), granularity


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), taus=st.lists(st.floats(0, 10), min_size=2, max_size=6))
def test_bits_monotone_non_increasing_in_tau(seed: int, taus: list[float]) -> None:
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(2, 3, 5, 5, generator=g) * 2
    quantized = _pool(delta, (1.0, 1.5, 1.0))
    errors = error_maps_eq10(delta, quantized, 1.0)
    previous = None
    for tau in sorted(taus):
        index = select_eq11(errors, tau)
        if previous is not None:
            assert bool((index <= previous).all())
        previous = index


def test_expand_units_inverts_region_blocks() -> None:
    index = torch.arange(2 * 3 * 2).view(2, 3, 2)  # 2 rows, 3 x 2 blocks of k=3
    full = expand_units(index, (7, 5), "region", 3)
    assert full.shape == (2, 7, 5)
    for h in range(7):
        for w in range(5):
            assert torch.equal(full[:, h, w], index[:, h // 3, w // 3])


def test_fit_error_polynomial_recovers_known_coefficients() -> None:
    energy = torch.linspace(0, 40, 60, dtype=torch.float64)
    coefficients = (2e-3, 0.0, 3e-7, 1e-9)
    error = predict_error_rrm_eq8(coefficients, energy)
    fitted = fit_error_polynomial(energy, error, degree=4)
    torch.testing.assert_close(predict_error_rrm_eq8(fitted, energy), error, rtol=1e-6,
                               atol=1e-9)
    assert predict_error_rrm_eq8(fitted, torch.zeros(1)).item() == 0.0  # no constant term
    assert fit_error_polynomial(torch.zeros(5), torch.rand(5)) == (0.0,) * 4
    with pytest.raises(ValueError, match="equal length"):
        fit_error_polynomial(torch.ones(3), torch.ones(4))


def test_fit_error_polynomial_is_monotone_beyond_the_calibrated_range() -> None:
    """Errors that bend down within the calibration range: a free quartic has a negative
    leading term and falls below zero beyond it (the budget would never fire on long
    streams); the fit must keep growing."""
    energy = torch.linspace(0, 43, 80, dtype=torch.float64)
    error = predict_error_rrm_eq8((2e-3, 0.0, 0.0, -1e-9), energy)
    design = torch.stack([energy**k for k in range(1, 5)], 1)
    free = torch.linalg.lstsq(design, error.unsqueeze(1)).solution[:, 0].tolist()
    far = torch.linspace(0, 40 * 43, 500, dtype=torch.float64)
    assert predict_error_rrm_eq8(free, far).min() < 0  # the failure RRM's free fit has
    fitted = fit_error_polynomial(energy, error, degree=4)
    assert all(c >= 0 for c in fitted)
    predicted = predict_error_rrm_eq8(fitted, far)
    assert bool((predicted.diff() >= 0).all()) and predicted[-1] > error.max()
    # It describes the calibration pairs at least as well as the best straight line c_1 * e
    # (a feasible non-negative fit; when the fit is that line, the two residual norms agree
    # only to float rounding, hence the 1e-9 relative margin).
    line = float((energy @ error) / (energy @ energy)) * energy
    best_line = (line - error).norm()
    assert (predict_error_rrm_eq8(fitted, energy) - error).norm() <= best_line * (1 + 1e-9)


def test_nonnegative_least_squares_matches_scipy() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    from resq_brevitas.policy.refresh import nonnegative_least_squares

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        design = torch.randn(30, 5, generator=g, dtype=torch.float64)
        target = torch.randn(30, generator=g, dtype=torch.float64)
        expected, _ = scipy_optimize.nnls(design.numpy(), target.numpy())
        got = nonnegative_least_squares(design, target)
        torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-6, atol=1e-9)
