"""ResQ layers (Brevitas keyframe layers with a weight-sharing residual path), residual paths and
the BOPs records they produce."""

from resq_brevitas.nn.cost import CostReport, CostTally, LayerCost, precision_bops
from resq_brevitas.nn.layers import (
    DEFAULT_LAYER_MAP,
    ResQConv1d,
    ResQConv2d,
    ResQConv3d,
    ResQConvTranspose2d,
    ResQLayerMixin,
    ResQLinear,
    TemporalExecutor,
    conv_macs,
    conv_transpose_macs,
    is_resq_layer,
    linear_macs,
    resq_layer_class,
)
from resq_brevitas.nn.residual import (
    CalibrationTarget,
    PoolResidual,
    PrecisionPolicy,
    ResidualPath,
    Sent,
    StaticResidual,
    ZeroResidual,
    build_residual_path,
    mix_pool,
)

__all__ = [
    "DEFAULT_LAYER_MAP",
    "CalibrationTarget",
    "CostReport",
    "CostTally",
    "LayerCost",
    "PoolResidual",
    "PrecisionPolicy",
    "ResQConv1d",
    "ResQConv2d",
    "ResQConv3d",
    "ResQConvTranspose2d",
    "ResQLayerMixin",
    "ResQLinear",
    "ResidualPath",
    "Sent",
    "StaticResidual",
    "TemporalExecutor",
    "ZeroResidual",
    "build_residual_path",
    "conv_macs",
    "conv_transpose_macs",
    "is_resq_layer",
    "linear_macs",
    "mix_pool",
    "precision_bops",
    "resq_layer_class",
]
