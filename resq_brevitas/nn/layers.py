"""ResQ layers: a Brevitas layer (the keyframe path) plus a residual view sharing its weight.

Each ResQ layer *is* the Brevitas layer (``qnn.QuantConv2d`` etc.) configured with the keyframe
quantizers. Its ``residual`` child is a second Brevitas layer of the same class, configured with the
residual quantizers and without bias, whose ``weight`` is the very same ``Parameter``: gradients
from both paths sum into one tensor, ``state_dict`` stores the weight once, and the tie is restored
after ``load_state_dict`` (also with ``assign=True``).

For Dynamic-ResQ (a pool of residual activation bit widths, ``W8A8->W8A{0,4,8}``) the residual
view has no input quantizer; ``residual_pool`` holds one Brevitas activation quantizer per pool bit
width (``qnn.QuantIdentity``, calibrated like the static one), and the policy of
:mod:`resq_brevitas.policy.error_bound` mixes their outputs per pixel before the residual view runs.

The layer itself knows nothing about time: when a temporal state is attached (by
:class:`resq_brevitas.temporal.ResQModel`), ``forward`` hands the input to it, and the state decides
between :meth:`ResQLayerMixin.keyframe_forward` and :meth:`ResQLayerMixin.residual_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import brevitas.nn as qnn
import torch
from torch import Tensor, nn

__all__ = [
    "TemporalSlot",
    "ResQLayerMixin",
    "ResQConv1d",
    "ResQConv2d",
    "ResQConv3d",
    "ResQConvTranspose2d",
    "ResQLinear",
    "RESQ_LAYER_FOR",
    "is_resq_layer",
]


class TemporalSlot(Protocol):
    """What a ResQ layer delegates to while a temporal state is attached."""

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on ``x`` as a keyframe or a residual frame, per batch row."""


