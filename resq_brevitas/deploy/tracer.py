"""A torch.fx tracer that keeps ResQ layers as leaves, with shape-aware tracing as a fallback.

A plain ``torch.fx.Tracer`` (and Brevitas's FX backport) traces *into* ResQ layers and silently
bakes the "no executor attached" branch, i.e. the keyframe path, into every call site;
:class:`ResQTracer` keeps ResQ layers, Brevitas quant layers and the step modules of
:mod:`resq_brevitas.deploy.step_modules` as ``call_module`` leaves.

Models whose ``forward`` checks input shapes (``if x.dim() != 4: raise``) defeat a plain symbolic
trace; given an example input, :func:`trace_graph` retries with torch.fx's ``MetaTracer`` so the
checks run on the example's shapes and the graph is specialised to them.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from brevitas.nn.mixin.base import QuantLayerMixin
from torch import Tensor, fx, nn

from resq_brevitas.deploy.step_modules import KeyframeStep, ResidualStep
from resq_brevitas.nn.layers import is_resq_layer

__all__ = ["ResQTracer", "symbolic_trace", "trace_graph"]


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
    return is_resq_layer(m) or isinstance(m, (QuantLayerMixin, KeyframeStep, ResidualStep))


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
