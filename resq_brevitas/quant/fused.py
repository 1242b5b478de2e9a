"""Inference fake quantization of a Brevitas activation proxy in one fresh tensor.

A Brevitas activation proxy computes eq. 1 as a chain of out-of-place ops (``x / s``, ``+ zp``,
round, two ``where`` for the clamp, ``- zp``, ``* s``: nine full-size temporaries per call) so
that every step is differentiable and exportable. A residual frame calls that chain once per
layer (a pool once per bit width), and on CPU the temporaries cost more than the layer's op on
the narrow layers of a video network. :class:`FusedActQuant` computes the same values with one
fresh tensor and in-place ops, ``div(x, s).round_().clamp_(lo, hi).mul_(s)``, reading the scale,
zero point and bit width from the proxy's own Brevitas modules (so a recalibrated or retrained
scale is always the current one). It runs only where that is exact and nothing needs the chain:
no gradient required, not traced or exported, quantization enabled, and the proxy built from
the parts whose arithmetic it reproduces (``RescalingIntQuant`` over ``IntQuant`` with
``RoundSte`` and ``TensorClamp``, an identity activation, a zero zero-point); otherwise it calls
the proxy.

Exactness: the same IEEE division and multiplication by the same scale tensor, the same
round-half-to-even, and ``clamp`` equal to ``TensorClamp``'s two ``where`` on every value
(NaN included). Brevitas adds and subtracts the zero point ``0.0``, which turns a ``-0.0`` into
``+0.0``; the fused path keeps ``-0.0``, equal under ``==`` and in every sum.
"""

from __future__ import annotations

from typing import Any

import torch
from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp
from brevitas.core.quant.delay import _NoDelay
from brevitas.core.quant.int import RescalingIntQuant
from brevitas.core.quant.int_base import IntQuant
from torch import Tensor, nn

__all__ = ["FusedActQuant", "fusable", "is_traced"]


def is_traced(x: Any) -> bool:
    """Whether ``x`` is being traced, compiled or exported: then only the exportable,
    data-independent path may run (the Brevitas chain here, the dense op in
    :mod:`resq_brevitas.nn.executors`).

    A tensor subclass (the fake and functional tensors of ``torch.export``) counts as traced.
    """
    if type(x) is not Tensor:
        return True
    symbolic = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                       torch.fx._symbolic_trace.is_fx_tracing)
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(torch.jit.is_tracing() or symbolic() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling() or exporting())


def fusable(proxy: Any) -> bool:
    """Whether ``proxy`` (a Brevitas activation quant proxy) is built from the parts
    :class:`FusedActQuant` reproduces exactly (see the module docstring)."""
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    if fused is None or not isinstance(fused.activation_impl, nn.Identity):
        return False
    tensor_quant = fused.tensor_quant
    if type(tensor_quant) is not RescalingIntQuant or tensor_quant.observer_only:
        return False
    int_quant = tensor_quant.int_quant
    return (type(int_quant) is IntQuant and type(int_quant.float_to_int_impl) is RoundSte
            and type(int_quant.tensor_clamp_impl) is TensorClamp
            and type(int_quant.input_view_impl) is Identity
            and type(int_quant.delay_wrapper.delay_impl) is _NoDelay)


class FusedActQuant:
    """``proxy(x)``'s de-quantized value; one fresh tensor when no gradient is needed.

    Not a module: it holds its proxy without registering it a second time. Whether the proxy
    is fusable is read on every call (cheap), so a proxy changed after construction (made
    unsigned, quantization disabled, a new scaling) is followed.

    Args:
        proxy: A Brevitas activation quant proxy (e.g. a layer's ``input_quant``).
    """

    def __init__(self, proxy: nn.Module) -> None:
        self.proxy = proxy

    def fast(self, x: Tensor) -> bool:
        """Whether the call on ``x`` takes the fused path."""
        proxy = self.proxy
        if not proxy.is_quant_enabled or proxy.export_mode or is_traced(x):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in proxy.parameters())):
            return False
        return fusable(proxy)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.fast(x):
            out = self.proxy(x)
            return out.value if hasattr(out, "value") else out
        tensor_quant = self.proxy.fused_activation_quant_proxy.tensor_quant
        bit_width = tensor_quant.msb_clamp_bit_width_impl()
        scale = tensor_quant.scaling_impl(x, tensor_quant.int_scaling_impl(bit_width))
        zero_point = tensor_quant.zero_point_impl(x, scale, bit_width)
        int_quant = tensor_quant.int_quant
        if bool((zero_point != 0).any()):  # never for the project's symmetric quantizers
            return int_quant(scale, zero_point, bit_width, x)
        low = int_quant.min_int(bit_width).to(x.dtype)
        high = int_quant.max_int(bit_width).to(x.dtype)
        return torch.div(x, scale).round_().clamp_(low, high).mul_(scale)

    def __repr__(self) -> str:
        return f"FusedActQuant({type(self.proxy).__name__})"
