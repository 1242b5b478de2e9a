"""``convert``: float model + :class:`ResQConfig` in, :class:`ResQModel` out.

The float model is deep-copied and left untouched. BatchNorm layers that directly follow a
supported layer are folded into it (:mod:`resq_brevitas.bn_fold`; when ``torch.fx`` cannot trace
the model, folding waits for the first calibration frame and uses an eager trace); only plain
BatchNorms fold (a subclass with its own ``forward``, such as timm's ``BatchNormAct2d``, is kept
and reported). Then every supported module (a key of ``layer_map``, or a subclass of one that
changes only ``__init__``) that ``filter_fn`` accepts is replaced by its ResQ module (the map's
value, built by its ``from_float``), at its own scheme (the config's per-layer overrides):
ResQ layers for convolutions and ``Linear``, :class:`~resq_brevitas.nn.ResQMultiheadAttention`
for ``nn.MultiheadAttention`` (whose attention matmuls stay in floating point and are listed in
``qm.float_operations``).

What stays in floating point is reported by name (a warning; an error under ``strict``): weight
layers ResQ cannot run, subclasses of supported layers with their own ``forward``, and parents
that call ``F.linear``/``F.conv*`` on their children's weights instead of calling the children
(torchvision's ``ShiftedWindowAttention``: those children are left in floating point, found on a
``torch.fx`` trace). Bare Parameters that no linear op reads (ConvNeXt's ``layer_scale``, ViT's
``class_token``) are not weight layers. Layers ``filter_fn`` refuses are listed in
``qm.skipped_layers``. ``config.execution`` picks the executor of every residual path
(:mod:`resq_brevitas.nn.executors`); layers whose op the sparse executor does not run are reported
in a warning and listed in ``qm.dense_fallback_layers``.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from brevitas.graph.base import ModuleInstanceToModuleInstance, ModuleToModuleByInstance
from torch import fx, nn

from resq_brevitas.bn_fold import (
    LayerMap,
    LayerMapTracer,
    fold_batch_norm_pairs,
    kept_batch_norm_subclasses,
)
from resq_brevitas.config import ResQConfig
from resq_brevitas.nn.executors import apply_execution
from resq_brevitas.nn.layers import (
    DEFAULT_LAYER_MAP,
    is_resq_class,
    is_resq_layer,
    layer_map_entry,
    resq_class_for,
)
from resq_brevitas.policy.base import build_policy
from resq_brevitas.temporal.model import ResQModel

__all__ = ["FilterFn", "Survey", "ToResQLayer", "convert", "find_unsupported", "survey",
           "with_execution"]

#: ``filter_fn(module, qualified_name) -> bool``: convert this supported layer (torchao style).
FilterFn = Callable[[nn.Module, str], bool]

# Layers that hold weights but are left in floating point by design: they are not
# multiply-accumulate layers (normalisation, per-channel affine, PReLU slopes).
_ELEMENTWISE_WEIGHT_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, nn.LocalResponseNorm,
    nn.RMSNorm,
)
# Ops that multiply an input by a weight: a Parameter they read is a weight of a linear op.
_LINEAR_FUNCTIONS = frozenset({
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm,
    torch.baddbmm, torch.addmv, torch.mv, operator.matmul, F.multi_head_attention_forward,
})
_LINEAR_METHODS = frozenset({"matmul", "mm", "bmm", "mv", "__matmul__", "__rmatmul__"})
# Ops that only reshape or move a tensor: a weight seen through them is still the weight.
_VIEW_METHODS = frozenset({"t", "transpose", "permute", "view", "reshape", "contiguous", "to",
                           "flatten", "unsqueeze", "squeeze", "type_as", "float", "half"})
_VIEW_FUNCTIONS = frozenset({torch.t, torch.transpose, torch.permute, torch.reshape,
                             torch.flatten, torch.unsqueeze, torch.squeeze})


class ToResQLayer(ModuleToModuleByInstance):
    """Brevitas rewriter replacing one float layer instance by a ResQ layer (built by the ResQ
    class's ``from_float``: on the float weight's device, float tensors copied key by key)."""

    def init_new_module(self, old_module: nn.Module, name: str | None = None,
                        load_state_dict: bool = True) -> nn.Module:
        kwargs = self._evaluate_new_kwargs({}, old_module, name)
        return self.new_module_class.from_float(old_module, name, **kwargs)


@dataclass
class Survey:
    """What :func:`convert` finds in a float model before replacing anything.

    Attributes:
        targets: ``(name, module, ResQ class)`` of each supported module, outermost first (the
            children of a target are part of it).
        unsupported: ``"name (Type)"`` of weight layers that stay in floating point.
        own_forward: ``"name (Type)"`` of subclasses of supported layers with their own forward.
        bypassed: ``"parent (Type: children)"`` of parents that use their children's weights
            directly (``F.linear(x, self.qkv.weight)``).
        bypassed_children: Names of those children (they stay in floating point).
        kept_batch_norms: ``"name (Type)"`` of BatchNorm subclasses that are not plain BN.
        float_operations: ``"name: what"`` of weight-free ops of ResQ modules kept in float.
    """

    targets: list[tuple[str, nn.Module, type]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    own_forward: list[str] = field(default_factory=list)
    bypassed: list[str] = field(default_factory=list)
    bypassed_children: set[str] = field(default_factory=set)
    kept_batch_norms: list[str] = field(default_factory=list)
    float_operations: list[str] = field(default_factory=list)

    @property
    def floating(self) -> list[str]:
        """Everything with weights that stays in floating point, for ``unsupported_layers``."""
        return self.unsupported + self.own_forward + self.bypassed


def _traced_graphs(model: nn.Module, layer_map: LayerMap) -> Iterator[tuple[str, fx.Graph]]:
    """``(prefix, graph)`` covering as much of ``model`` as ``torch.fx`` can trace: the whole
    model, else each child that traces on its own (the root's input checks need not block the
    blocks below it)."""
    tracer = LayerMapTracer(layer_map)
    try:
        yield "", tracer.trace(model)
        return
    except Exception:  # arbitrary user code: try the children one by one
        pass
    for name, child in model.named_children():
        if tracer.is_leaf_module(child, name):
            continue
        for prefix, graph in _traced_graphs(child, layer_map):
            yield f"{name}.{prefix}" if prefix else name, graph


def _weight_uses(model: nn.Module, layer_map: LayerMap) -> tuple[dict[str, bool], set[str],
                                                                   set[str]]:
    """What a trace says about parameters read outside module calls.

    Returns:
        ``parameter name -> whether a linear op reads it`` (bare parameters read as tensors),
        the names of modules called, and the names of the module trees that were traced.
    """
    uses: dict[str, bool] = {}
    called: set[str] = set()
    traced: set[str] = set()
    for prefix, graph in _traced_graphs(model, layer_map):
        traced.add(prefix)
        join = (lambda t, p=prefix: f"{p}.{t}" if p else t)  # noqa: E731
        for node in graph.nodes:
            if node.op == "call_module":
                called.add(join(node.target))
            elif node.op == "get_attr":
                uses[join(node.target)] = uses.get(join(node.target), False) or _feeds_linear(node)
    return uses, called, traced


def _feeds_linear(node: fx.Node) -> bool:
    """Whether ``node``'s value reaches a linear op's input, directly or through views."""
    for user in node.users:
        if user.op == "call_function" and user.target in _LINEAR_FUNCTIONS:
            return True
        if user.op == "call_method" and user.target in _LINEAR_METHODS:
            return True
        if ((user.op == "call_method" and user.target in _VIEW_METHODS)
                or (user.op == "call_function" and user.target in _VIEW_FUNCTIONS)):
            if _feeds_linear(user):
                return True
    return False


def _in_traced(name: str, traced: set[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in traced)


def survey(model: nn.Module, layer_map: LayerMap = DEFAULT_LAYER_MAP) -> Survey:
    """Find what :func:`convert` replaces and what stays in floating point (see :class:`Survey`).

    Args:
        model: A float model (after BatchNorm folding).
        layer_map: The layer map.
    """
    found = Survey(kept_batch_norms=kept_batch_norm_subclasses(model))
    uses, called, traced = _weight_uses(model, layer_map)
    modules = dict(model.named_modules())
    # Supported children whose weight the parent reads while the child is never called.
    by_parent: dict[str, list[str]] = {}
    for param_name in uses:
        owner = param_name.rpartition(".")[0]
        module = modules.get(owner)
        if (module is not None and owner not in called
                and (resq_class_for(module, layer_map) is not None or is_resq_layer(module))):
            parent = owner.rpartition(".")[0]
            by_parent.setdefault(parent, []).append(owner)
    for parent, children in sorted(by_parent.items()):
        local = sorted({c.removeprefix(parent + ".") if parent else c for c in children})
        found.bypassed.append(f"{parent or '<root>'} ({type(modules[parent]).__name__}: calls "
                              f"F.linear/F.conv on {', '.join(local)}.weight)")
        found.bypassed_children.update(children)
    leaf = LayerMapTracer(layer_map)
    inside: list[str] = []  # targets whose subtree is theirs
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in inside) or name in found.bypassed_children:
            continue
        if is_resq_layer(module):
            continue
        entry = layer_map_entry(type(module), layer_map)
        if entry is not None and not entry[1]:
            found.targets.append((name, module, layer_map[entry[0]]))
            inside.append(name)
            for op in getattr(layer_map[entry[0]], "float_operations", ()):
                found.float_operations.append(f"{name}: {op}")
            continue
        if entry is not None:
            found.own_forward.append(
                f"{name} ({type(module).__name__}: a {entry[0].__name__} subclass overriding "
                f"{', '.join(entry[1])})")
            continue
        if isinstance(module, _ELEMENTWISE_WEIGHT_LAYERS):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        qualified = [f"{name}.{n}" if name else n for n in own]
        if _in_traced(name, traced) and not leaf.is_leaf_module(module, name):
            # Traced through: its parameters are bare tensors; only a linear op makes a weight.
            # (A torch module such as LSTM is a leaf: it runs its own linear algebra.)
            if not any(uses.get(q, False) for q in qualified):
                continue
        found.unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    return found


def find_unsupported(model: nn.Module, layer_map: LayerMap = DEFAULT_LAYER_MAP) -> list[str]:
    """Names of modules with weights that ResQ cannot run (e.g. LSTM), of subclasses of
    supported layers with their own ``forward``, and of parents calling ``F.linear``/``F.conv``
    on their children's weights (see :func:`survey`)."""
    return survey(model, layer_map).floating


