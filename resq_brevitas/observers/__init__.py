"""torch.ao and torchao observers for ResQ (installed as ``resq_brevitas.observers``).

The line-search range setter (eq. 8) as an observer, written once (:mod:`.core`) and bound to
torch.ao.quantization (:class:`LineSearchObserver`, for ``prepare_fx`` / ``prepare_qat_fx``) and to
torchao pt2e (:class:`PT2ELineSearchObserver`, for ``prepare_pt2e`` / ``prepare_qat_pt2e``;
torchao is optional and imported on first use of a pt2e name)::

    from resq_brevitas.observers import attach_output_consumers, resq_qconfig
    qconfig = resq_qconfig(act_bits=4, weight_bits=4, qat=True)
    prepared = prepare_qat_fx(model, QConfigMapping().set_global(qconfig), example_inputs)
    attach_output_consumers(prepared)    # optional: eq. 8's output error instead of input error
"""

from __future__ import annotations

from typing import Any

from .ao import LineSearchObserver, resq_qconfig, unrolled_qconfig_mapping
from .consumers import attach_output_consumers, freeze_observers, line_search_observers
from .core import Consumer, LineSearchRangeMixin, bits_of_range

__all__ = [
    "Consumer",
    "LineSearchObserver",
    "LineSearchRangeMixin",
    "PT2ELineSearchObserver",
    "ResQQuantizer",
    "attach_output_consumers",
    "bits_of_range",
    "freeze_observers",
    "line_search_observers",
    "resq_pt2e_quantizer",
    "resq_qconfig",
    "unrolled_qconfig_mapping",
]

_PT2E_NAMES = ("PT2ELineSearchObserver", "ResQQuantizer", "resq_pt2e_quantizer")


def __getattr__(name: str) -> Any:
    # torchao is an optional extra: import the pt2e binding only when asked for.
    if name in _PT2E_NAMES:
        from . import pt2e

        return getattr(pt2e, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
