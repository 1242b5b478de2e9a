"""``convert``: float model + :class:`ResQConfig` in, :class:`ResQModel` out.

The float model is deep-copied and left untouched. BatchNorm layers that directly follow a
supported layer are folded into it (:mod:`resq_brevitas.bn_fold`; when ``torch.fx`` cannot trace
the model, folding waits for the first calibration frame and uses an eager trace); then every
supported layer (a key of ``layer_map``) that ``filter_fn`` accepts is replaced by its ResQ layer
with a Brevitas graph rewriter, at its own scheme (the config's per-layer overrides). Weight
layers that are not supported are reported by name; layers ``filter_fn`` refuses stay in floating
point and are listed in ``qm.skipped_layers``. ``config.execution`` picks the executor of every
residual path (:mod:`resq_brevitas.nn.executors`); layers whose op the sparse executor does not
run are reported in a warning and listed in ``qm.dense_fallback_layers``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from brevitas.graph.base import ModuleToModuleByInstance
from brevitas.graph.utils import signature_keys
from torch import nn

from resq_brevitas.bn_fold import LayerMap, fold_batch_norms
from resq_brevitas.config import ResQConfig
from resq_brevitas.nn.executors import apply_execution
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, ResQLayerMixin, is_resq_layer
from resq_brevitas.policy.base import build_policy
from resq_brevitas.temporal.model import ResQModel

__all__ = ["FilterFn", "ToResQLayer", "convert", "find_unsupported", "with_execution"]

#: ``filter_fn(module, qualified_name) -> bool``: convert this supported layer (torchao style).
FilterFn = Callable[[nn.Module, str], bool]

# Layers that hold weights but are left in floating point by design: they are not
# multiply-accumulate layers (normalisation, per-channel affine, PReLU slopes).
_ELEMENTWISE_WEIGHT_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, nn.LocalResponseNorm,
    nn.RMSNorm,
)
_QUANT_KWARGS = frozenset({"device", "dtype", "weight_quant", "input_quant", "bias_quant",
                           "output_quant", "return_quant_tensor"})


class ToResQLayer(ModuleToModuleByInstance):
    """Brevitas rewriter replacing one float layer instance by a ResQ layer.

    Brevitas's default ``init_new_module`` builds on the meta device and loads with ``strict=True``;
    a ResQ layer has quantizer parameters a float layer lacks, so the new module is built on the
    float weight's device and only the float tensors are copied in (checked key by key).
    """

    def init_new_module(self, old_module: nn.Module, name: str | None = None,
                        load_state_dict: bool = True) -> nn.Module:
        attrs = self._map_origin_vars(self._module_attributes(old_module))
        allowed = set(signature_keys(self.new_module_class.brevitas_class)) - _QUANT_KWARGS
        kwargs = {k: v for k, v in attrs.items() if k in allowed}
        kwargs = self._evaluate_new_kwargs(kwargs, old_module, name)
        new_module = self.new_module_class(**kwargs)
        new_module.to(device=old_module.weight.device, dtype=old_module.weight.dtype)
        float_state = old_module.state_dict()
        unknown = set(float_state) - {"weight", "bias"}
        if unknown:
            raise ValueError(f"layer {name!r} has state {sorted(unknown)} that ResQ cannot carry")
        with torch.no_grad():
            new_module.weight.copy_(float_state["weight"])
            if "bias" in float_state:
                new_module.bias.copy_(float_state["bias"])
        new_module.train(old_module.training)
        return new_module


def find_unsupported(model: nn.Module, layer_map: LayerMap = DEFAULT_LAYER_MAP) -> list[str]:
    """Names of modules with their own weights that ResQ cannot run (e.g. LSTM, MHA)."""
    names = []
    for name, module in model.named_modules():
        if type(module) in layer_map or is_resq_layer(module):
            continue
        if isinstance(module, _ELEMENTWISE_WEIGHT_LAYERS):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(module).__name__})")
    return names


def _check_layer_map(layer_map: object) -> LayerMap:
    if not isinstance(layer_map, Mapping) or not all(
            isinstance(k, type) and is_resq_class(v) for k, v in layer_map.items()):
        raise TypeError(
            "layer_map must map torch layer classes to ResQ layer classes (see "
            f"resq_brevitas.nn.resq_layer_class), got {layer_map!r}"
        )
    return layer_map


def is_resq_class(cls: object) -> bool:
    """Whether ``cls`` is a ResQ layer class."""
    return isinstance(cls, type) and issubclass(cls, ResQLayerMixin)


def convert(model: nn.Module, config: ResQConfig | None = None,
            filter_fn: FilterFn | None = None,
            layer_map: LayerMap = DEFAULT_LAYER_MAP) -> ResQModel:
    """Convert a float model to a :class:`ResQModel`.

    Args:
        model: The float model (not modified).
        config: The configuration (default ``ResQConfig()``: ``W8A8->W4A4``, ``T=4``); its
            ``overrides`` give single layers their own scheme.
        filter_fn: ``filter_fn(module, name) -> bool``: which supported layers to convert
            (default: all). Refused layers stay in floating point, are not counted in BOPs and
            are listed in ``qm.skipped_layers``.
        layer_map: ``float class -> ResQ class``; extend :data:`~resq_brevitas.nn.
            DEFAULT_LAYER_MAP` for your own layer types (exact classes are matched).

    Returns:
        A ``ResQModel``; calibrate it with :func:`resq_brevitas.calibrate` before use.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, is already a ``ResQModel``, ``config`` is
            not a ``ResQConfig`` or ``layer_map`` is malformed.
        ValueError: If ``config.strict`` and the model has unsupported weight layers, or the model
            has no supported layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ResQModel):
        raise TypeError("model must be a float model, got a ResQModel (it is already converted)")
    if config is None:
        config = ResQConfig()
    if not isinstance(config, ResQConfig):
        raise TypeError(f"config must be a resq_brevitas.ResQConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {filter_fn!r}")
    layer_map = _check_layer_map(layer_map)
    if type(model) in layer_map:
        raise ValueError(
            f"model must contain its layers; wrap a bare {type(model).__name__} in nn.Sequential"
        )
    net = copy.deepcopy(model)
    # None: torch.fx could not trace the model; calibrate() folds on an eager trace instead.
    bn_fold_pending = config.fold_bn and fold_batch_norms(net, layer_map=layer_map) is None
    unsupported = find_unsupported(net, layer_map)
    if unsupported:
        message = ("these weight layers are not supported by ResQ and stay in floating point "
                   f"(not counted in BOPs): {', '.join(unsupported)}")
        if config.strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    per_frame = getattr(type(config.policy), "per_frame", False)  # the ResQModel builds it
    policy = build_policy(config.policy) if config.policy is not None and not per_frame else None
    targets, skipped = [], []
    for name, module in net.named_modules():
        if type(module) not in layer_map:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            skipped.append(name)
            continue
        targets.append((name, module))
    for name, module in targets:
        scheme = config.scheme_of(name)
        net = ToResQLayer(module, layer_map[type(module)], keyframe=scheme.keyframe,
                          residual=scheme.residual,
                          weight_granularity=config.weight_granularity,
                          policy=policy if scheme.is_dynamic else None,
                          residual_weights=config.residual_weights,
                          family=scheme if scheme.is_family else None).apply(net)
    qm = ResQModel(net, config, tuple(unsupported), tuple(skipped), layer_map=layer_map)
    qm.bn_fold_pending = bn_fold_pending
    _set_execution(qm, config.execution, {}, stacklevel=3)
    return qm


