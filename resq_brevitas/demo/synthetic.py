"""Procedural video data and video file IO for the embedded demo.

The synthetic clips are small, fully deterministic segmentation videos built to have the
statistics temporal residual quantization relies on in real video:

- **Natural textures**: every surface is 1/f ("pink") noise, the amplitude spectrum of natural
  images, in colour; no flat fields with rare full-contrast steps.
- **Anti-aliased, camera-blurred edges**: shapes are drawn with their pixel coverage (from a
  signed distance) and each frame passes a small Gaussian point-spread function.
- **Slow motion**: the camera pans (with a little jitter) by at most ~0.4% of the frame width
  per frame and objects move by at most ~0.55%, so consecutive frames differ by sub-pixel
  displacements; objects also rotate slowly.
- **Lighting changes**: a slowly varying global gain with a slight colour drift, and a shading
  gradient across each object.
- **Figure and ground differ**: each object's base colour is at least
  :data:`MIN_COLOUR_DISTANCE` (RGB, pixel units) from the background's mean colour, as
  foreground objects usually are; without it the network had to tell figure from ground by
  texture statistics alone, a function of local texture energy that any noise perturbs.
- **Occlusion**: objects overlap in depth order, and some clips have a textured foreground bar
  (labelled background, like a pole or a branch) crossing the scene.

Labels: class 0 is the background (and occluders), 1 = disc, 2 = rectangle, 3 = triangle, the
class of the topmost shape covering the pixel centre. The class is given by the shape only:
textures and colours are random.

Videos are returned in a normalised space: ``(pixel - MEAN) / STD`` with pixels in ``[0, 1]``.
Video files (PyAV) are read and written by :mod:`resq_brevitas.experiments.video_io`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MEAN",
    "STD",
    "NUM_SHAPE_CLASSES",
    "SyntheticVideoDataset",
    "make_clip",
    "pink_noise",
    "synthetic_clips",
]

#: Pixel value (in ``[0, 1]``) mapped to 0 by the normalisation.
MEAN: float = 0.5
#: Scale of the normalisation: ``normalised = (pixel - MEAN) / STD``, so ``[0, 1]`` maps to
#: ``[-2, 2]``.
STD: float = 0.25
#: Number of classes the generator knows how to draw: background, disc, rectangle, triangle.
NUM_SHAPE_CLASSES: int = 4

#: Least RGB distance (pixel units) of an object's base colour from the background's mean.
MIN_COLOUR_DISTANCE: float = 0.3
#: Redraws of an object's base colour before the last draw is kept whatever its distance.
_COLOUR_DRAWS = 50

_SENSOR_NOISE_STD = 0.008
#: Standard deviation (pixels) of the camera's Gaussian point-spread function.
_PSF_SIGMA = 0.6
#: Largest camera pan and object speed, as a share of the frame width per frame.
_MAX_PAN = 0.004
_MAX_SPEED = 0.0055
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


def _spectral_radius(n: int) -> Tensor:
    """``|f|`` in cycles per pixel on an ``n x n`` FFT grid."""
    freq = torch.fft.fftfreq(n)
    return torch.sqrt(freq.view(n, 1) ** 2 + freq.view(1, n) ** 2)


def pink_noise(gen: torch.Generator, channels: int, n: int, exponent: float = 1.0) -> Tensor:
    """Periodic ``[channels, n, n]`` noise with amplitude spectrum ``1 / |f|^exponent``.

    ``exponent = 1`` is the spectrum of natural images (power falling as ``1/f^2``); each channel
    is normalised to zero mean and unit standard deviation.

    Args:
        gen: Random generator (the only source of randomness).
        channels: Number of independent channels.
        n: Side of the square, periodic texture.
        exponent: Spectral slope of the amplitude.

    Returns:
        The texture, float32.
    """
    white = torch.randn(channels, n, n, generator=gen)
    radius = _spectral_radius(n)
    amplitude = radius.clamp_min(1.0 / n).pow(-exponent)
    amplitude[0, 0] = 0.0
    tex = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real
    tex = tex - tex.mean(dim=(1, 2), keepdim=True)
    return tex / tex.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _colour_texture(gen: torch.Generator, n: int, base_lo: float, base_hi: float,
                    contrast: float) -> Tensor:
    """A ``[3, n, n]`` colour 1/f texture around a random base colour (pixel units)."""
    base = _uniform(gen, base_lo, base_hi, 3).view(3, 1, 1)
    exponent = float(_uniform(gen, 0.9, 1.3))
    luminance = pink_noise(gen, 1, n, exponent)
    # Chroma varies more smoothly than luminance, as in natural scenes.
    chroma = pink_noise(gen, 3, n, exponent + 0.5)
    return base + contrast * (0.8 * luminance + 0.35 * chroma)


def _object_colour(gen: torch.Generator, background_colour: Tensor) -> Tensor:
    """An object's base colour in ``[0.1, 0.9]^3``, redrawn until it is at least
    :data:`MIN_COLOUR_DISTANCE` from ``background_colour`` (at most ``_COLOUR_DRAWS`` draws)."""
    base = _uniform(gen, 0.1, 0.9, 3)
    for _ in range(_COLOUR_DRAWS):
        if float((base - background_colour).norm()) >= MIN_COLOUR_DISTANCE:
            break
        base = _uniform(gen, 0.1, 0.9, 3)
    return base


def _sample_periodic(tex: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Bilinear samples of a periodic ``[C, N, N]`` texture at texel coordinates ``x, y``.

    Returns ``[*x.shape[:1], C, *x.shape[1:]]`` (channels second).
    """
    n = tex.shape[-1]
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    x0, y0 = x0.long() % n, y0.long() % n
    x1, y1 = (x0 + 1) % n, (y0 + 1) % n

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        return tex[:, yi, xi].transpose(0, 1)

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _shifted_crops(tex: Tensor, dx: Tensor, dy: Tensor, size: int) -> Tensor:
    """``[T, C, size, size]`` crops of a periodic texture translated by sub-pixel ``dx, dy``.

    The shift is a phase ramp in the Fourier domain: an exact band-limited translation, so a
    panning camera does not modulate the texture's sharpness from frame to frame.
    """
    n = tex.shape[-1]
    freq = torch.fft.fftfreq(n)
    phase = (dx.view(-1, 1, 1) * freq.view(1, 1, n) + dy.view(-1, 1, 1) * freq.view(1, n, 1))
    ramp = torch.exp(-2j * math.pi * phase).unsqueeze(1)
    shifted = torch.fft.ifft2(torch.fft.fft2(tex).unsqueeze(0) * ramp).real
    return shifted[..., :size, :size]


