"""Graph rewrites that let FINN (finn-plus) consume the QONNX step graphs of a ResQ export.

:func:`resq_brevitas.export` with ``format="qonnx"`` writes ``keyframe.onnx`` and
``residual.onnx`` whose extra outputs are the per-layer state (``x_ref``, ``z_ref``). As written,
FINN's builder cannot take them (``step_qonnx_to_finn`` fails on both), for three reasons that
these rewrites remove, each exact (the graph computes the same values, bit for bit):

* :func:`drop_alias_outputs`: a state output that is a graph input passed through (every
  ``*_out`` of the residual graph in the ``keyframe`` reference mode) or another output
  (``z_ref`` of the last layer is the model output; ``x_ref`` of the first layer is the frame)
  is an ``Identity`` from graph input to graph output, which qonnx's ``RemoveIdentityOps``
  rejects. Such outputs are removed and returned as an alias map, so the host loop can re-create
  them from what it fed and what it got back (:func:`restore_aliases`).
* :func:`unsigned_post_relu_quants`: every activation quantizer is signed (the paper's eq. 1),
  also on ReLU outputs, and FINN converts ``Relu -> Quant`` only for unsigned, non-narrow
  quantizers. On a non-negative input a signed ``b``-bit quantizer and an unsigned ``(b-1)``-bit
  one with the same scale and zero point give the same values, so those are rewritten.
* :func:`isolate_state_taps`: FINN folds a ``Relu`` that feeds a ``Quant`` into the
  ``MultiThreshold`` it makes of the pair and deletes the ``Relu``; a state output tapped from that
  ``Relu`` (``x_ref`` of the next layer) would lose its producer and silently come back as zeros.
  Each such ``Quant`` gets a private twin of the ``Relu``, which FINN may delete. Likewise a
  quantized tensor read by a ``Conv`` and by the state update (``x_ref + q(delta)`` in the
  ``previous`` reference mode) gets a private ``Quant`` for the ``Conv``, so streamlining can
  move the scale out of the way and the ``Conv`` becomes an integer ``MVAU``.

:func:`prepare_for_finn` applies all three and returns a JSON-serialisable report for the
manifest, which also says what FINN can map only to floating-point layers: the float ``Sub`` of
the reference ``x_ref`` and ``Add`` of ``z_ref`` (finn-plus makes FP32 elementwise layers of
them), the float ``Relu`` of a state tap, and the dequantizing scale (and bias) of every result
that leaves the graph as float state (:func:`float_elementwise_ops`, :func:`float_dequantized`);
and what it cannot map at all (:func:`finn_unmapped_ops`: RRM truncation's ``Cast``/``Where``).

The module depends on ``onnx`` and ``numpy`` only (``qonnx`` when given a ``ModelWrapper``, which
is then also returned); inputs are never modified (the rewrites work on a copy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

__all__ = [
    "ELEMENTWISE_OPS",
    "drop_alias_outputs",
    "finn_unmapped_ops",
    "float_dequantized",
    "float_elementwise_ops",
    "fp32_layer_counts",
    "isolate_state_taps",
    "prepare_for_finn",
    "restore_aliases",
    "unsigned_post_relu_quants",
]

#: ONNX ops finn-plus's ``step_convert_to_hw`` maps to elementwise HW layers (``Relu`` through
#: ``InferReLUAsElementwiseMax``, ``Where`` through ``InferWhereLayer``, the rest through
#: ``InferElementwiseBinaryOperation``).
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Where", "Relu",
})
#: Activations FINN's ``QuantReluHandler`` deletes when they feed an activation ``Quant``.
_FOLDED_ACTIVATIONS = frozenset({"Relu", "Selu"})
_QUANT_OPS = frozenset({"Quant", "BipolarQuant"})
#: Ops whose output is non-negative when their data input(s) are (values are moved, kept, or
#: averaged with non-negative weights; never negated or shifted). Not ``Resize``/``Upsample``:
#: cubic interpolation overshoots below zero.
_SIGN_PRESERVING = frozenset({
    "Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool",
    "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Concat", "DepthToSpace",
    "SpaceToDepth",
})
#: Ops of the sign-preserving set whose only data input is input 0 (others are shapes/axes).
_FIRST_INPUT_ONLY = _SIGN_PRESERVING - {"Concat"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _unwrap(model: Any) -> tuple[ModelProto, bool]:
    """A private copy of the ModelProto of ``model`` and whether it came in a ModelWrapper."""
    if isinstance(model, ModelProto):
        return copy.deepcopy(model), False
    inner = getattr(model, "model", None)
    if isinstance(inner, ModelProto):  # qonnx.core.modelwrapper.ModelWrapper
        return copy.deepcopy(inner), True
    raise TypeError(
        "model must be an onnx.ModelProto or a qonnx ModelWrapper, got "
        f"{type(model).__name__}"
    )


def _wrap(proto: ModelProto, wrapped: bool) -> Any:
    if not wrapped:
        return proto
    from qonnx.core.modelwrapper import ModelWrapper

    return ModelWrapper(proto)


def _producers(graph: onnx.GraphProto) -> dict[str, NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[NodeProto]]:
    uses: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                uses.setdefault(name, []).append(node)
    return uses


class _Index:
    """Producers, readers and constants of a graph (rebuilt after each structural edit)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producers = _producers(graph)
        self.consumers = _consumers(graph)
        self.initializers = {t.name: t for t in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or the output of a ``Constant`` node."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def is_activation_quant(self, node: NodeProto) -> bool:
        """A Quant/BipolarQuant on a run-time tensor (not a weight initializer)."""
        return (node.op_type in _QUANT_OPS and bool(node.input)
                and self.constant(node.input[0]) is None)


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_int_attr(node: NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, int(value)))


