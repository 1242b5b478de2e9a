"""Video file IO with PyAV (an optional extra: ``pip install resq-brevitas[video]``).

Videos are tensors ``[T, 3, H, W]`` in the demo's normalised space (``(pixel - MEAN) / STD``,
:mod:`resq_brevitas.demo.synthetic`): :func:`write_video` encodes H.264 ``.mp4``,
:func:`read_video` decodes one file, :func:`video_folder_clips` cuts a folder into clips. Frames
brought to another size keep their aspect ratio (centre crop or padding, :func:`resize_plan`)
unless ``fit="stretch"`` is asked for.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from resq_brevitas.demo.synthetic import MEAN, STD, _check_positive_int

__all__ = [
    "FITS",
    "ResizePlan",
    "apply_plan",
    "probe_video",
    "read_video",
    "resize_plan",
    "video_files",
    "video_folder_clips",
    "write_video",
]


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


#: How a frame is brought to another size: ``crop`` (scale to cover, centre crop), ``pad``
#: (scale to fit inside, centre on mid-grey) or ``stretch`` (scale each axis; aspect lost).
FITS = ("crop", "pad", "stretch")


class ResizePlan(NamedTuple):
    """How a ``source`` frame becomes a ``target`` one.

    Attributes:
        source: ``(H, W)`` of the decoded frames.
        target: ``(H, W)`` of the output frames.
        scaled: ``(H, W)`` after scaling, before cropping or padding.
        fit: One of :data:`FITS`.
    """

    source: tuple[int, int]
    target: tuple[int, int]
    scaled: tuple[int, int]
    fit: str

    def describe(self) -> str:
        """One line for users, e.g. ``640x360 -> 64x64 (scaled to 114x64, centre-cropped)``."""
        src, dst, mid = (f"{h}x{w}" for h, w in (self.source, self.target, self.scaled))
        if self.source == self.target:
            return f"{src} (kept)"
        if self.fit == "stretch" or self.scaled == self.target:
            how = "stretched, aspect ratio lost" if self.fit == "stretch" else "scaled"
            return f"{src} -> {dst} ({how})"
        how = "centre-cropped" if self.fit == "crop" else "padded with mid-grey"
        return f"{src} -> {dst} (scaled to {mid}, {how})"


def _check_size(size: Any) -> tuple[int, int]:
    """``size`` (an int or ``(H, W)``) as ``(H, W)`` of positive ints."""
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)):
        raise ValueError(f"size must be an int >= 1 or a pair (H, W) of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def resize_plan(source: tuple[int, int], size: int | tuple[int, int], fit: str = "crop"
                ) -> ResizePlan:
    """The :class:`ResizePlan` that brings ``source`` frames to ``size``.

    Args:
        source: ``(H, W)`` of the input frames.
        size: Output ``H = W`` or ``(H, W)``.
        fit: ``crop`` (default), ``pad`` or ``stretch`` (:data:`FITS`).

    Raises:
        ValueError: A bad ``size`` or ``fit``.
    """
    target = _check_size(size)
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    height, width = source
    if fit == "stretch":
        return ResizePlan(source, target, target, fit)
    pick = max if fit == "crop" else min
    scale = pick(target[0] / height, target[1] / width)
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
    # rounding must not leave a crop short of the target or a pad over it
    bound = max if fit == "crop" else min
    scaled = (bound(scaled[0], target[0]), bound(scaled[1], target[1]))
    return ResizePlan(source, target, scaled, fit)


def apply_plan(pixels: Tensor, plan: ResizePlan) -> Tensor:
    """Frames ``[N, 3, H, W]`` in ``[0, 1]`` brought to ``plan.target`` (bilinear, antialiased)."""
    if tuple(pixels.shape[-2:]) != plan.scaled:
        pixels = F.interpolate(pixels, size=plan.scaled, mode="bilinear", antialias=True,
                               align_corners=False).clamp(0.0, 1.0)
    (height, width), (th, tw) = plan.scaled, plan.target
    if plan.fit == "crop":
        top, left = (height - th) // 2, (width - tw) // 2
        return pixels[..., top:top + th, left:left + tw]
    if plan.fit == "pad" and (height, width) != (th, tw):
        top, left = (th - height) // 2, (tw - width) // 2
        # MEAN is 0 in the normalised space: padding adds no signal
        return F.pad(pixels, (left, tw - width - left, top, th - height - top), value=MEAN)
    return pixels


def probe_video(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of a video file's first video stream, without decoding it.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a readable video or has no video stream.
        ImportError: If PyAV is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            return int(stream.codec_context.height), int(stream.codec_context.width)
    except av.FFmpegError as err:
        raise ValueError(f"{path} is not a readable video ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    """FFmpeg's message without the file name it repeats."""
    return str(getattr(err, "strerror", None) or err)


