"""Fold BatchNorm into the conv/linear layer that feeds it.

A BatchNorm is folded when its input is the output of one supported layer (float or ResQ) and
nothing else reads that output. The pattern is found on a ``torch.fx`` trace when the model can be
traced; otherwise (data-dependent control flow, input checks) on an *eager* trace of one forward
pass with an example input, which records which calls read each layer output. Folding uses running
statistics (inference semantics) and Brevitas's ``merge_bn``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from resq_brevitas.nn.batch_norm import BN_TYPES, fold_pairs, is_plain_batch_norm
from resq_brevitas.nn.layers import (
    DEFAULT_LAYER_MAP,
    is_resq_layer,
    resq_class_for,
    resq_layer_class_of,
)

__all__ = ["BN_TYPES", "LayerMap", "LayerMapTracer", "call_with_inputs", "conv_bn_pairs_eager",
           "conv_bn_pairs_fx", "fold_batch_norm_pairs", "fold_batch_norms", "fold_pairs",
           "is_plain_batch_norm", "kept_batch_norm_subclasses", "warn_unfolded"]

#: ``float class -> ResQ class``, as :data:`resq_brevitas.nn.DEFAULT_LAYER_MAP`.
LayerMap = Mapping[type[nn.Module], type[nn.Module]]

# Tensor queries that read metadata only: they do not consume the layer output.
_METADATA_FUNCS = frozenset(
    {"dim", "size", "numel", "__get__", "is_floating_point", "stride", "ndimension"}
)


def _resq_class(module: nn.Module, layer_map: LayerMap) -> type[nn.Module] | None:
    """The ResQ class that defines ``module``'s axes (itself for a ResQ layer), else ``None``."""
    return resq_layer_class_of(module, layer_map)


