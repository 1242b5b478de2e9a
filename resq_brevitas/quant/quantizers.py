"""Brevitas injector quantizers implementing eq. 1 and eq. 6 of the ResQ paper.

Brevitas computes ``scale = threshold / int_threshold``. Eq. 6 asks for
``s = 2 max(r_max, -r_min) / (2^b - 1)``, i.e. ``threshold = max|r|`` and
``int_threshold = (2^b - 1) / 2``: :class:`HalfRangeIntScaling` supplies that denominator, and the
integer range stays the full signed ``[-2^(b-1), 2^(b-1) - 1]`` (not narrow), as eq. 1 asks.

The injectors work on their own in plain Brevitas layers::

    qnn.QuantConv2d(3, 8, 3, weight_quant=weight_quant(4), input_quant=act_quant(4))
"""

from __future__ import annotations

import torch
from brevitas.core.function_wrapper import TensorClamp
from brevitas.core.stats import AbsMax
from brevitas.inject.enum import RestrictValueType, ScalingImplType, ScalingPerOutputType
from brevitas.quant.base import IntQuant, MaxStatsScaling
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from torch import Tensor, nn

from resq_brevitas.checks import check_choice
from resq_brevitas.config import validate_bits

__all__ = [
    "MIN_THRESHOLD",
    "FullRangeIntScaling",
    "HalfRangeIntScaling",
    "ZeroTensorQuant",
    "ResQWeightQuant",
    "ResQWeightPerChannelQuant",
    "ResQActQuant",
    "ResQZeroWeightQuant",
    "ResQZeroActQuant",
    "weight_quant",
    "act_quant",
    "make_unsigned",
    "quantize_eq1",
    "quantize_unsigned",
    "scale_eq6",
]


def scale_eq6(r_max: Tensor | float, r_min: Tensor | float, bits: int) -> Tensor:
    """Scale factor of eq. 6: ``s = 2 max(r_max, -r_min) / (2^b - 1)``.

    Args:
        r_max: Upper end of the range.
        r_min: Lower end of the range.
        bits: Bit width ``b`` (>= 2).

    Returns:
        The scale ``s`` as a tensor.
    """
    r_max_t = torch.as_tensor(r_max, dtype=torch.float32)
    r_min_t = torch.as_tensor(r_min, dtype=torch.float32)
    return 2 * torch.maximum(r_max_t, -r_min_t) / (2**bits - 1)


def quantize_eq1(x: Tensor, scale: Tensor | float, bits: int) -> Tensor:
    """Uniform symmetric signed quantization, eq. 1.

    ``q(x) = s * clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` with round-half-to-even;
    ``bits == 0`` returns zeros. This is the reference the Brevitas injectors are tested against
    and the fake-quant used inside the line search.

    Args:
        x: Tensor to quantize.
        scale: Scale ``s`` (broadcastable to ``x``).
        bits: Bit width ``b`` (0 or >= 2).

    Returns:
        The de-quantized tensor.
    """
    if bits == 0:
        return torch.zeros_like(x)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # One fresh tensor, then in place: the line search quantizes r candidates of every batch.
    return torch.div(x, scale).round_().clamp_(q_min, q_max).mul_(scale)


#: The smallest activation threshold a quantizer uses (a floor under ``2 ** log2_threshold``).
MIN_THRESHOLD = 1e-12


