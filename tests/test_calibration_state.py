"""Issue 12 item 7: an uncalibrated model says so; zero-range calibration does not set ranges;
an activation threshold of exactly 0 gives no NaN (the positive floor)."""

from __future__ import annotations

import warnings

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.calibrate import activation_ranges
from resq_brevitas.quant.quantizers import ACT_THRESHOLD_FLOOR
from tests.helpers import make_all_layers_net, make_clip


def _qm(**config) -> resq.ResQModel:
    return resq.convert(make_all_layers_net(), resq.ResQConfig(period=3, **config))


def test_uncalibrated_model_warns_once_and_raises_under_strict() -> None:
    clip = make_clip(batch=1, frames=3)
    qm = _qm()
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with resq.quantization_disabled(qm):  # ranges play no part: no warning
                qm(clip)
        with pytest.warns(UserWarning, match="not calibrated.*resq_brevitas.calibrate"):
            qm(clip)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qm.step(clip[:, 0])  # once per model
        strict = _qm(strict=True)
        with pytest.raises(RuntimeError, match="not calibrated"):
            strict.step(clip[:, 0])
        assert not strict.in_stream  # refused before touching the state
        resq.calibrate(strict, [clip], samples=3, candidates=4, progress=False)
        strict(clip)  # calibrated: runs


def test_zero_range_calibration_warns_and_leaves_the_quantizers_uncalibrated() -> None:
    qm = _qm()
    before = activation_ranges(qm)
    zeros = torch.zeros(1, 4, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"range of exactly zero.*stem/keyframe/0"):
        resq.calibrate(qm, [zeros], samples=4, candidates=4, progress=False)
    after = activation_ranges(qm)
    assert not qm.calibrated and "stem/keyframe/0" in qm.uncalibrated_ranges
    for key in qm.uncalibrated_ranges:
        assert after[key] == before[key]  # kept, not set to a tiny range
    assert all(after[k] >= ACT_THRESHOLD_FLOOR for k in after)


def test_constant_clip_sets_keyframe_ranges_and_leaves_residual_ones() -> None:
    qm = _qm()
    constant = make_clip(batch=1, frames=1).expand(1, 4, 3, 16, 16).contiguous()
    with pytest.warns(UserWarning, match="range of exactly zero"):
        resq.calibrate(qm, [constant], samples=4, candidates=4, progress=False)
    assert qm.uncalibrated_ranges and all("/residual/" in k for k in qm.uncalibrated_ranges)
    assert not qm.calibrated
    resq.calibrate(qm, [make_clip(batch=1, frames=4)], samples=4, candidates=4,
                   progress=False)
    assert qm.calibrated and qm.uncalibrated_ranges == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_zero_activation_threshold_gives_no_nan(dtype: torch.dtype) -> None:
    qm = _qm()
    clip = make_clip(batch=2, frames=4)
    resq.calibrate(qm, [clip[:1]], samples=4, candidates=4, progress=False)
    state = qm.state_dict()
    zeroed = {k: (torch.zeros_like(v) if k.endswith("scaling_impl.value") else v)
              for k, v in state.items()}
    assert sum(k.endswith("scaling_impl.value") for k in state) > 0
    qm.load_state_dict(zeroed)
    qm = qm.to(dtype)
    with torch.no_grad():
        out = qm(clip.to(dtype))  # a keyframe and residual frames
    for value in out.values():
        assert torch.isfinite(value).all()
