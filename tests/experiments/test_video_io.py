"""Video file IO with PyAV: round trips, resizing, folders, errors."""

from __future__ import annotations

import math

import pytest
import torch

from resq_brevitas.demo.synthetic import MEAN, STD, make_clip
from resq_brevitas.experiments.video_io import read_video, video_folder_clips, write_video

pytestmark = pytest.mark.usefixtures("single_thread")


def _psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two normalised videos, measured on the [0, 1] pixel scale."""
    a01 = (a * STD + MEAN).clamp(0, 1)
    b01 = (b * STD + MEAN).clamp(0, 1)
    mse = float((a01 - b01).pow(2).mean())
    return 10.0 * math.log10(1.0 / mse)




# --------------------------------------------------------------------------------- video IO


def test_video_round_trip(tmp_path) -> None:
    video, _ = make_clip(9, frames=12, size=64)
    path = tmp_path / "clip.mp4"
    write_video(path, video, fps=10)
    assert path.stat().st_size > 0
    decoded = read_video(path)
    assert decoded.shape == video.shape and decoded.dtype == torch.float32
    assert _psnr01(decoded, video) > 25.0
    # A different clip must not be as close: the round trip carries real content.
    other, _ = make_clip(10, frames=12, size=64)
    assert _psnr01(decoded, other) < _psnr01(decoded, video) - 5.0


def test_read_video_resize_and_max_frames(tmp_path) -> None:
    video, _ = make_clip(1, frames=6, size=64)
    path = tmp_path / "clip.mp4"
    write_video(path, video)
    small = read_video(path, size=32, max_frames=4)
    assert small.shape == (4, 3, 32, 32)
    reference = torch.nn.functional.interpolate(
        (video[:4] * STD + MEAN), size=(32, 32), mode="bilinear", antialias=True
    )
    assert _psnr01(small, (reference - MEAN) / STD) > 25.0


def test_write_video_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", torch.zeros(2, 3, 33, 32))
    with pytest.raises(ValueError, match="video"):
        write_video(tmp_path / "bad.mp4", torch.zeros(2, 1, 32, 32))


def test_video_folder_clips(tmp_path) -> None:
    long, _ = make_clip(20, frames=11, size=32)
    short, _ = make_clip(21, frames=3, size=32)
    write_video(tmp_path / "a.mp4", long)
    write_video(tmp_path / "b.mp4", short)
    (tmp_path / "notes.txt").write_text("not a video")
    clips = video_folder_clips(tmp_path, frames_per_clip=4, size=16)
    # 11 frames -> two 4-frame clips (tail of 3 dropped); 3 frames -> none.
    assert len(clips) == 2
    assert all(c.shape == (4, 3, 16, 16) for c in clips)
    full = read_video(tmp_path / "a.mp4", size=16)
    assert torch.equal(clips[0], full[0:4]) and torch.equal(clips[1], full[4:8])


def test_video_folder_clips_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no .mp4"):
        video_folder_clips(tmp_path)
    with pytest.raises(ValueError, match="existing directory"):
        video_folder_clips(tmp_path / "missing")
    short, _ = make_clip(0, frames=2, size=16)
    write_video(tmp_path / "short.mp4", short)
    with pytest.raises(ValueError, match="frames_per_clip"):
        video_folder_clips(tmp_path, frames_per_clip=4, size=16)
