"""Step modules of a ResQ model: ``keyframe(x) -> (y, *state)`` and
``residual(x, *state) -> (y, *state)``, from one factory for torch.fx and eager models.

The state is each ResQ layer's reference input and output ``(x_ref, z_ref)``, layer by layer in
:meth:`ResQModel.resq_layers` order, identical in the keyframe outputs, the residual inputs and
the residual outputs (design card, section 5). The frame counter stays in the host program (see
:class:`resq_brevitas.deploy.runtime.OnnxStream`).

:func:`step_modules` builds GraphModules when ``qm.model`` is traceable by torch.fx
(symbolically, or with an example frame's shapes): each ResQ call site becomes one leaf,
:class:`~resq_brevitas.deploy.step_modules.KeyframeStep` or :class:`~resq_brevitas.deploy.
step_modules.ResidualStep`, running the shared step of :mod:`resq_brevitas.temporal.step`. When
the model cannot be traced (Python control flow on tensor *values*), it returns eager modules
with the same inputs, outputs and state order, which run the model with step executors attached
(:func:`resq_brevitas.temporal.context.attached`), for a fixed frame shape.
:func:`export_program` runs ``torch.export`` on either.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from functools import reduce
from typing import Any

import torch
from torch import Tensor, fx, nn

from resq_brevitas.deploy.step_modules import (
    FamilyFrameStep,
    KeyframeStep,
    ResidualStep,
    StepGraphs,
    member_path,
    state_specs,
)
from resq_brevitas.deploy.tracer import trace_graph
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.quant.control import proxy_attribute
from resq_brevitas.temporal.context import attached
from resq_brevitas.temporal.model import ResQModel
from resq_brevitas.temporal.step import Reference, ResidualMode, keyframe_step, residual_step

__all__ = [
    "KEYFRAME_STEP_PREFIX",
    "RESIDUAL_STEP_PREFIX",
    "EagerKeyframeStep",
    "EagerResidualStep",
    "export_program",
    "quant_tensors_disabled",
    "step_graphs",
    "step_modules",
]

#: Where the residual step graph keeps its :class:`ResidualStep` leaves (``<prefix>.<layer>``).
RESIDUAL_STEP_PREFIX = "resq_residual_step"
#: Where the keyframe step graph keeps its :class:`KeyframeStep` leaves (``<prefix>.<layer>``).
KEYFRAME_STEP_PREFIX = "resq_keyframe_step"


def _check_model(qm: Any) -> ResidualMode:
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    pools = [name for name, layer in qm.resq_layers()
             if layer.residual is not None and layer.residual.has_bit_maps]
    if pools:
        raise ValueError(
            f"step graphs need a static residual precision; scheme {qm.notation} has a pool "
            "whose bit width the Dynamic-ResQ policy picks per pixel at run time "
            f"(layers {pools})"
        )
    return qm.mode


# --------------------------------------------------------------------------------------------
# torch.fx step graphs
# --------------------------------------------------------------------------------------------
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


def _members(qm: ResQModel, member: int | None) -> tuple[int | None, int | None]:
    """``(frame member, residual member)``: ``member`` on the family's side of the scheme."""
    if member is None:
        return None, None
    family = qm.scheme.family or ()
    if isinstance(member, bool) or not isinstance(member, int) or not (
            0 <= member < len(family)) or family[member].precision is None:
        precisions = [i for i, a in enumerate(family) if a.precision is not None]
        raise ValueError(f"member must be the index of a precision action of scheme "
                         f"{qm.notation} (one of {precisions}), got {member!r}")
    return (member, None) if qm.scheme.family_side == "frame" else (None, member)


