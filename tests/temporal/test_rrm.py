"""RRM / sigma-delta mode (reference="previous"): exactness, truncation with error feedback,
density and speedup, and the refresh policies (error budget, scene cut), per stream."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from tests.helpers import make_all_layers_net, make_clip

EPS = 0.05
SIZE = 12


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


def _drift_clip(frames: int, seed: int, speed: float = 0.3 * EPS) -> torch.Tensor:
    """``[1, T, 3, H, W]``: every entry drifts linearly, mostly by less than EPS per frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 3, SIZE, SIZE, generator=g)
    velocity = speed * torch.randn(1, 1, 3, SIZE, SIZE, generator=g)
    t = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1, 1)
    return base + t * velocity


def _dense(net: nn.Module, clip: torch.Tensor):
    with torch.no_grad():
        outs = [net(clip[:, t]) for t in range(clip.shape[1])]
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs], 1) for k in outs[0]}
    return torch.stack(outs, 1)


def _per_frame_rel_error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, out.dim()))
    return (out - dense).abs().amax(dim=(0,) + dims) / dense.abs().amax(dim=(0,) + dims)


def test_previous_reference_without_quantization_equals_dense_over_50_frames() -> None:
    net = make_all_layers_net()
    qm = resq.convert(net, resq.ResQConfig(period=1000, reference="previous"))
    clip = make_clip(batch=2, frames=50, seed=21)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = _dense(net, clip)
    for key in dense:
        rel = ((out[key] - dense[key]).abs().max() / dense[key].abs().max()).item()
        assert rel <= 1e-5, key
    assert qm.last_keyframes.sum().item() == 2  # only frame 0 of each row was a keyframe


def test_error_feedback_keeps_truncation_error_bounded() -> None:
    net = _net()
    clip = _drift_clip(200, seed=1)
    dense = _dense(net, clip)
    errors, densities = {}, {}
    for label, threshold, feedback in (("exact", 0.0, True), ("feedback", EPS, True),
                                       ("no feedback", EPS, False)):
        qm = resq.convert(net, resq.ResQConfig(period=1000, reference="previous",
                                               threshold=threshold, error_feedback=feedback))
        with torch.no_grad(), resq.quantization_disabled(qm):
            out = qm(clip)
        errors[label] = _per_frame_rel_error(out, dense)
        densities[label] = qm.last_cost.mean_density
    assert errors["exact"].max() <= 1e-5
    fb, nofb = errors["feedback"], errors["no feedback"]
    # with feedback the error does not grow: the last 100 frames stay within the first 100's
    assert fb[100:].max() <= 1.5 * fb[:100].max()
    # without it the truncated entries are lost for good: the error keeps growing
    assert nofb[150:].mean() > 3 * nofb[:50].mean()
    assert nofb[-1] > 5 * fb.max()
    assert densities["feedback"] < 0.5 * densities["exact"]


def test_static_clip_density_zero_and_speedup_counts_skipped_frames() -> None:
    qm = resq.convert(_net(), resq.ResQConfig("W8A8->W8A8", period=1000, reference="previous",
                                               threshold=EPS))
    frames = 6
    static = _drift_clip(1, seed=2).repeat(1, frames, 1, 1, 1)
    with torch.no_grad():
        qm(static)
    cost = qm.last_cost
    assert cost.density == {"a": 0.0, "b": 0.0, "head": 0.0}
    # RRM eq. 10: dense work on every frame over the keyframe's work alone
    assert cost.speedup == pytest.approx(frames)
    assert cost.mean_sparse_bops == pytest.approx(cost.per_frame[0] / frames)


