"""A ResQModel is safe to train: positive scales, no graph across clips, random phase, groups."""

from __future__ import annotations

import weakref

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.quant.line_search import act_threshold
from tests.helpers import make_clip, make_tiny_segnet


def _calibrated(scheme: str = "W8A8->W4A4", period: int = 4, seed: int = 0) -> resq.ResQModel:
    qm = resq.convert(make_tiny_segnet(seed), resq.ResQConfig(scheme=scheme, period=period))
    resq.calibrate(qm, [_clip(2, 8, seed=s) for s in range(2)], samples=16, progress=False)
    return qm


def _clip(batch: int, frames: int, seed: int) -> torch.Tensor:
    return make_clip(batch, frames, size=8, seed=seed)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_parameter_groups_partition_the_parameters() -> None:
    qm = _calibrated()
    quant = list(qm.quantizer_parameters())
    weights = list(qm.weight_parameters())
    assert {id(p) for p in quant}.isdisjoint(id(p) for p in weights)
    assert {id(p) for p in quant} | {id(p) for p in weights} == {id(p) for p in qm.parameters()}
    # one keyframe + one residual threshold per layer; each shared weight counted once
    layers = list(qm.resq_layers())
    assert len(quant) == 2 * len(layers)
    assert sum(p is layer.weight for p in weights for _, layer in layers) == len(layers)


def test_scales_stay_positive_under_an_adversarial_learning_rate() -> None:
    qm = _calibrated().train()
    clip = _clip(2, 8, seed=3)
    optimiser = torch.optim.SGD(qm.quantizer_parameters(), lr=1e4)
    for _ in range(8):
        optimiser.zero_grad()
        _loss(qm(clip)).backward()
        optimiser.step()
    for _, layer in qm.resq_layers():
        for target in layer.calibration_targets():
            assert act_threshold(target.proxy) > 0
    out = qm(clip)
    assert bool(torch.isfinite(out).all())


def test_no_autograd_graph_survives_a_clip() -> None:
    qm = _calibrated().train()
    saved: list[weakref.ref] = []
    params = {id(p) for p in qm.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # The graph keeps its own detached handle (a handle with a grad_fn would make a
        # reference cycle through the graph): it dies exactly when the graph does.
        handle = t.detach()
        if id(t) not in params:
            saved.append(weakref.ref(handle))
        return handle

    clips = [_clip(2, 8, seed=10 + s) for s in range(3)]
    for clip in clips:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = qm(clip)
        del out  # no backward: only a reference kept by the model could keep the graph alive
    assert saved
    alive = [r for r in saved if r() is not None]
    assert not alive, f"{len(alive)} tensors of earlier clips' autograd graphs are still alive"
    for _, state in qm._states.items():
        if state.ref is not None:
            assert state.ref.x.grad_fn is None and state.ref.z.grad_fn is None


def test_random_phase_in_training_only() -> None:
    torch.manual_seed(0)
    qm = _calibrated()
    qm.training_phase = "random"
    clip = _clip(16, 8, seed=4)
    qm.train()
    out = qm(clip)
    key = qm.last_keyframes
    assert bool(key[:, 0].all())
    # each row: keyframe at 0, next one after 1..T frames, then every T frames
    first = [int(row[1:].nonzero()[0]) + 1 for row in key]
    assert set(first) <= set(range(1, 5)) and len(set(first)) > 1
    for row, f in zip(key, first):
        expected = torch.zeros(8, dtype=torch.bool)
        expected[0] = True
        expected[f::4] = True
        assert torch.equal(row, expected)
    # equal to stepping the same schedule frame by frame
    qm.eval()
    assert torch.equal(qm(clip)[:, :1], out[:, :1])
    assert torch.equal(qm.last_keyframes[0], torch.tensor([1, 0, 0, 0] * 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="training_phase"):
        qm.training_phase = "later"
        qm(clip)


def test_random_phase_rows_equal_a_stream_with_that_schedule() -> None:
    torch.manual_seed(1)
    qm = _calibrated().train()
    qm.training_phase = "random"
    clip = _clip(4, 6, seed=5)
    out = qm(clip)
    key = qm.last_keyframes.clone()
    qm.training_phase = "zero"
    for b in range(4):  # the same keyframes, forced by resets while stepping one row
        qm.reset()
        for t in range(6):
            if key[b, t]:
                qm.reset()
            y = qm.step(clip[b:b + 1, t])
            torch.testing.assert_close(y[0], out[b, t], rtol=1e-5, atol=1e-5)


def test_version_1_state_dict_with_linear_thresholds_loads() -> None:
    qm = _calibrated()
    state = qm.state_dict()
    old = type(state)((k, v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in state.items())
    old._metadata = {k: dict(v) for k, v in state._metadata.items()}
    for name, _ in qm.resq_layers():  # rewrite into the old format: linear thresholds
        old._metadata["model." + name]["version"] = 1
        for key in [k for k in old if k.startswith(f"model.{name}.") and
                    k.endswith("scaling_impl.value")]:
            old[key] = torch.exp2(old[key])
    fresh = resq.convert(make_tiny_segnet(), qm.config)
    fresh.load_state_dict(old)
    assert resq.activation_ranges(fresh) == pytest.approx(resq.activation_ranges(qm), rel=1e-6)
    clip = _clip(1, 5, seed=6)
    torch.testing.assert_close(fresh(clip), qm(clip))
