"""Any-precision weights (VideoIQ section 3.4): truncated views of the keyframe's integer weight."""

from __future__ import annotations

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.nn.layers import (
    ResQConv1d,
    ResQConv2d,
    ResQConv3d,
    ResQConvTranspose2d,
    ResQLinear,
)
from resq_brevitas.nn.residual import value_of
from resq_brevitas.quant.any_precision import truncation_bound
from tests.helpers import make_all_layers_net, make_clip

LAYERS = [
    (ResQConv1d, (4, 6, 3), 0),
    (ResQConv2d, (4, 6, 3), 0),
    (ResQConv3d, (4, 6, (1, 3, 3)), 0),
    (ResQConvTranspose2d, (4, 6, 3), 1),
    (ResQLinear, (12, 5), 0),
]
GRANULARITIES = ["tensor", "channel"]


def _layer(cls, args, residual_bits, granularity, key_bits=8, truncated=True, seed=0):
    torch.manual_seed(seed)
    return cls(*args, keyframe=f"W{key_bits}A8", residual=f"W{residual_bits}A8",
               weight_granularity=granularity,
               residual_weights="truncated" if truncated else "separate")


def _hand_scale(w: torch.Tensor, bits: int, granularity: str, out_dim: int) -> torch.Tensor:
    """eq. 6 by hand: ``max|w| / ((2^b - 1) / 2)``, per tensor or per output channel."""
    if granularity == "tensor":
        return w.abs().max() / ((2**bits - 1) / 2)
    dims = tuple(d for d in range(w.dim()) if d != out_dim)
    return w.abs().amax(dims, keepdim=True) / ((2**bits - 1) / 2)


def _hand_truncated(w, key_bits, bits, granularity, out_dim):
    """The section-3.4 formula with integer ops: an arithmetic shift of the int64 weight."""
    scale = _hand_scale(w, key_bits, granularity, out_dim)
    q1 = torch.clamp(torch.round(w / scale), -(2 ** (key_bits - 1)), 2 ** (key_bits - 1) - 1)
    shifted = q1.to(torch.int64) >> (key_bits - bits)           # drop k LSBs (floor)
    value = shifted.to(w.dtype) * scale * 2 ** (key_bits - bits)
    dims = (tuple(range(w.dim())) if granularity == "tensor"
            else tuple(d for d in range(w.dim()) if d != out_dim))
    value = value + (q1 * scale).mean(dims, keepdim=True) - value.mean(dims, keepdim=True)
    return value, shifted, scale


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("cls,args,out_dim", LAYERS)
def test_truncation_equals_integer_formula_every_bit_width(cls, args, out_dim, granularity):
    for bits in range(2, 9):
        layer = _layer(cls, args, bits, granularity)
        with torch.no_grad():
            got = layer.residual.quant_weight()
        expected, shifted, _ = _hand_truncated(layer.weight.detach(), 8, bits, granularity,
                                               out_dim)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        assert low <= int(shifted.min()) and int(shifted.max()) <= high


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("cls,args,out_dim", LAYERS)
def test_one_integer_weight_keyframe_int_shifted(cls, args, out_dim, granularity):
    """The residual's integer is the keyframe quantizer's own integer, shifted right."""
    for bits in (2, 4, 6):
        layer = _layer(cls, args, bits, granularity)
        with torch.no_grad():
            key_int = layer.quant_weight().int().to(torch.int64)
            res = layer.residual.view.quant_weight()
            value = res.value
            scale = res.scale
            dims = (tuple(range(value.dim())) if granularity == "tensor"
                    else tuple(d for d in range(value.dim()) if d != out_dim))
            # Undo the mean offset: the remainder is an exact multiple of the residual scale.
            _, shifted, _ = _hand_truncated(layer.weight, 8, bits, granularity, out_dim)
            offset = (value - shifted * scale).mean(dims, keepdim=True)
            recovered = torch.round((value - offset) / scale).to(torch.int64)
        assert torch.equal(recovered, key_int >> (8 - bits))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("cls,args,out_dim", LAYERS)
