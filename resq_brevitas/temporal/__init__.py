"""Temporal state: per-layer references, the keyframe schedule, the frame context and the
ResQModel wrapper."""

from resq_brevitas.temporal.context import FrameContext, StepInputs, StepOutputs, attached
from resq_brevitas.temporal.model import ResQModel, StreamState, stack_outputs
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import LayerState
from resq_brevitas.temporal.step import (
    AdvanceReference,
    KeepReference,
    Reference,
    ResidualMode,
    keyframe_step,
    residual_step,
)

__all__ = [
    "AdvanceReference",
    "FrameContext",
    "KeepReference",
    "KeyframeSchedule",
    "LayerState",
    "Reference",
    "ResQModel",
    "ResidualMode",
    "StepInputs",
    "StepOutputs",
    "StreamState",
    "attached",
    "keyframe_step",
    "residual_step",
    "stack_outputs",
]
