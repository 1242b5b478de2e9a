"""torch.fx support: a ResQ-aware tracer, keyframe/residual step graphs and unrolled clips.

Three things live here (design card, section 5):

* :class:`ResQTracer` keeps ResQ layers (and any Brevitas quant layer) as ``call_module`` leaves.
  A plain ``torch.fx.Tracer`` (and Brevitas's FX backport) traces *into* them and silently bakes
  the ``temporal_slot is None`` branch, i.e. the keyframe path, into every call site.
* :func:`step_graphs` turns a calibrated :class:`~resq_brevitas.ResQModel` into two graphs with
  explicit state, like a KV cache: ``keyframe(x) -> (y, *state)`` and
  ``residual(x, *state) -> (y, *state)``. The state is each ResQ layer's reference input and
  output ``(x_ref, z_ref)``, layer by layer in :meth:`ResQModel.resq_layers` order, identical in
  the keyframe outputs, the residual inputs and the residual outputs. The frame counter stays in
  the host program (see :class:`resq_brevitas.runtime.OnnxStream`). Each ResQ call site becomes
  one leaf module, :class:`~resq_brevitas.temporal.step.KeyframeStep` or
  :class:`~resq_brevitas.temporal.step.ResidualStep`, that runs the shared step of
  :mod:`resq_brevitas.temporal.step` (both reference modes, RRM truncation, see
  :class:`ResidualMode`); exporters trace through them. :func:`export_program` runs
  ``torch.export`` on the graphs.
* :func:`unroll` turns a *float* model into a GraphModule that runs one clip of ``T`` frames (one
  keyframe and ``T - 1`` residual frames in a static loop). Residual call sites go through twin
  modules that share the weight ``Parameter``, so torch.ao ``prepare_qat_fx`` (with
  ``QConfigMapping.set_module_name``) or torchao ``prepare_qat_pt2e`` give keyframe and residual
  call sites their own fake-quants, e.g. 8-bit and 4-bit.

Models whose ``forward`` checks input shapes (``if x.dim() != 4: raise``) defeat a plain symbolic
trace; given an example input, :func:`trace_graph` retries with torch.fx's ``MetaTracer`` so the
checks run on the example's shapes and the graph is specialised to them.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from brevitas.nn.mixin.base import QuantLayerMixin
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from resq_brevitas.convert import fold_batch_norms
from resq_brevitas.nn.layers import RESQ_LAYER_FOR, is_resq_layer
from resq_brevitas.quant.control import proxy_attribute
from resq_brevitas.temporal.step import (
    KeyframeStep,
    ResidualMode,
    ResidualStep,
    truncate_residual,
)

__all__ = [
    "ResQTracer",
    "export_program",
    "quant_tensors_disabled",
    "StateSpec",
    "StepGraphs",
    "step_graphs",
    "symbolic_trace",
    "trace_graph",
    "unroll",
    "RESIDUAL_PREFIX",
    "RESIDUAL_QUANT_PREFIX",
    "RESIDUAL_STEP_PREFIX",
    "KEYFRAME_STEP_PREFIX",
    "KeyframeStep",
    "ResidualMode",
    "ResidualQuantize",
    "ResidualStep",
    "truncate_residual",
]

#: Submodule under which :func:`unroll` registers the residual twins (``resq_residual.<name>``).
RESIDUAL_PREFIX = "resq_residual"
#: Prefix for :class:`ResidualQuantize` helpers (no longer emitted by :func:`step_graphs`).
RESIDUAL_QUANT_PREFIX = "resq_residual_quantize"
#: Where the residual step graph keeps its :class:`ResidualStep` leaves (``<prefix>.<layer>``).
RESIDUAL_STEP_PREFIX = "resq_residual_step"
#: Where the keyframe step graph keeps its :class:`KeyframeStep` leaves (``<prefix>.<layer>``).
KEYFRAME_STEP_PREFIX = "resq_keyframe_step"


class ResQTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps ResQ layers and Brevitas quant layers as leaves.

    Everything else follows ``torch.fx.Tracer`` (``torch.nn`` modules are leaves, other modules
    are traced through).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """ResQ layers and Brevitas quant layers are leaves; otherwise the torch.fx default."""
        if _is_resq_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _meta_tracer_class(leaf: Any) -> type[fx.Tracer]:
    from torch.fx.experimental.meta_tracer import MetaTracer, proxys_to_metas

    class _MetaTracer(MetaTracer):
        # Never add modules to the user's model (MetaTracer would, for unregistered ones).
        allow_insert_stateless_mods = False

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            if leaf(m):
                return True
            return super().is_leaf_module(m, module_qualified_name)

        def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...],
                         kwargs: dict[str, Any], name: str | None = None,
                         type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
            module = self.root.get_submodule(target) if kind == "call_module" else None
            if module is None or not leaf(module):
                return super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                            proxy_factory_fn)
            # MetaTracer would run the leaf's forward, whose quantizer submodule calls trip
            # torch.fx's module-scope checks; the shape comes from the bare linear op instead.
            proxy = fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr,
                                           proxy_factory_fn)
            if is_resq_layer(module):
                self._disable_module_getattr = True  # real attributes, nothing recorded
                try:
                    x = proxys_to_metas(args[0])
                    proxy.install_tensor_meta(module.linear_op(x, module.weight.to("meta")))
                except Exception:  # no shape: later shape checks fail and are reported
                    pass
                finally:
                    self._disable_module_getattr = False
            return proxy

    return _MetaTracer


def _is_resq_leaf(m: nn.Module) -> bool:
    return is_resq_layer(m) or isinstance(m, (QuantLayerMixin, ResidualQuantize, KeyframeStep,
                                              ResidualStep))


def trace_graph(root: nn.Module, example: Tensor | None = None, resq_leaves: bool = True
                ) -> fx.Graph:
    """Trace ``root.forward(x)`` into a graph, with shape-aware tracing as a fallback.

    A plain symbolic trace is tried first (:class:`ResQTracer`, or ``torch.fx.Tracer`` with
    ``resq_leaves=False``). If it fails and ``example`` is given, the trace is retried with
    torch.fx's ``MetaTracer``, whose proxies carry the shapes of ``example`` (on the meta device),
    so Python checks on shapes (``if x.dim() != 4: raise ...``) run concretely and the graph is
    specialised to that input shape.

    Raises:
        RuntimeError: If neither trace succeeds (the message says why).
    """
    tracer: fx.Tracer = ResQTracer() if resq_leaves else fx.Tracer()
    try:
        return tracer.trace(root)
    except Exception as err:  # tracing arbitrary user code can fail in many ways
        first = err
    if example is not None:
        import inspect

        params = list(inspect.signature(root.forward).parameters)
        if params:
            meta = torch.empty(example.shape, dtype=example.dtype, device="meta")
            leaf = _is_resq_leaf if resq_leaves else (lambda m: False)
            try:
                with warnings.catch_warnings():
                    # MetaTracer warns for every op whose shape it cannot propagate; the graph
                    # does not depend on those shapes.
                    warnings.filterwarnings("ignore", message="Could not compute metadata")
                    return _meta_tracer_class(leaf)().trace(root, {params[0]: meta})
            except Exception:  # the plain tracer's message is the more useful one
                pass
    raise RuntimeError(
        f"{type(root).__name__} could not be traced by torch.fx: {first}"
    ) from first


def symbolic_trace(root: nn.Module, concrete_args: dict[str, Any] | None = None
                   ) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`ResQTracer`.

    Args:
        root: The module to trace.
        concrete_args: Passed to :meth:`torch.fx.Tracer.trace`.

    Returns:
        A GraphModule whose ResQ layers are ``call_module`` nodes.
    """
    tracer = ResQTracer()
    graph = tracer.trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, nn.Module) else root.__name__
    return fx.GraphModule(tracer.root, graph, name)


