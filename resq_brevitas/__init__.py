"""resq-brevitas: residual quantization of video networks across time, as a Brevitas plugin.

Typical use::

    import resq_brevitas as resq
    qm = resq.convert(float_model, resq.ResQConfig(scheme="W8A8->W4A4", period=4))
    resq.calibrate(qm, clips)
    y = qm(video)            # [B, T, C, H, W] -> [B, T, ...]
    print(qm.last_cost)      # BOPs per layer and frame
"""

from resq_brevitas.calibrate import activation_ranges, calibrate, copy_ranges, set_activation_ranges
from resq_brevitas.config import (
    ErrorBoundPolicy,
    ErrorBudgetRefresh,
    FixedPeriodRefresh,
    LayerOverride,
    LineSearch,
    Precision,
    ResQConfig,
    SceneCutRefresh,
    Scheme,
)
from resq_brevitas.convert import convert, with_execution
from resq_brevitas.cost import count_bops, count_macs
from resq_brevitas.deploy.onnx_export import export
from resq_brevitas.nn.cost import CostReport, LayerCost
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP
from resq_brevitas.quant.control import quantization_disabled
from resq_brevitas.temporal.model import ResQModel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_MAP",
    "CostReport",
    "ErrorBoundPolicy",
    "ErrorBudgetRefresh",
    "FixedPeriodRefresh",
    "LayerCost",
    "LayerOverride",
    "LineSearch",
    "Precision",
    "ResQConfig",
    "ResQModel",
    "SceneCutRefresh",
    "Scheme",
    "activation_ranges",
    "calibrate",
    "convert",
    "copy_ranges",
    "count_bops",
    "count_macs",
    "export",
    "quantization_disabled",
    "set_activation_ranges",
    "with_execution",
]
