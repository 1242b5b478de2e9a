"""Residual paths: how a ResQ layer quantizes and applies ``delta = x_t - x_ref`` (eq. 5).

One object per kind, chosen once when the layer is built (:func:`build_residual_path`):

- :class:`StaticResidual`: one activation quantizer ``q_Theta_a`` and the residual weight
  quantizer ``q_Theta_w`` (``W8A8->W4A4``; also an fp32 residual);
- :class:`ZeroResidual`: a 0-bit activation quantizer (``W8A8->W4A0``): nothing is sent, the
  layer's residual op is skipped and ``z_t = z_ref``;
- :class:`PoolResidual`: a pool of activation quantizers ordered by bits (Dynamic-ResQ,
  ``W8A8->W8A{0,4,8}``) and a precision policy (:class:`PrecisionPolicy`, e.g. the error bound of
  eq. 9-11) that picks one per pixel.

Every kind owns the same four things: :meth:`ResidualPath.quantize` (what is sent),
:meth:`ResidualPath.contribution` (its contribution ``q(delta) * q_Theta_w(w)``, no bias, computed
by the path's executor ``op``: :class:`~resq_brevitas.nn.executors.DenseOp` by default, or
:class:`~resq_brevitas.nn.executors.SparseTileOp`, set once by :func:`resq_brevitas.convert`),
:meth:`ResidualPath.calibration_targets` (which quantizers eq. 8 searches, on residuals) and
:meth:`ResidualPath.cost` (BOPs per residual row). Each holds a bias-free Brevitas view of the
layer (``view``) whose ``weight`` is the layer's very ``Parameter``: gradients from both paths
sum into one tensor and ``state_dict`` stores the weight once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import brevitas.nn as qnn
import torch
from brevitas.core.scaling import ParameterScaling
from torch import Tensor, nn

from resq_brevitas.config import Precision
from resq_brevitas.nn.cost import precision_bops
from resq_brevitas.nn.executors import ContributionOp, DenseOp
from resq_brevitas.quant.any_precision import truncated_weight_quant
from resq_brevitas.quant.fused import FusedActQuant
from resq_brevitas.quant.line_search import scaling_threshold
from resq_brevitas.quant.quantizers import act_quant, weight_quant

__all__ = [
    "CalibrationTarget",
    "PoolResidual",
    "PrecisionPolicy",
    "ResidualCost",
    "ResidualPath",
    "Sent",
    "StaticResidual",
    "ZeroResidual",
    "build_residual_path",
    "mix_pool",
    "residual_weight_quant",
    "value_of",
]


def value_of(tensor: Any) -> Tensor:
    """The plain tensor of a Brevitas ``QuantTensor`` (or the tensor itself)."""
    return getattr(tensor, "value", tensor)


class Sent(NamedTuple):
    """What a residual path sends for a residual.

    Attributes:
        q: The quantized residual ``q(delta)``, or ``None`` when nothing is sent (0 bits).
        bit_map: Pool paths: ``[R, *S]`` activation bits of each pixel, else ``None``.
        units: Pool paths: decision units per row (for the policy's cost), else 0.
        qweight: ``q_Theta_w(w)`` if :meth:`ResidualPath.quantize` already computed it (the
            contribution then reuses it).
    """

    q: Tensor | None
    bit_map: Tensor | None = None
    units: int = 0
    qweight: Tensor | None = None


class ResidualCost(NamedTuple):
    """BOPs of the residual rows of one layer call (float64 ``[R]`` each)."""

    bops: Tensor
    bits: Tensor
    policy_bops: Tensor | None


@dataclass(frozen=True)
class CalibrationTarget:
    """One activation quantizer that eq. 8 calibrates.

    Attributes:
        path: ``"keyframe"`` (searched on frame inputs) or ``"residual"`` (on residuals).
        slot: Index among the targets of the same path and layer.
        bits: The quantizer's bit width.
        proxy: The Brevitas activation quant proxy whose threshold is set.
        view: The Brevitas layer whose quantized weight scores the candidates.
    """

    path: str
    slot: int
    bits: int
    proxy: nn.Module
    view: nn.Module


@runtime_checkable
class PrecisionPolicy(Protocol):
    """What a pool residual asks of a precision policy (implemented in :mod:`resq_brevitas.policy`).

    A policy is an ``nn.Module`` (it may own parameters) built from its settings by
    :func:`resq_brevitas.policy.build_policy`, one per model, shared by its pool layers. It may
    also have ``needs_fit`` (a property) and ``fit(qm, frames, samples, progress)``, which
    :func:`resq_brevitas.calibrate` calls on the calibration frames after the ranges are set.
    """

    def select(self, delta: Tensor, quantized: Sequence[Tensor], weight_norm: Tensor,
               channel_dim: int) -> tuple[Tensor, int]:
        """Pool index per pixel ``[R, *S]`` and the number of decision units per row."""

    def cost(self, pool_size: int, channels: int, positions: int, units: int,
             act_bits: int) -> int:
        """BOPs of the policy's own work on one residual row."""


class ResidualPath(nn.Module):
    """Base class: the residual path of one ResQ layer (see the module docstring).

    Attributes:
        has_bit_maps: Whether :meth:`quantize` reports per-pixel bits (pools).
        op: The executor of the layer's op in :meth:`contribution` (dense unless
            ``execution="sparse"`` chose :class:`~resq_brevitas.nn.executors.SparseTileOp`).

    Args:
        brevitas_class: The layer's Brevitas class (the view is one of these).
        precision: The residual precision.
        weight_granularity: ``"tensor"`` or ``"channel"``.
        layer_kwargs: The layer's constructor arguments (channels, kernel, stride, ...).
        input_quant: The view's activation quantizer injector.
        truncate_from: ``None``: the residual weight has its own quantizer (``separate``);
            else the keyframe's weight bits: the residual weight is the truncated view of the
            keyframe's integer (VideoIQ any-precision, :mod:`resq_brevitas.quant.any_precision`).
    """

    has_bit_maps = False

    def __init__(self, brevitas_class: type[nn.Module], precision: Precision,
                 weight_granularity: str, layer_kwargs: dict[str, Any],
                 input_quant: Any, truncate_from: int | None = None) -> None:
        super().__init__()
        self.precision = precision
        kwargs = dict(layer_kwargs)
        kwargs["bias"] = False
        self.view = brevitas_class(
            weight_quant=residual_weight_quant(precision.weight_bits, weight_granularity,
                                               truncate_from),
            input_quant=input_quant, return_quant_tensor=False, **kwargs)
        self.op: ContributionOp = DenseOp()

    # The weight is the layer's; the layer ties it (see ``ResQLayerMixin``).
    @property
    def weight(self) -> nn.Parameter:
        """The shared weight ``Parameter``."""
        return self.view.weight

    def quant_weight(self) -> Tensor:
        """``q_Theta_w(w)`` (differentiable)."""
        return value_of(self.view.quant_weight())

    def weight_norm(self, qweight: Tensor | None = None) -> Tensor:
        """``||q_Theta_w(w)||_F``, the weight factor of eq. 10 (no gradient)."""
        with torch.no_grad():
            return (self.quant_weight() if qweight is None else qweight).detach().norm()

    def quantize(self, delta: Tensor) -> Sent:
        """``q_Theta_a(delta)``: what the path sends."""
        raise NotImplementedError

    def contribution(self, sent: Sent, **kwargs: Any) -> Tensor:
        """``q(delta) * q_Theta_w(w)`` (no bias) for what :meth:`quantize` sent (not ``None``).

        Args:
            sent: From :meth:`quantize`.
            **kwargs: Extra options of the layer's forward (e.g. ``output_size``).
        """
        assert sent.q is not None, "nothing was sent: the contribution is zero"
        if kwargs:
            # The Brevitas forward handles extra options; re-quantizing a quantized tensor is
            # exact, and a pool view has no input quantizer.
            return value_of(self.view(sent.q, **kwargs))
        # A callable: a sparse executor quantizes the weight only if some tile needs it.
        weight = (lambda: sent.qweight) if sent.qweight is not None else self.quant_weight
        return self.op(self.view, sent.q, weight)

    def calibration_targets(self) -> list[CalibrationTarget]:
        """The quantizers eq. 8 calibrates on residuals."""
        return []

    def cost(self, macs: int, sent: Sent, rows: int, channels: int, positions: int,
             keyframe_act_bits: int) -> ResidualCost:
        """BOPs of ``rows`` residual rows (``macs`` per row) at the static precision."""
        bops = float(precision_bops(macs, self.precision))
        bits = float(self.precision.bops_act_bits)
        return ResidualCost(torch.full((rows,), bops, dtype=torch.float64),
                            torch.full((rows,), bits, dtype=torch.float64), None)

    def density_source(self, delta: Tensor, sent: Sent) -> Tensor:
        """The tensor whose non-zero share is the residual density (RRM eq. 9)."""
        return delta


class StaticResidual(ResidualPath):
    """One activation quantizer (or none, fp32) and the residual weight quantizer."""

    def __init__(self, brevitas_class: type[nn.Module], precision: Precision,
                 weight_granularity: str, layer_kwargs: dict[str, Any],
                 truncate_from: int | None = None) -> None:
        bits = precision.act_bits[0] if precision.act_bits else None
        super().__init__(brevitas_class, precision, weight_granularity, layer_kwargs,
                         act_quant(bits), truncate_from)

    def quantize(self, delta: Tensor) -> Sent:
        quant = self.view.input_quant
        if not quant.is_quant_enabled:
            return Sent(delta)
        # The executor decides which entries go through the quantizer: all, or the tiles that
        # hold an entry eq. 1 does not round to 0. FusedActQuant: the proxy's values without
        # its nine temporaries when no gradient is needed.
        return Sent(self.op.quantize(FusedActQuant(quant), delta, self.zero_band))

    def zero_band(self) -> float:
        """A magnitude below which eq. 1 certainly rounds a residual entry to 0.

        Half a quantization step, ``s / 2`` with ``s = threshold / ((2^b - 1) / 2)`` (eq. 6, as
        :class:`~resq_brevitas.quant.quantizers.HalfRangeIntScaling` sets it), shrunk by
        ``2^-20`` so that the float division ``x / s`` cannot land on the other side of 0.5.
        ``0.0`` (only exact zeros) when the quantizer holds no single ``ParameterScaling``.
        """
        assert self.precision.act_bits is not None
        scaling = self._parameter_scaling()
        if scaling is None:
            return 0.0
        with torch.no_grad():
            threshold = float(scaling_threshold(scaling).abs().min())
        return threshold / (2 ** self.precision.act_bits[0] - 1) * (1.0 - 2.0 ** -20)

    def _parameter_scaling(self) -> ParameterScaling | None:
        """The quantizer's single ``ParameterScaling`` (``None`` if it has none or several).

        Looked up once: a Brevitas proxy is a deep module tree, and the lookup would otherwise
        cost more than a skipped tile. The reference lives in a tuple so that it is not
        registered as a second parent of the module.
        """
        cached = self.__dict__.get("_scaling_lookup")
        if cached is None:
            found = [m for m in self.view.input_quant.modules() if isinstance(m, ParameterScaling)]
            cached = (found[0] if len(found) == 1 else None,)
            self.__dict__["_scaling_lookup"] = cached
        return cached[0]

    def calibration_targets(self) -> list[CalibrationTarget]:
        if self.precision.is_float:
            return []
        assert self.precision.act_bits is not None
        return [CalibrationTarget("residual", 0, self.precision.act_bits[0],
                                  self.view.input_quant, self.view)]


class ZeroResidual(ResidualPath):
    """A 0-bit activation quantizer: nothing is sent and the residual op is skipped.

    The view keeps Brevitas's zero quantizer so that :func:`resq_brevitas.quantization_disabled`
    (which switches Brevitas proxies off) runs the residual in floating point, as it must.
    """

    def __init__(self, brevitas_class: type[nn.Module], precision: Precision,
                 weight_granularity: str, layer_kwargs: dict[str, Any],
                 truncate_from: int | None = None) -> None:
        super().__init__(brevitas_class, precision, weight_granularity, layer_kwargs,
                         act_quant(0), truncate_from)

    def quantize(self, delta: Tensor) -> Sent:
        return Sent(None if self.view.input_quant.is_quant_enabled else delta)

    def cost(self, macs: int, sent: Sent, rows: int, channels: int, positions: int,
             keyframe_act_bits: int) -> ResidualCost:
        zeros = torch.zeros(rows, dtype=torch.float64)
        return ResidualCost(zeros, zeros.clone(), None)


class PoolResidual(ResidualPath):
    """A pool of activation quantizers (ascending bits) and the policy that mixes them per pixel.

    Args:
        brevitas_class: The layer's Brevitas class.
        precision: A pool precision (``W8A{0,4,8}``).
        weight_granularity: ``"tensor"`` or ``"channel"``.
        layer_kwargs: The layer's constructor arguments.
        policy: The precision policy (shared by all pool layers of a model).
        channel_dim: The dim of the layer input holding channels (1, or -1 for ``Linear``).
    """

    has_bit_maps = True

    def __init__(self, brevitas_class: type[nn.Module], precision: Precision,
                 weight_granularity: str, layer_kwargs: dict[str, Any],
                 policy: PrecisionPolicy, channel_dim: int,
                 truncate_from: int | None = None) -> None:
        super().__init__(brevitas_class, precision, weight_granularity, layer_kwargs, None,
                         truncate_from)
        if not isinstance(policy, PrecisionPolicy):
            raise TypeError(f"policy must implement PrecisionPolicy (select, cost), got "
                            f"{type(policy).__name__}")
        assert precision.act_bits is not None
        self.pool_bits: tuple[int, ...] = tuple(precision.act_bits)
        self.pool = nn.ModuleList(qnn.QuantIdentity(act_quant=act_quant(b),
                                                    return_quant_tensor=False)
                                  for b in self.pool_bits)
        self.policy = policy
        self.channel_dim = channel_dim
        self.register_buffer("_bits", torch.tensor(self.pool_bits), persistent=False)

    def _quantized(self, delta: Tensor) -> list[Tensor]:
        """``q_i(delta)`` of every pool quantizer (an active 0-bit one: zeros, without a call)."""
        out = []
        for bits, quant in zip(self.pool_bits, self.pool):
            if bits == 0 and quant.act_quant.is_quant_enabled:
                out.append(torch.zeros_like(delta))
            else:
                out.append(FusedActQuant(quant.act_quant)(delta))
        return out

    def quantize(self, delta: Tensor) -> Sent:
        quantized = self._quantized(delta)
        qweight = self.quant_weight()  # once per call: the policy and the contribution share it
        index, units = self.policy.select(delta, quantized, self.weight_norm(qweight),
                                          self.channel_dim)
        return Sent(mix_pool(quantized, index, self.channel_dim),
                    self._bits.to(index.device)[index], units, qweight)

    def calibration_targets(self) -> list[CalibrationTarget]:
        return [CalibrationTarget("residual", i, bits, quant.act_quant, self.view)
                for i, (bits, quant) in enumerate(zip(self.pool_bits, self.pool)) if bits]

    def cost(self, macs: int, sent: Sent, rows: int, channels: int, positions: int,
             keyframe_act_bits: int) -> ResidualCost:
        assert sent.bit_map is not None
        bits = sent.bit_map.reshape(rows, -1).double().mean(1).cpu()
        weight_bits = self.precision.bops_weight_bits
        policy = self.policy.cost(len(self.pool_bits), channels, positions, sent.units,
                                  keyframe_act_bits)
        return ResidualCost(bits * (macs * weight_bits), bits,
                            torch.full((rows,), float(policy), dtype=torch.float64))

    def density_source(self, delta: Tensor, sent: Sent) -> Tensor:
        assert sent.bit_map is not None
        active = (sent.bit_map > 0).unsqueeze(1 if self.channel_dim >= 0 else sent.bit_map.dim())
        return delta * active


def mix_pool(quantized: Sequence[Tensor], index: Tensor, channel_dim: int = 1) -> Tensor:
    """The residual each pixel sends: ``q_{Pi_p}(delta_p)`` (pool outputs selected per pixel).

    Args:
        quantized: ``q_i(delta)`` of each pool quantizer (``[R, C, *S]`` or ``[R, *S, C]``).
        index: ``[R, *S]`` pool index per pixel.
        channel_dim: 1 (convs) or -1 (``Linear``).

    Returns:
        The mixed quantized residual (differentiable w.r.t. the pool outputs).
    """
    mask_dim = 1 if channel_dim >= 0 else index.dim()
    index = index.unsqueeze(mask_dim)
    out = quantized[0]
    for i in range(1, len(quantized)):
        out = torch.where(index == i, quantized[i], out)
    return out


def build_residual_path(brevitas_class: type[nn.Module], precision: Precision | None,
                        weight_granularity: str, layer_kwargs: dict[str, Any],
                        policy: PrecisionPolicy | None, channel_dim: int,
                        truncate_from: int | None = None) -> ResidualPath | None:
    """The residual path kind for ``precision``, chosen once (``None``: no residual path).

    Args:
        truncate_from: The keyframe's weight bits when the residual weight is its truncated
            view (``residual_weights="truncated"``), else ``None``.

    Raises:
        ValueError: A pool precision without a policy.
    """
    if precision is None:
        return None
    if precision.is_pool:
        if policy is None:
            raise ValueError(f"residual precision {precision} is a pool and needs a policy")
        return PoolResidual(brevitas_class, precision, weight_granularity, layer_kwargs, policy,
                            channel_dim, truncate_from)
    if precision.act_bits == (0,):
        return ZeroResidual(brevitas_class, precision, weight_granularity, layer_kwargs,
                            truncate_from)
    return StaticResidual(brevitas_class, precision, weight_granularity, layer_kwargs,
                          truncate_from)


def residual_weight_quant(bits: int | None, granularity: str, truncate_from: int | None
                          ) -> type | None:
    """The residual view's weight quantizer injector, chosen once per layer: its own
    (``truncate_from=None``, or an fp32 residual) or the truncated view of the keyframe's
    ``truncate_from``-bit integer (VideoIQ any-precision weights)."""
    if truncate_from is None or bits is None:
        return weight_quant(bits, granularity)
    return truncated_weight_quant(bits, truncate_from, granularity)

