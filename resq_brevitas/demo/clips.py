"""The demo's calibration and evaluation clips (shared by the recipe and the benchmarks)."""

from __future__ import annotations

import math

from torch import Tensor

from resq_brevitas.demo.synthetic import make_clip

__all__ = ["CALIB_SEED", "EVAL_SEED", "demo_clips"]

#: Seeds disjoint from recipes/train_demo.py's training and validation seeds.
CALIB_SEED = 7_000
EVAL_SEED = 9_000


def demo_clips(calib_samples: int = 64, eval_clips: int = 6, frames: int = 16, size: int = 64
               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Calibration clips (enough for ``calib_samples`` frames), evaluation clips and their labels.

    Args:
        calib_samples: Calibration frames ``c`` the clips must cover.
        eval_clips: Number of evaluation clips.
        frames: Frames per clip.
        size: Frame height and width.

    Returns:
        ``(calib [T,3,H,W] list, eval [T,3,H,W] list, labels [T,H,W] list)``.
    """
    calib = [make_clip(CALIB_SEED + i, frames=frames, size=size)[0]
             for i in range(max(1, math.ceil(calib_samples / frames)))]
    pairs = [make_clip(EVAL_SEED + i, frames=frames, size=size) for i in range(eval_clips)]
    return calib, [v for v, _ in pairs], [lab for _, lab in pairs]
