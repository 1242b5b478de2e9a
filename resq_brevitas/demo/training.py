"""Optimiser and schedule shared by the demo training recipes (``recipes/train_demo.py``,
``recipes/train_recognition_demo.py``)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["adamw_decay_groups", "warmup_cosine"]


def adamw_decay_groups(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays weights and BatchNorm scales but not biases / BN shifts (the usual
    recipe; it keeps channels from growing scales that BN folding turns into outlier weights)."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up over ``steps // 20`` steps, then cosine decay to ~0 at ``steps``.

    Raises:
        ValueError: ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
