"""Quantizers against eq. 1 / eq. 6 / eq. 7 computed by hand, inside real Brevitas layers."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resq_brevitas.quant import act_quant, quantize_eq1, set_act_threshold, weight_quant
from resq_brevitas.quant.line_search import act_threshold


def _value(t):
    return getattr(t, "value", t)


def _hand_eq1(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    # eq. 1 written out element by element, independent of quantize_eq1.
    out = torch.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.view(-1)
    flat_s = scale.expand_as(x).reshape(-1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for i in range(flat_x.numel()):
        level = round(flat_x[i].item() / flat_s[i].item())  # Python round: half to even
        flat_out[i] = flat_s[i] * min(max(level, lo), hi)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_tensor_weight_quant_equals_eq1_eq6_eq7(bits: int) -> None:
    torch.manual_seed(bits)
    layer = qnn.QuantConv2d(3, 5, 3, bias=False, weight_quant=weight_quant(bits))
    w = layer.weight.detach()
    scale = 2 * torch.maximum(w.max(), -w.min()) / (2**bits - 1)  # eq. 6 with eq. 7's range
    expected = _hand_eq1(w, scale.view(1, 1, 1, 1), bits)
    torch.testing.assert_close(_value(layer.quant_weight()), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_weight_quant_equals_eq1(bits: int) -> None:
    torch.manual_seed(10 + bits)
    layer = qnn.QuantConv2d(3, 5, 3, bias=False, weight_quant=weight_quant(bits, "channel"))
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, 5).view(5, 1, 1, 1))
    w = layer.weight.detach()
    per_channel_max = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    expected = _hand_eq1(w, 2 * per_channel_max / (2**bits - 1), bits)
    torch.testing.assert_close(_value(layer.quant_weight()), expected, rtol=0, atol=1e-7)
    # each channel uses its own scale: its largest magnitude is representable exactly
    top = _value(layer.quant_weight()).abs().amax(dim=(1, 2, 3))
    assert torch.all(top > 0)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_activation_quant_equals_eq1_with_threshold(bits: int) -> None:
    torch.manual_seed(bits)
    layer = qnn.QuantLinear(6, 2, bias=False, input_quant=act_quant(bits), weight_quant=None)
    set_act_threshold(layer.input_quant, 1.7)
    assert act_threshold(layer.input_quant) == pytest.approx(1.7)
    x = 2 * torch.randn(4, 6)
    expected = _hand_eq1(x, torch.tensor(2 * 1.7 / (2**bits - 1)), bits)
    torch.testing.assert_close(_value(layer.input_quant(x)), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(quantize_eq1(x, 2 * 1.7 / (2**bits - 1), bits), expected)


def test_zero_bit_quantizers_return_zeros() -> None:
    layer = qnn.QuantConv2d(2, 3, 1, bias=False, weight_quant=weight_quant(0),
                            input_quant=act_quant(0))
    x = torch.randn(1, 2, 4, 4)
    assert torch.count_nonzero(_value(layer.quant_weight())) == 0
    assert torch.count_nonzero(_value(layer.input_quant(x))) == 0
    assert torch.count_nonzero(layer(x)) == 0
    assert torch.count_nonzero(quantize_eq1(x, 1.0, 0)) == 0


def test_fp32_means_no_quantizer() -> None:
    assert weight_quant(None) is None and act_quant(None) is None
    torch.manual_seed(0)
    layer = qnn.QuantConv2d(2, 3, 3, weight_quant=weight_quant(None), input_quant=act_quant(None))
    ref = torch.nn.Conv2d(2, 3, 3)
    ref.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("bad", [1, 17, -2])
def test_invalid_bit_widths_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        weight_quant(bad)
    with pytest.raises(ValueError, match="bits"):
        act_quant(bad)


def test_non_int_bit_width_rejected() -> None:
    with pytest.raises(TypeError, match="bits"):
        act_quant("8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity"):
        weight_quant(8, "row")


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(min_value=2, max_value=10),
    threshold=st.floats(min_value=0.05, max_value=20.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_quantizer_error_bound_and_idempotence(bits: int, threshold: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = qnn.QuantIdentity(act_quant=act_quant(bits), return_quant_tensor=False)
    set_act_threshold(layer.act_quant, threshold)
    scale = 2 * threshold / (2**bits - 1)
    x = threshold * (2 * torch.rand(256, generator=g) - 1)
    q = layer(x)
    inside = (x >= -(2 ** (bits - 1)) * scale) & (x <= (2 ** (bits - 1) - 1) * scale)
    assert torch.all((x - q).abs()[inside] <= scale / 2 * (1 + 1e-5))
    torch.testing.assert_close(layer(q), q, rtol=0, atol=scale * 1e-5)
    # quantized values sit on the integer grid
    levels = q / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
