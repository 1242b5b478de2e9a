"""ResQ layers: a Brevitas layer (the keyframe path) plus a residual path sharing its weight.

Each ResQ layer *is* the Brevitas layer (``qnn.QuantConv2d`` etc.) configured with the keyframe
quantizers. Its ``residual`` child is a residual path object (:mod:`resq_brevitas.nn.residual`:
static, 0-bit or a Dynamic-ResQ pool, chosen once when the layer is built) holding a bias-free
Brevitas view whose ``weight`` is the very same ``Parameter``: gradients from both paths sum into
one tensor, ``state_dict`` stores the weight once, and the tie is restored after
``load_state_dict`` (also with ``assign=True``). ``residual is None`` means the layer is frame
quantized: every frame runs the keyframe path.

The layer itself knows nothing about time: while a temporal executor is attached
(:func:`resq_brevitas.temporal.context.attached`, by :class:`resq_brevitas.ResQModel` or an
export step), ``forward`` hands the input to it, and the executor runs
:func:`resq_brevitas.temporal.step.keyframe_step` / ``residual_step`` on the layer.

Layer types come from a layer map, ``float class -> ResQ class`` (:data:`DEFAULT_LAYER_MAP`), that
:func:`resq_brevitas.convert` takes as a parameter; :func:`resq_layer_class` builds the ResQ class
of any Brevitas ``QuantWBIOL`` layer (e.g. ``qnn.QuantConvTranspose1d``) for a user's map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import brevitas.nn as qnn
import torch
from brevitas.core.restrict_val import LogFloatRestrictValue
from brevitas.core.scaling import ParameterScaling
from brevitas.graph.utils import signature_keys
from torch import Tensor, nn

from resq_brevitas.config import Precision, Scheme, check_residual_weights
from resq_brevitas.nn.attention import ResQAttentionBase
from resq_brevitas.nn.cost import precision_bops
from resq_brevitas.nn.family import FamilyPaths
from resq_brevitas.nn.residual import (
    CalibrationTarget,
    PrecisionPolicy,
    ResidualPath,
    build_residual_path,
)
from resq_brevitas.quant.quantizers import ACT_THRESHOLD_FLOOR, act_quant, weight_quant

__all__ = [
    "DEFAULT_LAYER_MAP",
    "ResQModule",
    "ResQMultiheadAttention",
    "ResQConv1d",
    "ResQConv2d",
    "ResQConv3d",
    "ResQConvTranspose2d",
    "ResQLayerMixin",
    "ResQLinear",
    "TemporalExecutor",
    "conv_macs",
    "conv_transpose_macs",
    "is_resq_class",
    "is_resq_layer",
    "layer_map_entry",
    "resq_layer_class_of",
    "linear_macs",
    "overridden_members",
    "resq_class_for",
    "resq_layer_class",
]

# Keyword arguments of a Brevitas layer that ResQ sets itself (never copied from a float layer).
_QUANT_KWARGS = frozenset({"device", "dtype", "weight_quant", "input_quant", "bias_quant",
                           "output_quant", "return_quant_tensor"})


class ResQModule(Protocol):
    """What a layer map's value is: a class that builds the ResQ replacement of a float module.

    ResQ layer classes (:class:`ResQLayerMixin`) are one kind; modules made of several ResQ
    layers (:class:`~resq_brevitas.nn.attention.ResQMultiheadAttention`) are another.
    """

    @classmethod
    def from_float(cls, module: nn.Module, name: str | None = None, *,
                   keyframe: Precision | str, residual: Precision | str | None,
                   weight_granularity: str = "tensor",
                   policy: PrecisionPolicy | None = None, residual_weights: str = "separate",
                   family: Scheme | None = None) -> nn.Module:
        """The ResQ module computing what ``module`` computes, with its weights."""


class TemporalExecutor(Protocol):
    """What a ResQ layer delegates to while attached (see :mod:`resq_brevitas.temporal`)."""

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on ``x`` as a keyframe or a residual frame."""


#: ``macs(layer, input_shape, output_shape)``: MACs of one sample (no batch dim).
MacsFn = Callable[[Any, tuple[int, ...], tuple[int, ...]], int]