def _unique(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, then unused initializers and value_info."""
    needed = {o.name for o in graph.output}
    keep: list[NodeProto] = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(n for n in node.input if n)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    live = needed | {i.name for i in graph.input}
    live.update(out for node in keep for out in node.output)
    inits = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(infos)


# --------------------------------------------------------------------------------------------
# aliasing outputs
# --------------------------------------------------------------------------------------------
def drop_alias_outputs(model: Any) -> tuple[Any, dict[str, str]]:
    """Remove graph outputs that equal a graph input or an earlier output.

    An output aliases a tensor when it is that tensor or reaches it through a chain of
    ``Identity`` nodes. Outputs are scanned in order; output 0 (the model output) is always kept,
    and of several outputs with the same value the first is kept. Nodes left without a reader
    (the ``Identity`` chains) are removed. Graph inputs are kept even if nothing reads them any
    more: they are the interface the host feeds.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        ``(model, aliases)``: the rewritten model (same type as given) and
        ``{removed output name: graph input or kept output name it equals}``, in output order.
    """
    proto, wrapped = _unwrap(model)
    graph = proto.graph
    producers = _producers(graph)
    inputs = {i.name for i in graph.input}

    def root(name: str) -> str:
        seen = set()
        while name in producers and producers[name].op_type == "Identity" and name not in seen:
            seen.add(name)
            name = producers[name].input[0]
        return name

    kept_by_root: dict[str, str] = {}
    aliases: dict[str, str] = {}
    kept = []
    for index, out in enumerate(graph.output):
        base = root(out.name)
        if index > 0 and base in inputs:
            aliases[out.name] = base
        elif index > 0 and base in kept_by_root:
            aliases[out.name] = kept_by_root[base]
        else:
            kept.append(out)
            kept_by_root.setdefault(base, out.name)
    if aliases:
        del graph.output[:]
        graph.output.extend(kept)
        _prune(graph)
    return _wrap(proto, wrapped), aliases


def restore_aliases(aliases: Mapping[str, str], feeds: Mapping[str, Any],
                    outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Re-create the outputs :func:`drop_alias_outputs` removed.

    Args:
        aliases: The alias map (``manifest["finn"][graph]["aliases"]``).
        feeds: What was fed to the graph, by input name.
        outputs: What the graph returned, by output name.

    Returns:
        ``outputs`` plus every aliased output, each the same object as its source.

    Raises:
        KeyError: If an alias names a tensor that is neither fed nor returned.
    """
    result = dict(outputs)
    for name, source in aliases.items():
        if source in result:
            result[name] = result[source]
        elif source in feeds:
            result[name] = feeds[source]
        else:
            raise KeyError(
                f"output {name!r} aliases {source!r}, which is neither a graph input that was "
                f"fed ({sorted(feeds)}) nor a returned output ({sorted(outputs)})"
            )
    return result


# --------------------------------------------------------------------------------------------
# unsigned post-ReLU quantizers
# --------------------------------------------------------------------------------------------
def _non_negative(index: _Index, name: str, memo: dict[str, bool]) -> bool:
    """Whether ``name`` is provably >= 0 (NaN aside) from the graph structure alone."""
    if name in memo:
        return memo[name]
    memo[name] = False  # cycles (not in a valid ONNX graph) and unknowns: not provable
    value = index.constant(name)
    node = index.producers.get(name)
    result = False
    if value is not None:
        result = bool(np.all(value >= 0))
    elif node is None:
        result = False  # a graph input: anything
    elif node.op_type == "Relu":
        result = True
    elif node.op_type == "Clip" and len(node.input) > 1 and node.input[1]:
        low = index.constant(node.input[1])
        result = low is not None and bool(np.all(low >= 0))
    elif node.op_type == "Quant" and not _attr(node, "signed", 1):
        scale = index.constant(node.input[1])
        zero = index.constant(node.input[2])
        result = (scale is not None and zero is not None and bool(np.all(scale > 0))
                  and bool(np.all(zero == 0)))
    elif node.op_type in _FIRST_INPUT_ONLY:
        result = _non_negative(index, node.input[0], memo)
    elif node.op_type == "Concat":
        result = all(_non_negative(index, n, memo) for n in node.input if n)
    memo[name] = result
    return result


def unsigned_post_relu_quants(model: Any) -> tuple[Any, list[str]]:
    """Turn signed activation quantizers of non-negative tensors into unsigned ones, exactly.

    A QONNX ``Quant`` computes ``(round(clamp(x/s + z, lo, hi)) - z) * s``. For a signed ``b``-bit
    quantizer ``hi = 2^(b-1) - 1`` (narrow or not), the same as for an unsigned, non-narrow
    ``(b-1)``-bit one; when ``x >= 0``, ``s > 0`` and ``z`` is a non-negative integer,
    ``x/s + z >= 0`` so the lower bound never acts in either, and both give the same values for
    every input. The rewrite is applied when all of that is provable from the graph: the input
    is a ``Relu`` output (or reaches one only through ops that keep the sign, such as
    ``MaxPool``, ``Reshape``, ``Concat`` of non-negative tensors), scale, zero point and bit width
    are constants, the bit width is an integer >= 2. The rewritten node is unsigned, non-narrow
    (what FINN's ``Relu -> Quant`` conversion requires) and gets its own bit-width initializer.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        ``(model, names)``: the rewritten model (same type as given) and the names of the
        rewritten ``Quant`` nodes, in graph order.
    """
    proto, wrapped = _unwrap(model)
    graph = proto.graph
    index = _Index(graph)
    taken = _all_names(graph)
    memo: dict[str, bool] = {}
    rewritten: list[str] = []
    for node in graph.node:
        if node.op_type != "Quant" or len(node.input) < 4:
            continue
        if not index.is_activation_quant(node) or not _attr(node, "signed", 1):
            continue
        scale = index.constant(node.input[1])
        zero = index.constant(node.input[2])
        bits = index.constant(node.input[3])
        if scale is None or zero is None or bits is None or bits.size != 1:
            continue
        width = float(bits.reshape(()))
        if width < 2 or width != int(width) or not bool(np.all(scale > 0)):
            continue
        if not (bool(np.all(zero >= 0)) and bool(np.all(zero == np.round(zero)))):
            continue
        if not _non_negative(index, node.input[0], memo):
            continue
        name = _unique(taken, f"{node.name or node.output[0]}_unsigned_bit_width")
        graph.initializer.append(
            numpy_helper.from_array(np.asarray(width - 1, dtype=bits.dtype), name))
        node.input[3] = name
        _set_int_attr(node, "signed", 0)
        _set_int_attr(node, "narrow", 0)
        rewritten.append(node.name or node.output[0])
    if rewritten:
        _prune(graph)  # the old bit-width initializers, unless shared
    return _wrap(proto, wrapped), rewritten


# --------------------------------------------------------------------------------------------
# state taps
# --------------------------------------------------------------------------------------------
_LINEAR_OPS = frozenset({"Conv", "MatMul", "Gemm"})


def _twin(node: NodeProto, tensor: str, taken: set[str], infos: Mapping[str, Any],
          graph: onnx.GraphProto) -> tuple[NodeProto, str]:
    """A copy of ``node`` writing a new tensor in place of its output ``tensor``."""
    twin = copy.deepcopy(node)
    twin.name = _unique(taken, f"{node.name or tensor}_finn_twin")
    twin_out = _unique(taken, f"{tensor}_finn_twin")
    twin.output[0] = twin_out
    if tensor in infos:
        info = copy.deepcopy(infos[tensor])
        info.name = twin_out
        graph.value_info.append(info)
    return twin, twin_out


def isolate_state_taps(model: Any) -> tuple[Any, dict[str, list[str]]]:
    """Give the nodes FINN deletes or moves private copies, so state taps keep their values.

    Two patterns, both rewritten by duplicating a node (same inputs, same attributes: exact):

    * FINN's ``ConvertQONNXtoFINN`` turns ``Relu -> Quant`` into one ``MultiThreshold`` on the
      ``Relu``'s input and deletes the ``Relu``, whatever else reads its output: a graph output
      (a state tap such as ``x_ref``) or another node then has no producer and reads zeros, with
      no error. When such an activation has any reader besides a single ``Quant``, every
      ``Quant`` reading it gets its own copy of the activation, so FINN deletes only the copies
      and the original keeps feeding the state output and the other readers.
    * An activation ``Quant`` becomes ``MultiThreshold -> Mul`` (its scale); streamlining moves
      that ``Mul`` past the ``Conv``/``MatMul`` it feeds so the layer becomes an integer ``MVAU``,
      but it does not move a ``Mul`` that also feeds something else (a fork). When the quantized
      tensor is also read elsewhere or is a graph output (``x_ref + q(delta)`` of the
      ``previous`` reference mode), each linear reader gets its own copy of the ``Quant``.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        ``(model, twins)``: the rewritten model (same type as given) and
        ``{shared tensor: [names of the twin nodes]}``.
    """
    proto, wrapped = _unwrap(model)
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    infos = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}
    taken = _all_names(graph)
    twins: dict[str, list[str]] = {}

    def isolate(select: Any) -> None:
        """One pass: ``select(node, readers)`` names the readers that get a twin of ``node``."""
        index = _Index(graph)
        new_nodes: list[NodeProto] = []
        for node in graph.node:
            new_nodes.append(node)
            tensor = node.output[0] if node.output else ""
            for reader in select(index, node, index.consumers.get(tensor, [])):
                twin, twin_out = _twin(node, tensor, taken, infos, graph)
                reader.input[0] = twin_out
                new_nodes.append(twin)
                twins.setdefault(tensor, []).append(twin.name)
        del graph.node[:]
        graph.node.extend(new_nodes)

    def shared_quant(index: _Index, node: NodeProto, readers: list[NodeProto]
                     ) -> list[NodeProto]:
        if not index.is_activation_quant(node):
            return []
        linear = [r for r in readers if r.op_type in _LINEAR_OPS and r.input[0] == node.output[0]]
        others = len(readers) - len(linear) + (node.output[0] in outputs)
        return linear if linear and others else []

    def shared_activation(index: _Index, node: NodeProto, readers: list[NodeProto]
                          ) -> list[NodeProto]:
        if node.op_type not in _FOLDED_ACTIVATIONS:
            return []
        tensor = node.output[0]
        quants = [r for r in readers if index.is_activation_quant(r) and r.input[0] == tensor]
        others = len(readers) - len(quants) + (tensor in outputs)
        if not quants or (others == 0 and len(quants) == 1):
            return []
        return quants

    isolate(shared_quant)
    isolate(shared_activation)  # after the Quant twins: those read the activation too
    if twins:
        _prune(graph)  # an activation whose only readers were Quants is now dead
    return _wrap(proto, wrapped), twins


