"""Keyframe schedule: which batch rows start a new keyframe at this step.

One object, used by the model (per-row phases), the export manifest (its period) and the host
loop of the ONNX runtime (:meth:`KeyframeSchedule.is_keyframe` on a frame counter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from resq_brevitas.checks import check_period

__all__ = ["KeyframeSchedule"]


class KeyframeSchedule:
    """Fixed-period keyframes, tracked per batch row.

    Each row keeps a phase: the number of frames since its last keyframe, including it
    (0 means "no keyframe yet"). A row is a keyframe when its phase is 0 or has reached the
    period, so a refresh policy can force a keyframe on one row by zeroing its phase.

    Args:
        period: Keyframe period ``T`` (>= 1).
    """

    def __init__(self, period: int) -> None:
        self.period = check_period(period)

    def key_mask(self, phase: Tensor) -> Tensor:
        """Bool ``[B]``: rows that run a keyframe now."""
        return (phase == 0) | (phase >= self.period)

    def advance(self, phase: Tensor, key_mask: Tensor) -> Tensor:
        """Phases after a step that used ``key_mask``."""
        return torch.where(key_mask, torch.ones_like(phase), phase + 1)

    def is_keyframe(self, t: int) -> bool:
        """Whether frame ``t`` (counted from 0 at the stream's start) is a keyframe, for a host
        loop whose rows share one phase."""
        return t % self.period == 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyframeSchedule) and other.period == self.period

    def __hash__(self) -> int:
        return hash(self.period)

    def __repr__(self) -> str:
        return f"KeyframeSchedule(period={self.period})"
