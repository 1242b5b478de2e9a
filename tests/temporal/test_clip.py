"""Time-batched clips: every layer once over all frames, equal to stepping frame by frame."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.temporal.clip import plan_clip
from resq_brevitas.temporal.schedule import KeyframeSchedule
from tests.helpers import make_all_layers_net, make_clip

pytestmark = pytest.mark.usefixtures("single_thread")

POOL = "W8A8->W8A{0,4,8}"


# float64: torch's CPU kernels may reduce in another order for another batch size (seen: a 1x1
# conv at 2 vs 20 rows, 1e-7 apart in float32), which quantization can round to a whole step.
# In float64 such differences stay far below every rounding boundary, so batched == stepped is
# asserted exactly; float32 is checked to float rounding with quantization disabled.
DTYPE = torch.float64


def _calibrated(scheme: str = "W8A8->W4A4", period: int = 4, dtype: torch.dtype = DTYPE,
                **config) -> resq.ResQModel:
    qm = resq.convert(make_all_layers_net().to(dtype),
                      resq.ResQConfig(scheme=scheme, period=period, **config))
    return resq.calibrate(qm, [make_clip(batch=1, frames=6, seed=7)[0].to(dtype)], samples=6,
                          candidates=6, progress=False)


def _clip(batch: int, frames: int, seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return make_clip(batch=batch, frames=frames, seed=seed).to(dtype)


def _stepped(qm: resq.ResQModel, clip: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    qm.reset()
    outs, costs = [], []
    with torch.no_grad():
        for t in range(clip.shape[1]):
            outs.append(qm.step(clip[:, t])["seg"])
            costs.append(qm.last_cost.per_frame[0])
    return torch.stack(outs, 1), costs


CASES = [
    ("W8A8->W4A4", 4, {}),
    ("W8A8->W4A4", 3, {}),                         # does not divide T = 10
    ("W8A8->W4A4", 1, {}),
    ("W6A6", 4, {}),                               # frame quantization
    ("W8A8->W6A0", 4, {}),                         # 0-bit residuals
    ("W8A8->W4A4", 4, {"threshold": 0.05}),        # truncation with the keyframe reference
    (POOL, 4, {"policy": resq.ErrorBoundPolicy(tau=1e-2)}),
    (POOL, 3, {"policy": resq.ErrorBoundPolicy(tau=1e-2, granularity="region", k=3)}),
    (POOL, 5, {"policy": resq.ErrorBoundPolicy(tau=1e-2, granularity="frame")}),
    ("W8A8->W4A4", 4, {"overrides": (resq.LayerOverride("head", "W8A8"),)}),
    # every keyframe with the same number of residual frames: references broadcast
    ("W8A8->W4A4", 2, {}),
    ("W8A8->W6A0", 5, {}),
]


@pytest.mark.parametrize("scheme,period,config", CASES,
                         ids=[f"{c[0]}-T{c[1]}-{sorted(c[2])}" for c in CASES])
def test_batched_clip_equals_stepping(scheme, period, config) -> None:
    qm = _calibrated(scheme, period, **config)
    assert qm.batches_clips
    clip = _clip(2, 10, 3)
    with torch.no_grad():
        out = qm(clip)["seg"]
    cost, keyframes, maps = qm.last_cost, qm.last_keyframes, dict(qm.last_bit_maps)
    stepped, per_frame = _stepped(qm, clip)
    torch.testing.assert_close(out, stepped, rtol=0, atol=0)
    assert cost.per_frame == pytest.approx(per_frame)
    assert torch.equal(keyframes, torch.tensor([t % qm.period == 0 for t in range(10)])
                       .expand(2, 10))
    for name, bits in maps.items():  # the bit maps of every frame, as stepping records them
        assert bits.shape[:2] == (2, 10), name


def test_state_after_a_batched_clip_continues_the_stream() -> None:
    qm = _calibrated(period=4)
    clip = _clip(2, 11, 4)
    stepped, _ = _stepped(qm, clip)
    with torch.no_grad():
        head = qm(clip[:, :6])["seg"]                       # ends mid-period
        tail = [qm.step(clip[:, t])["seg"] for t in range(6, 11)]
        torch.testing.assert_close(torch.cat([head, torch.stack(tail, 1)], 1), stepped,
                                   rtol=0, atol=0)
        qm(clip[:, :6])
        rest = qm.step_clip(clip[:, 6:])["seg"]             # chunks of a decoded stream
    torch.testing.assert_close(rest, stepped[:, 6:], rtol=0, atol=0)


def test_rows_with_different_histories_batch_like_stepping() -> None:
    qm = _calibrated(period=4)
    clip = _clip(3, 12, 5)
    with torch.no_grad():
        qm.reset()
        expected = [qm.step(clip[:, t])["seg"] for t in range(3)]
        qm.reset(rows=[1])
        expected += [qm.step(clip[:, t])["seg"] for t in range(3, 12)]
        energy = qm.truncated_energy
        qm.reset()
        got = [qm.step(clip[:, t])["seg"] for t in range(3)]
        qm.reset(rows=[1])
        batched = qm.step_clip(clip[:, 3:])["seg"]          # three different phases in one batch
    torch.testing.assert_close(torch.cat([torch.stack(got, 1), batched], 1),
                               torch.stack(expected, 1), rtol=0, atol=0)
    assert torch.equal(qm.truncated_energy, energy)


def test_chunked_clip_equals_one_batch() -> None:
    qm = _calibrated(POOL, 3, policy=resq.ErrorBoundPolicy(tau=1e-2))
    clip = _clip(2, 10, 6)
    with torch.no_grad():
        whole = qm(clip)["seg"]
        whole_cost = qm.last_cost.per_frame
        qm.max_frames_per_batch = 6                          # 3 frames of 2 streams per call
        chunked = qm(clip)["seg"]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert qm.last_cost.per_frame == pytest.approx(whole_cost)


def test_uniform_chunks_broadcast_their_references() -> None:
    from resq_brevitas.temporal.clip import ClipLayout

    uniform = ClipLayout.of(plan_clip(KeyframeSchedule(5), torch.zeros(2, dtype=torch.long), 10))
    ragged = ClipLayout.of(plan_clip(KeyframeSchedule(4), torch.zeros(2, dtype=torch.long), 10))
    carried = ClipLayout.of(plan_clip(KeyframeSchedule(5), torch.tensor([2, 2]), 10))
    assert uniform.groups == 4 and ragged.groups is None and carried.groups is None


def test_plan_follows_the_schedule_per_stream() -> None:
    schedule = KeyframeSchedule(3)
    phase = torch.tensor([0, 2, 3])
    plan = plan_clip(schedule, phase, 5)
    stepped = []
    for _ in range(5):
        mask = schedule.key_mask(phase)
        stepped.append(mask)
        phase = schedule.advance(phase, mask)
    assert torch.equal(plan.key, torch.stack(stepped, 1)) and torch.equal(plan.phase, phase)
    # Stream 1 (phase 2 of 3) takes one residual frame against its carried reference (table
    # row 1), then a keyframe, which refers to itself (the first keyframe of the chunk in row
    # order after stream 0's frames 0 and 3: table row 3 + 2).
    assert plan.ref_row[5].item() == 1 and bool(plan.key[1, 1])
    assert plan.ref_row[6].item() == 3 + 2 and plan.last_ref[2].item() != 2


class TokenNet(nn.Module):
    """A Linear over pixel tokens: the layer sees B * H * W rows, not one row per frame."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        n, c, hh, ww = h.shape
        tokens = self.mix(h.permute(0, 2, 3, 1).reshape(n * hh * ww, c))
        return tokens.reshape(n, hh, ww, c).permute(0, 3, 1, 2)