# --------------------------------------------------------------------------------------------
# what stays floating point
# --------------------------------------------------------------------------------------------
def _finn_layer(op_type: str) -> str | None:
    """The finn-plus HW layer ``step_convert_to_hw`` makes of an elementwise op."""
    if op_type == "Relu":
        return "ElementwiseMax"
    if op_type == "Where":
        return None
    return f"Elementwise{op_type}"


def _folded_activation(index: _Index, node: NodeProto, graph_outputs: set[str]) -> bool:
    """A Relu/Selu FINN folds into a MultiThreshold: read only by activation quantizers."""
    readers = index.consumers.get(node.output[0], [])
    return (node.op_type in _FOLDED_ACTIVATIONS and bool(readers)
            and node.output[0] not in graph_outputs
            and all(index.is_activation_quant(r) for r in readers))


def float_elementwise_ops(model: Any) -> list[dict[str, Any]]:
    """Elementwise nodes finn-plus can map only to floating-point (FP32) HW layers.

    A node counts when its op is in :data:`ELEMENTWISE_OPS` and one of its run-time inputs is not
    the output of a quantizer (``Quant``/``BipolarQuant``): a graph input (the frame or a state
    tensor) or a dequantized accumulator (``Conv``/``MatMul`` output). Excluded are a ``Relu``
    whose only readers are activation quantizers (FINN folds the pair into a ``MultiThreshold``)
    and ``Mul``/``Add``/``Sub``/``Div`` by a constant (streamlining absorbs or moves those). For
    a ResQ residual graph this is the ``Sub`` of ``x_ref`` and the ``Add`` of ``z_ref`` of every
    layer and the ``Relu`` between them; for a keyframe graph the ``Relu`` of each state tap that
    :func:`isolate_state_taps` keeps.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        One dict per node, in graph order: ``name``, ``op_type``, ``finn_layer`` (the finn-plus
        layer it becomes, e.g. ``ElementwiseSub``), ``inputs``, ``outputs``, ``graph_inputs``
        (its inputs that are graph inputs: the state it reads) and ``graph_outputs`` (its
        outputs that are graph outputs: the state it writes).
    """
    proto, _ = _unwrap(model)
    graph = proto.graph
    index = _Index(graph)
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type not in ELEMENTWISE_OPS:
            continue
        dynamic = [n for n in node.input if n and index.constant(n) is None]
        if node.op_type in {"Add", "Sub", "Mul", "Div"} and len(dynamic) < 2:
            continue
        if _folded_activation(index, node, graph_outputs):
            continue
        if all(n in index.producers and index.producers[n].op_type in _QUANT_OPS
               for n in dynamic):
            continue
        found.append({
            "name": node.name,
            "op_type": node.op_type,
            "finn_layer": _finn_layer(node.op_type),
            "inputs": list(node.input),
            "outputs": list(node.output),
            "graph_inputs": [n for n in node.input if n in graph_inputs],
            "graph_outputs": [n for n in node.output if n in graph_outputs],
        })
    return found