def test_failure_mid_forward_leaves_rrm_state_intact() -> None:
    config = resq.ResQConfig("W8A8->W8A4", period=5, reference="previous", threshold=EPS,
                             refresh=resq.ErrorBudgetRefresh(budget=1.0, coefficients=(0.1,)))
    qm = resq.convert(_net(), config)
    clip = _drift_clip(6, seed=3)
    resq.calibrate(qm, [clip[0]], samples=6, candidates=4, progress=False)
    with torch.no_grad():
        expected = qm(clip)
        qm.reset()
        got = [qm.step(clip[:, t]) for t in range(3)]
        truncation = qm.truncated_energy
        layer = dict(qm.resq_layers())["head"]

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        layer.residual.contribution = broken
        try:
            with pytest.raises(RuntimeError, match="boom"):
                qm.step(clip[:, 3])
        finally:
            del layer.residual.contribution  # the class's method again
        assert torch.equal(qm.truncated_energy, truncation)
        got += [qm.step(clip[:, t]) for t in range(3, 6)]
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


def test_error_budget_refresh_fires_per_stream_with_fitted_polynomial() -> None:
    period = 12
    config = resq.ResQConfig("W8A8->W8A8", period=period, reference="previous", threshold=EPS,
                             refresh=resq.ErrorBudgetRefresh(budget=0.05),
                             error_feedback=False)  # truncation error accumulates (RRM Alg. 1)
    qm = resq.convert(_net(), config)
    resq.calibrate(qm, [_drift_clip(24, seed=4)[0]], samples=24, candidates=6, progress=False)
    assert qm.error_polynomial is not None and any(c != 0 for c in qm.error_polynomial)
    frames = 30
    drifting = _drift_clip(frames, seed=5)
    static = _drift_clip(1, seed=6).repeat(1, frames, 1, 1, 1)
    clip = torch.cat([drifting, static])
    with torch.no_grad():
        out = qm(clip)
    refreshes, keyframes = qm.last_refreshes, qm.last_keyframes
    assert refreshes[0].any()  # the drifting stream's accumulated truncation crossed the budget
    assert not refreshes[1].any()  # the static stream never truncates anything
    scheduled = torch.tensor([t % period == 0 for t in range(frames)])
    assert torch.equal(keyframes[1], scheduled)  # row 1 keeps its own phase
    keys = keyframes[0].nonzero().flatten().tolist()
    for previous, current in zip(keys, keys[1:]):  # period is the longest run between keyframes
        assert current - previous <= period
        assert refreshes[0, current] or current - previous == period
    # refreshing helps: the same model without the refresh drifts further from the float model
    plain = qm.with_refresh(None)
    with torch.no_grad():
        without = plain(clip)
    dense = _dense(_net(), drifting)
    assert ((out[:1] - dense).norm() < (without[:1] - dense).norm()).item()


def test_error_budget_refresh_with_given_coefficients_and_missing_fit() -> None:
    budget = 3.0
    config = resq.ResQConfig("W8A8->W8A8", period=100, reference="previous", threshold=EPS,
                             refresh=resq.ErrorBudgetRefresh(budget=budget,
                                                             coefficients=(1.0,)))
    qm = resq.convert(_net(), config)
    clip = torch.cat([_drift_clip(20, seed=7), _drift_clip(1, seed=8).repeat(1, 20, 1, 1, 1)])
    with torch.no_grad(), resq.quantization_disabled(qm):
        energies = []
        qm.reset()
        for t in range(20):
            before = qm.truncated_energy
            qm.step(clip[:, t])
            forced = bool(qm.last_refreshes[0, 0])
            # H(e) = e: a keyframe is forced exactly when the energy accumulated so far > budget
            assert forced == (before is not None and before[0].item() > budget), t
            energies.append(qm.truncated_energy[0].item())
    assert max(energies) > budget and qm.truncated_energy[1].item() == 0
    unfitted = resq.convert(_net(), replace(config, refresh=resq.ErrorBudgetRefresh(0.1)))
    with pytest.raises(RuntimeError, match="fitted polynomial"):
        unfitted(clip)


