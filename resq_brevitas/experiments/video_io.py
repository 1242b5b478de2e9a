"""Video file IO with PyAV (an optional extra: ``pip install resq-brevitas[video]``).

Videos are tensors ``[T, 3, H, W]`` in the demo's normalised space (``(pixel - MEAN) / STD``,
:mod:`resq_brevitas.demo.synthetic`): :func:`write_video` encodes H.264 ``.mp4``,
:func:`read_video` decodes one file, :func:`video_folder_clips` cuts a folder into clips.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from resq_brevitas.demo.synthetic import MEAN, STD, _check_positive_int

__all__ = ["read_video", "video_folder_clips", "write_video"]


def _import_av() -> ModuleType:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Video file IO needs PyAV; install it with `pip install resq-brevitas[video]`."
        ) from exc
    return av


def _check_video(name: str, video: Any) -> None:
    if not isinstance(video, Tensor) or video.dim() != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"{name} must be a [T, 3, H, W] tensor, got {shape}")
    if video.shape[0] == 0:
        raise ValueError(f"{name} must have at least one frame, got T=0")


def write_video(path: str | Path, video: Tensor, fps: int = 10, crf: int = 18) -> None:
    """Encode a normalised video as an H.264 ``.mp4`` (yuv420p).

    Args:
        path: Output file path.
        video: ``[T, 3, H, W]`` tensor in the normalised space; ``H`` and ``W`` must be even
            because yuv420p subsamples chroma by two.
        fps: Frame rate written to the container.
        crf: x264 constant rate factor (lower is higher quality).

    Raises:
        ValueError: If ``video`` has the wrong shape or odd sizes, or ``fps`` is not positive.
        ImportError: If PyAV is not installed.
    """
    _check_video("video", video)
    _check_positive_int("fps", fps)
    height, width = int(video.shape[2]), int(video.shape[3])
    if height % 2 or width % 2:
        raise ValueError(f"video height and width must be even for yuv420p, got {height}x{width}")
    av = _import_av()
    pixels = (video.detach().float().cpu() * STD + MEAN).clamp(0.0, 1.0)
    frames = (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            av_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(av_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path, size: int | None = None, max_frames: int | None = None) -> Tensor:
    """Decode a video file with PyAV into the normalised space.

    Args:
        path: Video file path.
        size: If given, every frame is resized (bilinear, antialiased) to ``size x size``;
            the aspect ratio is not preserved.
        max_frames: If given, decode at most this many frames.

    Returns:
        ``[T, 3, H, W]`` float32 tensor, ``(pixel - MEAN) / STD`` with pixels in ``[0, 1]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``size``/``max_frames`` are invalid or the file has no video frames.
        ImportError: If PyAV is not installed.
    """
    if size is not None:
        _check_positive_int("size", size)
    if max_frames is not None:
        _check_positive_int("max_frames", max_frames)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    av = _import_av()
    decoded: list[Tensor] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        for frame in container.decode(video=0):
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            pixels = rgb.unsqueeze(0).float() / 255.0
            # Resize frame by frame so long high-resolution files never sit in memory as
            # full-size float tensors.
            if size is not None and tuple(pixels.shape[-2:]) != (size, size):
                pixels = F.interpolate(
                    pixels,
                    size=(size, size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                ).clamp(0.0, 1.0)
            decoded.append(pixels)
            if max_frames is not None and len(decoded) >= max_frames:
                break
    if not decoded:
        raise ValueError(f"{path} contains no decodable video frames")
    return (torch.cat(decoded) - MEAN) / STD


def video_folder_clips(
    folder: str | Path, frames_per_clip: int = 16, size: int = 64
) -> list[Tensor]:
    """Decode every ``*.mp4`` in a folder and cut it into non-overlapping clips.

    Files are processed in sorted name order; each is decoded with :func:`read_video`,
    resized to ``size x size`` and split into consecutive ``frames_per_clip``-frame clips.
    Trailing frames that do not fill a clip are dropped.

    Args:
        folder: Folder containing ``.mp4`` files (not searched recursively).
        frames_per_clip: Frames per clip.
        size: Output frame height and width.

    Returns:
        List of ``[frames_per_clip, 3, size, size]`` normalised clips.

    Raises:
        ValueError: If the folder does not exist, holds no ``.mp4`` file, or no file is long
            enough for one clip.
    """
    _check_positive_int("frames_per_clip", frames_per_clip)
    _check_positive_int("size", size)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be an existing directory, got {str(folder)!r}")
    files = sorted(p for p in folder.glob("*.mp4") if p.is_file())
    if not files:
        raise ValueError(f"folder {str(folder)!r} contains no .mp4 files")
    clips: list[Tensor] = []
    lengths: list[int] = []
    for file in files:
        video = read_video(file, size=size)
        lengths.append(int(video.shape[0]))
        for start in range(0, video.shape[0] - frames_per_clip + 1, frames_per_clip):
            clips.append(video[start : start + frames_per_clip].clone())
    if not clips:
        raise ValueError(
            f"no video in {str(folder)!r} has frames_per_clip={frames_per_clip} frames "
            f"(longest has {max(lengths)})"
        )
    return clips
