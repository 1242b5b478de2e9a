"""Unrolled clips for QAT in FX graph mode: one keyframe and ``T - 1`` residual frames.

:func:`unroll` turns a *float* model into a GraphModule that runs one clip of ``T`` frames in a
static loop. Residual call sites go through twin modules that share the weight ``Parameter``
(``resq_residual.<name>``), so torch.ao ``prepare_qat_fx`` (with ``QConfigMapping.set_module_name``)
or torchao ``prepare_qat_pt2e`` give keyframe and residual call sites their own fake-quants, e.g.
8-bit and 4-bit. The residual arithmetic is not written here: each residual call site is
:func:`resq_brevitas.temporal.step.residual_step` itself, traced with torch.fx proxies, so the
unrolled clip has the runtime's semantics, RRM truncation and the ``previous`` reference mode
included (the quantization is torch.ao's: ``q(delta)`` in the error-feedback update is the
unquantized ``delta``, as torch.ao fake-quantizes inside the twin call).
"""

from __future__ import annotations

import copy
import operator
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from resq_brevitas.bn_fold import fold_batch_norms
from resq_brevitas.checks import check_frame, check_period
from resq_brevitas.config import ResQConfig
from resq_brevitas.deploy.manifest import Manifest
from resq_brevitas.deploy.tracer import trace_graph
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, resq_layer_class_of
from resq_brevitas.nn.residual import Sent
from resq_brevitas.temporal.step import Reference, ResidualMode, residual_step

__all__ = ["RESIDUAL_PREFIX", "export_unrolled", "unroll"]

#: Submodule under which :func:`unroll` registers the residual twins (``resq_residual.<name>``).
RESIDUAL_PREFIX = "resq_residual"


