"""torch.ao.quantization (FX graph mode) binding of the eq. 8 line-search observer.

Use it in a ``QConfig`` for ``prepare_fx`` / ``prepare_qat_fx``; :func:`resq_qconfig` builds one
with eq. 6/7 weights (torch's symmetric min-max observer is exactly eq. 6 with a max-abs range::

    scale = max|w| / ((quant_max - quant_min) / 2) = 2 max|w| / (2^b - 1)

) and :func:`unrolled_qconfig_mapping` gives the keyframe and residual call sites of an unrolled
clip (:func:`resq_brevitas.deploy.unroll`) their own precisions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping
from torch.ao.quantization.observer import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    UniformQuantizationObserverBase,
)

from resq_brevitas.checks import check_choice
from resq_brevitas.config import Precision, ResQConfig, Scheme

from .core import LineSearchRangeMixin, unrolled_sites

__all__ = ["LineSearchObserver", "resq_qconfig", "unrolled_qconfig_mapping"]


class LineSearchObserver(LineSearchRangeMixin, UniformQuantizationObserverBase):
    """torch.ao activation observer choosing the range by eq. 8 (see :mod:`.core`).

    Args:
        dtype: Quantized dtype (``torch.quint8`` for fbgemm/qnnpack kernels, or ``torch.qint8``).
        qscheme: ``torch.per_tensor_affine`` or ``torch.per_tensor_symmetric`` (the grid is
            always eq. 6's symmetric one).
        reduce_range: As in torch.ao (prefer ``quant_min``/``quant_max``).
        quant_min: Lowest integer level; with ``quant_max`` it fixes the bit width.
        quant_max: Highest integer level.
        factory_kwargs: As in torch.ao.
        eps: As in torch.ao.
        is_dynamic: Must be ``False`` (eq. 8 is a calibration-time search).
        candidates: ``r``, grid points of the search.
        samples: ``c``, batch rows kept for the search.
        **kwargs: Passed to the torch.ao base class.
    """

    default_dtype = torch.quint8


def _weight_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_bits(bits: Any, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__} {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name} must be 2..8 for torch.ao int8 kernels, got {bits}")
    return bits


def resq_qconfig(act_bits: int = 8, weight_bits: int = 8, *, qat: bool = False,
                 weight_granularity: str = "tensor", candidates: int = 20, samples: int = 64,
                 act_dtype: torch.dtype = torch.quint8) -> QConfig:
    """A torch.ao ``QConfig``: eq. 8 activations, eq. 6/7 (symmetric min-max) weights.

    Args:
        act_bits: Activation bit width (2..8).
        weight_bits: Weight bit width (2..8).
        qat: Fake-quant modules (for ``prepare_qat_fx``) instead of observers.
        weight_granularity: ``"tensor"`` or ``"channel"`` (per output channel).
        candidates: ``r`` of the line search.
        samples: ``c`` of the line search (batch rows).
        act_dtype: ``torch.quint8`` (fbgemm/qnnpack) or ``torch.qint8``.

    Returns:
        The QConfig.
    """
    act_bits = _check_bits(act_bits, "act_bits")
    weight_bits = _check_bits(weight_bits, "weight_bits")
    check_choice(weight_granularity, "weight_granularity", ("tensor", "channel"))
    if act_dtype not in (torch.quint8, torch.qint8):
        raise ValueError(f"act_dtype must be torch.quint8 or torch.qint8, got {act_dtype}")
    act_min = 0 if act_dtype == torch.quint8 else -(2 ** (act_bits - 1))
    act_kwargs = dict(dtype=act_dtype, qscheme=torch.per_tensor_affine, quant_min=act_min,
                      quant_max=act_min + 2**act_bits - 1, candidates=candidates,
                      samples=samples)
    w_min, w_max = _weight_range(weight_bits)
    if weight_granularity == "channel":
        w_observer: Any = PerChannelMinMaxObserver
        w_kwargs = dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0,
                        quant_min=w_min, quant_max=w_max)
    else:
        w_observer = MinMaxObserver
        w_kwargs = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=w_min,
                        quant_max=w_max)
    if qat:
        return QConfig(activation=FakeQuantize.with_args(observer=LineSearchObserver,
                                                         **act_kwargs),
                       weight=FakeQuantize.with_args(observer=w_observer, **w_kwargs))
    return QConfig(activation=LineSearchObserver.with_args(**act_kwargs),
                   weight=w_observer.with_args(**w_kwargs))


def _precision_qconfig(precision: Precision, path: str, **kwargs: Any) -> QConfig | None:
    if precision.is_float:
        return None
    assert precision.act_bits is not None and precision.weight_bits is not None
    if precision.is_pool or precision.act_bits[0] == 0:
        raise ValueError(
            f"the {path} precision {precision} has no single torch.ao activation bit width "
            "(pools and 0-bit quantizers are ResQ-only); use a static W<b>A<b> precision"
        )
    return resq_qconfig(precision.act_bits[0], precision.weight_bits, **kwargs)


def unrolled_qconfig_mapping(unrolled: torch.nn.Module, scheme: str | Scheme | ResQConfig, *,
                             qat: bool = True, **kwargs: Any) -> QConfigMapping:
    """``QConfigMapping`` giving keyframe and residual call sites of an unrolled clip their bits.

    Keyframe call sites (the original layers) get the keyframe precision, the residual twins the
    residual precision; everything else stays in floating point (global ``None``), so the
    residual ``x_t - x_0`` and ``+ z_0`` run at full precision as in ResQ. Note that torch.ao
    also fake-quantizes each call site's *output* at the call site's activation bits.

    Args:
        unrolled: A GraphModule from :func:`resq_brevitas.deploy.unroll`.
        scheme: ``"W8A8->W4A4"``-style notation or a Scheme, or the model's
            :class:`~resq_brevitas.ResQConfig` (per-layer overrides, weight granularity and
            line-search settings taken from it).
        qat: Fake-quant (``prepare_qat_fx``) or observers (``prepare_fx``).
        **kwargs: Passed to :func:`resq_qconfig` (candidates, samples, weight_granularity, ...);
            they override the config's.

    Returns:
        The mapping.
    """
    sites, defaults = unrolled_sites(unrolled, scheme)
    options = {**defaults, **kwargs}
    mapping = QConfigMapping().set_global(None)
    cache: dict[tuple[str, Precision], QConfig | None] = {}
    for setting in sites:
        key = (setting.path, setting.precision)
        if key not in cache:
            cache[key] = _precision_qconfig(setting.precision, setting.path, qat=qat, **options)
        mapping.set_module_name(setting.site, cache[key])
    return mapping
