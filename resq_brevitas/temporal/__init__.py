"""Temporal state: per-layer references, the keyframe schedule, the frame context and the
ResQModel wrapper."""

from resq_brevitas.temporal.context import FrameContext, StepInputs, StepOutputs, attached
from resq_brevitas.temporal.inputs import ClipInputs, FrameInputs, InputSpec, expected_inputs
from resq_brevitas.temporal.model import ResQModel, StreamState
from resq_brevitas.temporal.outputs import (
    flatten_outputs,
    output_names,
    stack_outputs,
    unflatten_outputs,
)
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
    "ClipInputs",
    "FrameContext",
    "FrameInputs",
    "InputSpec",
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
    "expected_inputs",
    "flatten_outputs",
    "keyframe_step",
    "output_names",
    "residual_step",
    "stack_outputs",
    "unflatten_outputs",
]
