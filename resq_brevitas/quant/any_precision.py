"""Any-precision weights (VideoIQ, section 3.4): lower precisions as truncated views of one integer.

VideoIQ quantizes the weight once, at the largest bit width ``b_1`` of a family, stores that
integer, and obtains every lower precision ``b`` by discarding the ``k = b_1 - b`` least
significant bits; it then aligns ``E[W_b]`` with ``E[W_b1]`` so that the dropped bits do not shift
the weight's mean. With the project's eq. 1 / eq. 6 weight quantizer that reads::

    s_1   = max|w| / ((2^b_1 - 1) / 2)                    the b_1-bit scale (eq. 6)
    q_1   = clamp(round(w / s_1), -2^(b_1-1), 2^(b_1-1)-1) the stored integer (eq. 1)
    q_b   = floor(q_1 / 2^k)                              arithmetic shift right by k bits
    W_b   = s_1 2^k q_b + (mean(s_1 q_1) - mean(s_1 2^k q_b))   mean alignment

``q_b`` lies in ``[-2^(b-1), 2^(b-1)-1]`` (the signed ``b``-bit range) and its scale is
``s_b = s_1 2^k``; means are taken over the whole tensor (per-tensor scales) or over each output
channel (per-channel scales). Nothing is re-quantized from float, and a deployed model stores
``q_1`` once for every precision of the family (plus one mean offset per tensor or channel).

Because ``floor`` loses up to ``2^k - 1`` steps of ``s_1``, a truncated weight differs from the
``b_1``-bit one by at most ``s_1 (2^k - 1) + |offset|`` and from a freshly quantized ``b``-bit
weight (scale ``s_b' = max|w| / ((2^b - 1) / 2)``) by at most
``s_1 (2^k - 1) + s_1 / 2 + |offset| + s_b' / 2`` (:func:`truncation_bound`).

:class:`TruncatedIntQuant` is the Brevitas tensor quantizer that computes this from the layer's
own weight and its keyframe scaling (same statistics, so the same ``s_1`` and ``q_1`` as the
keyframe path's ``b_1``-bit quantizer); :func:`truncated_weight_quant` is its injector, used for
the residual weights of ``ResQConfig(residual_weights="truncated")`` and for the lower
precisions of a family scheme.
"""

from __future__ import annotations

import torch
from brevitas.function.ops_ste import floor_ste, round_ste
from torch import Tensor, nn

from resq_brevitas.checks import check_choice
from resq_brevitas.config import validate_bits
from resq_brevitas.quant.quantizers import ResQWeightPerChannelQuant, ResQWeightQuant

__all__ = [
    "TruncatedIntQuant",
    "align_mean_videoiq",
    "any_precision_weight",
    "truncate_lsb_videoiq",
    "truncated_weight_quant",
    "truncation_bound",
]


def truncate_lsb_videoiq(q: Tensor, source_bits: int, bits: int) -> Tensor:
    """VideoIQ section 3.4: drop the ``source_bits - bits`` least significant bits of ``q``.

    ``floor(q / 2^k)``: the arithmetic right shift of a two's-complement integer, which maps the
    signed ``source_bits`` range onto the signed ``bits`` range. Straight-through gradient.

    Args:
        q: Integer-valued tensor in the signed ``source_bits`` range (float dtype).
        source_bits: Bit width of ``q``.
        bits: Target bit width (``<= source_bits``).
    """
    if bits > source_bits:
        raise ValueError(f"bits must be <= source_bits={source_bits}, got {bits}")
    if bits == source_bits:
        return q
    return floor_ste(q / 2 ** (source_bits - bits))


def _mean_dims(scale: Tensor, x: Tensor) -> tuple[int, ...]:
    """The dims a mean is taken over: all (per-tensor scale) or all but the channel dim of a
    per-channel scale (the dims where the scale broadcasts)."""
    if scale.dim() != x.dim() or scale.numel() == 1:
        return tuple(range(x.dim()))
    return tuple(d for d in range(x.dim()) if scale.shape[d] == 1)


def align_mean_videoiq(truncated: Tensor, reference: Tensor, dims: tuple[int, ...]) -> Tensor:
    """VideoIQ section 3.4: align ``E[W_b]`` with ``E[W_b1]`` (means over ``dims``).

    Args:
        truncated: The truncated weight ``s_1 2^k q_b``.
        reference: The ``b_1``-bit weight ``s_1 q_1``.
        dims: Dims of the mean (all, or all but the output channel's).

    Returns:
        ``truncated + mean(reference) - mean(truncated)``.
    """
    offset = reference.mean(dims, keepdim=True) - truncated.mean(dims, keepdim=True)
    return truncated + offset


