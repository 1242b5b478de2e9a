"""Quantizers (eq. 1, 6, 7), the line-search range setter (eq. 8) and quantizer switches."""

from resq_brevitas.quant.control import quantization_disabled
from resq_brevitas.quant.line_search import (
    StreamingLineSearch,
    act_threshold,
    candidate_thresholds,
    line_search,
    output_sse,
    set_act_threshold,
)
from resq_brevitas.quant.quantizers import (
    HalfRangeIntScaling,
    ResQActQuant,
    ResQWeightPerChannelQuant,
    ResQWeightQuant,
    ResQZeroActQuant,
    ResQZeroWeightQuant,
    act_quant,
    quantize_eq1,
    scale_eq6,
    weight_quant,
)

__all__ = [
    "HalfRangeIntScaling",
    "ResQActQuant",
    "ResQWeightPerChannelQuant",
    "ResQWeightQuant",
    "ResQZeroActQuant",
    "ResQZeroWeightQuant",
    "StreamingLineSearch",
    "act_quant",
    "act_threshold",
    "candidate_thresholds",
    "line_search",
    "output_sse",
    "quantization_disabled",
    "quantize_eq1",
    "scale_eq6",
    "set_act_threshold",
    "weight_quant",
]