# --------------------------------------------------------------------------------------------
# step graphs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateSpec:
    """One state tensor of the step graphs.

    Attributes:
        name: Tensor name used in exported graphs (``"<layer>.x_ref"`` / ``"<layer>.z_ref"``).
        layer: Qualified name of the ResQ layer inside ``qm.model``.
        kind: ``"x_ref"`` (the layer's reference input) or ``"z_ref"`` (its reference output).
    """

    name: str
    layer: str
    kind: str


@dataclass
class StepGraphs:
    """The two step graphs of a ResQ model and their shared state layout.

    Attributes:
        keyframe: ``keyframe(x) -> (y, *state)``.
        residual: ``residual(x, *state) -> (y, *state)``; ``None`` under frame quantization.
        state: The state tensors, in graph order.
        layers: Names of the ResQ layers that carry state (two state tensors each).
    """

    keyframe: nn.Module
    residual: nn.Module | None
    state: list[StateSpec]
    layers: list[str]


def state_specs(layers: list[str]) -> list[StateSpec]:
    """The state layout for ``layers``: ``x_ref`` then ``z_ref`` of each layer, in order."""
    specs = []
    for layer in layers:
        specs.append(StateSpec(f"{layer}.x_ref", layer, "x_ref"))
        specs.append(StateSpec(f"{layer}.z_ref", layer, "z_ref"))
    return specs