def step_graphs(qm: Any, example_frame: Tensor | None = None, member: int | None = None
                ) -> StepGraphs:
    """The keyframe and residual step graphs of a ResQ model (torch.fx GraphModules).

    The graphs share the ResQ model's layers (no copy). Each call site of a ResQ layer becomes a
    ``call_module`` leaf: in the keyframe graph a :class:`KeyframeStep` at
    ``resq_keyframe_step.<layer>``, in the residual graph a :class:`ResidualStep` at
    ``resq_residual_step.<layer>`` taking ``(x, x_ref, z_ref)``. In the ``keyframe`` reference
    mode the residual graph returns its state unchanged; in the ``previous`` mode it returns the
    advanced references. A layer that the model never calls carries no state. If the model
    writes in place after a ResQ layer (e.g. ``ReLU(inplace=True)``), the steps return private
    copies of the state tensors.

    Args:
        qm: A :class:`~resq_brevitas.ResQModel`.
        example_frame: Optional ``[B, C, ...]`` frame: if a plain symbolic trace fails (Python
            checks on shapes in ``forward``), the model is traced again with that frame's shape.
        member: Family schemes: the action index of the precision the graphs run. A frame
            family's member replaces the keyframe path in the keyframe graph
            (:class:`~resq_brevitas.deploy.step_modules.FamilyFrameStep`); a residual
            family's member runs in the residual graph (the keyframe graph is the keyframe's).
            ``None``: the layers' own paths (the highest member).

    Raises:
        TypeError: If ``qm`` is not a ResQModel.
        RuntimeError: If ``qm.model`` cannot be traced by torch.fx; the message says why.
        ValueError: If a ResQ layer is called more than once or with several inputs, a layer
            has a pool of residual bit widths, or ``member`` is not a precision action.
    """
    mode = _check_model(qm)
    frame_member, residual_member = _members(qm, member)
    source = trace_graph(qm.model, example_frame)
    order = [name for name, _ in qm.resq_layers()]
    sites = _resq_call_sites(source, set(order))
    layers = [name for name in order if name in sites]
    all_layers = dict(qm.resq_layers())
    modules = dict(qm.model.named_modules())
    clone_state = bool(_inplace_ops(source, modules))
    key_helpers: dict[str, nn.Module] = {}
    keyframe = _step_graph(source, layers, None, clone_state, all_layers, key_helpers,
                           frame_member)
    residual_module = None
    if any(all_layers[name].residual is not None for name in layers):
        helpers: dict[str, nn.Module] = {}
        residual = _step_graph(source, layers, mode, clone_state, all_layers, helpers,
                               residual_member)
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
                helpers: dict[str, nn.Module], member: int | None = None) -> fx.Graph:
    """The keyframe step graph (``mode is None``) or the residual step graph of ``source``;
    ``member``: the family member the graph's steps run (:func:`step_graphs`).

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
            if mode is None or all_layers[name].residual is None:
                target = f"{KEYFRAME_STEP_PREFIX}.{name}"
                helpers[target] = (KeyframeStep(all_layers[name], private=clone_state)
                                   if mode is not None or member is None else
                                   FamilyFrameStep(all_layers[name], member, clone_state))
                args: tuple[Any, ...] = (env[node.args[0]],)
                if mode is not None:
                    # A frame-quantized layer keeps the state layout: its references pass through.
                    step = graph.call_module(target, args, fx.map_arg(node.kwargs, lookup))
                    env[node] = graph.call_function(operator.getitem, (step, 0))
                    new_refs[name] = refs[name]
                    continue
            else:
                target = f"{RESIDUAL_STEP_PREFIX}.{name}"
                helpers[target] = ResidualStep(all_layers[name], mode, private=clone_state,
                                               member=member)
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
# eager step modules (models torch.fx cannot trace)
# --------------------------------------------------------------------------------------------
class _KeyframeExecutor:
    """Executor of the eager keyframe step: :func:`keyframe_step` (or a frame family's member
    ``member``), recording the state."""

    def __init__(self, names: dict[int, str], member: int | None = None) -> None:
        self.names = names
        self.member = member
        self.state: dict[str, Reference] = {}

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        name = self.names[id(layer)]
        if name in self.state:
            raise RuntimeError(f"ResQ layer {name!r} was called twice in one frame")
        if self.member is not None:
            z = layer.family.frame_forward(layer, self.member, x, **kwargs)
            self.state[name] = Reference(x.clone(), z.clone())
            return z
        # Private copies: the model may write into x or z later (ReLU(inplace=True)).
        z, self.state[name] = keyframe_step(layer, x, private=True, **kwargs)
        return z


class _ResidualExecutor:
    """Executor of the eager residual step: :func:`residual_step` on the given state."""

    def __init__(self, names: dict[int, str], refs: dict[str, Reference],
                 mode: ResidualMode, member: int | None = None) -> None:
        self.names = names
        self.refs = refs
        self.mode = mode
        self.member = member
        self.next_refs: dict[str, Reference] = {}

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        name = self.names[id(layer)]
        if layer.residual is None:  # frame quantized: keyframe path, references pass through
            self.next_refs[name] = self.refs[name]
            return keyframe_step(layer, x, **kwargs)[0]
        res = residual_step(member_path(layer, self.member), x, self.refs[name], self.mode,
                            private=True, **kwargs)
        self.next_refs[name] = res.ref
        return res.z


class _EagerStep(nn.Module):
    def __init__(self, model: nn.Module, layers: list[str],
                 all_layers: dict[str, ResQLayerMixin], member: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer_names = list(layers)
        self._layers = all_layers  # a plain dict: the layers are registered under ``model``
        self.member = member

    def _names(self) -> dict[int, str]:
        return {id(layer): name for name, layer in self._layers.items()}

    def _run(self, x: Tensor, executor: Any) -> Any:
        with attached(self._layers.items(), lambda name: executor):
            return self.model(x)


class EagerKeyframeStep(_EagerStep):
    """``keyframe(x) -> (y, *state)`` for models torch.fx cannot trace (eager, same semantics)."""

    def forward(self, x: Tensor) -> tuple[Any, ...]:
        executor = _KeyframeExecutor(self._names(), self.member)
        y = self._run(x, executor)
        missing = [name for name in self.layer_names if name not in executor.state]
        if missing:
            raise RuntimeError(f"these ResQ layers were not called on this frame: {missing}")
        return (y, *[t for name in self.layer_names for t in executor.state[name]])


class EagerResidualStep(_EagerStep):
    """``residual(x, *state) -> (y, *state)`` for models torch.fx cannot trace."""

    def __init__(self, model: nn.Module, layers: list[str],
                 all_layers: dict[str, ResQLayerMixin], mode: ResidualMode,
                 member: int | None = None) -> None:
        super().__init__(model, layers, all_layers, member)
        self.mode = mode

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Any, ...]:
        if len(state) != 2 * len(self.layer_names):
            raise ValueError(
                f"residual step expects {2 * len(self.layer_names)} state tensors, got "
                f"{len(state)}"
            )
        refs = {name: Reference(state[2 * i], state[2 * i + 1])
                for i, name in enumerate(self.layer_names)}
        executor = _ResidualExecutor(self._names(), refs, self.mode, self.member)
        y = self._run(x, executor)
        return (y, *[t for name in self.layer_names for t in executor.next_refs[name]])


def step_modules(qm: ResQModel, example_frame: Tensor | None = None,
                 member: int | None = None) -> StepGraphs:
    """The keyframe/residual step modules of ``qm``: torch.fx graphs when possible, else eager.

    Args:
        qm: A ResQ model.
        example_frame: ``[B, C, ...]``; needed for models a plain symbolic trace fails on (a
            shape-specialised trace, or the eager modules, which need to know which layers run).
        member: Family schemes: the precision action the graphs run (:func:`step_graphs`).

    Returns:
        A :class:`StepGraphs` whose ``source`` says which kind was built.

    Raises:
        RuntimeError: The model cannot be traced and no example frame was given.
        ValueError: The example frame does not run through the model.
    """
    mode = _check_model(qm)
    frame_member, residual_member = _members(qm, member)
    try:
        return step_graphs(qm, example_frame, member)
    except RuntimeError as err:
        if example_frame is None:
            raise RuntimeError(
                f"{err}; pass example_frame to build eager step modules instead"
            ) from err
    layers = dict(qm.resq_layers())
    executor = _KeyframeExecutor({id(layer): name for name, layer in layers.items()})
    try:
        with torch.no_grad(), attached(layers.items(), lambda name: executor):
            qm.model(example_frame)
    except Exception as err:  # the user's model rejected the frame
        raise ValueError(
            f"example_frame of shape {tuple(example_frame.shape)} does not run through the "
            f"model: {err}"
        ) from err
    called = [name for name in layers if name in executor.state]
    keyframe = EagerKeyframeStep(qm.model, called, layers, frame_member)
    residual = None
    if any(layers[name].residual is not None for name in called):
        residual = EagerResidualStep(qm.model, called, layers, mode, residual_member)
    return StepGraphs(keyframe=keyframe, residual=residual, state=state_specs(called),
                      layers=called, source="eager")


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
    """``torch.export.export`` a step module (or any module with Brevitas layers).

    Args:
        module: E.g. ``step_modules(qm).keyframe`` or ``.residual``.
        args: Example inputs, e.g. ``(frame,)`` or ``(frame, *state)``.

    Returns:
        The ExportedProgram; ``program.module()`` computes what ``module`` computes.
    """
    with quant_tensors_disabled(module):
        return torch.export.export(module, tuple(args))
