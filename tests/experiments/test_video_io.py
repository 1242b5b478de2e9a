"""Video file IO with PyAV: round trips, resizing, folders, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resq_brevitas.demo.synthetic import MEAN, STD, make_clip
from resq_brevitas.experiments.video_io import (
    probe_video,
    read_video,
    resize_plan,
    video_folder_clips,
    write_video,
)

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


# ------------------------------------------------------------------------- sizes and aspect


@settings(max_examples=60, deadline=None)
@given(source=st.tuples(st.integers(8, 2000), st.integers(8, 2000)),
       target=st.tuples(st.integers(8, 512), st.integers(8, 512)))
def test_resize_plans_keep_the_aspect_ratio(source, target) -> None:
    crop, pad = resize_plan(source, target, "crop"), resize_plan(source, target, "pad")
    aspect = source[1] / source[0]
    # crop covers the target, pad fits inside it; both fill one side exactly
    assert crop.scaled[0] >= target[0] and crop.scaled[1] >= target[1]
    assert pad.scaled[0] <= target[0] and pad.scaled[1] <= target[1]
    for plan in (crop, pad):
        assert plan.scaled[0] == target[0] or plan.scaled[1] == target[1]
    for plan in (crop, pad):
        # the scaled frame's aspect is the source's up to rounding each side (half a pixel)
        height, width = plan.scaled
        assert height >= 1 and width >= 1
        assert (width - 0.5) / (height + 0.5) <= aspect + 1e-9 or min(height, width) == 1
        assert aspect <= (width + 0.5) / (height - 0.5) + 1e-9 or min(height, width) == 1
    assert resize_plan(source, target, "stretch").scaled == target


def test_resize_plan_describes_itself() -> None:
    assert resize_plan((360, 640), 64).describe() == (
        "360x640 -> 64x64 (scaled to 64x114, centre-cropped)")
    assert resize_plan((360, 640), 64, "pad").describe() == (
        "360x640 -> 64x64 (scaled to 36x64, padded with mid-grey)")
    assert resize_plan((64, 64), 64).describe() == "64x64 (kept)"
    assert "aspect ratio lost" in resize_plan((360, 640), 64, "stretch").describe()
    with pytest.raises(ValueError, match="fit must be one of"):
        resize_plan((8, 8), 4, "squash")
    with pytest.raises(ValueError, match=r"size must be an int >= 1 or a pair"):
        resize_plan((8, 8), (4, 0))


def _wide_video(tmp_path) -> tuple:
    """A 32x64 (H x W) video on disk and its full-size decode."""
    video, _ = make_clip(5, frames=3, size=64)
    path = tmp_path / "wide.mp4"
    write_video(path, video[:, :, 16:48, :].contiguous())
    return path, read_video(path)


def test_read_video_crops_and_pads_without_distortion(tmp_path) -> None:
    path, full = _wide_video(tmp_path)
    assert full.shape == (3, 3, 32, 64) and probe_video(path) == (32, 64)
    # scale 1 in both cases: the crop is the middle 32 columns, the pad adds grey bands
    assert torch.equal(read_video(path, size=32), full[..., 16:48])
    padded = read_video(path, size=(64, 64), fit="pad")
    assert torch.equal(padded[..., 16:48, :], full)
    assert bool((padded[..., :16, :] == 0).all() and (padded[..., 48:, :] == 0).all())
    halved = read_video(path, size=(16, 16))  # scale 1/2, then the middle 16 of 32 columns
    reference = torch.nn.functional.interpolate(full * STD + MEAN, size=(16, 32),
                                                mode="bilinear", antialias=True)
    torch.testing.assert_close(halved, (reference.clamp(0, 1)[..., 8:24] - MEAN) / STD)


def test_unreadable_videos_give_one_line_errors(tmp_path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 20)
    for call in (lambda: read_video(bad), lambda: probe_video(bad),
                 lambda: video_folder_clips(tmp_path, frames_per_clip=2)):
        with pytest.raises(ValueError, match=r"broken\.mp4 is not a readable video") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(tmp_path / "missing.mp4")


def test_video_folder_clips_can_keep_the_files_size(tmp_path) -> None:
    path, full = _wide_video(tmp_path)
    clips = video_folder_clips(path.parent, frames_per_clip=3, size=None)
    assert len(clips) == 1 and torch.equal(clips[0], full)
