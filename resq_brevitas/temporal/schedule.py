"""Keyframe schedule: which batch rows start a new keyframe at this step."""

from __future__ import annotations

import torch
from torch import Tensor

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
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        self.period = period

    def key_mask(self, phase: Tensor) -> Tensor:
        """Bool ``[B]``: rows that run a keyframe now."""
        return (phase == 0) | (phase >= self.period)

    def advance(self, phase: Tensor, key_mask: Tensor) -> Tensor:
        """Phases after a step that used ``key_mask``."""
        return torch.where(key_mask, torch.ones_like(phase), phase + 1)