def test_truncation_keeps_the_high_precision_mean(cls, args, out_dim, granularity):
    layer = _layer(cls, args, 3, granularity)
    with torch.no_grad():
        key = layer.quant_weight().value
        res = layer.residual.quant_weight()
    dims = (tuple(range(key.dim())) if granularity == "tensor"
            else tuple(d for d in range(key.dim()) if d != out_dim))
    torch.testing.assert_close(res.mean(dims), key.mean(dims), rtol=0, atol=1e-7)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("cls,args,out_dim", LAYERS)
def test_truncated_differs_from_fresh_quantization_within_the_bound(cls, args, out_dim,
                                                                     granularity):
    for bits in (2, 4, 6):
        truncated = _layer(cls, args, bits, granularity, truncated=True)
        fresh = _layer(cls, args, bits, granularity, truncated=False)
        w = truncated.weight.detach()
        assert torch.equal(w, fresh.weight.detach())
        with torch.no_grad():
            a = truncated.residual.quant_weight()
            b = fresh.residual.quant_weight()
        bound = truncation_bound(w, _hand_scale(w, 8, granularity, out_dim), 8, bits,
                                 _hand_scale(w, bits, granularity, out_dim))
        diff = (a - b).abs()
        assert bool((diff <= bound + 1e-6).all()), float((diff - bound).max())
        assert float(diff.max()) > 0  # a different grid: truncation is not re-quantization


def test_gradient_reaches_the_shared_weight():
    layer = _layer(ResQConv2d, (4, 6, 3), 4, "channel")
    layer.residual.quant_weight().sum().backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


def test_truncated_rejects_bits_above_keyframe_and_fp32():
    with pytest.raises(ValueError, match="residual_weights"):
        resq.ResQConfig(scheme="W4A4->W8A8", residual_weights="truncated")
    with pytest.raises(ValueError, match="residual_weights"):
        resq.ResQConfig(scheme="fp32->W4A4", residual_weights="truncated")
    with pytest.raises(ValueError, match="residual_weights"):
        resq.ResQConfig(scheme="W8A8->W4A4", residual_weights="shared")
    with pytest.raises(ValueError, match="override"):
        resq.ResQConfig(scheme="W8A8->W4A4", residual_weights="truncated",
                        overrides=(resq.LayerOverride("head", "W4A4->W6A6"),))


def test_residual_weights_round_trips_through_to_dict():
    cfg = resq.ResQConfig(scheme="W8A8->W4A4", residual_weights="truncated")
    data = cfg.to_dict()
    assert data["residual_weights"] == "truncated"
    assert resq.ResQConfig.from_dict(data) == cfg


def test_keyframe_path_unchanged_residual_frames_differ():
    net = make_all_layers_net()
    calib = [make_clip(2, 4, seed=s) for s in range(2)]
    clip = make_clip(2, 4, seed=9)
    models = {}
    for kind in ("separate", "truncated"):
        qm = resq.convert(net, resq.ResQConfig(scheme="W8A8->W4A4", period=4,
                                               residual_weights=kind,
                                               calibration=resq.LineSearch(8, 8)))
        resq.calibrate(qm, calib, progress=False)
        models[kind] = qm
    sep, tru = models["separate"], models["truncated"]
    for (name, a), (_, b) in zip(sep.resq_layers(), tru.resq_layers()):
        assert torch.equal(value_of(a.quant_weight()), value_of(b.quant_weight())), name
        assert torch.equal(a.input_quant.scale(), b.input_quant.scale()), name
    with torch.no_grad():
        ys, yt = sep(clip), tru(clip)
    for key in ys:
        assert torch.equal(ys[key][:, 0], yt[key][:, 0])     # the keyframe
        assert not torch.equal(ys[key][:, 1:], yt[key][:, 1:])  # residual frames differ
