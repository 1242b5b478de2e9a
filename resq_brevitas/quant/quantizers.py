"""Brevitas injector quantizers implementing eq. 1 and eq. 6 of the ResQ paper.

Brevitas computes ``scale = threshold / int_threshold``. Eq. 6 asks for
``s = 2 max(r_max, -r_min) / (2^b - 1)``, i.e. ``threshold = max|r|`` and
``int_threshold = (2^b - 1) / 2``: :class:`HalfRangeIntScaling` supplies that denominator, and the
integer range stays the full signed ``[-2^(b-1), 2^(b-1) - 1]`` (not narrow), as eq. 1 asks.

The injectors work on their own in plain Brevitas layers::

    qnn.QuantConv2d(3, 8, 3, weight_quant=weight_quant(4), input_quant=act_quant(4))
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from brevitas.core.function_wrapper import TensorClamp
from brevitas.core.stats import AbsMax
from brevitas.inject.enum import RestrictValueType, ScalingImplType, ScalingPerOutputType
from brevitas.proxy.parameter_quant import BiasQuantProxyFromInjector, WeightQuantProxyFromInjector
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
from brevitas.quant.base import IntQuant, MaxStatsScaling
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from torch import Tensor, nn

from resq_brevitas.checks import check_choice
from resq_brevitas.config import validate_bits

__all__ = [
    "ACT_THRESHOLD_FLOOR",
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
    "InjectorRecipe",
    "make_picklable",
    "pickle_reduction",
    "make_unsigned",
    "quantize_eq1",
    "quantize_unsigned",
    "scale_eq6",
]


#: Smallest activation threshold a ResQ activation quantizer uses (see ``ResQActQuant``).
ACT_THRESHOLD_FLOOR = 2.0**-15


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
    to 0 (a division by zero in eq. 1) after a run of large steps, or after a range of exactly 0
    (a state_dict). The line search (eq. 8) sets
    it during calibration; read and write it with
    :func:`~resq_brevitas.quant.line_search.act_threshold` / ``set_act_threshold``.
    """

    bit_width = 8
    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    restrict_scaling_type = RestrictValueType.LOG_FP
    scaling_init = 1.0
    # Positive floor of the threshold (Brevitas clamps ``2 ** value``, with a straight-through
    # gradient): a range of exactly 0 would make the scale 0 and residual frames 0/0 = NaN.
    # 2^-15 keeps the scale a positive float16 number up to 8 bits (2^-15 / 255 > 2^-24) and
    # is far below any real activation range.
    scaling_min_val = ACT_THRESHOLD_FLOOR
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


# ---------------------------------------------------------------------------- pickling
# Brevitas builds a proxy's injector with ``Injector.let(...)``: a class created at run time
# (``brevitas.inject.ResQActQuant``, one per proxy since it binds ``proxy_module``) that pickle
# cannot find by name, so ``torch.save(model)`` fails upstream. The proxies of ResQ layers are
# given picklable subclasses whose state stores the injector as a recipe: the nearest class
# importable by name plus the ``let`` attributes of the run-time classes above it.


