"""ResQ layers: Brevitas keyframe layers with a weight-sharing residual view."""

from resq_brevitas.nn.layers import (
    RESQ_LAYER_FOR,
    ResQConv1d,
    ResQConv2d,
    ResQConv3d,
    ResQConvTranspose2d,
    ResQLayerMixin,
    ResQLinear,
    TemporalSlot,
    is_resq_layer,
)

__all__ = [
    "RESQ_LAYER_FOR",
    "ResQConv1d",
    "ResQConv2d",
    "ResQConv3d",
    "ResQConvTranspose2d",
    "ResQLayerMixin",
    "ResQLinear",
    "TemporalSlot",
    "is_resq_layer",
]