class _TwinPath:
    """The residual path of an unrolled call site, on torch.fx proxies: sends ``delta`` as is
    (torch.ao inserts the fake-quant) and applies the bias-free twin."""

    def __init__(self, tracer: fx.proxy.GraphAppendingTracer, twin: str,
                 kwargs: dict[str, Any]) -> None:
        self.tracer = tracer
        self.twin = twin
        self.kwargs = kwargs

    def quantize(self, delta: Any) -> Sent:
        return Sent(delta)

    def contribution(self, sent: Sent, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_module", self.twin, (sent.q,), self.kwargs)


def _mode_of(config: ResQConfig | int) -> tuple[int, ResidualMode]:
    if isinstance(config, ResQConfig):
        return config.effective_period, ResidualMode.from_config(config)
    return check_period(config), ResidualMode()


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


def unroll(model: nn.Module, period: ResQConfig | int, example: Tensor, *, fold_bn: bool = True,
           layer_map: Any = DEFAULT_LAYER_MAP) -> fx.GraphModule:
    """Unroll a float model over one clip: a keyframe and ``period - 1`` residual frames.

    Frame 0 runs the model as written; at frame ``t > 0`` every supported layer computes
    :func:`~resq_brevitas.temporal.step.residual_step` (eq. 4-5: ``z_t = twin(x_t - x_ref) +
    z_ref``, with the config's truncation and reference rule), where ``twin`` is a bias-free copy
    registered at ``resq_residual.<name>`` that shares the layer's ``weight`` Parameter. In
    floating point this equals running the model frame by frame (up to rounding). Everything
    else (activations, adds, concats) runs as written, per frame. The returned module maps a
    clip ``[B, T, C, ...]`` to outputs stacked on dim 1, like ``ResQModel.forward``.

    The model is deep-copied; BatchNorms that follow a conv/linear are folded (inference
    semantics) so that the residual path stays linear, and in-place operations are made
    out-of-place so that references are never overwritten.

    Attributes of the result: ``period``, ``keyframe_sites`` (names of the keyframe call sites,
    i.e. the original layers) and ``residual_sites`` (``{layer name: twin name}``), to build a
    ``QConfigMapping`` with ``set_module_name`` (see
    :func:`resq_brevitas.observers.unrolled_qconfig_mapping`).

    Args:
        model: The float model (not modified). It must be traceable by ``torch.fx``.
        period: A :class:`~resq_brevitas.ResQConfig` (its period, reference rule and threshold)
            or just ``T`` (>= 1; the ``keyframe`` reference, no truncation).
        example: A clip ``[B, T, C, ...]`` with ``T == period``; it is run once to check the
            result.
        fold_bn: Fold BatchNorms into the preceding layer first.
        layer_map: Which float layer types are ResQ call sites.

    Returns:
        The unrolled GraphModule (in the model's training mode).

    Raises:
        TypeError: On a non-module model, a non-int period or a non-tensor example.
        ValueError: On a period < 1, an example of the wrong shape, a model without supported
            layers, or a model torch.fx cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    period, mode = _mode_of(period)
    _check_clip(example, period)
    net = copy.deepcopy(model)
    if fold_bn:
        fold_batch_norms(net, layer_map=layer_map)
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
        if (node.op == "call_module" and node.target in modules
                and resq_layer_class_of(modules[node.target], layer_map) is not None):
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
        outputs.append(_copy_frame(graph, source, {placeholders[0]: frame}, twins, refs, t,
                                   mode))
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
                twins: dict[str, str], refs: dict[str, Reference], t: int,
                mode: ResidualMode) -> Any:
    """Append frame ``t`` of an unrolled clip to ``graph``; returns the frame's output value.

    Frame 0 records each layer's reference ``(x_0, z_0)`` in ``refs``; later frames run
    :func:`residual_step` on graph proxies (recording its ops) and move ``refs`` as the mode says.
    """
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def lookup(n: fx.Node) -> Any:
        return env[n]

    for node in source.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return fx.map_arg(node.args[0], lookup)
        if t > 0 and node.op == "call_module" and node.target in twins:
            ref = refs[node.target]
            proxy = fx.Proxy(env[node.args[0]], tracer)
            path = _TwinPath(tracer, twins[node.target], fx.map_arg(node.kwargs, lookup))
            res = residual_step(path, proxy, Reference(fx.Proxy(ref.x, tracer),
                                                       fx.Proxy(ref.z, tracer)), mode)
            env[node] = res.z.node
            refs[node.target] = Reference(res.ref.x.node, res.ref.z.node)
            continue
        env[node] = graph.node_copy(node, lookup)
        if t == 0 and node.op == "call_module" and node.target in twins:
            refs[node.target] = Reference(env[node.args[0]], env[node])
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


def export_unrolled(float_model: nn.Module, period: ResQConfig | int, example_frame: Tensor,
                    out_dir: str | os.PathLike[str]) -> Manifest:
    """Write the QAT-ready unrolled clip (:func:`resq_brevitas.deploy.unroll`) of a float model.

    Files: ``unrolled.pt`` (the GraphModule, ``torch.load(..., weights_only=False)``),
    ``unrolled.py`` (its generated code, for reading) and ``manifest.json`` (period, input shape,
    keyframe and residual call sites for ``QConfigMapping.set_module_name``).

    Args:
        float_model: The float model (not modified).
        period: A :class:`~resq_brevitas.ResQConfig` or the keyframe period ``T``.
        example_frame: One frame ``[B, C, ...]``; the example clip repeats it ``T`` times.
        out_dir: Output directory (created if missing).

    Returns:
        The manifest.
    """
    check_frame(example_frame, "example_frame")
    config = period if isinstance(period, ResQConfig) else None
    period, _ = _mode_of(period)
    clip = example_frame.unsqueeze(1).repeat_interleave(period, dim=1)
    unrolled = unroll(float_model, period, clip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(unrolled, out / "unrolled.pt")
    (out / "unrolled.py").write_text(unrolled.code)
    manifest = Manifest(
        format="fx",
        period=period,
        files={"graph_module": "unrolled.pt", "code": "unrolled.py"},
        config=config.to_dict() if config is not None else {},
        extra={
            "video": {"name": "video", "shape": list(clip.shape),
                      "dtype": str(clip.dtype).replace("torch.", "")},
            "keyframe_sites": list(unrolled.keyframe_sites),
            "residual_sites": dict(unrolled.residual_sites),
        },
        how_to_drive=[
            "gm = torch.load('unrolled.pt', weights_only=False)  # video [B, T, C, ...] -> "
            "[B, T, ...]",
            "mapping = resq_brevitas.observers.unrolled_qconfig_mapping(gm, 'W8A8->W4A4', "
            "qat=True)",
            "prepared = torch.ao.quantization.quantize_fx.prepare_qat_fx(gm, mapping, (video,))",
            "train, then torch.ao.quantization.quantize_fx.convert_fx(prepared.eval())",
        ],
    )
    manifest.write(out)
    return manifest
