"""The demo's procedural video data."""

from __future__ import annotations

import math

import pytest
import torch

from resq_brevitas.demo.synthetic import (
    MEAN,
    STD,
    SyntheticVideoDataset,
    make_clip,
    pink_noise,
    synthetic_clips,
)

# Training uses dataset seeds 0 (train) and 1 (held-out evaluation); 7 is never used there.
HELD_OUT_SEED = 7


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- synthetic clips


def test_make_clip_shapes_dtypes_and_range() -> None:
    video, labels = make_clip(3, frames=5, size=32)
    assert video.shape == (5, 3, 32, 32) and video.dtype == torch.float32
    assert labels.shape == (5, 32, 32) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 4
    # Pixels are clamped to [0, 1] before normalisation.
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert float(video.min()) >= lo - 1e-6 and float(video.max()) <= hi + 1e-6
    assert torch.isfinite(video).all()


def test_make_clip_deterministic_per_seed() -> None:
    v1, l1 = make_clip(11)
    v2, l2 = make_clip(11)
    assert torch.equal(v1, v2) and torch.equal(l1, l2)
    v3, _ = make_clip(12)
    assert not torch.allclose(v1, v3)


def test_make_clip_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_clip(5)
    assert torch.equal(torch.rand(3), expected)


def test_every_shape_class_reachable(first_frame_labels: list[torch.Tensor]) -> None:
    seen: set[int] = set()
    for labels in first_frame_labels[:20]:
        seen.update(int(c) for c in labels.unique())
    assert seen == {0, 1, 2, 3}


def test_num_classes_limits_drawn_shapes() -> None:
    for seed in range(10):
        _, labels = make_clip(seed, frames=2, num_classes=2)
        assert int(labels.max()) <= 1


def test_clip_is_temporally_coherent() -> None:
    ratios = []
    for seed in range(8):
        video, _ = make_clip(seed)
        frame_diff = (video[1:] - video[:-1]).abs().mean()
        ratios.append(float(frame_diff / video.abs().mean()))
    assert max(ratios) < 0.5
    assert sum(ratios) / len(ratios) < 0.3


def test_objects_move() -> None:
    moved = 0
    for seed in range(8):
        _, labels = make_clip(seed, frames=8)
        moved += int(not torch.equal(labels[0], labels[-1]))
    assert moved >= 7


