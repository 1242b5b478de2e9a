"""The learned frame policy's inputs (``LearnedFramePolicy.inputs``): the frame difference to the
stream's previous downsampled frame, its per-stream state, its cost and its validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resq_brevitas as resq
from resq_brevitas.config import POLICY_INPUTS, ResQConfig
from resq_brevitas.policy import learned
from resq_brevitas.policy.learned import FramePolicyNetwork
from tests.helpers import scramble_policy

SIZE = 8
CALIB = [torch.randn(2, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s))
         for s in range(2)]
SEARCH = resq.LineSearch(candidates=6, samples=8)
ALL_INPUTS = ("frame", "difference", "mean_abs_difference")
RESIDUAL_FAMILY = "W8A8->{W8A4,W4A4,skip,key}"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1)).eval()


def _model(inputs=ALL_INPUTS, period=16) -> resq.ResQModel:
    policy = resq.LearnedFramePolicy(input_size=4, channels=(4,), hidden=8, inputs=inputs)
    cfg = resq.ResQConfig(scheme=RESIDUAL_FAMILY, period=period, policy=policy,
                          calibration=SEARCH)
    qm = resq.convert(_net(), cfg)
    resq.calibrate(qm, CALIB, progress=False)
    return qm.eval()


def _event_video(batch=3, frames=10, seed=5) -> torch.Tensor:
    """Drifting clips; row 0 freezes on frame 2 for frames 3-5 and cuts to a new scene at 7."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, 3, SIZE, SIZE, generator=g)
    video = base + 0.1 * torch.randn(batch, frames, 3, SIZE, SIZE, generator=g).cumsum(1)
    video[0, 3:6] = video[0, 2]
    video[0, 7:] = torch.randn(3, SIZE, SIZE, generator=g) + 0.1 * torch.randn(
        frames - 7, 3, SIZE, SIZE, generator=g).cumsum(0)
    return video


def _network(inputs, input_size=4, channels=(4, 6), hidden=8, actions=3) -> FramePolicyNetwork:
    settings = resq.LearnedFramePolicy(input_size=input_size, channels=channels, hidden=hidden,
                                       inputs=inputs)
    family = resq.Scheme.parse("{W8A8,W4A4,skip}").family
    return FramePolicyNetwork(settings, family[:actions]).eval()