def any_precision_weight(w: Tensor, scale: Tensor, source_bits: int, bits: int
                         ) -> tuple[Tensor, Tensor]:
    """The ``bits``-bit view of ``w``'s ``source_bits``-bit integer (VideoIQ section 3.4).

    Args:
        w: The float weight.
        scale: Its ``source_bits``-bit scale ``s_1`` (eq. 6; broadcastable to ``w``).
        source_bits: The stored bit width ``b_1``.
        bits: The view's bit width ``b <= b_1``.

    Returns:
        ``(W_b, s_b)``: the mean-aligned truncated weight and its scale ``s_1 2^k``.
    """
    q_min, q_max = -(2 ** (source_bits - 1)), 2 ** (source_bits - 1) - 1
    # The same ops as the keyframe's Brevitas IntQuant: x / s, round half to even, clamp.
    q1 = torch.clamp(round_ste(w / scale), q_min, q_max)
    step = scale * 2 ** (source_bits - bits)
    truncated = truncate_lsb_videoiq(q1, source_bits, bits) * step
    return align_mean_videoiq(truncated, q1 * scale, _mean_dims(scale, w)), step


def truncation_bound(w: Tensor, scale: Tensor, source_bits: int, bits: int,
                     fresh_scale: Tensor) -> Tensor:
    """The largest ``|W_b - q_b(w)|`` the formula allows against a fresh ``bits``-bit
    quantization with scale ``fresh_scale``: ``s_1 (2^k - 1) + s_1/2 + |offset| + s_b'/2``
    (floor loses < ``2^k`` steps, both roundings half a step each), elementwise."""
    value, step = any_precision_weight(w, scale, source_bits, bits)
    q1 = torch.clamp(torch.round(w / scale), -(2 ** (source_bits - 1)),
                     2 ** (source_bits - 1) - 1)
    offset = (value - truncate_lsb_videoiq(q1, source_bits, bits) * step).abs()
    k = source_bits - bits
    return scale * (2**k - 1) + scale / 2 + offset + fresh_scale / 2


class TruncatedIntQuant(nn.Module):
    """Brevitas tensor quantizer: the ``bit_width``-bit truncated view of the weight's
    ``source_bit_width``-bit integer (:func:`any_precision_weight`).

    The ``source_bit_width`` scale comes from the injector's own ``scaling_impl`` and
    ``int_scaling_impl`` (the same statistics as the keyframe's quantizer), so ``q_1`` is the
    keyframe path's integer bit for bit.

    Args:
        scaling_impl: Brevitas scaling (threshold statistics of the weight).
        int_scaling_impl: Integer threshold of a bit width (eq. 6's ``(2^b - 1) / 2``).
        bit_width: The view's bits ``b``.
        source_bit_width: The stored bits ``b_1``.
    """

    def __init__(self, scaling_impl: nn.Module, int_scaling_impl: nn.Module, bit_width: int,
                 source_bit_width: int) -> None:
        super().__init__()
        self.scaling_impl = scaling_impl
        self.int_scaling_impl = int_scaling_impl
        self.bits = int(bit_width)
        self.source_bits = int(source_bit_width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        source = torch.tensor(float(self.source_bits), device=x.device)
        scale = self.scaling_impl(x, self.int_scaling_impl(source))
        value, step = any_precision_weight(x, scale, self.source_bits, self.bits)
        return value, step, x.new_zeros(()), torch.tensor(float(self.bits), device=x.device)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, source_bits={self.source_bits}"


def truncated_weight_quant(bits: int, source_bits: int, granularity: str = "tensor") -> type:
    """Weight quantizer injector: ``bits``-bit truncated views of a ``source_bits``-bit weight.

    Args:
        bits: The view's bit width (2..16, ``<= source_bits``).
        source_bits: The stored (keyframe) bit width.
        granularity: ``"tensor"`` or ``"channel"``: as the keyframe's quantizer (the truncated
            view must read the same integer).

    Raises:
        ValueError: Bits outside 2..16, or ``bits > source_bits``.
    """
    bits = validate_bits(bits, "bits", allow_zero=False)
    source_bits = validate_bits(source_bits, "source_bits", allow_zero=False)
    check_choice(granularity, "granularity", ("tensor", "channel"))
    if bits > source_bits:
        raise ValueError(f"truncated weights need bits <= source_bits; got bits={bits}, "
                         f"source_bits={source_bits}")
    base = ResQWeightPerChannelQuant if granularity == "channel" else ResQWeightQuant
    return base.let(bit_width=bits, source_bit_width=source_bits, tensor_quant=TruncatedIntQuant)
