"""Switching Brevitas quantizers off and on for a whole model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import nn

__all__ = ["quantization_disabled"]


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
    proxies = [m for m in model.modules() if isinstance(m, QuantProxyFromInjector)]
    previous = [p.disable_quant for p in proxies]
    try:
        for proxy in proxies:
            proxy.disable_quant = True
        yield model
    finally:
        for proxy, value in zip(proxies, previous):
            proxy.disable_quant = value
