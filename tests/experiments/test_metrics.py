"""Segmentation and signal metrics against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.experiments.metrics import confusion_matrix, miou, sqnr_db

# ---------------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_miou_by_hand() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(pred, target, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    # IoU: class 0 = 1/(2+2-1) = 1/3, class 1 = 2/(2+3-2) = 2/3, class 2 = 1/(2+1-1) = 1/2;
    # class 3 is absent from both and ignored.
    assert miou(pred, target, 4) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_miou_counts_classes_only_predicted() -> None:
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 3])
    # class 0: 3/4; class 3 predicted but absent from target: IoU 0.
    assert miou(pred, target, 4) == pytest.approx((3 / 4 + 0.0) / 2)


def test_miou_identical_is_one() -> None:
    _, labels = make_clip(2, frames=3)
    assert miou(labels, labels.clone(), 4) == 1.0


def test_metric_validation() -> None:
    with pytest.raises(ValueError, match="pred and target"):
        miou(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match="pred must hold integer"):
        miou(torch.zeros(2), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="reference and test"):
        sqnr_db(torch.zeros(2), torch.zeros(3))


def test_sqnr_db_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=gen)
    noisy = ref + 0.1 * torch.randn(1000, generator=gen)
    r, n = ref.double(), noisy.double()
    expected = 10 * math.log10(float((r**2).sum()) / float(((r - n) ** 2).sum()))
    assert sqnr_db(ref, noisy) == pytest.approx(expected, rel=1e-9)
    assert sqnr_db(ref, ref) == math.inf
    # Halving the error amplitude gains 20*log10(2) ~ 6.02 dB.
    half = ref + 0.5 * (noisy - ref)
    assert sqnr_db(ref, half) - sqnr_db(ref, noisy) == pytest.approx(20 * math.log10(2))