def test_pixels_follow_labels() -> None:
    """Label boundaries are real appearance boundaries: colour statistics differ per class."""
    video, labels = make_clip(4, frames=1)
    fg = labels[0] > 0
    assert fg.any() and (~fg).any()
    # The background is a smooth, low-contrast texture; objects are saturated textures, so
    # the mean colour of the two regions must differ noticeably.
    bg_mean = video[0][:, ~fg].mean(dim=1)
    fg_mean = video[0][:, fg].mean(dim=1)
    assert float((bg_mean - fg_mean).abs().max()) > 0.1


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_pink_noise_power_falls_as_f_to_minus_twice_the_exponent(exponent: float) -> None:
    """Natural images have amplitude ~ 1/f (power ~ 1/f^2); the textures are built that way."""
    n = 64
    tex = pink_noise(torch.Generator().manual_seed(0), 8, n, exponent)
    assert torch.allclose(tex.mean(dim=(1, 2)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(tex.std(dim=(1, 2)), torch.ones(8), atol=1e-5)
    power = (torch.fft.fft2(tex).abs() ** 2).mean(dim=0)
    freq = torch.fft.fftfreq(n)
    radius = torch.sqrt(freq.view(n, 1) ** 2 + freq.view(1, n) ** 2)
    band = (radius > 2 / n) & (radius < 0.45)
    design = torch.stack([radius[band].log(), torch.ones(int(band.sum()))], dim=1)
    slope = torch.linalg.lstsq(design, power[band].log().unsqueeze(1)).solution[0, 0]
    assert abs(float(slope) + 2 * exponent) < 0.15


def test_residuals_are_smaller_than_frames_as_in_real_video() -> None:
    """ResQ's premise (Fig. 2) at the input: slow, sub-pixel motion of natural textures makes
    ``x_t - x_(t-d)`` much smaller than ``x_t`` for d = 1..3 in every clip."""
    for seed in range(6):
        video, _ = make_clip(seed, frames=8, size=32)
        centred = video - video.mean(dim=(0, 2, 3), keepdim=True)
        for d in (1, 2, 3):
            ratio = float((video[d:] - video[:-d]).var() / centred.var())
            assert ratio < 0.25, (seed, d, ratio)


def test_motion_is_slow() -> None:
    """Objects move at most ~0.55% of the frame width per frame: at 64 px, under 0.4 px, so a
    frame step relabels under 1% of the pixels (perimeter x displacement / area; fast motion,
    1-2 px per frame, relabels several percent)."""
    shares = []
    for seed in range(8):
        _, labels = make_clip(seed, frames=6)
        shares.append(float((labels[1:] != labels[:-1]).float().mean()))
    assert max(shares) < 0.01, shares
    assert max(shares) > 0  # ... but they do move


@pytest.fixture(scope="module")
def first_frame_labels() -> list[torch.Tensor]:
    """Label maps of the first frame of 60 clips, shared by the geometry tests."""
    return [make_clip(seed, frames=1)[1][0] for seed in range(60)]


def _isolated_regions(cls: int, label_maps: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(area, bbox_h, bbox_w) of class ``cls`` regions that do not touch the frame border."""
    out = []
    for labels in label_maps:
        mask = labels == cls
        if not mask.any():
            continue
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        if top == 0 or left == 0 or bottom == mask.shape[0] - 1 or right == mask.shape[1] - 1:
            continue
        out.append((int(mask.sum()), bottom - top + 1, right - left + 1))
    return out


def test_disc_labels_are_round(first_frame_labels: list[torch.Tensor]) -> None:
    regions = _isolated_regions(1, first_frame_labels)
    assert len(regions) >= 8
    fill = sorted(area / (h * w) for area, h, w in regions)
    aspect = sorted(h / w for _, h, w in regions)
    # Medians are robust to the occasional disc occluded by a later-drawn shape or two discs
    # sharing a bounding box. A disc fills pi/4 of its bounding box and has aspect 1.
    assert abs(fill[len(fill) // 2] - math.pi / 4) < 0.06
    assert abs(aspect[len(aspect) // 2] - 1.0) < 0.1


def test_triangle_labels_fill_less_than_discs(
    first_frame_labels: list[torch.Tensor],
) -> None:
    regions = _isolated_regions(3, first_frame_labels)
    assert len(regions) >= 8
    fill = sorted(area / (h * w) for area, h, w in regions)
    # A triangle fills at most half of its axis-aligned bounding box.
    assert fill[len(fill) // 2] < 0.6


def test_dataset_indexing_and_validation() -> None:
    ds = SyntheticVideoDataset(3, frames=4, size=32, seed=2)
    assert len(ds) == 3
    video, labels = ds[1]
    ref_video, ref_labels = make_clip(2 * 1_000_003 + 1, frames=4, size=32)
    assert torch.equal(video, ref_video) and torch.equal(labels, ref_labels)
    assert torch.equal(ds[-1][0], ds[2][0])
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="num_clips"):
        SyntheticVideoDataset(0)
    with pytest.raises(ValueError, match="frames.*got -1"):
        SyntheticVideoDataset(2, frames=-1)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticVideoDataset(2, num_classes=9)


def test_synthetic_clips_matches_dataset() -> None:
    clips = synthetic_clips(2, frames=3, size=16, seed=5)
    ds = SyntheticVideoDataset(2, frames=3, size=16, seed=5)
    assert len(clips) == 2
    assert all(torch.equal(c, ds[i][0]) for i, c in enumerate(clips))
