"""What ``resq.calibrate`` accepts: a torch DataLoader of ``(clip, labels)`` batches, and fewer
frames than ``samples`` asks for (used whole, with a warning)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import resq_brevitas as resq
from resq_brevitas.demo.model import DemoSegNet
from resq_brevitas.demo.synthetic import SyntheticVideoDataset

pytestmark = pytest.mark.usefixtures("single_thread")

CLIPS, FRAMES, SIZE = 4, 4, 16


def _model() -> resq.ResQModel:
    torch.manual_seed(0)
    config = resq.ResQConfig("W8A8->W4A4", period=2, calibration=resq.LineSearch(candidates=4))
    return resq.convert(DemoSegNet().eval(), config)


@pytest.fixture(scope="module")
def dataset() -> SyntheticVideoDataset:
    return SyntheticVideoDataset(CLIPS, frames=FRAMES, size=SIZE, seed=3)


def test_calibrate_takes_a_dataloader_of_clip_label_batches(dataset) -> None:
    loader = DataLoader(dataset, batch_size=2, shuffle=False)
    clips, labels = next(iter(loader))
    assert clips.shape == (2, FRAMES, 3, SIZE, SIZE) and labels.shape == (2, FRAMES, SIZE, SIZE)
    from_loader = resq.calibrate(_model(), loader, samples=CLIPS * FRAMES, progress=False)
    # the same clips, stacked by hand into the same batches, without labels
    batches = [torch.stack([dataset[i][0] for i in range(b, b + 2)]) for b in (0, 2)]
    by_hand = resq.calibrate(_model(), batches, samples=CLIPS * FRAMES, progress=False)
    ranges = resq.activation_ranges(from_loader)
    assert ranges and ranges == resq.activation_ranges(by_hand)


def test_asking_for_more_samples_than_exist_warns_and_uses_them_all(dataset) -> None:
    clips = [dataset[i][0] for i in range(CLIPS)]
    available = CLIPS * FRAMES
    with pytest.warns(UserWarning, match=rf"samples=64 frames .* hold {available}"):
        short = resq.calibrate(_model(), clips, samples=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly what exists: no warning
        exact = resq.calibrate(_model(), clips, samples=available, progress=False)
    assert resq.activation_ranges(short) == resq.activation_ranges(exact)