def _set_execution(qm: ResQModel, execution: str, options: dict[str, Any],
                   stacklevel: int) -> None:
    """Install the residual executors and report (warn, ``qm.dense_fallback_layers``) the
    layers that stay dense although sparse was asked for."""
    fallbacks = apply_execution(qm.resq_layers(), execution, **options)
    # "name (reason)" of each layer whose residual op stays dense under "sparse".
    qm.dense_fallback_layers = fallbacks
    if fallbacks:
        warnings.warn("execution='sparse': these layers run their residual op dense: "
                      + ", ".join(fallbacks), stacklevel=stacklevel)


def with_execution(qm: ResQModel, execution: str, **options: Any) -> ResQModel:
    """A copy of a (calibrated) model whose residual frames run with another executor.

    The executor changes how residual ops are computed, not what they compute, so nothing is
    recalibrated: benchmarks compare ``"dense"`` and ``"sparse"`` on the very same ranges.

    Args:
        qm: A ResQModel (not modified).
        execution: ``"dense"`` or ``"sparse"`` (the copy's ``config.execution``).
        **options: Sparse executor options: ``tile`` (output tile edge, an int or one per
            spatial dim) and ``dense_above`` (share of active tiles above which a layer runs its
            dense op); see :class:`~resq_brevitas.nn.executors.SparseTileOp`.

    Returns:
        A new ResQModel (deep copy, reset).

    Raises:
        TypeError: If ``qm`` is not a ResQModel.
        ValueError: If ``execution`` is unknown or an option is malformed.
    """
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a resq_brevitas.ResQModel, got {type(qm).__name__}")
    config = dataclasses.replace(qm.config, execution=execution)  # validates execution
    new = copy.deepcopy(qm)
    new.config = config
    _set_execution(new, execution, options, stacklevel=3)
    new.reset()
    return new