def conv_macs(layer: Any, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """Convolutions: each output element reads ``in_channels/groups * prod(kernel)`` inputs."""
    return (math.prod(output_shape) * (layer.in_channels // layer.groups)
            * math.prod(layer.kernel_size))


def conv_transpose_macs(layer: Any, input_shape: tuple[int, ...],
                        output_shape: tuple[int, ...]) -> int:
    """Transposed convolutions: each input element scatters into
    ``out_channels/groups * prod(kernel)`` outputs."""
    return (math.prod(input_shape) * (layer.out_channels // layer.groups)
            * math.prod(layer.kernel_size))


def linear_macs(layer: Any, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """``Linear``: ``in_features`` MACs per output element."""
    return math.prod(output_shape) * layer.in_features


class ResQLayerMixin:
    """Keyframe path (the Brevitas layer itself) + residual path (``self.residual``)."""

    #: ``state_dict`` format: 2 stores activation thresholds as ``log2`` (version 1, linear
    #: thresholds, is converted on load; see :func:`_thresholds_to_log_domain`).
    _version = 2

    #: The plain torch class this ResQ class replaces.
    float_class: type[nn.Module]
    #: The Brevitas class of the keyframe path and of the residual view.
    brevitas_class: type[nn.Module]
    #: Dimension of the input holding channels (features): 1 for convs, -1 for ``Linear``.
    channel_dim: int
    #: Dimension of ``weight`` holding output channels (0; 1 for transposed convs).
    output_channel_dim: int
    _macs: MacsFn

    residual: ResidualPath | None
    weight: nn.Parameter
    keyframe_precision: Precision
    residual_precision: Precision | None

    @classmethod
    def from_float(cls, module: nn.Module, name: str | None = None, *,
                   keyframe: Precision | str = "W8A8", residual: Precision | str | None = "W4A4",
                   weight_granularity: str = "tensor",
                   policy: PrecisionPolicy | None = None, residual_weights: str = "separate",
                   family: Scheme | None = None) -> nn.Module:
        """The ResQ layer of a float layer (same hyper-parameters, weight and bias copied).

        The layer is built on the float weight's device and dtype; only the float tensors are
        copied (a ResQ layer has quantizer parameters a float layer lacks).

        Raises:
            ValueError: If the float layer has state other than ``weight`` and ``bias``.
        """
        attrs = dict(vars(module))
        attrs["bias"] = getattr(module, "bias", None) is not None  # not in vars() of Linear
        allowed = set(signature_keys(cls.brevitas_class)) - _QUANT_KWARGS
        kwargs = {k: v for k, v in attrs.items() if k in allowed}
        new = cls(keyframe=keyframe, residual=residual, weight_granularity=weight_granularity,
                  policy=policy, residual_weights=residual_weights, family=family, **kwargs)
        new.to(device=module.weight.device, dtype=module.weight.dtype)
        float_state = module.state_dict()
        unknown = set(float_state) - {"weight", "bias"}
        if unknown:
            raise ValueError(f"layer {name!r} has state {sorted(unknown)} that ResQ cannot carry")
        with torch.no_grad():
            new.weight.copy_(float_state["weight"])
            if "bias" in float_state:
                new.bias.copy_(float_state["bias"])
        new.train(module.training)
        return new

    def _init_resq(self, keyframe: Precision, residual: Precision | None,
                   weight_granularity: str, layer_kwargs: dict[str, Any],
                   policy: PrecisionPolicy | None, residual_weights: str = "separate",
                   family: Scheme | None = None) -> None:
        self._temporal: TemporalExecutor | None = None
        self.keyframe_precision = keyframe
        self.residual_precision = residual
        self.weight_granularity = weight_granularity
        self.residual_weights = residual_weights
        truncate_from = keyframe.weight_bits if residual_weights == "truncated" else None
        self.residual = build_residual_path(self.brevitas_class, residual, weight_granularity,
                                            layer_kwargs, policy, self.channel_dim,
                                            truncate_from)
        #: The per-action paths of a family scheme (VideoIQ), else ``None``.
        self.family = (FamilyPaths(self.brevitas_class, family, weight_granularity, layer_kwargs,
                                   residual_weights) if family is not None else None)
        if self.family is not None:
            self.family.tie(self.weight)
        if self.residual is not None or self.family is not None:
            if self.residual is not None:
                self.residual.view.weight = self.weight
            self._register_state_dict_hook(_drop_residual_weight)
            self.register_load_state_dict_pre_hook(_fill_residual_weight)
            self.register_load_state_dict_post_hook(_retie_residual_weight)
        self.register_load_state_dict_pre_hook(_thresholds_to_log_domain)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Keyframe path, unless a temporal executor is attached (then it decides per row)."""
        if args:
            raise TypeError(
                f"{type(self).__name__}.forward takes extra options by keyword only, got {args}"
            )
        if self._temporal is None:
            return self.keyframe_forward(x, **kwargs)
        return self._temporal.forward(self, x, **kwargs)

    def keyframe_forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``z = q_Phi_a(x) * q_Phi_w(w) + b`` (eq. 5, keyframe): the Brevitas layer itself."""
        return self.brevitas_class.forward(self, x, **kwargs)

    def residual_forward(self, delta: Tensor, **kwargs: Any) -> Tensor:
        """``q_Theta_a(delta) * q_Theta_w(w)`` (eq. 5, residual, no bias) through the residual
        path, as a tensor (a path that sends nothing contributes zeros)."""
        if self.residual is None:
            raise RuntimeError(f"{type(self).__name__} is frame quantized: it has no residual path")
        sent = self.residual.quantize(delta)
        if sent.q is None:
            sent = sent._replace(q=delta.new_zeros(delta.shape))
        return self.residual.contribution(sent, **kwargs)

    def keyframe_bops(self, macs: int) -> int:
        """BOPs of one keyframe row (``macs`` MACs at the keyframe precision)."""
        return precision_bops(macs, self.keyframe_precision)

    def calibration_targets(self) -> list[CalibrationTarget]:
        """Every activation quantizer of the layer that eq. 8 calibrates."""
        targets = []
        bits = self.keyframe_precision.act_bits
        if bits:
            targets.append(CalibrationTarget("keyframe", 0, bits[0], self.input_quant, self))
        if self.residual is not None:
            targets.extend(self.residual.calibration_targets())
        if self.family is not None:
            targets.extend(self.family.calibration_targets())
        return targets

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """MACs of one sample (shapes without the batch dim)."""
        return type(self)._macs(self, input_shape, output_shape)

    def spatial_positions(self, input_shape: Sequence[int]) -> int:
        """Number of input positions ("pixels") of one sample: ``H_in * W_in`` for a 2-D conv,
        tokens for ``Linear`` (1 for a plain ``[B, F]`` input)."""
        dims = input_shape[:-1] if self.channel_dim == -1 else input_shape[1:]
        return math.prod(dims)

    def spatial_shape(self, x: Tensor) -> tuple[int, ...]:
        """The pixel grid of an input ``x`` (batch first), as in :meth:`spatial_positions`."""
        return tuple(x.shape[1:-1]) if self.channel_dim == -1 else tuple(x.shape[2:])

    def linear_op(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's own op (stride, padding, groups, dilation) without bias."""
        return self.inner_forward_impl(x, weight, None)

    @classmethod
    def bn_fold_axis(cls, module: nn.Module) -> int | None:
        """The weight axis a following BatchNorm folds into, or ``None`` if it cannot.

        Grouped weights whose output channels are not a weight axis of their own (transposed
        convs with ``groups > 1``: ``[in, out / groups, ...]``) cannot take a per-channel scale.
        """
        groups = getattr(module, "groups", 1)
        if cls.output_channel_dim != 0 and groups != 1:
            return None
        return cls.output_channel_dim


def _tied_weight_keys(module: nn.Module) -> list[str]:
    """The state-dict keys (without prefix) of the views that share the layer's weight."""
    keys = ["residual.view.weight"] if module.residual is not None else []
    family = getattr(module, "family", None)
    if family is not None:
        keys += [f"family.paths.{name}.view.weight" for name in family.paths]
    return keys


def _drop_residual_weight(module: nn.Module, state_dict: dict, prefix: str,
                          local_metadata: Any) -> None:
    for key in _tied_weight_keys(module):
        state_dict.pop(prefix + key, None)


def _fill_residual_weight(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix + "weight" in state_dict:
        for key in _tied_weight_keys(module):
            state_dict[prefix + key] = state_dict[prefix + "weight"]


def _retie_residual_weight(module: nn.Module, incompatible_keys: Any) -> None:
    if module.residual is not None and module.residual.view.weight is not module.weight:
        module.residual.view.weight = module.weight
    if getattr(module, "family", None) is not None:
        module.family.tie(module.weight)


def _thresholds_to_log_domain(module: nn.Module, state_dict: dict, prefix: str,
                              local_metadata: dict, *args: Any) -> None:
    """Load a version-1 ``state_dict`` (linear activation thresholds, before the log-domain
    parametrisation) into log-domain quantizers: ``value <- log2(value)``. A ``state_dict``
    without metadata (rebuilt as a plain dict) is taken as the current format."""
    if local_metadata.get("version", _CURRENT) >= 2:
        return
    for name, sub in module.named_modules():
        if not isinstance(sub, ParameterScaling):
            continue
        key = f"{prefix}{name}.value"
        restrict = sub.restrict_clamp_scaling.restrict_value_impl
        if key in state_dict and isinstance(restrict, LogFloatRestrictValue):
            state_dict[key] = torch.log2(state_dict[key].abs().clamp_min(ACT_THRESHOLD_FLOOR))


_CURRENT = 2


def _positional_names(brevitas_class: type[nn.Module]) -> list[str]:
    if issubclass(brevitas_class, qnn.QuantLinear):
        return ["in_features", "out_features", "bias"]
    return ["in_channels", "out_channels", "kernel_size", "stride", "padding"]


def _make_init(brevitas_class: type[nn.Module]):
    def __init__(self, *args: Any, keyframe: Precision | str = "W8A8",
                 residual: Precision | str | None = "W4A4", weight_granularity: str = "tensor",
                 policy: PrecisionPolicy | None = None, residual_weights: str = "separate",
                 family: Scheme | str | None = None, **layer_kwargs: Any) -> None:
        """Build the keyframe layer and its residual path.

        Args:
            *args: Positional arguments of the torch layer (e.g. in/out channels, kernel size).
            keyframe: Keyframe precision (``"W8A8"``, ``"fp32"`` or a :class:`Precision`).
            residual: Residual precision (a pool such as ``"W8A{0,4,8}"`` needs ``policy``);
                ``None`` for frame quantization (no residual path).
            weight_granularity: ``"tensor"`` or ``"channel"`` weight scales.
            policy: The precision policy of a pool residual.
            residual_weights: ``"separate"`` (the residual weight has its own quantizer) or
                ``"truncated"`` (it is the truncated view of the keyframe's integer weight,
                VideoIQ any-precision: one integer stored for both paths).
            family: A family scheme (``"{W8A8,W4A4,skip}"``, ``"W8A8->{W4A4,skip,key}"``): the
                layer also builds the members' paths (:class:`~resq_brevitas.nn.family.
                FamilyPaths`); ``keyframe``/``residual`` must be the scheme's.
            **layer_kwargs: Keyword arguments of the torch layer (stride, padding, bias, ...).
        """
        names = _positional_names(brevitas_class)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional args")
        layer_kwargs = {**dict(zip(names, args)), **layer_kwargs}
        key = keyframe if isinstance(keyframe, Precision) else Precision.parse(keyframe)
        res = residual if residual is None or isinstance(residual, Precision) else (
            Precision.parse(residual))
        if key.is_pool or key.act_bits == (0,):
            raise ValueError(f"keyframe must be a static precision with activations, got {key}")
        check_residual_weights(residual_weights, key, res)
        brevitas_class.__init__(
            self,
            weight_quant=weight_quant(key.weight_bits, weight_granularity),
            input_quant=act_quant(key.act_bits[0] if key.act_bits else None),
            return_quant_tensor=False,
            **layer_kwargs,
        )
        fam = Scheme.parse(family) if family is not None else None
        if fam is not None and (not fam.is_family or fam.keyframe != key or fam.residual != res):
            raise ValueError(f"family must be a family scheme whose precisions are the layer's "
                             f"({key}->{res}), got {family!r}")
        self._init_resq(key, res, weight_granularity, layer_kwargs, policy, residual_weights,
                        fam)

    return __init__


def resq_layer_class(name: str, brevitas_class: type[nn.Module], float_class: type[nn.Module],
                     macs: MacsFn, channel_dim: int = 1, output_channel_dim: int = 0) -> type:
    """Build the ResQ class of a Brevitas layer class, for a layer map.

    Args:
        name: The new class's name (e.g. ``"ResQConvTranspose1d"``).
        brevitas_class: A Brevitas ``QuantWBIOL`` class (``qnn.QuantConvTranspose1d``, ...).
        float_class: The torch class it replaces.
        macs: ``macs(layer, input_shape, output_shape)`` of one sample (:func:`conv_macs`,
            :func:`conv_transpose_macs`, :func:`linear_macs` or your own).
        channel_dim: Input dim holding channels (1; -1 for ``Linear``-like layers).
        output_channel_dim: Weight dim holding output channels (0; 1 for transposed convs);
            BatchNorm folds along it.

    Returns:
        The class: ``class ResQX(ResQLayerMixin, brevitas_class)``.
    """
    return type(
        name,
        (ResQLayerMixin, brevitas_class),
        {
            "__init__": _make_init(brevitas_class),
            "brevitas_class": brevitas_class,
            "float_class": float_class,
            "channel_dim": channel_dim,
            "output_channel_dim": output_channel_dim,
            "_macs": staticmethod(macs),
            "__doc__": (
                f"ResQ {float_class.__name__}: keyframe path is this "
                f"``{brevitas_class.__name__}``; ``residual`` is a residual path whose view "
                "shares ``weight``."
            ),
            "__module__": __name__,
            "__qualname__": name,
        },
    )


ResQConv1d = resq_layer_class("ResQConv1d", qnn.QuantConv1d, nn.Conv1d, conv_macs)
ResQConv2d = resq_layer_class("ResQConv2d", qnn.QuantConv2d, nn.Conv2d, conv_macs)
ResQConv3d = resq_layer_class("ResQConv3d", qnn.QuantConv3d, nn.Conv3d, conv_macs)
ResQConvTranspose2d = resq_layer_class("ResQConvTranspose2d", qnn.QuantConvTranspose2d,
                                       nn.ConvTranspose2d, conv_transpose_macs,
                                       output_channel_dim=1)
ResQLinear = resq_layer_class("ResQLinear", qnn.QuantLinear, nn.Linear, linear_macs,
                              channel_dim=-1)

class ResQMultiheadAttention(ResQAttentionBase):
    """``nn.MultiheadAttention`` with ``ResQLinear`` q/k/v/out projections (each with its own
    temporal state) and the attention matmuls in floating point; see
    :class:`~resq_brevitas.nn.attention.ResQAttentionBase`."""

    projection_class = ResQLinear


#: Float torch class -> ResQ class (a :class:`ResQModule`), the default layer map of
#: :func:`resq_brevitas.convert`. Subclasses of a key are converted when they only change
#: ``__init__`` (:func:`resq_class_for`); extend it with
#: ``{**DEFAULT_LAYER_MAP, MyConv: ResQConv2d}``.
DEFAULT_LAYER_MAP: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType({
    nn.Conv1d: ResQConv1d,
    nn.Conv2d: ResQConv2d,
    nn.Conv3d: ResQConv3d,
    nn.ConvTranspose2d: ResQConvTranspose2d,
    nn.Linear: ResQLinear,
    nn.MultiheadAttention: ResQMultiheadAttention,
})


def is_resq_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ResQ layer."""
    return isinstance(module, ResQLayerMixin)


def is_resq_class(cls: object) -> bool:
    """Whether ``cls`` can be a layer map's value (a :class:`ResQModule`)."""
    return isinstance(cls, type) and callable(getattr(cls, "from_float", None))


# Class members a subclass may redefine without changing what the base's forward computes.
_HARMLESS_MEMBERS = frozenset({
    "__init__", "__doc__", "__module__", "__qualname__", "__dict__", "__weakref__",
    "__annotations__", "__firstlineno__", "__static_attributes__", "__parameters__",
    "__orig_bases__", "__constants__", "__repr__", "extra_repr", "_version",
})


def overridden_members(cls: type, base: type) -> list[str]:
    """Members of ``base`` that ``cls`` (or a class before ``base`` in its MRO) redefines,
    other than ``__init__`` and metadata: empty when ``base``'s forward computes ``cls``'s."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is base:
            break
        names.update(n for n in vars(klass) if n not in _HARMLESS_MEMBERS and hasattr(base, n))
    return sorted(names)


def layer_map_entry(module_type: type, layer_map: Mapping[type, type]
                    ) -> tuple[type, list[str]] | None:
    """The key of ``layer_map`` that ``module_type`` is or derives from (nearest first), with
    the members of it the type overrides (``[]``: a plain subclass); ``None`` if none."""
    for base in module_type.__mro__:
        if base in layer_map:
            return base, overridden_members(module_type, base)
    return None


def resq_class_for(module: nn.Module, layer_map: Mapping[type, type]) -> type | None:
    """The layer map's value for ``module``: that of its exact type, or of its base for a
    subclass that changes only ``__init__`` (torchvision's ``Conv3DSimple``); else ``None``."""
    entry = layer_map_entry(type(module), layer_map)
    if entry is None or entry[1]:
        return None
    return layer_map[entry[0]]


def resq_layer_class_of(module: nn.Module, layer_map: Mapping[type, type]) -> type | None:
    """The ResQ *layer* class (one linear op) for ``module``: itself for a ResQ layer, the
    layer map's value when it is a :class:`ResQLayerMixin` class, else ``None`` (modules
    replaced by composite ResQ modules such as attention)."""
    if is_resq_layer(module):
        return type(module)
    cls = resq_class_for(module, layer_map)
    return cls if isinstance(cls, type) and issubclass(cls, ResQLayerMixin) else None
