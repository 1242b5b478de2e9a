"""Segmentation demo clips with a frozen stretch and a scene cut (issue 10's event clips)."""

from __future__ import annotations

import pytest
import torch

from resq_brevitas.demo.clips import SECOND_SCENE_OFFSET, event_clip, event_clips
from resq_brevitas.demo.synthetic import make_clip


def test_event_clip_freezes_then_resumes_then_cuts_to_another_scene():
    video, labels, frozen, cut = event_clip(3, frames=12, frozen_at=2, frozen=4, cut=9, size=32)
    first, first_labels = make_clip(3, frames=12, size=32)
    second, _ = make_clip(3 + SECOND_SCENE_OFFSET, frames=12, size=32)
    assert frozen.tolist() == [False] * 3 + [True] * 4 + [False] * 5 and cut == 9
    for t in range(3, 7):  # bit-identical copies of frame 2, labels included
        assert torch.equal(video[t], first[2]) and torch.equal(labels[t], first_labels[2])
    assert torch.equal(video[:3], first[:3])
    assert torch.equal(video[7:9], first[3:5])  # the first scene resumes where it stopped
    assert torch.equal(video[9:], second[:3])
    assert not torch.equal(video[8], video[9])


def test_event_clip_refuses_events_out_of_order():
    with pytest.raises(ValueError, match="frozen_at"):
        event_clip(0, frames=8, frozen_at=3, frozen=4, cut=6)


def test_event_clips_are_deterministic_batches():
    a = event_clips(3, seed=5, batch=2, frames=12)
    b = event_clips(3, seed=5, batch=2, frames=12)
    assert [x.shape[0] for x in a] == [2, 1] and a[0].shape[1:] == (12, 3, 64, 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # every clip holds a frozen stretch: two consecutive identical frames
    for clip in torch.cat(a):
        assert any(torch.equal(clip[t], clip[t + 1]) for t in range(11))
    with pytest.raises(ValueError, match="num_clips"):
        event_clips(0, seed=1)
    with pytest.raises(ValueError, match="frames"):
        event_clips(1, seed=1, frames=8)