def read_video(path: str | Path, size: int | tuple[int, int] | None = None,
               max_frames: int | None = None, fit: str = "crop") -> Tensor:
    """Decode a video file with PyAV into the normalised space.

    Args:
        path: Video file path.
        size: If given, every frame is brought to ``size x size`` or ``(H, W)`` as ``fit`` says.
        max_frames: If given, decode at most this many frames.
        fit: ``crop`` (scale to cover the size, centre crop: aspect kept; default), ``pad``
            (scale to fit inside, pad with mid-grey) or ``stretch`` (aspect ratio lost).

    Returns:
        ``[T, 3, H, W]`` float32 tensor, ``(pixel - MEAN) / STD`` with pixels in ``[0, 1]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``size``/``max_frames``/``fit`` are invalid, or the file is not a readable
            video or has no video frames.
        ImportError: If PyAV is not installed.
    """
    if max_frames is not None:
        _check_positive_int("max_frames", max_frames)
    if size is not None:
        resize_plan((1, 1), size, fit)  # checks size and fit before any decoding
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    av = _import_av()
    try:
        decoded = _decode(av, path, size, fit, max_frames)
    except av.FFmpegError as err:
        raise ValueError(f"{path} is not a readable video ({_reason(err)})") from None
    if not decoded:
        raise ValueError(f"{path} contains no decodable video frames")
    return (torch.cat(decoded) - MEAN) / STD


def _decode(av: ModuleType, path: Path, size: int | tuple[int, int] | None, fit: str,
            max_frames: int | None) -> list[Tensor]:
    decoded: list[Tensor] = []
    plan: ResizePlan | None = None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        for frame in container.decode(video=0):
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            pixels = rgb.unsqueeze(0).float() / 255.0
            # Resize frame by frame so long high-resolution files never sit in memory as
            # full-size float tensors.
            if size is not None:
                source = (int(pixels.shape[-2]), int(pixels.shape[-1]))
                if plan is None or plan.source != source:
                    plan = resize_plan(source, size, fit)
                pixels = apply_plan(pixels, plan)
            decoded.append(pixels)
            if max_frames is not None and len(decoded) >= max_frames:
                break
    return decoded


def video_files(folder: str | Path) -> list[Path]:
    """The ``*.mp4`` files of a folder (not recursive), in sorted name order.

    Raises:
        ValueError: If the folder does not exist or holds no ``.mp4`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be an existing directory, got {str(folder)!r}")
    files = sorted(p for p in folder.glob("*.mp4") if p.is_file())
    if not files:
        raise ValueError(f"folder {str(folder)!r} contains no .mp4 files")
    return files


def video_folder_clips(
    folder: str | Path, frames_per_clip: int = 16, size: int | tuple[int, int] | None = 64,
    fit: str = "crop",
) -> list[Tensor]:
    """Decode every ``*.mp4`` in a folder and cut it into non-overlapping clips.

    Files are processed in sorted name order; each is decoded with :func:`read_video`,
    brought to ``size`` (``fit``: aspect kept by centre crop by default) and split into
    consecutive ``frames_per_clip``-frame clips. Trailing frames that do not fill a clip are
    dropped.

    Args:
        folder: Folder containing ``.mp4`` files (not searched recursively).
        frames_per_clip: Frames per clip.
        size: Output ``H = W`` or ``(H, W)``; ``None`` keeps each file's own size.
        fit: ``crop``, ``pad`` or ``stretch`` (see :func:`read_video`).

    Returns:
        List of ``[frames_per_clip, 3, H, W]`` normalised clips.

    Raises:
        ValueError: If the folder does not exist, holds no ``.mp4`` file, a file is not a
            readable video, or no file is long enough for one clip.
    """
    _check_positive_int("frames_per_clip", frames_per_clip)
    if size is not None:
        _check_size(size)
    clips: list[Tensor] = []
    lengths: list[int] = []
    for file in video_files(folder):
        video = read_video(file, size=size, fit=fit)
        lengths.append(int(video.shape[0]))
        for start in range(0, video.shape[0] - frames_per_clip + 1, frames_per_clip):
            clips.append(video[start : start + frames_per_clip].clone())
    if not clips:
        raise ValueError(
            f"no video in {str(folder)!r} has frames_per_clip={frames_per_clip} frames "
            f"(longest has {max(lengths)})"
        )
    return clips
