"""The demo's calibration and evaluation clips (shared by the recipe and the benchmarks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from resq_brevitas.demo.synthetic import make_clip

__all__ = ["CALIB_FRAMES", "CALIB_SEED", "EVAL_SEED", "demo_clips", "event_clip", "event_clips"]

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
#: The second scene of an event clip is clip ``seed + SECOND_SCENE_OFFSET``.
SECOND_SCENE_OFFSET = 500_000


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


def event_clip(seed: int, frames: int = 16, frozen_at: int = 3, frozen: int = 6,
               cut: int = 11, size: int = 64) -> tuple[Tensor, Tensor, Tensor, int]:
    """A demo clip with a frozen stretch and a scene cut.

    Args:
        seed: Seed of the first scene (the second is ``seed + SECOND_SCENE_OFFSET``).
        frames: Frames ``T``.
        frozen_at: The frame the stream stalls on.
        frozen: How many copies of it follow.
        cut: The first frame of the second scene.
        size: Frame side.

    Returns:
        ``(video [T,3,H,W], labels [T,H,W], frozen mask [T], cut)``: frames
        ``frozen_at + 1 .. frozen_at + frozen`` repeat frame ``frozen_at``; frames from ``cut``
        come from another clip.

    Raises:
        ValueError: The events do not fit in ``frames`` in this order.
    """
    if not 0 <= frozen_at < frozen_at + frozen < cut < frames:
        raise ValueError(f"need 0 <= frozen_at < frozen_at + frozen < cut < frames, got "
                         f"{frozen_at}, {frozen}, {cut}, {frames}")
    a, la = make_clip(seed, frames=frames, size=size)
    b, lb = make_clip(seed + SECOND_SCENE_OFFSET, frames=frames, size=size)
    video, labels = a.clone(), la.clone()
    mask = torch.zeros(frames, dtype=torch.bool)
    span = slice(frozen_at + 1, frozen_at + 1 + frozen)
    video[span], labels[span], mask[span] = a[frozen_at], la[frozen_at], True
    # the frozen stretch holds the clip back; the first scene resumes where it stopped
    rest = cut - (frozen_at + 1 + frozen)
    video[span.stop:cut] = a[frozen_at + 1:frozen_at + 1 + rest]
    labels[span.stop:cut] = la[frozen_at + 1:frozen_at + 1 + rest]
    video[cut:], labels[cut:] = b[:frames - cut], lb[:frames - cut]
    return video, labels, mask, cut


def event_clips(num_clips: int, seed: int, batch: int = 1, frames: int = 16
                ) -> list[Tensor]:
    """``num_clips`` event clips with random frozen stretches (3-6 frames from frame 1-4) and
    cuts, clip ``i`` from seed ``seed + i``, stacked ``batch`` at a time ``[B, T, 3, H, W]``
    (the policy-training clips of ``bench_videoiq.py`` and ``apply_resq.py --policy``)."""
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"num_clips must be an int >= 1, got {num_clips!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 12:
        raise ValueError(f"frames must be an int >= 12 (room for both events), got {frames!r}")
    g = torch.Generator().manual_seed(seed)
    clips = []
    for i in range(num_clips):
        frozen_at = int(torch.randint(1, 5, (1,), generator=g))
        frozen = int(torch.randint(3, 7, (1,), generator=g))
        cut = int(torch.randint(frozen_at + frozen + 1, frames - 1, (1,), generator=g))
        clips.append(event_clip(seed + i, frames=frames, frozen_at=frozen_at, frozen=frozen,
                                cut=cut)[0])
    return [torch.stack(clips[i:i + batch]) for i in range(0, num_clips, batch)]