def kept_batch_norm_subclasses(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of the BatchNorm subclasses that are not plain BatchNorms: they are
    never folded and stay in floating point as written."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, BN_TYPES) and not is_plain_batch_norm(m)]


class LayerMapTracer(torch.fx.Tracer):
    """``torch.fx`` tracer whose leaves are torch's own modules, every supported module (a
    layer map key or a subclass of one that changes only ``__init__``, such as torchvision's
    ``Conv3DSimple``; ResQ layers) and every plain BatchNorm subclass."""

    def __init__(self, layer_map: LayerMap = DEFAULT_LAYER_MAP) -> None:
        super().__init__()
        self.layer_map = layer_map

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (resq_class_for(m, self.layer_map) is not None or is_resq_layer(m)
                or is_plain_batch_norm(m) or super().is_leaf_module(m, module_qualified_name))


def _is_bn(module: nn.Module | None) -> bool:
    return module is not None and is_plain_batch_norm(module)


def conv_bn_pairs_fx(model: nn.Module, layer_map: LayerMap = DEFAULT_LAYER_MAP
                     ) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` name pairs found on a ``torch.fx`` trace.

    Raises:
        Exception: Whatever ``torch.fx.symbolic_trace`` raises on untraceable code.
    """
    graph = LayerMapTracer(layer_map).trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(modules.get(node.target)):
            continue
        producer = node.args[0]
        if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module"):
            continue
        if (_resq_class(modules[producer.target], layer_map) is not None
                and len(producer.users) == 1
                and calls[producer.target] == 1 and calls[node.target] == 1):
            pairs.append((producer.target, node.target))
    return pairs


def call_with_inputs(model: nn.Module, example: Any) -> Any:
    """``model`` on one frame as the project passes frames: a tensor, a tuple of positional
    inputs, or a dict of keyword inputs."""
    if isinstance(example, tuple):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return model(example)


def conv_bn_pairs_eager(model: nn.Module, example: Any,
                        layer_map: LayerMap = DEFAULT_LAYER_MAP) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` name pairs found by running ``model(example)`` once.

    Each call of a leaf module (a supported layer, a BatchNorm, or a module without children) is
    one consumer of its tensor inputs; each torch call outside leaf modules is one consumer too. A
    BatchNorm qualifies when its input was produced by a supported layer called once and the
    BatchNorm call is that output's only consumer.
    """
    modules = dict(model.named_modules())
    producers = {name for name, m in modules.items() if _resq_class(m, layer_map) is not None}
    leaves = {name for name, m in modules.items()
              if name in producers or is_plain_batch_norm(m)
              or not any(True for _ in m.children())}
    counter = itertools.count()
    stack: list[str] = []
    produced: dict[int, str] = {}
    consumers: dict[int, set[tuple[str, int]]] = {}
    bn_inputs: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    alive: list[Tensor] = []  # keeps ids unique for the duration of the trace

    def consume(obj: Any, key: tuple[str, int]) -> None:
        for leaf in tree_leaves(obj):
            if isinstance(leaf, Tensor):
                consumers.setdefault(id(leaf), set()).add(key)
                alive.append(leaf)

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            if not stack:
                consume(args, (name, next(counter)))
                if is_plain_batch_norm(module):
                    bn_inputs.setdefault(name, []).append(id(args[0]))
            stack.append(name)
        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            stack.pop()
            if not stack and name in producers and isinstance(out, Tensor):
                produced[id(out)] = name
                alive.append(out)
        return hook

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not stack and getattr(func, "__name__", "") not in _METADATA_FUNCS:
                consume((args, kwargs), ("op", next(counter)))
            return func(*args, **kwargs)

    handles = []
    for name in leaves:
        if name == "":
            continue
        handles.append(modules[name].register_forward_pre_hook(pre_hook(name)))
        handles.append(modules[name].register_forward_hook(post_hook(name)))
    try:
        with torch.no_grad(), _Mode():
            call_with_inputs(model, example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn_name, inputs in bn_inputs.items():
        if len(inputs) != 1 or calls[bn_name] != 1:
            continue
        producer = produced.get(inputs[0])
        if producer is None or calls.get(producer) != 1:
            continue
        if len(consumers.get(inputs[0], ())) == 1:
            pairs.append((producer, bn_name))
    return pairs


def fold_batch_norms(model: nn.Module, example: Any = None,
                     layer_map: LayerMap = DEFAULT_LAYER_MAP) -> list[str] | None:
    """Fold every BatchNorm that directly and exclusively follows a supported layer.

    The fold axis is the layer class's own (:meth:`~resq_brevitas.nn.ResQLayerMixin.
    bn_fold_axis`: the weight's output-channel dim), so a user-registered layer type folds
    along its axis; a layer that cannot take a per-channel scale keeps its BatchNorm.

    Args:
        model: Modified in place (float or converted).
        example: An example frame (a tensor, or a tuple/dict of inputs for a model with several
            inputs); used only when ``torch.fx`` cannot trace the model.
        layer_map: The layer map that says which float layers are supported, and their axes.

    Returns:
        Names of the folded BatchNorm layers, or ``None`` when the model could not be traced and
        no ``example`` was given (the caller may retry with one).
    """
    pairs = fold_batch_norm_pairs(model, example, layer_map)
    return None if pairs is None else [bn_name for _, bn_name in pairs]


def fold_batch_norm_pairs(model: nn.Module, example: Any = None,
                          layer_map: LayerMap = DEFAULT_LAYER_MAP
                          ) -> list[tuple[str, str]] | None:
    """:func:`fold_batch_norms`, returning the folded ``(layer, batch norm)`` name pairs (what
    :func:`fold_pairs` needs to repeat the fold on another copy without tracing)."""
    try:
        pairs = conv_bn_pairs_fx(model, layer_map)
    except Exception:  # tracing arbitrary user code can fail in many ways; fall back to eager
        if example is None:
            return None
        was_training = model.training
        model.eval()
        try:
            pairs = conv_bn_pairs_eager(model, example, layer_map)
        finally:
            model.train(was_training)
    return fold_pairs(model, pairs, layer_map)


def warn_unfolded(model: nn.Module, reason: str) -> None:
    """Warn that BatchNorm layers stay in floating point."""
    names = [n for n, m in model.named_modules() if is_plain_batch_norm(m)]
    if names:
        warnings.warn(f"BatchNorm layers {names} stay in floating point: {reason}", stacklevel=3)