class HalfRangeIntScaling(nn.Module):
    """Integer threshold ``(2^b - 1) / 2`` so that Brevitas's scale equals eq. 6."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, bit_width: Tensor, signed: bool | None = None) -> Tensor:
        return ((2.0**bit_width - 1.0) / 2.0).to(dtype=self.dtype or bit_width.dtype)


class FullRangeIntScaling(nn.Module):
    """Integer threshold ``2^b - 1``: an unsigned quantizer maps ``[0, threshold]`` onto the
    levels ``0 .. 2^b - 1`` (twice the resolution of eq. 6's signed grid at equal bits)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, bit_width: Tensor, signed: bool | None = None) -> Tensor:
        return (2.0**bit_width - 1.0).to(dtype=self.dtype or bit_width.dtype)


def quantize_unsigned(x: Tensor, scale: Tensor | float, bits: int) -> Tensor:
    """The unsigned variant of eq. 1 for non-negative tensors (``act_signedness="auto"``):
    ``q(x) = s * clamp(round(x / s), 0, 2^b - 1)`` with ``s = threshold / (2^b - 1)``.

    Args:
        x: Tensor to quantize.
        scale: Scale ``s`` (broadcastable to ``x``).
        bits: Bit width ``b`` (>= 2).
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return torch.div(x, scale).round_().clamp_(0, 2**bits - 1).mul_(scale)


def make_unsigned(proxy: nn.Module) -> None:
    """Turn a ResQ activation quantizer proxy unsigned (:class:`FullRangeIntScaling`), in place.

    Its range parameter is re-created at its initial value: set the threshold afterwards.
    """
    proxy.quant_injector = proxy.quant_injector.let(signed=False,
                                                    int_scaling_impl=FullRangeIntScaling)
    proxy.init_tensor_quant()
    proxy.is_signed = False  # Brevitas caches it from the injector at construction


class ZeroTensorQuant(nn.Module):
    """A 0-bit tensor quantizer: returns zeros (with unit scale and zero bit width)."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zero = x.new_zeros(())
        return torch.zeros_like(x), x.new_ones(()), zero, zero


class ResQWeightQuant(IntQuant, MaxStatsScaling, WeightQuantSolver):
    """Signed symmetric per-tensor min-max (eq. 7) weight quantizer with eq. 6 scale."""

    bit_width = 8
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    restrict_scaling_type = RestrictValueType.FP
    scaling_stats_impl = AbsMax
    int_scaling_impl = HalfRangeIntScaling
    tensor_clamp_impl = TensorClamp


class ResQWeightPerChannelQuant(ResQWeightQuant):
    """Per-output-channel variant of :class:`ResQWeightQuant`."""

    scaling_per_output_type = ScalingPerOutputType.CHANNEL


class ResQActQuant(IntQuant, ActQuantSolver):
    """Signed symmetric per-tensor activation quantizer with eq. 6 scale.

    The range lives in a Brevitas ``ParameterScaling`` (learnable for QAT) that holds the
    threshold ``max(r_max, -r_min)`` in the log domain (``RestrictValueType.LOG_FP``: the
    parameter is ``log2(threshold)``, the quantizer uses ``2 ** value``), so that no gradient
    step can make a scale negative; ``scaling_min_val`` keeps ``2 ** value`` from underflowing
    to 0 (a division by zero in eq. 1) after a run of large steps. The line search (eq. 8) sets
    it during calibration; read and write it with
    :func:`~resq_brevitas.quant.line_search.act_threshold` / ``set_act_threshold``.
    """

    bit_width = 8
    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    restrict_scaling_type = RestrictValueType.LOG_FP
    scaling_min_val = MIN_THRESHOLD
    scaling_init = 1.0
    int_scaling_impl = HalfRangeIntScaling
    min_val = None
    max_val = None


class ResQZeroWeightQuant(ResQWeightQuant):
    """0-bit weight quantizer (zeros)."""

    tensor_quant = ZeroTensorQuant


class ResQZeroActQuant(ResQActQuant):
    """0-bit activation quantizer (zeros)."""

    tensor_quant = ZeroTensorQuant


def weight_quant(bits: int | None, granularity: str = "tensor") -> type | None:
    """Weight quantizer injector for ``bits`` (``None`` = fp32: no quantizer).

    Args:
        bits: 0, 2..16, or ``None``.
        granularity: ``"tensor"`` or ``"channel"`` (per output channel).

    Returns:
        An injector class to pass as ``weight_quant=`` to a Brevitas layer, or ``None``.
    """
    if bits is None:
        return None
    bits = validate_bits(bits, "bits")
    check_choice(granularity, "granularity", ("tensor", "channel"))
    if bits == 0:
        return ResQZeroWeightQuant
    base = ResQWeightPerChannelQuant if granularity == "channel" else ResQWeightQuant
    return base.let(bit_width=bits)


def act_quant(bits: int | None) -> type | None:
    """Activation quantizer injector for ``bits`` (``None`` = fp32: no quantizer).

    Args:
        bits: 0, 2..16, or ``None``.

    Returns:
        An injector class to pass as ``input_quant=`` to a Brevitas layer, or ``None``.
    """
    if bits is None:
        return None
    bits = validate_bits(bits, "bits")
    if bits == 0:
        return ResQZeroActQuant
    return ResQActQuant.let(bit_width=bits)