def _inplace_ops(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[str]:
    """Descriptions of nodes that may write into their input tensor."""
    found = []
    for node in graph.nodes:
        if node.op == "call_module":
            if getattr(modules.get(node.target), "inplace", False):
                found.append(f"{node.target} (inplace=True)")
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(
                node.target, "__name__", "")
            in_place_name = name.endswith("_") and not name.endswith("__")
            if node.kwargs.get("inplace", False) or in_place_name or name.startswith("__i"):
                found.append(f"{node.name} ({name})")
            elif node.op == "call_function" and node.target in (operator.iadd, operator.isub,
                                                                operator.imul,
                                                                operator.itruediv):
                found.append(f"{node.name} ({name})")
    return found


def _resq_call_sites(graph: fx.Graph, layer_names: set[str]) -> dict[str, fx.Node]:
    sites: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layer_names:
            if node.target in sites:
                raise ValueError(
                    f"ResQ layer {node.target!r} is called more than once per frame; a ResQ layer "
                    "must be called once per forward (reuse the float module for weight sharing)"
                )
            if not node.args or len(node.args) > 1:
                raise ValueError(
                    f"ResQ layer {node.target!r} must be called with one positional input, got "
                    f"{len(node.args)}"
                )
            sites[node.target] = node
    return sites


class ResidualQuantize(nn.Module):
    """``q_Theta_a(delta)`` of a ResQ layer's static residual path, as a plain tensor.

    A leaf of :class:`ResQTracer`. (The step graphs no longer use it: their residual call sites
    are :class:`~resq_brevitas.temporal.step.ResidualStep` leaves; kept for existing users.)

    Args:
        layer: The ResQ layer (not registered as a child: only its quantizer is).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.quant = layer.residual.input_quant

    def forward(self, delta: Tensor) -> Tensor:
        out = self.quant(delta)
        return getattr(out, "value", out)


def step_graphs(qm: Any, example_frame: Tensor | None = None) -> StepGraphs:
    """Derive the keyframe and residual step graphs of a ResQ model.

    The graphs share the ResQ model's layers (no copy). Each call site of a ResQ layer becomes a
    ``call_module`` leaf: in the keyframe graph a :class:`KeyframeStep` at
    ``resq_keyframe_step.<layer>`` (the keyframe path, ``z = q_Phi_a(x) * q_Phi_w(w) + b``, and
    the reference ``(x, z)``), in the residual graph a :class:`ResidualStep` at
    ``resq_residual_step.<layer>`` taking ``(x, x_ref, z_ref)`` (``z = q(x - x_ref) * q(w) +
    z_ref``, eq. 4-5, with RRM truncation first when the model has a threshold). Both run
    :mod:`resq_brevitas.temporal.step`, like the runtime. In the ``keyframe`` reference mode the
    residual graph returns its state unchanged; in the ``previous`` mode it returns the advanced
    references (see :class:`ResidualMode`). A layer that the model never calls carries no state.
    If the model writes in place after a ResQ layer (e.g. ``ReLU(inplace=True)``), the steps
    return private copies of the state tensors.

    Args:
        qm: A :class:`~resq_brevitas.ResQModel`.
        example_frame: Optional ``[B, C, ...]`` frame: if a plain symbolic trace fails (Python
            checks on shapes in ``forward``), the model is traced again with that frame's shape
            (see :func:`trace_graph`) and the graphs are specialised to it.

    Returns:
        The two GraphModules and the state layout.

    Raises:
        TypeError: If ``qm`` is not a ResQModel.
        RuntimeError: If ``qm.model`` cannot be traced by torch.fx (data-dependent Python control
            flow); the message says why.
        ValueError: If a ResQ layer is called more than once or with several inputs, or the
            scheme has a pool of residual bit widths.
    """
    from resq_brevitas.temporal.model import ResQModel

    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    mode = ResidualMode.of(qm)
    source = trace_graph(qm.model, example_frame)
    order = [name for name, _ in qm.resq_layers()]
    sites = _resq_call_sites(source, set(order))
    layers = [name for name in order if name in sites]
    all_layers = dict(qm.resq_layers())
    modules = dict(qm.model.named_modules())
    clone_state = bool(_inplace_ops(source, modules))
    key_helpers: dict[str, nn.Module] = {}
    keyframe = _step_graph(source, layers, None, clone_state, all_layers, key_helpers)
    residual_module = None
    if qm.scheme.residual is not None:
        helpers: dict[str, nn.Module] = {}
        residual = _step_graph(source, layers, mode, clone_state, all_layers, helpers)
        residual_module = fx.GraphModule(_graph_root(qm.model, residual, helpers), residual,
                                         "ResQResidualStep")
    return StepGraphs(
        keyframe=fx.GraphModule(_graph_root(qm.model, keyframe, key_helpers), keyframe,
                                "ResQKeyframeStep"),
        residual=residual_module,
        state=state_specs(layers),
        layers=layers,
    )


def _graph_root(model: nn.Module, graph: fx.Graph, helpers: dict[str, nn.Module]
                ) -> dict[str, Any]:
    """The objects a graph's ``call_module``/``get_attr`` targets name (a GraphModule root).

    A dict root (rather than ``model``) lets helper modules live at their own paths without
    ever being attached to the user's model.
    """
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            if node.target in helpers:
                root[node.target] = helpers[node.target]
            else:
                root[node.target] = reduce(getattr, node.target.split("."), model)
    return root


def _output_value(graph: fx.Graph) -> Any:
    for node in graph.nodes:
        if node.op == "output":
            return node.args[0]
    raise ValueError("graph has no output node")


def _step_outputs(graph: fx.Graph, step: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(z, x_ref, z_ref)`` of a step leaf's tuple output."""
    return tuple(graph.call_function(operator.getitem, (step, i)) for i in range(3))


def _step_graph(source: fx.Graph, layers: list[str], mode: ResidualMode | None,
                clone_state: bool, all_layers: dict[str, nn.Module],
                helpers: dict[str, nn.Module]) -> fx.Graph:
    """The keyframe step graph (``mode is None``) or the residual step graph of ``source``.

    Each ResQ call site becomes one leaf: :class:`KeyframeStep` (``keyframe_step``) or
    :class:`ResidualStep` (``residual_step`` of ``mode``), both from ``temporal/step.py``, which
    return the layer output and its next references (private copies if a later in-place op could
    overwrite them). The residual graph takes each layer's ``(x_ref, z_ref)`` as inputs after the
    frame; both graphs output them after the model output, in ``layers`` order.
    """
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    refs: dict[str, tuple[fx.Node, fx.Node]] = {}
    new_refs: dict[str, tuple[fx.Node, fx.Node]] = {}
    frame_seen = False
    wanted = set(layers)

    def lookup(n: fx.Node) -> Any:
        return env[n]

    for node in source.nodes:
        if node.op == "placeholder" and mode is not None:
            if frame_seen:
                raise ValueError("qm.model must take exactly one input (the frame)")
            env[node] = graph.node_copy(node, lookup)
            frame_seen = True
            for i, layer in enumerate(layers):
                refs[layer] = (graph.placeholder(f"x_ref_{i}"), graph.placeholder(f"z_ref_{i}"))
            continue
        if node.op == "output":
            continue
        if node.op == "call_module" and node.target in wanted:
            name = node.target
            if mode is None:
                target = f"{KEYFRAME_STEP_PREFIX}.{name}"
                helpers[target] = KeyframeStep(all_layers[name], private=clone_state)
                args: tuple[Any, ...] = (env[node.args[0]],)
            else:
                target = f"{RESIDUAL_STEP_PREFIX}.{name}"
                helpers[target] = ResidualStep(all_layers[name], mode, private=clone_state)
                args = (env[node.args[0]], *refs[name])
            step = graph.call_module(target, args, fx.map_arg(node.kwargs, lookup))
            z, x_next, z_next = _step_outputs(graph, step)
            env[node] = z
            new_refs[name] = (x_next, z_next)
            continue
        env[node] = graph.node_copy(node, lookup)
    outputs = [fx.map_arg(_output_value(source), lookup)]
    for layer in layers:
        outputs.extend(new_refs[layer])
    graph.output(tuple(outputs))
    graph.lint()
    return graph


# --------------------------------------------------------------------------------------------
# unrolled clips for QAT in FX graph mode
# --------------------------------------------------------------------------------------------
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for name in parents:
        child = getattr(parent, name, None)
        if child is None:
            child = nn.Module()
            parent.add_module(name, child)
        parent = child
    parent.add_module(leaf, module)


def _residual_twin(layer: nn.Module) -> nn.Module:
    """A bias-free copy of ``layer`` whose ``weight`` is the very same Parameter."""
    twin = copy.deepcopy(layer, memo={id(layer.weight): layer.weight})
    twin.bias = None
    return twin


def _functional_inplace(node: fx.Node) -> None:
    """Rewrite an in-place call into its out-of-place form (references must not change)."""
    if node.kwargs.get("inplace", False):
        node.kwargs = {**node.kwargs, "inplace": False}
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        if hasattr(Tensor, node.target[:-1]):
            node.target = node.target[:-1]
    if node.op == "call_function":
        swaps = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv}
        if node.target in swaps:
            node.target = swaps[node.target]