def float_dequantized(model: Any) -> list[dict[str, Any]]:
    """Integer results whose dequantized (float) value is needed, so FINN keeps FP32 scale ops.

    FINN lowers a ``Conv``/``MatMul``/``Gemm`` on quantized operands to an integer ``MVAU`` and
    an activation ``Quant`` to a ``MultiThreshold``, and moves their dequantizing scale (and the
    layer's bias) into the next ``MultiThreshold`` or past the next linear layer. When the float
    value itself is needed (it is a graph output, such as a ``z_ref`` state or the model output,
    or it is read by anything but a quantizer or, for a ``Quant``, a linear layer), the scale
    stays an FP32 ``ElementwiseMul`` and a layer's bias an FP32 ``ElementwiseAdd``.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        One dict per node, in graph order: ``name``, ``op_type``, ``output``, ``bias`` (whether
        an ``ElementwiseAdd`` for a bias follows), ``graph_output`` (whether the output is one)
        and ``finn_layers`` (the FP32 layers FINN leaves after its integer layer).
    """
    proto, _ = _unwrap(model)
    graph = proto.graph
    index = _Index(graph)
    graph_outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if not node.output:
            continue
        out = node.output[0]
        readers = index.consumers.get(out, [])
        if node.op_type in _LINEAR_OPS:
            integer_readers = all(index.is_activation_quant(r)
                                  or _folded_activation(index, r, graph_outputs) for r in readers)
        elif index.is_activation_quant(node):
            integer_readers = all(r.op_type in _LINEAR_OPS and r.input[0] == out
                                  for r in readers)
        else:
            continue
        if readers and integer_readers and out not in graph_outputs:
            continue
        bias = (node.op_type in {"Conv", "Gemm"} and len(node.input) > 2 and bool(node.input[2]))
        found.append({
            "name": node.name,
            "op_type": node.op_type,
            "output": out,
            "bias": bias,
            "graph_output": out in graph_outputs,
            "finn_layers": ["ElementwiseMul", *(["ElementwiseAdd"] if bias else [])],
        })
    return found