def _shape_sdf(kind: int, u: Tensor, v: Tensor, radius: float, aspect: float) -> Tensor:
    """Signed distance (pixels, negative inside) to a shape centred at the local origin."""
    if kind == 1:
        return torch.sqrt(u * u + v * v) - radius
    if kind == 2:
        # Half-extents below ``radius`` keep rectangle and disc areas comparable, so size
        # is not a shortcut for the class.
        qx = u.abs() - radius * 0.85
        qy = v.abs() - radius * 0.85 * aspect
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
        return outside + torch.maximum(qx, qy).clamp_max(0)
    # Equilateral triangle with circumradius ``radius * 1.25`` so its area is comparable to
    # the other shapes; the inradius of an equilateral triangle is half its circumradius.
    return triangle_sdf(u, v, radius * 1.25 / 2.0)


def triangle_sdf(u: Tensor, v: Tensor, inradius: Any) -> Tensor:
    """Signed distance (pixels, negative inside) to an upright equilateral triangle centred at
    the local origin, as the max over its three edge half-planes."""
    dist = None
    for k in range(3):
        angle = math.pi / 2 + 2.0 * math.pi * k / 3.0
        side = math.cos(angle) * u + math.sin(angle) * v - inradius
        dist = side if dist is None else torch.maximum(dist, side)
    assert dist is not None
    return dist