def _check_layer_map(layer_map: object) -> LayerMap:
    if not isinstance(layer_map, Mapping) or not all(
            isinstance(k, type) and is_resq_class(v) for k, v in layer_map.items()):
        raise TypeError(
            "layer_map must map torch module classes to ResQ classes with a from_float "
            f"(see resq_brevitas.nn.resq_layer_class), got {layer_map!r}"
        )
    return layer_map


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
            DEFAULT_LAYER_MAP` for your own layer types (exact classes, and subclasses that
            change only ``__init__``, are matched).

    Returns:
        A ``ResQModel``; calibrate it with :func:`resq_brevitas.calibrate` before use.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, is already a ``ResQModel``, ``config`` is
            not a ``ResQConfig`` or ``layer_map`` is malformed.
        ValueError: If ``config.strict`` and something with weights stays in floating point
            (unsupported weight layers, subclasses with their own forward, parents using their
            children's weights), or the model has no supported layer.
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
    if resq_class_for(model, layer_map) is not None:
        raise ValueError(
            f"model must contain its layers; wrap a bare {type(model).__name__} in nn.Sequential"
        )
    net = copy.deepcopy(model)
    # None: torch.fx could not trace the model; calibrate() folds on an eager trace instead.
    folded = fold_batch_norm_pairs(net, layer_map=layer_map) if config.fold_bn else []
    bn_fold_pending = folded is None
    found = survey(net, layer_map)
    _report(found, config.strict)
    per_frame = getattr(type(config.policy), "per_frame", False)  # the ResQModel builds it
    policy = build_policy(config.policy) if config.policy is not None and not per_frame else None
    targets, skipped = [], []
    for name, module, resq_class in found.targets:
        if filter_fn is not None and not filter_fn(module, name):
            skipped.append(name)
            continue
        targets.append((name, module, resq_class))
    unsupported = list(found.floating)
    for name, module, resq_class in targets:
        scheme = config.scheme_of(name)
        try:
            new = resq_class.from_float(module, name, keyframe=scheme.keyframe,
                                        residual=scheme.residual,
                                        weight_granularity=config.weight_granularity,
                                        policy=policy if scheme.is_dynamic else None,
                                        residual_weights=config.residual_weights,
                                        family=scheme if scheme.is_family else None)
        except ValueError as err:  # e.g. attention with add_bias_kv: it stays in float
            if config.strict:
                raise
            warnings.warn(f"{name} stays in floating point: {err}", stacklevel=2)
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        net = ModuleInstanceToModuleInstance(module, new).apply(net)
    qm = ResQModel(net, config, tuple(unsupported), tuple(skipped), layer_map=layer_map)
    qm.bn_fold_pending = bn_fold_pending
    qm.folded_batch_norms = tuple(folded or ())
    #: ``"name: what"`` of the weight-free operations of ResQ modules left in floating point
    #: (the attention matmuls of ``ResQMultiheadAttention``).
    qm.float_operations = tuple(op for op in found.float_operations
                                if op.partition(":")[0] not in skipped)
    #: BatchNorm subclasses with their own forward, kept as written (never folded).
    qm.kept_batch_norms = tuple(found.kept_batch_norms)
    _set_execution(qm, config.execution, {}, stacklevel=3)
    return qm


def _report(found: Survey, strict: bool) -> None:
    """Warn about (or, under ``strict``, refuse) what stays in floating point."""
    parts = []
    if found.unsupported:
        parts.append("these weight layers are not supported by ResQ and stay in floating point "
                     f"(not counted in BOPs): {', '.join(found.unsupported)}")
    if found.own_forward:
        parts.append("these subclasses of supported layers override their forward and stay in "
                     f"floating point (add them to layer_map if they compute the same): "
                     f"{', '.join(found.own_forward)}")
    if found.bypassed:
        parts.append("these modules use their children's weights directly instead of calling "
                     "them, so the children stay in floating point (convert the parent with a "
                     f"layer_map entry of its own): {', '.join(found.bypassed)}")
    if parts:
        message = "; ".join(parts)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    if found.kept_batch_norms:  # not a weight layer left out: BN runs in float either way
        warnings.warn("these BatchNorm subclasses have their own forward: they are not folded "
                      f"and run as written, in floating point: {', '.join(found.kept_batch_norms)}",
                      stacklevel=3)


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