class ResQLayerMixin:
    """Keyframe path (the Brevitas layer itself) + residual path (``self.residual``)."""

    #: The plain torch class this ResQ layer replaces.
    float_class: type[nn.Module]
    #: The Brevitas class of both paths.
    brevitas_class: type[nn.Module]

    residual: nn.Module | None
    #: One activation quantizer per pool bit width (Dynamic-ResQ), ascending; ``None`` if static.
    residual_pool: nn.ModuleList | None
    #: The pool's bit widths, ascending (empty for a static residual path).
    pool_bits: tuple[int, ...]
    weight: nn.Parameter
    #: Dimension of the input that holds channels (features): 1 for convs, -1 for Linear
    #: (set by the MACs mixins, which come after this class in the MRO).
    channel_dim: int

    def _init_residual(self, residual_weight_quant: Any, residual_input_quant: Any,
                       has_residual: bool, layer_kwargs: dict[str, Any],
                       residual_input_pool: Sequence[tuple[int, Any]] | None = None) -> None:
        self.temporal_slot: TemporalSlot | None = None
        self.residual_pool = None
        self.pool_bits = ()
        if not has_residual:
            self.residual = None
            return
        kwargs = dict(layer_kwargs)
        kwargs["bias"] = False
        if residual_input_pool is not None:
            if residual_input_quant is not None:
                raise ValueError("pass residual_input_quant or residual_input_pool, not both")
            pool = sorted(residual_input_pool, key=lambda item: item[0])
            if len(pool) < 2 or len({bits for bits, _ in pool}) != len(pool):
                raise ValueError(
                    "residual_input_pool must hold >= 2 distinct (bits, injector) pairs, "
                    f"got {residual_input_pool!r}"
                )
            self.pool_bits = tuple(int(bits) for bits, _ in pool)
            self.residual_pool = nn.ModuleList(
                qnn.QuantIdentity(act_quant=injector, return_quant_tensor=False)
                for _, injector in pool
            )
        self.residual = self.brevitas_class(
            weight_quant=residual_weight_quant,
            input_quant=residual_input_quant,
            return_quant_tensor=False,
            **kwargs,
        )
        self.residual.weight = self.weight
        self._register_state_dict_hook(_drop_residual_weight)
        self.register_load_state_dict_pre_hook(_fill_residual_weight)
        self.register_load_state_dict_post_hook(_retie_residual_weight)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Keyframe path, unless a temporal state is attached (then it decides per row)."""
        if args:
            raise TypeError(
                f"{type(self).__name__}.forward takes extra options by keyword only, got {args}"
            )
        if self.temporal_slot is None:
            return self.keyframe_forward(x, **kwargs)
        return self.temporal_slot.forward(self, x, **kwargs)

    def keyframe_forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``z = q_Phi_a(x) * q_Phi_w(w) + b`` (eq. 5, keyframe): the Brevitas layer itself."""
        return self.brevitas_class.forward(self, x, **kwargs)

    def residual_forward(self, delta: Tensor, **kwargs: Any) -> Tensor:
        """``q_Theta_a(delta) * q_Theta_w(w)`` (eq. 5, residual): no bias, shared weight.

        For a pool layer the residual view has no input quantizer: ``delta`` must already be
        quantized (by the policy, see :meth:`pool_quantize`).
        """
        if self.residual is None:
            raise RuntimeError(f"{type(self).__name__} was built without a residual path")
        return self.residual(delta, **kwargs)

    def residual_quantize(self, delta: Tensor) -> Tensor:
        """``q_Theta_a(delta)`` of a static residual path (the de-quantized tensor)."""
        if self.residual is None or self.residual_pool is not None:
            raise RuntimeError(
                f"{type(self).__name__} has no static residual quantizer "
                f"({'no residual path' if self.residual is None else 'it has a pool'})"
            )
        return _value(self.residual.input_quant(delta))

    def residual_apply(self, qdelta: Tensor, qweight: Tensor | None = None,
                       **kwargs: Any) -> Tensor:
        """``qdelta * q_Theta_w(w)`` for a residual that is already quantized (no bias).

        Equals :meth:`residual_forward` of the un-quantized residual; used where the quantized
        residual itself is needed too (error feedback, Dynamic-ResQ).

        Args:
            qdelta: The quantized residual.
            qweight: ``q_Theta_w(w)`` if already computed (:meth:`residual_quant_weight`).
            **kwargs: Extra options of the Brevitas forward (e.g. ``output_size``).
        """
        if self.residual is None:
            raise RuntimeError(f"{type(self).__name__} was built without a residual path")
        if kwargs:
            # The Brevitas forward handles extra options; re-quantizing a quantized tensor is
            # exact, and a pool view has no input quantizer.
            return self.residual(qdelta, **kwargs)
        if qweight is None:
            qweight = self.residual_quant_weight()
        return self.residual.inner_forward_impl(qdelta, qweight, None)

    def residual_quant_weight(self) -> Tensor:
        """``q_Theta_w(w)``, the residual path's quantized weight (differentiable)."""
        if self.residual is None:
            raise RuntimeError(f"{type(self).__name__} was built without a residual path")
        return _value(self.residual.quant_weight())

    def pool_quantize(self, delta: Tensor) -> list[Tensor]:
        """``[q(delta; Theta_a^i) for each pool quantizer]``, ascending bits (Dynamic-ResQ)."""
        if self.residual_pool is None:
            raise RuntimeError(f"{type(self).__name__} has no pool of residual quantizers")
        return [_value(quant(delta)) for quant in self.residual_pool]

    def residual_weight_norm(self, qweight: Tensor | None = None) -> Tensor:
        """``||q_Theta_w(w)||_F``, the weight factor of eq. 10 (no gradient).

        Args:
            qweight: ``q_Theta_w(w)`` if already computed.
        """
        with torch.no_grad():
            if qweight is None:
                qweight = self.residual_quant_weight()
            return qweight.detach().norm()

    def spatial_positions(self, input_shape: Sequence[int]) -> int:
        """Number of input positions ("pixels") of one sample: ``H_in * W_in`` for a 2-D conv,
        tokens for ``Linear`` (1 for a plain ``[B, F]`` input)."""
        dims = input_shape[:-1] if self.channel_dim == -1 else input_shape[1:]
        return math.prod(dims)

    def linear_op(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's own op (stride, padding, groups, dilation) without bias."""
        return self.inner_forward_impl(x, weight, None)


def _value(tensor: Any) -> Tensor:
    """The plain tensor of a Brevitas ``QuantTensor`` (or the tensor itself)."""
    return getattr(tensor, "value", tensor)


class _ConvMacs:
    """``macs(input_shape, output_shape)``: multiply-accumulates of one sample (no batch dim)."""

    channel_dim = 1

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        # Each output element reads in_channels/groups * prod(kernel) inputs.
        return (math.prod(output_shape) * (self.in_channels // self.groups)
                * math.prod(self.kernel_size))


class _ConvTransposeMacs:
    channel_dim = 1
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        # Each input element scatters into out_channels/groups * prod(kernel) outputs.
        return (math.prod(input_shape) * (self.out_channels // self.groups)
                * math.prod(self.kernel_size))


class _LinearMacs:
    in_features: int
    channel_dim = -1

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        return math.prod(output_shape) * self.in_features


def _drop_residual_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict.pop(prefix + "residual.weight", None)


def _fill_residual_weight(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix + "weight" in state_dict:
        state_dict[prefix + "residual.weight"] = state_dict[prefix + "weight"]


def _retie_residual_weight(module: nn.Module, incompatible_keys: Any) -> None:
    if module.residual is not None and module.residual.weight is not module.weight:
        module.residual.weight = module.weight


def _make_init(brevitas_class: type[nn.Module]):
    def __init__(
        self,
        *args: Any,
        weight_quant: Any = None,
        input_quant: Any = None,
        residual_weight_quant: Any = None,
        residual_input_quant: Any = None,
        has_residual: bool = True,
        residual_input_pool: Sequence[tuple[int, Any]] | None = None,
        **layer_kwargs: Any,
    ) -> None:
        """Build the keyframe layer and its residual view.

        Args:
            *args: Positional arguments of the torch layer (e.g. in/out channels, kernel size).
            weight_quant: Keyframe weight quantizer injector (``None``: fp32).
            input_quant: Keyframe activation quantizer injector (``None``: fp32).
            residual_weight_quant: Residual weight quantizer injector.
            residual_input_quant: Residual activation quantizer injector.
            has_residual: Build the residual view (``False`` for frame quantization).
            residual_input_pool: ``(bits, injector)`` pairs of a Dynamic-ResQ pool; the residual
                view then has no input quantizer (``residual_input_quant`` must be ``None``).
            **layer_kwargs: Keyword arguments of the torch layer (stride, padding, bias, ...).
        """
        names = _positional_names(brevitas_class)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional args")
        layer_kwargs = {**dict(zip(names, args)), **layer_kwargs}
        brevitas_class.__init__(
            self,
            weight_quant=weight_quant,
            input_quant=input_quant,
            return_quant_tensor=False,
            **layer_kwargs,
        )
        self._init_residual(residual_weight_quant, residual_input_quant, has_residual,
                            layer_kwargs, residual_input_pool)

    return __init__


def _positional_names(brevitas_class: type[nn.Module]) -> list[str]:
    if issubclass(brevitas_class, qnn.QuantLinear):
        return ["in_features", "out_features", "bias"]
    return ["in_channels", "out_channels", "kernel_size", "stride", "padding"]


def _resq_class(name: str, brevitas_class: type, float_class: type, macs_mixin: type) -> type:
    return type(
        name,
        (ResQLayerMixin, macs_mixin, brevitas_class),
        {
            "__init__": _make_init(brevitas_class),
            "brevitas_class": brevitas_class,
            "float_class": float_class,
            "__doc__": (
                f"ResQ {float_class.__name__}: keyframe path is this "
                f"``{brevitas_class.__name__}``; ``residual`` is a bias-free view sharing "
                "``weight``."
            ),
            "__module__": __name__,
            "__qualname__": name,
        },
    )


ResQConv1d = _resq_class("ResQConv1d", qnn.QuantConv1d, nn.Conv1d, _ConvMacs)
ResQConv2d = _resq_class("ResQConv2d", qnn.QuantConv2d, nn.Conv2d, _ConvMacs)
ResQConv3d = _resq_class("ResQConv3d", qnn.QuantConv3d, nn.Conv3d, _ConvMacs)
ResQConvTranspose2d = _resq_class(
    "ResQConvTranspose2d", qnn.QuantConvTranspose2d, nn.ConvTranspose2d, _ConvTransposeMacs
)
ResQLinear = _resq_class("ResQLinear", qnn.QuantLinear, nn.Linear, _LinearMacs)

#: Float torch class -> ResQ class. Exact classes only (a subclass may override ``forward``).
RESQ_LAYER_FOR: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType({
    nn.Conv1d: ResQConv1d,
    nn.Conv2d: ResQConv2d,
    nn.Conv3d: ResQConv3d,
    nn.ConvTranspose2d: ResQConvTranspose2d,
    nn.Linear: ResQLinear,
})


def is_resq_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ResQ layer."""
    return isinstance(module, ResQLayerMixin)
