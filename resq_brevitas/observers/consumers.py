"""The output-aware pass: give each line-search observer the conv/linear layers it feeds.

Eq. 8 scores a range by the *output* error of the layer that consumes the activation. After
``prepare_fx`` / ``prepare_qat_fx`` (torch.ao) or ``prepare_pt2e`` / ``prepare_qat_pt2e``
(torchao) the graph says which layers read each activation observer;
:func:`attach_output_consumers` walks it and hands every line-search observer its consumers
(module calls such as ``Conv2d``, ``ConvReLU2d``, ``ConvBn2d``, ``Linear``, or ATen/functional
calls such as ``aten.conv2d`` with their weight sub-graph). For fused conv-BN modules the weight is
BN-folded, ``w * gamma / sqrt(running_var + eps)``, and ``q(w)`` comes from the layer's own weight
fake-quant or observer. An observer read by anything else (an add, the graph output, a pooling)
keeps the input-error objective, since output errors of different ops are not comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .core import Consumer, LineSearchRangeMixin

__all__ = ["attach_output_consumers", "freeze_observers", "line_search_observers"]

_CONV_TRANSPOSE_FN = MappingProxyType(
    {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
)


def _line_search_of(module: nn.Module) -> LineSearchRangeMixin | None:
    if isinstance(module, LineSearchRangeMixin):
        return module
    inner = getattr(module, "activation_post_process", None)
    return inner if isinstance(inner, LineSearchRangeMixin) else None


def line_search_observers(model: nn.Module) -> dict[str, LineSearchRangeMixin]:
    """``{name: observer}`` for every line-search observer in ``model`` (also in fake-quants)."""
    found: dict[str, LineSearchRangeMixin] = {}
    for name, module in model.named_modules():
        if isinstance(module, LineSearchRangeMixin) and all(
                module is not other for other in found.values()):
            found[name] = module
    return found


def freeze_observers(model: nn.Module) -> int:
    """Run the pending searches of ``model``'s line-search observers and freeze their ranges.

    Call it after calibration when fewer than ``samples`` rows were seen, so that QAT steps stop
    observing. Observers that saw nothing are left alone.

    Returns:
        The number of observers frozen by this call.
    """
    count = 0
    for observer in line_search_observers(model).values():
        if not bool(observer.frozen) and observer.rows_seen > 0:
            observer.freeze()
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def _fake_quant(observer: nn.Module, w: Tensor) -> Tensor:
    """``q(w)`` with a weight observer (PTQ: the quantizer convert will use)."""
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    qmin, qmax = int(observer.quant_min), int(observer.quant_max)
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        return torch.fake_quantize_per_channel_affine(
            w, scale.float(), zero_point.to(torch.int32), int(observer.ch_axis), qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zero_point), qmin, qmax)


def _quantize_weight(quantizer: nn.Module | None, w: Tensor) -> Tensor:
    if quantizer is None:
        return w
    if hasattr(quantizer, "fake_quant_enabled") or not hasattr(quantizer, "calculate_qparams"):
        return quantizer(w)  # a fake-quant module: its own forward is q(w)
    return _fake_quant(quantizer, w)


def _bn_folded(core: nn.Module, w: Tensor, transposed: bool) -> Tensor:
    bn = getattr(core, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return w
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shape = [1] * w.dim()
    shape[1 if transposed else 0] = -1
    return w * scale.reshape(shape)


def _module_consumer(name: str, module: nn.Module) -> Consumer | None:
    core = module
    if not hasattr(core, "weight") and isinstance(core, nn.Sequential) and len(core) > 0:
        core = core[0]  # torch.ao PTQ fused modules (ConvReLU2d, LinearReLU) are Sequentials
    transposed = isinstance(core, nn.modules.conv._ConvTransposeNd)
    if transposed:
        fn = _CONV_TRANSPOSE_FN[len(core.kernel_size)]

        def op(x: Tensor, w: Tensor) -> Tensor:
            return fn(x, w, None, core.stride, core.padding, core.output_padding, core.groups,
                      core.dilation)
    elif isinstance(core, nn.modules.conv._ConvNd):
        def op(x: Tensor, w: Tensor) -> Tensor:
            return core._conv_forward(x, w, None)
    elif isinstance(core, nn.Linear):
        def op(x: Tensor, w: Tensor) -> Tensor:
            return F.linear(x, w)
    else:
        return None
    qconfig = getattr(module, "qconfig", None) or getattr(core, "qconfig", None)

    def weights() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            w = _bn_folded(core, core.weight, transposed)
            quantizer = getattr(core, "weight_fake_quant", None)
            if quantizer is None and qconfig is not None and qconfig.weight is not None:
                quantizer = qconfig.weight().to(w.device)
            return w, _quantize_weight(quantizer, w)

    return Consumer(name=name, op=op, weights=weights)


# --------------------------------------------------------------------------------------------
# functional / ATen consumers (pt2e graphs, functional FX code)
# --------------------------------------------------------------------------------------------
def _functional_targets() -> set[Any]:
    aten = torch.ops.aten
    return {
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
        aten.conv_transpose1d.default, aten.conv_transpose2d.input,
        aten.conv_transpose3d.input, aten.linear.default,
        F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
        F.conv_transpose3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
    }


class _NotConstant(Exception):
    pass


def _evaluate(gm: fx.GraphModule, node: Any, modules: dict[str, nn.Module]) -> Any:
    """Value of a node that depends on parameters and buffers only (a weight sub-graph)."""
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return type(node)(_evaluate(gm, n, modules) for n in node)
        return node
    if node.op == "get_attr":
        return reduce(getattr, node.target.split("."), gm)
    if node.op == "placeholder":
        raise _NotConstant(node.name)
    args = tuple(_evaluate(gm, a, modules) for a in node.args)
    kwargs = {k: _evaluate(gm, v, modules) for k, v in node.kwargs.items()}
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    raise _NotConstant(node.name)


def _is_quantizer(module: nn.Module) -> bool:
    return hasattr(module, "calculate_qparams")


def _function_consumer(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]
                       ) -> Consumer | None:
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return None
    weight_node: fx.Node = node.args[1]
    quantizer = None
    if weight_node.op == "call_module" and _is_quantizer(modules[weight_node.target]):
        quantizer = modules[weight_node.target]
        weight_node = weight_node.args[0]
    try:
        with torch.no_grad():
            _evaluate(gm, weight_node, modules)
            extra = tuple(_evaluate(gm, a, modules) for a in node.args[3:])
    except _NotConstant:
        return None  # the weight depends on the input: not a layer with a fixed weight
    kwargs = dict(node.kwargs)
    if "bias" in kwargs:
        kwargs["bias"] = None
    target: Callable[..., Tensor] = node.target

    def op(x: Tensor, w: Tensor) -> Tensor:
        return target(x, w, None, *extra, **kwargs)

    def weights() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            w = _evaluate(gm, weight_node, modules)
            return w, _quantize_weight(quantizer, w)

    return Consumer(name=node.name, op=op, weights=weights)


def attach_output_consumers(prepared: fx.GraphModule) -> dict[str, list[str]]:
    """Hand each line-search observer of a prepared GraphModule its consumer layers.

    Run it after ``prepare_fx`` / ``prepare_qat_fx`` / ``prepare_pt2e`` / ``prepare_qat_pt2e``
    and before calibration.

    Args:
        prepared: The prepared GraphModule.

    Returns:
        ``{observer node target: [consumer names]}`` for the observers that now score by output
        error; the others keep the input error.

    Raises:
        TypeError: If ``prepared`` is not a GraphModule.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(
            f"prepared must be a torch.fx.GraphModule (from prepare_fx/prepare_pt2e), got "
            f"{type(prepared).__name__}"
        )
    modules = dict(prepared.named_modules(remove_duplicate=False))
    functional = _functional_targets()
    sites: dict[int, list[fx.Node]] = {}
    observers: dict[int, LineSearchRangeMixin] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        observer = _line_search_of(modules[node.target])
        if observer is not None and not bool(observer.frozen):
            sites.setdefault(id(observer), []).append(node)
            observers[id(observer)] = observer
    attached: dict[str, list[str]] = {}
    for key, nodes in sites.items():
        if len(nodes) != 1:
            # torch.ao shares one observer between an op's input and output (e.g. mean): the
            # samples then mix tensors of different shapes, only the input error is defined.
            continue
        node = nodes[0]
        consumers: list[Consumer] | None = []
        for user in node.users:
            consumer = None
            if user.args and user.args[0] is node:
                if user.op == "call_module":
                    consumer = _module_consumer(user.target, modules[user.target])
                elif user.op == "call_function" and user.target in functional:
                    consumer = _function_consumer(prepared, user, modules)
            if consumer is None:
                consumers = None
                break
            consumers.append(consumer)
        if consumers:
            observers[key].set_consumers(consumers)
            attached[node.target] = [c.name for c in consumers]
    return attached