def finn_unmapped_ops(model: Any) -> list[dict[str, Any]]:
    """Nodes finn-plus 1.6's ``step_convert_to_hw`` leaves as plain ONNX inside the datapath.

    ``step_create_dataflow_partition`` then refuses the graph ("Unsupported/unmapped layer(s)
    found in between FINN operators"). Known cases: ``Cast`` (no HW layer) and ``Where`` with a
    constant input (``InferWhereLayer`` streams all three inputs), both from RRM truncation
    (``reference="previous"`` with ``threshold > 0``: ``Where(|delta| <= eps, 0, delta)``).

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` (not modified).

    Returns:
        One dict per node, in graph order: ``name``, ``op_type`` and ``reason``.
    """
    proto, _ = _unwrap(model)
    index = _Index(proto.graph)
    found = []
    for node in proto.graph.node:
        reason = None
        if node.op_type == "Cast":
            reason = "no finn-plus HW layer for Cast"
        elif node.op_type == "Where" and any(index.constant(n) is not None for n in node.input):
            reason = "InferWhereLayer takes no constant input"
        if reason:
            found.append({"name": node.name, "op_type": node.op_type, "reason": reason})
    return found


def fp32_layer_counts(float_ops: list[dict[str, Any]],
                      dequantized: list[dict[str, Any]]) -> dict[str, int]:
    """``{finn-plus layer: count}`` of the FP32 elementwise layers the two lists predict."""
    counts: dict[str, int] = {}
    layers = [op["finn_layer"] for op in float_ops if op["finn_layer"]]
    layers += [layer for item in dequantized for layer in item["finn_layers"]]
    for layer in layers:
        counts[layer] = counts.get(layer, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def prepare_for_finn(model: Any) -> tuple[Any, dict[str, Any]]:
    """Apply every rewrite FINN needs to a ResQ QONNX step graph, and say what was done.

    In order: :func:`drop_alias_outputs`, :func:`isolate_state_taps`,
    :func:`unsigned_post_relu_quants`. All are exact: the rewritten graph gives the same value
    for every output it keeps, and :func:`restore_aliases` gives back the others.

    Args:
        model: An ``onnx.ModelProto`` or qonnx ``ModelWrapper`` of a graph written by
            ``resq.export(..., format="qonnx")`` (not modified).

    Returns:
        ``(model, report)``: the rewritten model (same type as given) and a JSON-serialisable
        dict with ``aliases`` (removed output -> input/output it equals), ``outputs`` (the
        outputs kept, in order), ``unsigned_quants`` (rewritten ``Quant`` nodes),
        ``state_tap_twins`` (shared tensor -> twin nodes), ``float_ops`` (see
        :func:`float_elementwise_ops`), ``float_dequantized`` (see :func:`float_dequantized`)
        and ``fp32_elementwise_layers`` (``{finn-plus layer: count}`` of the FP32 elementwise
        layers those two predict after ``step_convert_to_hw``), ``unmapped_ops`` (see
        :func:`finn_unmapped_ops`; empty when FINN can put the whole graph in one dataflow
        partition).
    """
    model, aliases = drop_alias_outputs(model)
    model, twins = isolate_state_taps(model)
    model, unsigned = unsigned_post_relu_quants(model)
    proto, _ = _unwrap(model)
    report = {
        "aliases": dict(aliases),
        "outputs": [o.name for o in proto.graph.output],
        "unsigned_quants": list(unsigned),
        "state_tap_twins": {k: list(v) for k, v in twins.items()},
        "float_ops": float_elementwise_ops(proto),
        "float_dequantized": float_dequantized(proto),
        "unmapped_ops": finn_unmapped_ops(proto),
    }
    report["fp32_elementwise_layers"] = fp32_layer_counts(report["float_ops"],
                                                          report["float_dequantized"])
    return model, report
