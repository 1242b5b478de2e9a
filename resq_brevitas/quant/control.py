"""Switching Brevitas quantizers off and on for a whole model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import nn

__all__ = ["proxy_attribute", "quantization_disabled"]


@contextmanager
def proxy_attribute(model: nn.Module, name: str, value: object) -> Iterator[nn.Module]:
    """Set attribute ``name`` of every Brevitas quant proxy in ``model`` for the block's duration.

    Each proxy's previous value is restored on exit, also when the block raises.

    Args:
        model: Any module.
        name: A proxy attribute (e.g. ``disable_quant``, ``skip_create_quant_tensor``).
        value: The value inside the block.

    Yields:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
    proxies = [m for m in model.modules()
               if isinstance(m, QuantProxyFromInjector) and hasattr(m, name)]
    previous = [getattr(p, name) for p in proxies]
    try:
        for proxy in proxies:
            setattr(proxy, name, value)
        yield model
    finally:
        for proxy, old in zip(proxies, previous):
            setattr(proxy, name, old)


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Disable every Brevitas quantizer in ``model`` for the duration of the block.

    Inside the block a ResQ model keeps its temporal decomposition (keyframe + residuals) but runs
    it in floating point, so it must equal the float model. Previous per-quantizer settings are
    restored on exit, also when the block raises.

    Args:
        model: Any module (a ``ResQModel``, a converted model, a Brevitas layer).

    Yields:
        ``model``.
    """
    with proxy_attribute(model, "disable_quant", True):
        yield model
