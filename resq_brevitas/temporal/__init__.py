"""Temporal state: per-layer references, the keyframe schedule and the ResQModel wrapper."""

from resq_brevitas.temporal.model import ResQModel, stack_outputs
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import LayerState, StepContext

__all__ = ["KeyframeSchedule", "LayerState", "ResQModel", "StepContext", "stack_outputs"]