def test_a_layer_without_a_row_per_frame_falls_back_to_stepping() -> None:
    torch.manual_seed(0)
    qm = resq.convert(TokenNet().eval(), resq.ResQConfig(period=3))
    clip = make_clip(batch=2, frames=7, size=6, seed=8)
    resq.calibrate(qm, [clip[:1]], samples=7, candidates=4, progress=False)
    sequential = copy.deepcopy(qm)
    sequential.clip_execution = "sequential"
    with torch.no_grad():
        torch.testing.assert_close(qm(clip), sequential(clip), rtol=0, atol=0)


@pytest.mark.parametrize("scheme,period,config", CASES[:4] + CASES[6:7],
                         ids=[f"{c[0]}-T{c[1]}" for c in CASES[:4] + CASES[6:7]])
def test_float32_batched_clip_equals_stepping_to_float_rounding(scheme, period, config) -> None:
    qm = _calibrated(scheme, period, dtype=torch.float32, **config)
    clip = _clip(2, 10, 3, torch.float32)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)["seg"]
        stepped, _ = _stepped(qm, clip)
    torch.testing.assert_close(out, stepped, rtol=1e-5, atol=1e-5)


def test_modes_that_depend_on_earlier_frames_step() -> None:
    assert not _calibrated(reference="previous").batches_clips
    assert not _calibrated(refresh=resq.SceneCutRefresh(0.5)).batches_clips


def test_token_rows_work_when_streams_share_a_phase_and_are_refused_otherwise() -> None:
    torch.manual_seed(0)
    net = TokenNet().eval()
    qm = resq.convert(net, resq.ResQConfig(period=3))
    clip = make_clip(batch=2, frames=5, size=6, seed=9)
    resq.calibrate(qm, [clip[:1]], samples=5, candidates=4, progress=False)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    with torch.no_grad():
        dense = torch.stack([net(clip[:, t]) for t in range(5)], 1)
    assert qm.last_cost.macs["mix"] == 6 * 6 * 4 * 4  # one frame's tokens, per stream
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5
    with torch.no_grad():
        qm.reset()
        qm.step(clip[:, 0])
        qm.reset(rows=[1])
        with pytest.raises(RuntimeError, match=r"'mix' sees 72 rows for 2 streams"):
            qm.step(clip[:, 1])
