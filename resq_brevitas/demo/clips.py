"""The demo's calibration and evaluation clips (shared by the recipe and the benchmarks)."""

from __future__ import annotations

import math

from torch import Tensor

from resq_brevitas.demo.synthetic import make_clip

__all__ = ["CALIB_FRAMES", "CALIB_SEED", "EVAL_SEED", "demo_clips"]

#: Seeds disjoint from recipes/train_demo.py's training and validation seeds.
CALIB_SEED = 7_000
EVAL_SEED = 9_000
#: Frames per calibration clip. Short clips give more scenes for the same number of calibration
#: frames: global features (the SE block's pooled vector) take one value per scene, so 4 clips of
#: 16 frames calibrate them on 4 values per channel and clip the evaluation scenes (measured on
#: the shipped demo: W8A8 16.1 dB with 4 x 16 frames, 29.4 dB with 16 x 4, 29.4 / 29.5 dB with
#: 64 / 256 x 1; benchmarks/RESULTS.md section 8). Four frames still hold a keyframe and
#: residuals at distances 1-3 (T <= 4).
CALIB_FRAMES = 4


def demo_clips(calib_samples: int = 64, eval_clips: int = 6, frames: int = 16, size: int = 64,
               calib_frames: int = CALIB_FRAMES
               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Calibration clips (enough for ``calib_samples`` frames), evaluation clips and their labels.

    Args:
        calib_samples: Calibration frames ``c`` the clips must cover.
        eval_clips: Number of evaluation clips.
        frames: Frames per evaluation clip.
        size: Frame height and width.
        calib_frames: Frames per calibration clip.

    Returns:
        ``(calib [calib_frames,3,H,W] list, eval [frames,3,H,W] list, labels [frames,H,W]
        list)``.
    """
    calib = [make_clip(CALIB_SEED + i, frames=calib_frames, size=size)[0]
             for i in range(max(1, math.ceil(calib_samples / calib_frames)))]
    pairs = [make_clip(EVAL_SEED + i, frames=frames, size=size) for i in range(eval_clips)]
    return calib, [v for v, _ in pairs], [lab for _, lab in pairs]
