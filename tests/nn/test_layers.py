"""ResQ layers: weight sharing, state_dict round trips, the layer's own op, MACs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resq_brevitas.nn import (
    ResQConv1d,
    ResQConv2d,
    ResQConv3d,
    ResQConvTranspose2d,
    ResQLinear,
)

QUANT = {"keyframe": "W8A8", "residual": "W4A4"}

CASES = [
    (ResQConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                      dilation=2, groups=2), (2, 4, 17)),
    (ResQConv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=2,
                      dilation=2, groups=4), (2, 4, 11, 9)),
    (ResQConv2d, dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6),
     (2, 6, 8, 8)),
    (ResQConv3d, dict(in_channels=3, out_channels=4, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
     (2, 3, 2, 6, 6)),
    (ResQConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=4, stride=2,
                               padding=1, groups=2), (2, 4, 5, 7)),
    (ResQLinear, dict(in_features=5, out_features=3), (2, 7, 5)),
]


def _ids(case) -> str:
    return case[0].__name__ + "-" + "x".join(str(s) for s in case[2])


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=[_ids(c) for c in CASES])
def test_linear_op_equals_functional(cls, kwargs, shape) -> None:
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT)
    x = torch.randn(shape)
    w = layer.weight.detach()
    if cls is ResQLinear:
        expected = F.linear(x, w)
    elif cls is ResQConvTranspose2d:
        expected = F.conv_transpose2d(x, w, None, layer.stride, layer.padding,
                                      layer.output_padding, layer.groups, layer.dilation)
    else:
        fn = {ResQConv1d: F.conv1d, ResQConv2d: F.conv2d, ResQConv3d: F.conv3d}[cls]
        expected = fn(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer.linear_op(x, w), expected)


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=[_ids(c) for c in CASES])
def test_macs_equal_flop_counter(cls, kwargs, shape) -> None:
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer.linear_op(x, layer.weight)
        counter = FlopCounterMode(display=False)
        with counter:
            layer.linear_op(x, layer.weight)
    per_sample = layer.macs(tuple(x.shape[1:]), tuple(y.shape[1:]))
    assert counter.get_total_flops() == 2 * per_sample * x.shape[0]


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=[_ids(c) for c in CASES])
def test_residual_view_shares_weight_and_gradients_sum(cls, kwargs, shape) -> None:
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT)
    assert layer.residual.view.weight is layer.weight
    assert layer.residual.view.bias is None
    params = [n for n, _ in layer.named_parameters()]
    assert params.count("weight") == 1 and "residual.view.weight" not in params
    x, delta = torch.randn(shape), 0.1 * torch.randn(shape)

    layer.keyframe_forward(x).sum().backward()
    grad_key = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.residual_forward(delta).sum().backward()
    grad_res = layer.weight.grad.clone()
    layer.weight.grad = None
    (layer.keyframe_forward(x).sum() + layer.residual_forward(delta).sum()).backward()
    torch.testing.assert_close(layer.weight.grad, grad_key + grad_res)


@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip_keeps_tie(assign: bool) -> None:
    torch.manual_seed(0)
    src = ResQConv2d(3, 4, 3, padding=1, **QUANT)
    with torch.no_grad():
        src.residual.view.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value.fill_(
            0.3)
    sd = src.state_dict()
    assert "weight" in sd and "residual.view.weight" not in sd
    dst = ResQConv2d(3, 4, 3, padding=1, **QUANT)
    result = dst.load_state_dict(sd, assign=assign)
    assert not result.missing_keys and not result.unexpected_keys
    assert dst.residual.view.weight is dst.weight
    torch.testing.assert_close(dst.weight, src.weight)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(dst.residual_forward(x), src.residual_forward(x))
    with torch.no_grad():
        dst.weight.mul_(2)  # an in-place update is seen by both paths
    torch.testing.assert_close(dst.residual.view.weight, dst.weight)


def test_positional_and_keyword_construction_agree() -> None:
    a = ResQConv2d(3, 4, 3, 2, 1, **QUANT)
    b = ResQConv2d(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, **QUANT)
    assert (a.stride, a.padding, a.kernel_size) == (b.stride, b.padding, b.kernel_size)
    with pytest.raises(TypeError):
        ResQConv2d(3, 4, 3, 2, 1, 1, 1, 1, **QUANT)
