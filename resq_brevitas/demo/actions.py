"""Procedural action-recognition video for the VideoIQ demo (issue 10).

Every clip shows one textured shape (square, triangle or bar, random colour and texture) on a
slowly panning 1/f-textured background, with camera blur and sensor noise, in the normalised
space of :mod:`resq_brevitas.demo.synthetic`. The *class is how the shape moves*, never what it
is:

====  ==========  ===============================================================
 id   name        motion
====  ==========  ===============================================================
 0    static      the shape stays where it is
 1    left        translation to the left
 2    right       translation to the right
 3    up          translation upwards
 4    down        translation downwards
 5    rotate      rotation about its centre
 6    pulse       growing and shrinking (periodic scale)
 7    blink       periodic fading in and out
====  ==========  ===============================================================

A 2D network sees one frame at a time (TSN), so each frame must carry its motion: the sensor
has *persistence* (a decaying afterimage, like a slow phosphor): where the shape was at sub-frame
times ``t - k/4`` (``k = 1..20``, five frames back) and no longer is, frame ``t`` shows a bright
glow of opacity ``PERSISTENCE**k``. A moving shape therefore leaves a fading bright
trail behind it, so direction, rotation, scaling and blinking are visible in a single
frame, while a still shape is crisp.

Events that make the set behave like video rather than like i.i.d. frames:

- **pauses** (``pause``): in some clips of the moving classes the motion stops for a long
  stretch (6 to 9 of 16 frames); those frames look like ``static`` (the informative frames
  are the others: what a per-frame policy should learn to skip or run cheaply);
- **scene cuts** (``cut``): in some clips a new background, shape, colour and position start
  at one frame (the class stays); the afterimage restarts at the cut.

Everything is a pure function of the seed: no downloads, no global random state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from resq_brevitas.demo.synthetic import (
    MEAN,
    STD,
    _colour_texture,
    _shifted_crops,
    _uniform,
    triangle_sdf,
)

__all__ = [
    "ACTION_NAMES",
    "NUM_ACTIONS",
    "PERSISTENCE",
    "ActionClip",
    "action_clips",
    "make_action_clip",
]

#: Class names, indexed by label.
ACTION_NAMES: tuple[str, ...] = ("static", "left", "right", "up", "down", "rotate", "pulse",
                                 "blink")
#: Number of action classes.
NUM_ACTIONS: int = len(ACTION_NAMES)
#: Decay of the sensor's afterimage per sub-frame step (a quarter of a frame).
PERSISTENCE: float = 0.9
#: Sub-frame steps of the afterimage (20 quarter-frames: 5 frames back).
_TRAIL_STEPS = 20
_SUBSTEP = 0.25
_SENSOR_NOISE_STD = 0.01
#: Opacity of the afterimage glow right behind the shape.
_GLOW = 1.0
_CLIP_SEED_STRIDE = 1_000_003


class ActionClip(NamedTuple):
    """One generated clip.

    Attributes:
        video: ``[T, 3, H, W]`` float32, normalised (``(pixel - MEAN) / STD``).
        label: The action class (an index into :data:`ACTION_NAMES`).
        moving: Bool ``[T]``: whether the shape moved (or changed) since the previous frame;
            ``False`` for every frame of ``static``, for paused frames and for the first frame
            of each scene. (The afterimage of a stopped shape still fades over 5 frames.)
        cut: The first frame of the new scene, or ``None`` (no cut).
    """

    video: Tensor
    label: int
    moving: Tensor
    cut: int | None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _square_sdf(u: Tensor, v: Tensor, half_x: Tensor, half_y: Tensor) -> Tensor:
    qx, qy = u.abs() - half_x, v.abs() - half_y
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0)


def _shape_sdf(kind: int, u: Tensor, v: Tensor, radius: Tensor) -> Tensor:
    """Signed distance (pixels, negative inside): 0 square, 1 triangle, 2 bar."""
    if kind == 0:
        return _square_sdf(u, v, 0.8 * radius, 0.8 * radius)
    if kind == 2:
        return _square_sdf(u, v, 1.2 * radius, 0.45 * radius)
    return triangle_sdf(u, v, radius * 0.62)


def _clock(t: Tensor, pause: tuple[int, int] | None) -> Tensor:
    """The motion clock at times ``t``: how much motion happened by then (it stands still
    during ``pause = (start, length)``)."""
    if pause is None:
        return t
    start, length = pause
    still = torch.full_like(t, float(start))
    return torch.where(t < start, t, torch.where(t < start + length, still, t - length))


def _scene(gen: torch.Generator, label: int, size: int, moving_frames: float) -> dict[str, Any]:
    """The random draw of one scene: background, shape, colour, start and speed."""
    scene: dict[str, Any] = {}
    scene["background"] = _colour_texture(gen, 2 * size, 0.2, 0.6,
                                          float(_uniform(gen, 0.03, 0.06)))
    scene["pan"] = _uniform(gen, -0.15, 0.15, 2) * size / 32
    scene["kind"] = int(torch.randint(0, 3, (1,), generator=gen))
    scene["radius"] = float(_uniform(gen, 0.12, 0.16)) * size
    scene["angle0"] = float(_uniform(gen, 0.0, 2.0 * math.pi))
    scene["texture"] = _colour_texture(gen, size, 0.05, 0.7, float(_uniform(gen, 0.04, 0.08)))
    # Translation: a speed the travel fits in the frame.
    margin = scene["radius"] * 0.9
    room = size - 2 * margin
    speed = float(_uniform(gen, 1.0, 1.8)) * size / 32
    speed = min(speed, 0.95 * room / max(moving_frames, 1.0))
    scene["speed"] = speed
    travel = speed * moving_frames
    start = _uniform(gen, margin, size - margin, 2)
    along = float(_uniform(gen, margin, max(margin, size - margin - travel)))
    if label == 1:  # left: start on the right
        start[0] = size - along
    elif label == 2:
        start[0] = along
    elif label == 3:  # up: start at the bottom
        start[1] = size - along
    elif label == 4:
        start[1] = along
    scene["start"] = start
    scene["spin"] = float(_uniform(gen, 0.25, 0.4)) * (1 if bool(torch.rand(1, generator=gen)
                                                               < 0.5) else -1)
    scene["glow_colour"] = _uniform(gen, 0.95, 1.0, 3).view(3, 1, 1)
    scene["period"] = float(_uniform(gen, 3.0, 5.0))
    scene["phase"] = float(_uniform(gen, 0.0, 2.0 * math.pi))
    return scene


def _render(scene: dict[str, Any], label: int, times: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Coverage ``[N, H, W]`` and texture samples ``[N, 3, H, W]`` of the shape at motion-clock
    ``times [N]``."""
    n = times.numel()
    tt = times.view(n, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    cx = scene["start"][0].expand(n).clone().view(n, 1, 1)
    cy = scene["start"][1].expand(n).clone().view(n, 1, 1)
    angle = torch.full_like(tt, scene["angle0"])
    radius = torch.full_like(tt, scene["radius"])
    opacity = torch.ones_like(tt)
    speed = scene["speed"]
    omega = 2 * math.pi / scene["period"]
    if label == 1:
        cx = cx - speed * tt
    elif label == 2:
        cx = cx + speed * tt
    elif label == 3:
        cy = cy - speed * tt
    elif label == 4:
        cy = cy + speed * tt
    elif label == 5:
        angle = angle + scene["spin"] * tt
    elif label == 6:
        radius = radius * (1.0 + 0.35 * torch.sin(omega * tt + scene["phase"]))
    elif label == 7:
        opacity = 0.5 + 0.5 * torch.cos(omega * tt + scene["phase"])
    dx, dy = xx - cx, yy - cy
    u = torch.cos(angle) * dx + torch.sin(angle) * dy
    v = -torch.sin(angle) * dx + torch.cos(angle) * dy
    sdf = _shape_sdf(scene["kind"], u, v, radius)
    coverage = (0.5 - sdf).clamp(0.0, 1.0) * opacity
    return coverage, scene["texture"]


def make_action_clip(seed: int, frames: int = 16, size: int = 32, label: int | None = None,
                     pause: bool | None = None, cut: bool | None = None) -> ActionClip:
    """Generate one deterministic action clip.

    Args:
        seed: Seed of the clip; the same arguments always give the same clip.
        frames: Frames ``T`` (>= 4).
        size: Frame height and width (>= 16).
        label: The action class; ``None`` draws it from the seed.
        pause: Force a long motion pause (``True``), forbid it (``False``) or draw it (``None``:
            35% of the clips of moving classes). Ignored for ``static``.
        cut: Force a scene cut, forbid it, or draw it (``None``: 30% of the clips).

    Returns:
        An :class:`ActionClip`.

    Raises:
        TypeError: An argument of the wrong type.
        ValueError: An argument out of range.
    """
    _check_int("seed", seed, -(2**62))
    _check_int("frames", frames, 4)
    _check_int("size", size, 16)
    if label is not None:
        _check_int("label", label, 0)
        if label >= NUM_ACTIONS:
            raise ValueError(f"label must be in [0, {NUM_ACTIONS}), got {label}")
    for name, value in (("pause", pause), ("cut", cut)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")
    gen = torch.Generator().manual_seed(seed % (2**63))
    if label is None:
        label = int(torch.randint(0, NUM_ACTIONS, (1,), generator=gen))
    draw_pause = bool(torch.rand(1, generator=gen) < 0.35)
    draw_cut = bool(torch.rand(1, generator=gen) < 0.30)
    has_pause = (draw_pause if pause is None else pause) and label != 0
    has_cut = draw_cut if cut is None else cut
    pause_len = int(torch.randint(6, 10, (1,), generator=gen)) if has_pause else 0
    pause_len = min(pause_len, max(frames - 4, 0))
    pause_start = (int(torch.randint(2, max(3, frames - pause_len - 1), (1,), generator=gen))
                   if pause_len else 0)
    cut_at = (int(torch.randint(frames // 3, max(frames // 3 + 1, 2 * frames // 3 + 1), (1,),
                                generator=gen)) if has_cut else None)
    pause_span = (pause_start, pause_len) if pause_len else None

    t = torch.arange(frames, dtype=torch.float32)
    ks = torch.arange(_TRAIL_STEPS + 1, dtype=torch.float32)
    weights = PERSISTENCE ** ks
    video = torch.empty(frames, 3, size, size)
    moving = torch.zeros(frames, dtype=torch.bool)
    segments = [(0, frames)] if cut_at is None else [(0, cut_at), (cut_at, frames)]
    for begin, end in segments:
        scene = _scene(gen, label, size, float(frames - pause_len))
        span = end - begin
        local = t[begin:end] - begin
        pan = scene["pan"]
        jitter = torch.cumsum(0.03 * size / 32 * torch.randn(2, span, generator=gen), dim=1)
        video[begin:end] = _shifted_crops(scene["background"], pan[0] * local + jitter[0],
                                          pan[1] * local + jitter[1], size)
        # The afterimage: sub-frame samples back in time, clamped to the scene's start.
        sub = (local.view(-1, 1) - _SUBSTEP * ks.view(1, -1)).clamp_min(0.0)  # [span, K+1]
        motion = (_clock(sub + begin, pause_span)
                  - _clock(torch.full_like(sub, float(begin)), pause_span))
        coverage, texture = _render(scene, label, motion.flatten(), size)
        coverage = coverage.view(span, _TRAIL_STEPS + 1, size, size)
        # The shape itself is crisp (its coverage now); the afterimage of where it was is a
        # bright glow, ``max_k PERSISTENCE**k * coverage(t - k/4)`` outside the shape.
        alpha = coverage[:, 0].unsqueeze(1)  # [span, 1, H, W]
        glow = (coverage[:, 1:] * weights[1:].view(1, -1, 1, 1)).amax(1).unsqueeze(1)
        glow = _GLOW * (glow - alpha).clamp_min(0.0)
        shading = 1.0 + 0.15 * torch.linspace(-1, 1, size).view(1, 1, 1, size)
        frame = video[begin:end] * (1 - alpha) + texture * shading * alpha
        video[begin:end] = frame * (1 - glow) + scene["glow_colour"] * glow
        if label != 0:
            # k = 4 is one frame back: did the shape move since the previous frame?
            moving[begin:end] = (motion[:, 0] - motion[:, 4]) > 1e-6
    # Camera blur (a 3-tap binomial filter) and sensor noise, then the normalisation.
    kernel = torch.tensor([0.25, 0.5, 0.25])
    padded = torch.nn.functional.pad(video, (1, 1, 1, 1), mode="replicate")
    video = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, 3).expand(3, 1, 1, 3),
                                       groups=3)
    video = torch.nn.functional.conv2d(video, kernel.view(1, 1, 3, 1).expand(3, 1, 3, 1),
                                       groups=3)
    video = video + _SENSOR_NOISE_STD * torch.randn(video.shape, generator=gen)
    video = (video.clamp(0.0, 1.0) - MEAN) / STD
    return ActionClip(video.contiguous(), label, moving, cut_at)


def action_clips(num_clips: int, seed: int, frames: int = 16, size: int = 32,
                 pause: bool | None = None, cut: bool | None = None
                 ) -> tuple[Tensor, Tensor]:
    """A class-balanced set: clip ``i`` has label ``i % NUM_ACTIONS`` and seed
    ``seed * 1_000_003 + i`` (sets of different ``seed`` never share a clip).

    Args:
        num_clips: Number of clips.
        seed: Set seed (>= 0).
        frames: Frames per clip.
        size: Frame side.
        pause: As :func:`make_action_clip` (``None``: drawn per clip).
        cut: As :func:`make_action_clip`.

    Returns:
        ``(videos [N, T, 3, H, W], labels [N])``.
    """
    _check_int("num_clips", num_clips, 1)
    _check_int("seed", seed, 0)
    clips = [make_action_clip(seed * _CLIP_SEED_STRIDE + i, frames=frames, size=size,
                              label=i % NUM_ACTIONS, pause=pause, cut=cut)
             for i in range(num_clips)]
    return (torch.stack([c.video for c in clips]),
            torch.tensor([c.label for c in clips], dtype=torch.long))