def test_scene_cut_forces_a_keyframe_on_that_stream_only() -> None:
    config = resq.ResQConfig("W8A8->W8A8", period=100,
                             refresh=resq.SceneCutRefresh(fraction=0.5))
    qm = resq.convert(_net(), config)
    a, b, c = _drift_clip(10, seed=9), _drift_clip(10, seed=10), _drift_clip(10, seed=11)
    resq.calibrate(qm, [a[0]], samples=10, candidates=4, progress=False)
    cut = torch.cat([a[:, :5], b[:, 5:]], 1)  # a new scene from frame 5 on
    clip = torch.cat([cut, c])
    with torch.no_grad():
        out = qm(clip)
        refreshes, keyframes = qm.last_refreshes, qm.last_keyframes
        fresh = qm(cut[:, 5:])  # the new scene as a stream of its own
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[0, 5] = True
    assert torch.equal(refreshes, expected)
    assert torch.equal(keyframes, expected | (torch.arange(10) == 0))
    torch.testing.assert_close(out[0, 5:], fresh[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], qm(c)[0], rtol=0, atol=1e-5)


def test_rrm_config_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -0.1"):
        resq.ResQConfig(reference="previous", threshold=-0.1)
    with pytest.raises(TypeError, match="threshold must be a real number"):
        resq.ResQConfig(threshold="small")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no residual path"):
        resq.ResQConfig(scheme="W8A8", threshold=0.1)
    with pytest.raises(ValueError, match="needs threshold > 0, got threshold=0.0"):
        resq.ResQConfig(reference="previous", refresh=resq.ErrorBudgetRefresh())
    with pytest.raises(TypeError, match="refresh must be None, a refresh policy"):
        resq.ResQConfig(refresh="scene-cut")
    with pytest.raises(ValueError, match="must not repeat"):
        resq.ResQConfig(refresh=(resq.SceneCutRefresh(), resq.SceneCutRefresh(0.2)))
    with pytest.raises(ValueError, match="refresh needs residual frames"):
        resq.ResQConfig(scheme="W8A8", refresh=resq.SceneCutRefresh())
    with pytest.raises(ValueError, match="budget must be a finite number > 0, got 0.0"):
        resq.ErrorBudgetRefresh(budget=0)
    with pytest.raises(ValueError, match="degree must be 1..8, got 9"):
        resq.ErrorBudgetRefresh(degree=9)
    with pytest.raises(TypeError, match="coefficients must be a non-empty sequence"):
        resq.ErrorBudgetRefresh(coefficients=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction must be a finite number > 0"):
        resq.SceneCutRefresh(fraction=0)
    config = resq.ResQConfig(reference="previous", threshold=0.1,
                             refresh=[resq.FixedPeriodRefresh(), resq.SceneCutRefresh()])
    assert isinstance(config.refresh, tuple) and len(config.adaptive_refresh) == 1


@pytest.mark.slow
def test_error_budget_fires_on_a_long_stream_beyond_the_calibrated_range() -> None:
    """2,000 frames: the accumulated truncation passes far beyond what calibration saw, and the
    monotone RRM eq. 8 fit still predicts the growing error (a free quartic may turn down)."""
    config = resq.ResQConfig("W8A8->W8A8", period=5000, reference="previous", threshold=EPS,
                             error_feedback=False, refresh=resq.ErrorBudgetRefresh(budget=1.0))
    qm = resq.convert(_net(), config)
    calib = _drift_clip(24, seed=12)
    resq.calibrate(qm, [calib[0]], samples=24, candidates=4, progress=False)
    with torch.no_grad():
        qm.reset()
        for t in range(24):
            qm.step(calib[:, t])
    reached = qm.truncated_energy.item()
    coefficients = qm.error_polynomial
    predicted = resq.policy.predict_error_rrm_eq8(coefficients,
                                                  torch.tensor([reached], dtype=torch.float64))
    assert reached > 0 and predicted.item() > 0
    # A budget the calibrated range never reaches: only extrapolation can fire it.
    long = qm.with_refresh(resq.ErrorBudgetRefresh(budget=3 * predicted.item(),
                                                   coefficients=coefficients))
    stream = _drift_clip(2000, seed=13)
    with torch.no_grad():
        long(stream)
    fired = long.last_refreshes[0].nonzero().flatten()
    assert fired.numel() > 0 and fired[0].item() > 24