def _gaussian_blur(video: Tensor, sigma: float) -> Tensor:
    """Each frame of ``[T, 3, H, W]`` through a 5x5 Gaussian point-spread function."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = video.shape[1]
    padded = F.pad(video, (2, 2, 2, 2), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, 5).expand(channels, 1, 1, 5), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, 5, 1).expand(channels, 1, 5, 1), groups=channels)


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
        topmost shape at every pixel centre.

    Raises:
        ValueError: If an argument is out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_positive_int("frames", frames)
    _check_positive_int("size", size, minimum=8)
    _check_num_classes(num_classes)

    gen = torch.Generator().manual_seed(seed % (2**63))
    t = torch.arange(frames, dtype=torch.float32)
    tt = t.view(frames, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy = coords.view(1, size, 1)
    xx = coords.view(1, 1, size)

    # Background: a periodic colour 1/f texture twice the frame, panned by the camera (a
    # constant velocity plus a small random walk of jitter).
    background = _colour_texture(gen, 2 * size, 0.25, 0.75, float(_uniform(gen, 0.06, 0.12)))
    pan = _uniform(gen, -_MAX_PAN, _MAX_PAN, 2) * size
    jitter = torch.cumsum(0.02 * size / 64 * torch.randn(2, frames, generator=gen), dim=1)
    background_colour = background.mean(dim=(1, 2))
    video = _shifted_crops(background, pan[0] * t + jitter[0], pan[1] * t + jitter[1], size)
    labels = torch.zeros(frames, size, size, dtype=torch.int64)

    num_objects = int(torch.randint(1, 4, (1,), generator=gen))
    for _ in range(num_objects):
        kind = int(torch.randint(1, num_classes, (1,), generator=gen))
        radius = float(_uniform(gen, 0.11, 0.17)) * size
        aspect = float(_uniform(gen, 0.6, 1.0))
        rot = float(_uniform(gen, 0.0, 2.0 * math.pi)) + float(_uniform(gen, -0.01, 0.01)) * tt
        speed = float(_uniform(gen, 0.15, 1.0)) * _MAX_SPEED * size
        heading = float(_uniform(gen, 0.0, 2.0 * math.pi))
        # Centres stay inside the frame but shapes may be partially cut by the border.
        low, high = 0.3 * radius, size - 0.3 * radius
        start = _uniform(gen, low, high, 2)
        cx = _bounce(start[0], torch.tensor(speed * math.cos(heading)), tt, low, high)
        cy = _bounce(start[1], torch.tensor(speed * math.sin(heading)), tt, low, high)
        dx, dy = xx - cx, yy - cy
        u = torch.cos(rot) * dx + torch.sin(rot) * dy
        v = -torch.sin(rot) * dx + torch.cos(rot) * dy
        sdf = _shape_sdf(kind, u, v, radius, aspect)
        # Pixel coverage of the shape (a one-pixel ramp across the boundary): anti-aliasing.
        alpha = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)
        # Objects are more saturated and higher-contrast than the background, like typical
        # foreground objects; their textures move rigidly with them.
        contrast = float(_uniform(gen, 0.08, 0.16))
        base = _object_colour(gen, background_colour)
        texture = _sample_periodic(
            _colour_texture(gen, size, 0.0, 0.0, contrast) + base.view(3, 1, 1),
            u + size / 2, v + size / 2)
        light = _uniform(gen, -0.25, 0.25, 2)
        shading = 1.0 + (light[0] * u + light[1] * v).unsqueeze(1) / radius
        video = video * (1 - alpha) + texture * shading * alpha
        labels = torch.where(sdf < 0, torch.full_like(labels, kind), labels)

    if bool(torch.rand(1, generator=gen) < 0.35):
        # A foreground occluder (a pole or a branch): background class, drawn over everything.
        angle = float(_uniform(gen, -0.5, 0.5)) + (math.pi / 2 if torch.rand(1, generator=gen)
                                                   < 0.5 else 0.0)
        width = float(_uniform(gen, 0.04, 0.09)) * size
        offset = (float(_uniform(gen, 0.2, 0.8)) * size
                  + float(_uniform(gen, -1.0, 1.0)) * _MAX_SPEED * size * tt)
        across = math.cos(angle) * xx + math.sin(angle) * yy - offset
        sdf = across.abs() - width / 2
        alpha = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)
        bar = _colour_texture(gen, size, 0.1, 0.5, 0.08)
        along = -math.sin(angle) * xx + math.cos(angle) * yy
        # The bar's texture moves with the bar.
        texture = _sample_periodic(bar, along.expand_as(across), across)
        video = video * (1 - alpha) + texture * alpha
        labels = torch.where(sdf < 0, torch.zeros_like(labels), labels)

    # Lighting: a slow global gain (clouds, auto-exposure) with a slight colour drift.
    gain_amp = float(_uniform(gen, 0.0, 0.12))
    gain_period = float(_uniform(gen, 24.0, 64.0))
    gain_phase = float(_uniform(gen, 0.0, 2.0 * math.pi))
    gain = 1.0 + gain_amp * torch.sin(2 * math.pi * t / gain_period + gain_phase)
    tint = 1.0 + _uniform(gen, -0.03, 0.03, 3).view(1, 3) * torch.sin(
        2 * math.pi * t / gain_period).view(frames, 1)
    video = video * (gain.view(frames, 1) * tint).view(frames, 3, 1, 1)

    video = _gaussian_blur(video, _PSF_SIGMA)
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