def _importable(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    return module is not None and getattr(module, cls.__qualname__, None) is cls


class InjectorRecipe:
    """A picklable description of a Brevitas injector class: an importable base class and the
    attributes that run-time ``let`` calls added (outermost last)."""

    def __init__(self, base: type, attributes: dict[str, Any]) -> None:
        self.base = base
        self.attributes = attributes

    @classmethod
    def of(cls, injector: type) -> InjectorRecipe:
        """The recipe of ``injector``.

        ``let`` leaves no trace of its keyword arguments but the resolved dependency specs
        (``__dependencies__``): each spec a run-time class changed against its parent gives one
        argument back (a raw value is wrapped in a spec; a class or function is the spec).

        Raises:
            TypeError: If no class of its MRO is importable by name.
        """
        changed: list[dict[str, Any]] = []
        for klass, parent in zip(injector.__mro__, injector.__mro__[1:]):
            if _importable(klass):
                return cls(klass, _merged(changed))
            mine = vars(klass).get("__dependencies__", {})
            theirs = getattr(parent, "__dependencies__", {})
            changed.append({k: _spec_value(spec) for k, spec in mine.items()
                            if k not in theirs or theirs[k][1] is not spec[1]})
        raise TypeError(f"injector {injector!r} has no base class importable by name")

    def build(self) -> type:
        """The injector class again (a new run-time class with the same attributes)."""
        return self.base.let(**self.attributes) if self.attributes else self.base


def _merged(changed: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``let`` arguments of a chain of run-time classes (outermost first): later (outer)
    ``let`` calls win."""
    attributes: dict[str, Any] = {}
    for layer in reversed(changed):
        attributes.update(layer)
    return attributes


def _spec_value(spec: tuple[Any, ...]) -> Any:
    value = spec[1]
    dependency = getattr(value, "dependency", None)  # _dependencies' _RawSpec wraps raw values
    return dependency if type(value).__name__ == "_RawSpec" else value


def _rebuild_proxy(cls: type) -> nn.Module:
    return cls.__new__(cls)


class _PicklableProxy:
    """Mixin: pickles ``quant_injector`` as an :class:`InjectorRecipe`."""

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        recipe = InjectorRecipe.of(state["quant_injector"])
        # The injector binds its proxy and layer; after a deep copy (injector classes are
        # shared by copies) those are still the original's: bind this proxy's own.
        if "proxy_module" in recipe.attributes:
            recipe.attributes["proxy_module"] = self
        tracked = getattr(self, "tracked_module_list", [])
        if "module" in recipe.attributes and tracked:
            recipe.attributes["module"] = tracked[0]
        state["quant_injector"] = recipe
        return _rebuild_proxy, (type(self),), state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["quant_injector"] = state["quant_injector"].build()
        nn.Module.__setstate__(self, state)  # type: ignore[arg-type]


class PicklableActQuantProxy(_PicklableProxy, ActQuantProxyFromInjector):
    """``ActQuantProxyFromInjector`` that pickles (see :func:`make_picklable`)."""


class PicklableWeightQuantProxy(_PicklableProxy, WeightQuantProxyFromInjector):
    """``WeightQuantProxyFromInjector`` that pickles (see :func:`make_picklable`)."""


class PicklableBiasQuantProxy(_PicklableProxy, BiasQuantProxyFromInjector):
    """``BiasQuantProxyFromInjector`` that pickles (see :func:`make_picklable`)."""


_PICKLABLE = {
    ActQuantProxyFromInjector: PicklableActQuantProxy,
    WeightQuantProxyFromInjector: PicklableWeightQuantProxy,
    BiasQuantProxyFromInjector: PicklableBiasQuantProxy,
}


def make_picklable(module: nn.Module) -> list[str]:
    """Give every Brevitas quant proxy in ``module`` its picklable subclass, in place.

    The subclass adds only pickling (``__reduce_ex__``/``__setstate__``); Brevitas's export
    handlers, however, match proxy types exactly, so this is for a copy about to be pickled
    (:func:`pickle_reduction`); :func:`restore_proxy_classes` undoes it.

    Returns:
        Names of the proxies left as they are (their type has no picklable subclass here).
    """
    left = []
    for name, proxy in module.named_modules():
        target = _PICKLABLE.get(type(proxy))
        if target is not None:
            proxy.__class__ = target
        elif type(proxy).__name__.endswith("ProxyFromInjector") and type(proxy) not in _ORIGINAL:
            left.append(name)
    return left


_ORIGINAL = {picklable: original for original, picklable in _PICKLABLE.items()}


def restore_proxy_classes(module: nn.Module) -> None:
    """Give the proxies :func:`make_picklable` changed their Brevitas classes back."""
    for proxy in module.modules():
        original = _ORIGINAL.get(type(proxy))
        if original is not None:
            proxy.__class__ = original


#: Attribute marking a picklable copy (its own ``__reduce_ex__`` then pickles it as usual).
PICKLE_PAYLOAD = "_resq_pickle_payload"


def pickle_reduction(module: nn.Module) -> tuple[Any, tuple[Any, ...]]:
    """A ``__reduce_ex__`` result for a model holding Brevitas proxies: a deep copy whose
    proxies pickle their injectors as :class:`InjectorRecipe`; loading rebuilds the injectors
    and gives the proxies their Brevitas classes back (the original is not touched)."""
    payload = copy.deepcopy(module)
    object.__setattr__(payload, PICKLE_PAYLOAD, True)
    left = make_picklable(payload)
    if left:
        raise TypeError(f"these quant proxies cannot be pickled: {', '.join(left)}")
    return _restore_payload, (payload,)


def _restore_payload(payload: nn.Module) -> nn.Module:
    restore_proxy_classes(payload)
    payload.__dict__.pop(PICKLE_PAYLOAD, None)
    return payload