def _seen_inputs(network: FramePolicyNetwork, frames: list[torch.Tensor]):
    """The feature extractor's image input and the LSTM's input on each frame of one stream."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    images: list[torch.Tensor] = []
    h1 = network.features.register_forward_pre_hook(lambda m, a: images.append(a[0]))
    h2 = network.lstm.register_forward_pre_hook(
        lambda m, a: seen.append((images[-1], a[0])))
    state = None
    try:
        with torch.no_grad():
            for frame in frames:
                _, state = network(frame, state)
    finally:
        h1.remove()
        h2.remove()
    return seen, state


# ---------------------------------------------------------------- the difference input
def test_difference_of_a_frozen_frame_is_exactly_zero_and_the_first_is_the_frame():
    network = _network(ALL_INPUTS)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    seen, state = _seen_inputs(network, [a, a.clone(), b])
    small_a, small_b = (F.adaptive_avg_pool2d(x, 4) for x in (a, b))
    # Channels: frame (0-2), difference (3-5); the LSTM's last input is the mean |difference|.
    (first, first_lstm), (frozen, frozen_lstm), (moved, moved_lstm) = seen
    torch.testing.assert_close(first[:, :3], small_a, rtol=0, atol=0)
    torch.testing.assert_close(first[:, 3:], small_a, rtol=0, atol=0)  # from zeros (black)
    assert torch.equal(frozen[:, 3:], torch.zeros_like(frozen[:, 3:]))
    assert torch.equal(frozen_lstm[:, -1], torch.zeros(2))
    torch.testing.assert_close(moved[:, 3:], small_b - small_a, rtol=0, atol=0)
    torch.testing.assert_close(moved_lstm[:, -1], (small_b - small_a).abs().mean((1, 2, 3)))
    # The state's third entry is the last downsampled frame.
    assert len(state) == 3
    torch.testing.assert_close(state[2], small_b, rtol=0, atol=0)


def test_frame_only_keeps_the_lstm_state_alone():
    network = _network(("frame",))
    _, state = _seen_inputs(network, [torch.randn(2, 3, 8, 8)])
    assert len(state) == 2 and network.features[0].in_channels == 3


def test_input_names_match_the_config():
    assert set(learned._IMAGE_INPUTS) | set(learned._SCALAR_INPUTS) == set(POLICY_INPUTS)


# ---------------------------------------------------------------- per-stream state
def _scrambled(inputs=ALL_INPUTS, period=16):
    qm = _model(inputs, period)
    video = _event_video()
    scramble_policy(qm, video, seed=3)
    return qm, video


def _without_previous_frame(qm: resq.ResQModel, video: torch.Tensor) -> torch.Tensor:
    """The eval argmax of the policy per frame when the previous downsampled frame is not
    carried (zeros every frame), the LSTM state carried: what a state that forgets it gives."""
    policy = qm.frame_policy
    state, chosen = None, []
    with torch.no_grad():
        for t in range(video.shape[1]):
            if state is not None:
                state = (state[0], state[1], torch.zeros_like(state[2]))
            logits, state = policy(video[:, t], state)
            chosen.append(logits.argmax(-1))
    return torch.stack(chosen, 1)


def test_rows_are_independent_and_the_previous_frame_matters():
    qm, video = _scrambled()
    with torch.no_grad():
        together = qm(video)
        actions = qm.last_actions.clone()
        logits = qm.last_policy.logits.clone()
        for b in range(video.shape[0]):
            alone = qm(video[b:b + 1])
            assert torch.equal(qm.last_actions[0], actions[b])
            torch.testing.assert_close(qm.last_policy.logits[0], logits[b], rtol=0, atol=1e-5)
            torch.testing.assert_close(alone[0], together[b], rtol=0, atol=1e-5)
    assert len({tuple(r) for r in actions.tolist()}) > 1
    # The clip exposes a policy that drops the previous frame between frames.
    forgetful = _without_previous_frame(qm, video)
    assert not torch.equal(forgetful, logits.argmax(-1))


def test_stepping_equals_the_clip_continues_it_and_reset_equals_fresh():
    qm, video = _scrambled()
    with torch.no_grad():
        clip = qm(video)
        clip_actions = qm.last_actions.clone()
        # forward(first frames) then step(): the state (previous frame included) continues.
        qm(video[:, :4])
        steps = [qm.step(video[:, t]) for t in range(4, video.shape[1])]
        torch.testing.assert_close(torch.stack(steps, 1), clip[:, 4:], rtol=0, atol=0)
        qm.reset()
        steps = []
        for t in range(video.shape[1]):
            steps.append(qm.step(video[:, t]))
            assert torch.equal(qm.last_actions[:, 0], clip_actions[:, t])
        torch.testing.assert_close(torch.stack(steps, 1), clip, rtol=0, atol=0)


def test_resetting_some_rows_restarts_their_previous_frame_only():
    qm, video = _scrambled()
    other = _event_video(seed=9)
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        for t in range(4):
            qm.step(other[:, t])
        kept = qm._actions.stream.policy_state[2][~rows].clone()
        qm.reset(rows)
        previous = qm._actions.stream.policy_state[2]
        assert torch.equal(previous[rows], torch.zeros_like(previous[rows]))
        assert torch.equal(previous[~rows], kept) and bool(kept.abs().sum() > 0)
        mixed, mixed_actions = [], []
        for t in range(video.shape[1]):
            mixed.append(qm.step(video[:, t]))
            mixed_actions.append(qm.last_actions[:, 0].clone())  # step: one frame's actions
        mixed_actions = torch.stack(mixed_actions, 1)
        fresh = qm(video)
        fresh_actions = qm.last_actions.clone()
        # The kept row continues `other`: its state (previous frame) is not the fresh one.
        qm.reset()
        for t in range(4):
            qm.step(other[:, t])
        continued = [qm.step(video[:, t]) for t in range(video.shape[1])]
    mixed, continued = torch.stack(mixed, 1), torch.stack(continued, 1)
    assert torch.equal(mixed_actions[rows], fresh_actions[rows])
    # Rows run in other groupings here than in the fresh clip: float rounding only.
    torch.testing.assert_close(mixed[rows], fresh[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[~rows], continued[~rows], rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[~rows], fresh[~rows], atol=1e-3)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_mid_stream_continues_like_the_original(how):
    qm, video = _scrambled()
    with torch.no_grad():
        for t in range(5):
            qm.step(video[:, t])
        if how == "deepcopy":
            twin = copy.deepcopy(qm)
        else:
            buffer = io.BytesIO()
            torch.save(qm, buffer)
            buffer.seek(0)
            twin = torch.load(buffer, weights_only=False)
        rest = [qm.step(video[:, t]) for t in range(5, video.shape[1])]
        again = [twin.step(video[:, t]) for t in range(5, video.shape[1])]
    torch.testing.assert_close(torch.stack(again, 1), torch.stack(rest, 1), rtol=0, atol=0)


# ---------------------------------------------------------------- cost
def _hooked_macs(network: FramePolicyNetwork, frame: torch.Tensor) -> int:
    """MACs counted from the modules that actually ran on one frame of one stream."""
    total = 0

    def conv(m, a, out):
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def lstm(m, a, out):
        nonlocal total
        total += 4 * m.hidden_size * (m.input_size + m.hidden_size)

    def linear(m, a, out):
        nonlocal total
        total += m.in_features * m.out_features

    kinds = {nn.Conv2d: conv, nn.LSTMCell: lstm, nn.Linear: linear}
    hooks = [m.register_forward_hook(kinds[type(m)]) for m in network.modules()
             if type(m) in kinds]
    with torch.no_grad():
        network(frame[:1])
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("inputs", [("frame",), ("frame", "difference"), ("difference",),
                                    ALL_INPUTS])
def test_macs_count_the_extra_input_channels(inputs):
    network = _network(inputs, input_size=8, channels=(4, 6), hidden=8)
    frame = torch.randn(2, 3, 16, 16)
    assert network.macs(tuple(frame.shape[1:])) == _hooked_macs(network, frame)


def test_macs_by_hand_with_the_difference():
    # conv1: 4x4 out x 4 ch x (6 in x 9); conv2: 2x2 x 6 x (4 x 9); LSTM 4*8*(6+1+8); head 8*3
    network = _network(ALL_INPUTS, input_size=8, channels=(4, 6), hidden=8)
    assert network.macs((3, 16, 16)) == 16 * 4 * 6 * 9 + 4 * 6 * 4 * 9 + 4 * 8 * 15 + 8 * 3


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("value,error,match", [
    ("frame", TypeError, r"inputs must be a non-empty tuple .*got str 'frame'"),
    ((), ValueError, r"inputs must hold at least one image input .*got \(\)"),
    (("frame", "edges"), ValueError, r"inputs\[1\] must be one of \('frame', 'difference', "
                                     r"'mean_abs_difference'\), got 'edges'"),
    (("frame", 3), TypeError, r"inputs\[1\] must be a str, one of .*got int 3"),
    (("frame", "frame"), ValueError, r"distinct names .*got \('frame', 'frame'\)"),
    (("mean_abs_difference",), ValueError,
     r"at least one image input of \('frame', 'difference'\).*'mean_abs_difference'"),
])
def test_bad_inputs_are_refused_with_argument_expected_and_received(value, error, match):
    with pytest.raises(error, match=match):
        resq.LearnedFramePolicy(inputs=value)


def test_inputs_round_trip_and_a_version_1_config_reads_as_frame_only():
    cfg = ResQConfig(scheme=RESIDUAL_FAMILY, period=8,
                     policy=resq.LearnedFramePolicy(inputs=["difference", "frame"]))
    assert cfg.policy.inputs == ("difference", "frame")
    assert ResQConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old["version"] = 1
    del old["policy"]["inputs"]
    assert ResQConfig.from_dict(old).policy.inputs == ("frame",)
    assert resq.LearnedFramePolicy().inputs == ("frame", "difference")


def test_version_1_without_a_learned_policy_reads_unchanged_and_unknown_versions_fail():
    cfg = ResQConfig(scheme="W8A8->W8A{0,4,8}", period=4, policy=resq.ErrorBoundPolicy(tau=0.1))
    data = cfg.to_dict()
    assert data["version"] == 2
    old = {**data, "version": 1}
    assert ResQConfig.from_dict(old) == cfg
    assert "inputs" not in ResQConfig.from_dict(old).to_dict()["policy"]
    for version in (0, 3, None):
        with pytest.raises(ValueError, match=r"config version .*reads versions \(1, 2\)"):
            ResQConfig.from_dict({**data, "version": version})
