"""Temporal decomposition and stream semantics of ResQModel."""

from __future__ import annotations

import copy

import pytest
import torch

import resq_brevitas as resq
from tests.helpers import make_all_layers_net, make_clip


def _calibrated(net: torch.nn.Module, scheme: str = "W8A8->W4A4", period: int = 4,
                **kwargs) -> resq.ResQModel:
    qm = resq.convert(net, resq.ResQConfig(scheme=scheme, period=period, **kwargs))
    return resq.calibrate(qm, [make_clip(batch=1, frames=8, seed=7)[0]], samples=8,
                          candidates=8, progress=False)


def _dense(net: torch.nn.Module, clip: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = [net(clip[:, t]) for t in range(clip.shape[1])]
    return {k: torch.stack([o[k] for o in outs], 1) for k in outs[0]}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantization_disabled_equals_float_model(granularity: str) -> None:
    net = make_all_layers_net()
    clip = make_clip(frames=12)
    qm = _calibrated(net, weight_granularity=granularity)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = _dense(net, clip)
    for key in dense:
        assert _max_rel(out[key], dense[key]) <= 1e-5, key
    # the frames really went through the residual path (keyframe share 1/4)
    assert qm.last_cost.keyframe_share == pytest.approx(3 / 12)


def test_quantization_disabled_restores_quantizers() -> None:
    net = make_all_layers_net()
    qm = _calibrated(net)
    clip = make_clip(frames=4)
    with torch.no_grad():
        before = qm(clip)["seg"]
        with resq.quantization_disabled(qm):
            float_out = qm(clip)["seg"]
        after = qm(clip)["seg"]
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.allclose(before, float_out)


def test_bias_only_on_keyframe_path() -> None:
    net = make_all_layers_net()
    qm = _calibrated(net)
    for name, layer in qm.resq_layers():
        assert layer.residual.view.bias is None, name
        delta = torch.zeros(1, layer.weight.shape[1] * getattr(layer, "groups", 1), 5, 5)
        if isinstance(layer, torch.nn.Linear):
            delta = torch.zeros(1, layer.in_features)
        elif layer.weight.dim() == 3:
            delta = delta[..., 0]
        elif layer.weight.dim() == 5:
            delta = delta.unsqueeze(2)
        if isinstance(layer, torch.nn.ConvTranspose2d):
            delta = torch.zeros(1, layer.in_channels, 5, 5)
        with torch.no_grad():
            assert torch.count_nonzero(layer.residual_forward(delta)) == 0, name
    # a static clip: residual frames must return exactly the keyframe output (bias added once)
    static = make_clip(batch=1, frames=1).repeat(1, 6, 1, 1, 1)
    with torch.no_grad():
        out = qm(static)["seg"]
    for t in range(1, 4):
        torch.testing.assert_close(out[:, t], out[:, 0], rtol=0, atol=1e-6)


def test_forward_equals_step_by_step_and_split_loops() -> None:
    qm = _calibrated(make_all_layers_net())
    clip = make_clip(frames=10, seed=3)
    with torch.no_grad():
        whole = qm(clip)["seg"]
        qm.reset()
        first = [qm.step(clip[:, t])["seg"] for t in range(4)]
        second = [qm.step(clip[:, t])["seg"] for t in range(4, 10)]
    torch.testing.assert_close(torch.stack(first + second, 1), whole, rtol=0, atol=0)


def test_forward_cost_matches_step_costs() -> None:
    qm = _calibrated(make_all_layers_net())
    clip = make_clip(frames=6, seed=3)
    with torch.no_grad():
        qm(clip)
        clip_cost = qm.last_cost
        qm.reset()
        per_step = []
        for t in range(6):
            qm.step(clip[:, t])
            per_step.append(qm.last_cost.mean_bops)
    assert clip_cost.per_frame == pytest.approx(per_step)


def test_reset_equals_fresh_model() -> None:
    qm = _calibrated(make_all_layers_net())
    fresh = copy.deepcopy(qm)
    clip_a, clip_b = make_clip(frames=5, seed=1), make_clip(frames=6, seed=2)
    with torch.no_grad():
        for t in range(5):
            qm.step(clip_a[:, t])
        qm.reset()
        after_reset = [qm.step(clip_b[:, t])["seg"] for t in range(6)]
        from_fresh = [fresh.step(clip_b[:, t])["seg"] for t in range(6)]
    for a, b in zip(after_reset, from_fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_rows_are_independent_streams() -> None:
    qm = _calibrated(make_all_layers_net())
    clip = make_clip(batch=3, frames=8, seed=4)
    other = clip.clone()
    other[1:] = make_clip(batch=2, frames=8, seed=99)
    with torch.no_grad():
        ref = qm(clip)["seg"][0]
        changed = qm(other)["seg"][0]
        alone = qm(clip[:1])["seg"][0]
    torch.testing.assert_close(changed, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, ref, rtol=0, atol=1e-5)


def test_rows_with_different_phases() -> None:
    """Rows whose keyframes fall on different steps each follow their own schedule."""
    net = make_all_layers_net()
    qm = _calibrated(net)
    clip = make_clip(batch=2, frames=7, seed=5)
    with torch.no_grad():
        row0 = qm(clip[:1])["seg"][0]
        row1_late = qm(clip[1:, 2:])["seg"][0]  # row 1 starts its stream two frames later
        qm.reset()
        qm.step(clip[:, 0])
        qm.step(clip[:, 1])
        qm.reset(rows=[1])  # restart row 1's stream here
        mixed = [qm.step(clip[:, t])["seg"] for t in range(2, 7)]
        costs_mixed = qm.last_cost
    mixed = torch.stack(mixed, 1)
    torch.testing.assert_close(mixed[0], row0[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], row1_late, rtol=0, atol=1e-5)
    assert 0 < costs_mixed.keyframe_share < 1


def test_period_controls_keyframes() -> None:
    clip = make_clip(batch=1, frames=9)
    for period in (1, 2, 3):
        qm = _calibrated(make_all_layers_net(), period=period)
        with torch.no_grad():
            qm(clip)
        per_frame = qm.last_cost.per_frame
        high = max(per_frame)
        keys = [i for i, b in enumerate(per_frame) if b == high]
        assert keys == list(range(0, 9, period))


def test_tuple_outputs_and_training_mode_gradients() -> None:
    class TupleNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return h, self.b(h)

    qm = _calibrated(TupleNet())
    qm.train()
    clip = make_clip(frames=5)
    h, y = qm(clip)
    assert h.shape == (2, 5, 4, 16, 16) and y.shape == (2, 5, 2, 16, 16)
    y.pow(2).mean().backward()
    layer = dict(qm.resq_layers())["a"]
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.residual.weight.grad is layer.weight.grad


def test_frame_quantization_has_no_residual_path() -> None:
    qm = _calibrated(make_all_layers_net(), scheme="W4A4", period=4)
    assert qm.period == 1
    assert all(layer.residual is None for _, layer in qm.resq_layers())
    clip = make_clip(frames=4)
    with torch.no_grad():
        out = qm(clip)["seg"]
        direct = torch.stack([qm.model(clip[:, t])["seg"] for t in range(4)], 1)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    assert qm.last_cost.keyframe_share == 1.0


def test_two_models_share_nothing() -> None:
    net = make_all_layers_net()
    qa = _calibrated(net, scheme="W8A8->W4A4")
    qb = _calibrated(net, scheme="W8A8->W2A2")
    clip = make_clip(frames=4)
    with torch.no_grad():
        ref = qa(clip)["seg"]
        qb(make_clip(frames=3, seed=9))
        qb.step(make_clip(frames=1, seed=9)[:, 0])
        again = qa(clip)["seg"]
    torch.testing.assert_close(ref, again, rtol=0, atol=0)
    la, lb = dict(qa.resq_layers())["stem"], dict(qb.resq_layers())["stem"]
    assert la.weight is not lb.weight


def test_calibrate_keeps_each_module_training_mode() -> None:
    net = make_all_layers_net()
    qm = resq.convert(net, resq.ResQConfig(fold_bn=False))
    assert not qm.training  # an eval float model gives an eval ResQModel
    qm.model.se.train()  # mixed modes survive calibration one by one
    modes = {n: m.training for n, m in qm.named_modules()}
    resq.calibrate(qm, [make_clip(batch=1, frames=4)[0]], samples=4, candidates=4,
                   progress=False)
    assert {n: m.training for n, m in qm.named_modules()} == modes
