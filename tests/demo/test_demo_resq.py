"""The embedded demo quantizes like a real network (benchmarks/RESULTS.md section 8's acceptance
criteria), and ResQ beats frame quantization at comparable BOPs on it."""

from __future__ import annotations

import math

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.experiments.metrics import sqnr_db
from tests.helpers import relative_bops


@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    model = load_demo_model()
    calib = [make_clip(7_000 + i, frames=8)[0] for i in range(2)]
    video = make_clip(9_000, frames=8)[0].unsqueeze(0)
    return model, calib, video


def _sqnr_and_bops(model, calib, video, scheme: str, period: int) -> tuple[float, float]:
    qm = resq.convert(model, resq.ResQConfig(scheme=scheme, period=period))
    resq.calibrate(qm, calib, samples=16, candidates=12, progress=False)
    with torch.no_grad():
        out = qm(video)
        ref = torch.stack([model(video[:, t]) for t in range(video.shape[1])], 1)
    return sqnr_db(ref, out), qm.last_cost.mean_bops


def test_resq_beats_frame_quantization_near_equal_bops(demo) -> None:
    model, calib, video = demo
    resq_sqnr, resq_bops = _sqnr_and_bops(model, calib, video, "W8A8->W4A4", 4)
    w8_bops = resq.count_bops(model, tuple(video.shape[2:]), "W8A8").mean_bops
    assert resq_bops / w8_bops == pytest.approx(relative_bops("W8A8->W4A4", 4))
    for frame_scheme in ("W5A5", "W4A4"):
        frame_sqnr, frame_bops = _sqnr_and_bops(model, calib, video, frame_scheme, 1)
        assert frame_bops / w8_bops == pytest.approx(relative_bops(frame_scheme))
        assert math.isfinite(frame_sqnr)
        assert resq_sqnr > frame_sqnr, (frame_scheme, resq_sqnr, frame_sqnr)


def test_frame_quantization_degrades_like_a_real_network(demo) -> None:
    """Section 8's acceptance profile: W8A8 in the 35-45 dB range of real segmentation networks
    (the old demo, with its aliased flat-colour data, gave 24.7 dB) and about 6 dB per bit
    (uniform quantization noise) from W8A8 down to W5A5. Bands widened for one 8-frame clip
    calibrated on 16 frames: W8A8 33-48 dB, 3-9 dB per bit. (On section 1's six clips the
    shipped checkpoint gives 33.5 dB with the paper's signed quantizers and 35.2 dB with
    ``act_signedness="auto"``: RESULTS.md section 8.)"""
    model, calib, video = demo
    sqnr = {s: _sqnr_and_bops(model, calib, video, s, 1)[0] for s in ("W8A8", "W6A6", "W5A5")}
    assert 33.0 <= sqnr["W8A8"] <= 48.0, sqnr
    assert 3.0 <= (sqnr["W8A8"] - sqnr["W6A6"]) / 2 <= 9.0, sqnr
    assert 3.0 <= sqnr["W6A6"] - sqnr["W5A5"] <= 9.0, sqnr