def _check_clip(example: Any, period: int) -> None:
    if not isinstance(example, Tensor):
        raise TypeError(
            f"example must be a torch.Tensor clip [B, T, C, ...], got {type(example).__name__}"
        )
    if not example.is_floating_point():
        raise TypeError(f"example must be a floating-point tensor, got dtype {example.dtype}")
    if example.dim() < 3 or example.shape[1] != period:
        raise ValueError(
            f"example must be a clip [B, T, C, ...] with T = period = {period}, got shape "
            f"{tuple(example.shape)}"
        )


def unroll(model: nn.Module, period: int, example: Tensor, *, fold_bn: bool = True
           ) -> fx.GraphModule:
    """Unroll a float model over one clip: a keyframe and ``period - 1`` residual frames.

    Frame 0 runs the model as written; at frame ``t > 0`` every supported layer (Conv1d/2d/3d,
    ConvTranspose2d, Linear) computes ``z_t = twin(x_t - x_0) + z_0`` (eq. 4-5), where ``twin``
    is a bias-free copy registered at ``resq_residual.<name>`` that shares the layer's ``weight``
    Parameter. In floating point this equals running the model frame by frame (up to rounding).
    Everything else (activations, adds, concats) runs as written, per frame. The returned module
    maps a clip ``[B, T, C, ...]`` to outputs stacked on dim 1, like ``ResQModel.forward``.

    The model is deep-copied; BatchNorms that follow a conv/linear are folded (inference
    semantics) so that the residual path stays linear, and in-place operations are made
    out-of-place so that references are never overwritten.

    Attributes of the result: ``period``, ``keyframe_sites`` (names of the keyframe call sites,
    i.e. the original layers) and ``residual_sites`` (``{layer name: twin name}``), to build a
    ``QConfigMapping`` with ``set_module_name`` (see
    :func:`resq_brevitas.observers.unrolled_qconfig_mapping`).

    Args:
        model: The float model (not modified). It must be traceable by ``torch.fx``.
        period: ``T`` (>= 1).
        example: A clip ``[B, T, C, ...]`` with ``T == period``; it is run once to check the
            result.
        fold_bn: Fold BatchNorms into the preceding layer first.

    Returns:
        The unrolled GraphModule (in the model's training mode).

    Raises:
        TypeError: On a non-module model, a non-int period or a non-tensor example.
        ValueError: On a period < 1, an example of the wrong shape, a model without supported
            layers, or a model torch.fx cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(period, bool) or not isinstance(period, int):
        raise TypeError(f"period must be an int, got {type(period).__name__} {period!r}")
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    _check_clip(example, period)
    net = copy.deepcopy(model)
    if fold_bn:
        fold_batch_norms(net)
    for module in net.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    try:
        source = trace_graph(net, example[:, 0], resq_leaves=False)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    for node in source.nodes:
        _functional_inplace(node)
    modules = dict(net.named_modules())
    sites: list[str] = []
    for node in source.nodes:
        if node.op == "call_module" and type(modules.get(node.target)) in RESQ_LAYER_FOR:
            if node.target in sites:
                raise ValueError(
                    f"layer {node.target!r} is called more than once per frame; unroll needs one "
                    "call per layer and frame"
                )
            sites.append(node.target)
    if not sites:
        raise ValueError(
            "model has no supported layer (Conv1d/2d/3d, ConvTranspose2d, Linear) called in forward"
        )
    twins = {name: f"{RESIDUAL_PREFIX}.{name}" for name in sites}
    for name, twin in twins.items():
        _set_submodule(net, twin, _residual_twin(modules[name]))

    graph = fx.Graph()
    video = graph.placeholder("video")
    placeholders = [n for n in source.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"model must take exactly one input (a frame), got {len(placeholders)}")
    refs: dict[str, tuple[fx.Node, fx.Node]] = {}
    outputs = []
    for t in range(period):
        frame = graph.call_function(operator.getitem, (video, (slice(None), t)))
        outputs.append(_copy_frame(graph, source, {placeholders[0]: frame}, twins, refs, t))
    graph.output(_stack_nodes(graph, outputs))
    graph.lint()
    unrolled = fx.GraphModule(net, graph, f"Unrolled{type(model).__name__}")
    unrolled.period = period
    unrolled.keyframe_sites = tuple(sites)
    unrolled.residual_sites = dict(twins) if period > 1 else {}
    was_training = unrolled.training
    unrolled.eval()  # the check run must not update BatchNorm statistics
    try:
        with torch.no_grad():
            unrolled(example)
    finally:
        unrolled.train(was_training)
    return unrolled


def _copy_frame(graph: fx.Graph, source: fx.Graph, env: dict[fx.Node, Any],
                twins: dict[str, str], refs: dict[str, tuple[fx.Node, fx.Node]], t: int) -> Any:
    """Append frame ``t`` of an unrolled clip to ``graph``; returns the frame's output value.

    Frame 0 records each layer's ``(x_0, z_0)`` in ``refs``; later frames call the twins.
    """
    def lookup(n: fx.Node) -> Any:
        return env[n]

    for node in source.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return fx.map_arg(node.args[0], lookup)
        if t > 0 and node.op == "call_module" and node.target in twins:
            x0, z0 = refs[node.target]
            delta = graph.call_function(operator.sub, (env[node.args[0]], x0))
            kwargs = fx.map_arg(node.kwargs, lookup)
            r = graph.call_module(twins[node.target], (delta,), kwargs)
            env[node] = graph.call_function(operator.add, (r, z0))
            continue
        env[node] = graph.node_copy(node, lookup)
        if t == 0 and node.op == "call_module" and node.target in twins:
            refs[node.target] = (env[node.args[0]], env[node])
    raise ValueError("graph has no output node")


def _stack_nodes(graph: fx.Graph, outputs: list[Any]) -> Any:
    """Stack per-frame outputs on a new dim 1 (the ResQModel layout), as graph nodes.

    Stacking is written into the graph (one ``torch.stack`` per output leaf) so that re-tracing
    the unrolled module (``prepare_qat_fx``, ``torch.export``) sees plain tensor ops.
    """
    flat = [tree_flatten(out) for out in outputs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("model outputs change structure from frame to frame")
    leaves = []
    for i in range(len(flat[0][0])):
        per_frame = [leaves_t[i] for leaves_t, _ in flat]
        if not all(isinstance(n, fx.Node) for n in per_frame):
            raise ValueError("model outputs must be tensors (or tuples/lists/dicts of tensors)")
        leaves.append(graph.call_function(torch.stack, (per_frame, 1)))
    return tree_unflatten(leaves, spec)


@contextmanager
def quant_tensors_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Make Brevitas proxies in ``module`` return plain tensors for the duration of the block.

    ``torch.export`` cannot trace Brevitas ``QuantTensor`` dispatch (it guards on data), so step
    graphs are exported inside this block (:func:`export_program` does it). The computed values
    are the same; previous settings are restored on exit.
    """
    with proxy_attribute(module, "skip_create_quant_tensor", True):
        yield module


def export_program(module: nn.Module, args: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export`` a step graph (or any module with Brevitas layers).

    Args:
        module: E.g. ``step_graphs(qm).keyframe`` or ``.residual``.
        args: Example inputs, e.g. ``(frame,)`` or ``(frame, *state)``.

    Returns:
        The ExportedProgram; ``program.module()`` computes what ``module`` computes.
    """
    with quant_tensors_disabled(module):
        return torch.export.export(module, tuple(args))
