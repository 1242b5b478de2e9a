"""torchao pt2e binding of the eq. 8 line-search observer (torchao is an optional extra).

Import it lazily (``resq_brevitas.observers.PT2ELineSearchObserver`` imports this module on first
use). :class:`ResQQuantizer` annotates conv/linear calls of a ``torch.export``-ed model: input
activations get the line-search observer (or a fake-quant around it for QAT) and weights eq. 6/7
symmetric min-max, at bit widths chosen per module name, so the keyframe call sites and residual
twins of :func:`resq_brevitas.deploy.unroll` get different precisions. Outputs are not annotated:
ResQ quantizes the inputs and weights of linear layers only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

try:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import (
        MinMaxObserver,
        PerChannelMinMaxObserver,
        UniformQuantizationObserverBase,
    )
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )
except ImportError as err:  # pragma: no cover - exercised only without torchao
    raise ImportError(
        "resq_brevitas.observers.pt2e needs torchao (pip install torchao); the torch.ao "
        f"observers in resq_brevitas.observers work without it ({err})"
    ) from err

from resq_brevitas.checks import check_choice
from resq_brevitas.config import Precision, ResQConfig, Scheme

from .core import LineSearchRangeMixin, unrolled_sites

__all__ = ["PT2ELineSearchObserver", "ResQQuantizer", "resq_pt2e_quantizer"]


class PT2ELineSearchObserver(LineSearchRangeMixin, UniformQuantizationObserverBase):
    """torchao pt2e activation observer choosing the range by eq. 8 (see :mod:`.core`).

    Arguments as :class:`resq_brevitas.observers.LineSearchObserver`; ``dtype`` defaults to
    ``torch.int8`` (pt2e's q/dq ops take plain integer dtypes).
    """

    default_dtype = torch.int8


def _specs(act_bits: int, weight_bits: int, qat: bool, weight_granularity: str,
           candidates: int, samples: int) -> tuple[QuantizationSpec, QuantizationSpec]:
    a_min, a_max = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
    w_min, w_max = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    act_ctr: Any = PT2ELineSearchObserver.with_args(candidates=candidates, samples=samples)
    if weight_granularity == "channel":
        w_ctr: Any = PerChannelMinMaxObserver
        w_scheme, ch_axis = torch.per_channel_symmetric, 0
    else:
        w_ctr, w_scheme, ch_axis = MinMaxObserver, torch.per_tensor_symmetric, None
    if qat:
        act_ctr = FakeQuantize.with_args(observer=PT2ELineSearchObserver, candidates=candidates,
                                         samples=samples)
        w_ctr = FakeQuantize.with_args(observer=w_ctr)
    act = QuantizationSpec(dtype=torch.int8, quant_min=a_min, quant_max=a_max,
                           qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(dtype=torch.int8, quant_min=w_min, quant_max=w_max,
                              qscheme=w_scheme, ch_axis=ch_axis, observer_or_fake_quant_ctr=w_ctr)
    return act, weight


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


class ResQQuantizer(Quantizer):
    """pt2e quantizer: conv/linear input activations (eq. 8) and weights (eq. 6/7).

    Args:
        bits: ``{module name: (act_bits, weight_bits) or None}``; a call site whose innermost
            module name is listed gets those bits (``None``: left in floating point).
        default: Bits for call sites not listed (``None``: float).
        qat: Fake-quants (``prepare_qat_pt2e``) instead of observers.
        weight_granularity: ``"tensor"`` or ``"channel"``.
        candidates: ``r`` of the line search.
        samples: ``c`` of the line search.
    """

    def __init__(self, bits: dict[str, tuple[int, int] | None] | None = None,
                 default: tuple[int, int] | None = None, *, qat: bool = False,
                 weight_granularity: str = "tensor", candidates: int = 20,
                 samples: int = 64) -> None:
        super().__init__()
        check_choice(weight_granularity, "weight_granularity", ("tensor", "channel"))
        self.bits = dict(bits or {})
        for name, pair in [*self.bits.items(), ("default", default)]:
            if pair is not None:
                for b in pair:
                    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                        raise ValueError(f"bits[{name!r}] must be ints in 2..8, got {pair!r}")
        self.default = default
        self.qat = qat
        self.weight_granularity = weight_granularity
        self.candidates = candidates
        self.samples = samples

    def _targets(self) -> set[Any]:
        aten = torch.ops.aten
        return {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                aten.conv_transpose2d.input, aten.linear.default}

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        """Annotate every conv/linear call with the bits of its module name."""
        targets = self._targets()
        cache: dict[tuple[int, int], tuple[QuantizationSpec, QuantizationSpec]] = {}
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in targets:
                continue
            path = _module_path(node)
            pair = self.bits[path] if path in self.bits else self.default
            if pair is None:
                continue
            if pair not in cache:
                cache[pair] = _specs(pair[0], pair[1], self.qat, self.weight_granularity,
                                     self.candidates, self.samples)
            act, weight = cache[pair]
            x, w = node.args[0], node.args[1]
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={x: act, w: weight}, _annotated=True)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Nothing to check: every annotation uses integer q/dq ops pt2e supports."""


def _pair(precision: Precision | None, path: str) -> tuple[int, int] | None:
    if precision is None or precision.is_float:
        return None
    assert precision.act_bits is not None and precision.weight_bits is not None
    if precision.is_pool or precision.act_bits[0] == 0:
        raise ValueError(
            f"the {path} precision {precision} has no single pt2e activation bit width "
            "(pools and 0-bit quantizers are ResQ-only)"
        )
    return precision.act_bits[0], precision.weight_bits


def resq_pt2e_quantizer(unrolled: torch.nn.Module, scheme: str | Scheme | ResQConfig, *,
                        qat: bool = True, **kwargs: Any) -> ResQQuantizer:
    """A :class:`ResQQuantizer` for an unrolled clip: keyframe sites and residual twins.

    Args:
        unrolled: A GraphModule from :func:`resq_brevitas.deploy.unroll` (export it with
            ``torch.export.export(unrolled, (clip,)).module()`` before ``prepare_qat_pt2e``).
        scheme: ``"W8A8->W4A4"``-style notation or a Scheme, or the model's
            :class:`~resq_brevitas.ResQConfig` (per-layer overrides and settings).
        qat: Fake-quants (``prepare_qat_pt2e``) or observers (``prepare_pt2e``).
        **kwargs: Passed to :class:`ResQQuantizer`; they override the config's settings.
    """
    sites, defaults = unrolled_sites(unrolled, scheme)
    bits = {s.site: _pair(s.precision, s.path) for s in sites}
    return ResQQuantizer(bits, None, qat=qat, **{**defaults, **kwargs})
