"""Procedural video data and video file IO for the embedded demo.

The synthetic clips are small, fully deterministic segmentation videos: a slowly panning
textured background (class 0) with one to three textured shapes moving over it
(class 1 = disc, class 2 = rectangle, class 3 = triangle). Consecutive frames differ only by
small motions plus mild sensor noise, which is the regime temporal residual quantization is
designed for.

Videos are returned in a normalised space: ``(pixel - MEAN) / STD`` with pixels in ``[0, 1]``.
Video files (PyAV) are read and written by :mod:`resq_brevitas.experiments.video_io`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MEAN",
    "STD",
    "NUM_SHAPE_CLASSES",
    "SyntheticVideoDataset",
    "make_clip",
    "synthetic_clips",
]

#: Pixel value (in ``[0, 1]``) mapped to 0 by the normalisation.
MEAN: float = 0.5
#: Scale of the normalisation: ``normalised = (pixel - MEAN) / STD``, so ``[0, 1]`` maps to
#: ``[-2, 2]``.
STD: float = 0.25
#: Number of classes the generator knows how to draw: background, disc, rectangle, triangle.
NUM_SHAPE_CLASSES: int = 4

_SENSOR_NOISE_STD = 0.01
_BG_COMPONENTS = 8
_CLIP_SEED_STRIDE = 1_000_003


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_num_classes(num_classes: Any) -> None:
    valid = isinstance(num_classes, int) and not isinstance(num_classes, bool)
    if not valid or not 2 <= num_classes <= NUM_SHAPE_CLASSES:
        raise ValueError(
            f"num_classes must be an int in [2, {NUM_SHAPE_CLASSES}], got {num_classes!r}"
        )


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(shape if shape else (1,), generator=gen)


def _bounce(start: Tensor, velocity: Tensor, t: Tensor, low: float, high: float) -> Tensor:
    """Position of a point moving at constant speed and reflecting off ``[low, high]``."""
    span = high - low
    u = torch.remainder(start - low + velocity * t, 2.0 * span)
    # A triangle wave in ``u`` is exactly the reflected trajectory.
    return low + span - (u - span).abs()


def _texture(
    gen: torch.Generator,
    u: Tensor,
    v: Tensor,
    size: int,
    base_lo: float,
    base_hi: float,
    contrast: float,
) -> Tensor:
    """Two-colour grating (optionally a checker) in object-local coordinates.

    Returns a ``[3, *u.shape]`` colour field whose second colour differs from the first by
    at most ``contrast`` per channel. Textures move rigidly with their object, so the
    frame-to-frame change stays small.
    """
    colour_a = _uniform(gen, base_lo, base_hi, 3)
    colour_b = (colour_a + _uniform(gen, -contrast, contrast, 3)).clamp(0.0, 1.0)
    theta = float(_uniform(gen, 0.0, math.pi))
    freq = float(_uniform(gen, 0.75, 2.0)) * 2.0 * math.pi / (0.25 * size)
    phase = float(_uniform(gen, 0.0, 2.0 * math.pi))
    checker = bool(torch.rand(1, generator=gen) < 0.4)
    along = math.cos(theta) * u + math.sin(theta) * v
    pattern = torch.sin(freq * along + phase)
    if checker:
        across = -math.sin(theta) * u + math.cos(theta) * v
        pattern = pattern * torch.sin(freq * across)
    mix = (0.5 + 0.5 * pattern).unsqueeze(0)
    broadcast = (3,) + (1,) * u.dim()
    return colour_a.view(broadcast) + (colour_b - colour_a).view(broadcast) * mix


def _shape_mask(kind: int, u: Tensor, v: Tensor, radius: float, aspect: float) -> Tensor:
    """Boolean mask of a shape centred at the local origin, in its own (rotated) frame."""
    if kind == 1:
        return u * u + v * v <= radius * radius
    if kind == 2:
        # Half-extents below ``radius`` keep rectangle and disc areas comparable, so size
        # is not a shortcut for the class.
        half_w = radius * 0.85
        half_h = radius * 0.85 * aspect
        return (u.abs() <= half_w) & (v.abs() <= half_h)
    # Equilateral triangle with circumradius ``radius * 1.25`` so its area is comparable to
    # the other shapes; the inradius of an equilateral triangle is half its circumradius.
    circum = radius * 1.25
    mask = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):
        angle = math.pi / 2 + 2.0 * math.pi * k / 3.0
        mask &= math.cos(angle) * u + math.sin(angle) * v <= circum / 2.0
    return mask


def make_clip(
    seed: int, frames: int = 16, size: int = 64, num_classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Generate one deterministic synthetic segmentation clip.

    Args:
        seed: Seed of the clip; the same seed always yields the same clip.
        frames: Number of frames ``T``.
        size: Frame height and width ``H = W``.
        num_classes: Number of label classes, 2 to 4. Class 0 is the background and shape
            classes ``1 .. num_classes - 1`` are drawn (1 = disc, 2 = rectangle,
            3 = triangle).

    Returns:
        ``(video, labels)``: ``video`` is ``[T, 3, H, W]`` float32 in the normalised space
        ``(pixel - MEAN) / STD``; ``labels`` is ``[T, H, W]`` int64 holding the class of the
        topmost object at every pixel.

    Raises:
        ValueError: If an argument is out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_positive_int("frames", frames)
    _check_positive_int("size", size, minimum=8)
    _check_num_classes(num_classes)

    gen = torch.Generator().manual_seed(seed % (2**63))
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy = coords.view(1, size, 1)
    xx = coords.view(1, 1, size)

    # Background: a sum of low-frequency random sinusoids ("random Fourier" texture) with
    # random colours, rigidly panned so every frame is an exact translate of the previous.
    pan = _uniform(gen, -0.6, 0.6, 2)
    n = _BG_COMPONENTS
    angles = _uniform(gen, 0.0, 2.0 * math.pi, n)
    freqs = _uniform(gen, 0.5, 4.0, n) * 2.0 * math.pi / size
    phases = _uniform(gen, 0.0, 2.0 * math.pi, n)
    amps = _uniform(gen, 0.3, 1.0, n) / n**0.5
    colours = torch.randn(n, 3, generator=gen) * 0.12
    base = _uniform(gen, 0.3, 0.7, 3)
    bx = xx - pan[0] * t
    by = yy - pan[1] * t
    kx = (freqs * torch.cos(angles)).view(n, 1, 1, 1)
    ky = (freqs * torch.sin(angles)).view(n, 1, 1, 1)
    waves = torch.sin(kx * bx + ky * by + phases.view(n, 1, 1, 1)) * amps.view(n, 1, 1, 1)
    video = base.view(1, 3, 1, 1) + torch.einsum("nthw,nc->tchw", waves, colours)
    labels = torch.zeros(frames, size, size, dtype=torch.int64)

    num_objects = int(torch.randint(1, 4, (1,), generator=gen))
    for _ in range(num_objects):
        kind = int(torch.randint(1, num_classes, (1,), generator=gen))
        radius = float(_uniform(gen, 0.11, 0.17)) * size
        aspect = float(_uniform(gen, 0.6, 1.0))
        rot = float(_uniform(gen, 0.0, 2.0 * math.pi))
        speed = float(_uniform(gen, 0.5, 2.5))
        heading = float(_uniform(gen, 0.0, 2.0 * math.pi))
        # Centres stay inside the frame but shapes may be partially cut by the border.
        low, high = 0.3 * radius, size - 0.3 * radius
        start = _uniform(gen, low, high, 2)
        cx = _bounce(start[0], torch.tensor(speed * math.cos(heading)), t, low, high)
        cy = _bounce(start[1], torch.tensor(speed * math.sin(heading)), t, low, high)
        dx = xx - cx
        dy = yy - cy
        u = math.cos(rot) * dx + math.sin(rot) * dy
        v = -math.sin(rot) * dx + math.cos(rot) * dy
        mask = _shape_mask(kind, u, v, radius, aspect)
        # Objects are more saturated and higher-contrast than the background, like typical
        # foreground objects, but their textures are random so shape is the only class cue.
        texture = _texture(gen, u, v, size, 0.05, 0.95, 0.35).permute(1, 0, 2, 3)
        video = torch.where(mask.unsqueeze(1), texture, video)
        labels = torch.where(mask, torch.full_like(labels, kind), labels)

    video = video + _SENSOR_NOISE_STD * torch.randn(video.shape, generator=gen)
    video = (video.clamp(0.0, 1.0) - MEAN) / STD
    return video.contiguous(), labels


class SyntheticVideoDataset(Dataset):
    """Map-style dataset of :func:`make_clip` clips.

    Item ``i`` is ``make_clip(seed * 1_000_003 + i, ...)``, so datasets built with different
    ``seed`` values and fewer than 1_000_003 clips never share a clip.

    Args:
        num_clips: Number of clips.
        frames: Frames per clip.
        size: Frame height and width.
        num_classes: Number of label classes (2 to 4).
        seed: Dataset seed.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_clips: int,
        frames: int = 16,
        size: int = 64,
        num_classes: int = 4,
        seed: int = 0,
    ) -> None:
        _check_positive_int("num_clips", num_clips)
        _check_positive_int("frames", frames)
        _check_positive_int("size", size, minimum=8)
        _check_num_classes(num_classes)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.num_clips = num_clips
        self.frames = frames
        self.size = size
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"index must be in [0, {self.num_clips}), got {index}")
        index %= self.num_clips
        return make_clip(
            self.seed * _CLIP_SEED_STRIDE + index,
            frames=self.frames,
            size=self.size,
            num_classes=self.num_classes,
        )


def synthetic_clips(
    num_clips: int, frames: int = 16, size: int = 64, seed: int = 0
) -> list[Tensor]:
    """Videos (without labels) of the first ``num_clips`` items of a SyntheticVideoDataset.

    Args:
        num_clips: Number of clips.
        frames: Frames per clip.
        size: Frame height and width.
        seed: Dataset seed.

    Returns:
        A list of ``[T, 3, H, W]`` float32 videos in the normalised space.
    """
    dataset = SyntheticVideoDataset(num_clips, frames=frames, size=size, seed=seed)
    return [dataset[i][0] for i in range(num_clips)]
