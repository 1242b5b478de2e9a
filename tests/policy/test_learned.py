"""VideoIQ's learned per-frame policy (eq. 3-13) and the per-frame action executor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.policy.learned import (
    AnnealedTemperature,
    balance_loss_eq11,
    efficiency_loss_eq10,
    entropy_loss_eq12,
    gumbel_softmax_eq6,
)
from resq_brevitas.temporal.actions import SCHEDULED_KEYFRAME, recognition_average
from tests.helpers import force_policy, scramble_policy

SIZE = 8
CALIB = [torch.randn(2, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s))
         for s in range(2)]
SEARCH = resq.LineSearch(candidates=6, samples=8)
POLICY = resq.LearnedFramePolicy(input_size=8, channels=(4,), hidden=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1)).eval()


def _video(batch=3, frames=6, seed=5, drift=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, 3, SIZE, SIZE, generator=g)
    return base + drift * torch.randn(batch, frames, 3, SIZE, SIZE, generator=g).cumsum(1)


def _model(scheme, period=4, **kwargs):
    cfg = resq.ResQConfig(scheme=scheme, period=period, policy=POLICY, calibration=SEARCH,
                          **kwargs)
    qm = resq.convert(_net(), cfg)
    resq.calibrate(qm, CALIB, progress=False)
    return qm.eval()


_force = force_policy
_scramble = scramble_policy


# ---------------------------------------------------------------- sampling and losses
def test_hard_samples_are_one_hot_and_gradient_reaches_policy_parameters():
    qm = _model("{W8A8,W4A4,W2A2,skip}").train()
    policy = qm.frame_policy
    logits, _ = policy(_video()[:, 0])
    samples = policy.sample(logits, generator=torch.Generator().manual_seed(0))
    assert set(samples.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(samples.detach().sum(-1), torch.ones(samples.shape[0]))
    costs = torch.tensor([64.0, 16.0, 4.0, 0.0])
    efficiency_loss_eq10(samples.unsqueeze(1), costs).backward()
    for name, p in policy.named_parameters():
        if name.startswith(("head", "lstm.weight_ih", "features")):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_gumbel_hard_sample_is_the_argmax_of_log_pi_plus_gumbel():
    logits = torch.randn(64, 5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    hard = gumbel_softmax_eq6(logits, 0.5, hard=True, generator=g1)
    u = torch.rand(logits.shape, generator=g2)
    expected = (torch.log_softmax(logits, -1) - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(hard.argmax(-1), expected)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax_eq6(logits, 0.0)


def test_eval_sampling_is_the_argmax_and_respects_allowed():
    qm = _model("{W8A8,W4A4,skip}")
    logits = torch.tensor([[0.0, 1.0, 5.0], [3.0, 1.0, 0.0]])
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    assert qm.frame_policy.sample(logits, allowed).argmax(-1).tolist() == [1, 0]


def test_temperature_schedule_anneals_from_5_towards_0():
    schedule = AnnealedTemperature(start=5.0, end=0.01, steps=100)
    values = [schedule(s) for s in range(0, 151, 10)]
    assert values[0] == 5.0 and math.isclose(schedule(100), 0.01) and schedule(150) == schedule(100)
    assert all(a > b for a, b in zip(values[:10], values[1:11]))
    with pytest.raises(ValueError, match="end"):
        AnnealedTemperature(start=5.0, end=0.0)


def test_loss_terms_match_their_equations():
    samples = torch.tensor([[[1.0, 0, 0], [0, 0, 1.0]], [[0, 1.0, 0], [0, 1.0, 0]]])  # [B=2,T=2,3]
    costs = torch.tensor([4.0, 2.0, 0.0])
    # eq. 10: per clip the sum over frames, then the mean over clips: ((4+0) + (2+2)) / 2
    assert float(efficiency_loss_eq10(samples, costs)) == 4.0
    # eq. 11 (squared): usage (1/4, 1/2, 1/4) against 1/3 each
    expected = (0.25 - 1 / 3) ** 2 * 2 + (0.5 - 1 / 3) ** 2
    assert math.isclose(float(balance_loss_eq11(samples)), expected, rel_tol=1e-6)
    uniform = torch.eye(3).repeat(2, 1).view(2, 3, 3)
    assert float(balance_loss_eq11(uniform)) < 1e-12
    # eq. 12: uniform logits have entropy log |Omega| per frame, summed over T = 2
    assert math.isclose(float(entropy_loss_eq12(torch.zeros(4, 2, 3))), 2 * math.log(3),
                        rel_tol=1e-6)


# ---------------------------------------------------------------- the executor
def test_policy_forced_to_the_top_precision_reproduces_frame_quantization_exactly():
    family = _model("{W8A8,W4A4,W2A2,skip}")
    fixed = resq.convert(_net(), resq.ResQConfig(scheme="W8A8", calibration=SEARCH))
    resq.calibrate(fixed, CALIB, progress=False)
    fixed.eval()
    _force(family, 0)
    video = _video()
    with torch.no_grad():
        assert torch.equal(family(video), fixed(video))
    assert bool((family.last_actions == 0).all())
    policy_bops = family.frame_policy.bops(tuple(video.shape[2:]))
    assert family.last_cost.mean_bops == pytest.approx(fixed.last_cost.mean_bops + policy_bops)


def test_policy_forced_to_one_residual_precision_reproduces_static_resq_exactly():
    family = _model("W8A8->{W8A4,W4A4,skip,key}", period=3)
    fixed = resq.convert(_net(), resq.ResQConfig(scheme="W8A8->W8A4", period=3,
                                                 calibration=SEARCH))
    resq.calibrate(fixed, CALIB, progress=False)
    fixed.eval()
    _force(family, 0)
    video = _video(frames=7)
    with torch.no_grad():
        assert torch.equal(family(video), fixed(video))
    assert torch.equal(family.last_keyframes, fixed.last_keyframes)
    assert family.last_actions[:, 0].eq(SCHEDULED_KEYFRAME).all()
    assert family.last_actions[:, 1].eq(0).all()
    assert not family.last_refreshes.any()


def test_lower_member_forced_runs_the_truncated_views():
    """Forced to W4A4, every layer runs its member's path: the layer-by-layer composition of
    FamilyPaths.frame_forward (the truncated weight, its own range, the bias)."""
    qm = _model("{W8A8,W4A4,skip}")
    _force(qm, 1)
    frame = _video(frames=1)
    with torch.no_grad():
        y = qm(frame)[:, 0]
        layers = [m for _, m in qm.resq_layers()]
        expected = layers[1].family.frame_forward(
            layers[1], 1, torch.relu(layers[0].family.frame_forward(layers[0], 1, frame[:, 0])))
    assert torch.equal(y, expected)
    assert not torch.equal(y, qm.model(frame[:, 0]))  # the W8A8 keyframe path differs


def test_skip_costs_zero_and_returns_the_previous_output():
    for scheme in ("{W8A8,W4A4,skip}", "W8A8->{W4A4,skip,key}"):
        qm = _model(scheme, period=100)
        skip = [str(a) for a in qm.config.scheme.family].index("skip")
        _force(qm, skip)
        video = _video(frames=5)
        with torch.no_grad():
            y = qm(video)
        # The first frame cannot skip (no output yet); then every frame reuses it.
        assert bool((qm.last_actions[:, 1:] == skip).all())
        assert not bool((qm.last_actions[:, 0] == skip).any())
        for t in range(1, 5):
            assert torch.equal(y[:, t], y[:, 0])
        policy_bops = qm.frame_policy.bops(tuple(video.shape[2:]))
        assert torch.equal(qm.last_row_bops[:, 1:],
                           torch.full((3, 4), float(policy_bops), dtype=torch.float64))


def _hand_macs() -> list[int]:
    # conv1: 8x8 outputs x 6 channels x (3 inputs x 3x3); conv2: 8x8 x 4 x (6 x 3x3)
    return [SIZE * SIZE * 6 * 3 * 9, SIZE * SIZE * 4 * 6 * 9]


@pytest.mark.parametrize("scheme", ["{W8A8,W4A4,W2A2,skip}", "W8A8->{W8A4,W4A4,skip,key}"])
def test_per_frame_cost_adds_up_to_last_cost(scheme):
    qm = _model(scheme, period=4)
    video = _video(batch=4, frames=8)
    _scramble(qm, video)
    with torch.no_grad():
        qm(video)
    actions, row_bops = qm.last_actions, qm.last_row_bops
    assert len(set(actions.flatten().tolist())) >= 3  # a mix of actions
    family = qm.config.scheme.family
    policy = qm.frame_policy.bops(tuple(video.shape[2:]))
    macs = sum(_hand_macs())
    for b in range(4):
        for t in range(8):
            a = int(actions[b, t])
            if a == SCHEDULED_KEYFRAME or family[a].kind == "key":
                bits = 8 * 8
            elif family[a].kind == "skip":
                bits = 0
            else:
                p = family[a].precision
                bits = p.weight_bits * p.act_bits[0]
            assert float(row_bops[b, t]) == macs * bits + policy
    report = qm.last_cost
    assert report.per_frame == pytest.approx(row_bops.mean(0).tolist())
    assert report.mean_policy_bops == policy
    assert sum(report.per_layer.values()) * 8 == pytest.approx(
        sum(report.per_frame) - 8 * policy)


def test_rows_are_independent():
    qm = _model("W8A8->{W8A4,W4A4,skip,key}", period=4)
    video = _video(batch=3, frames=8)
    _scramble(qm, video, seed=4)
    with torch.no_grad():
        together = qm(video)
        actions = qm.last_actions.clone()
        for b in range(3):
            alone = qm(video[b:b + 1])
            assert torch.equal(qm.last_actions[0], actions[b])
            torch.testing.assert_close(alone[0], together[b], rtol=0, atol=1e-5)
    assert len(set(tuple(r) for r in actions.tolist())) > 1  # the rows did choose differently


def test_stepping_equals_the_clip_and_reset_equals_fresh():
    qm = _model("W8A8->{W8A4,W4A4,skip,key}", period=3)
    video = _video(frames=6)
    _scramble(qm, video, seed=2)
    with torch.no_grad():
        clip = qm(video)
        clip_actions = qm.last_actions.clone()
        qm.reset()
        steps = []
        for t in range(6):
            steps.append(qm.step(video[:, t]))
            assert torch.equal(qm.last_actions[:, 0], clip_actions[:, t])
    torch.testing.assert_close(torch.stack(steps, 1), clip, rtol=0, atol=0)


def test_step_clip_in_chunks_equals_the_clip_and_refuses_tuple_inputs():
    qm = _model("W8A8->{W8A4,W4A4,skip,key}", period=3)
    video = _video(frames=7)
    _scramble(qm, video, seed=2)
    with torch.no_grad():
        clip = qm(video)
        clip_actions = qm.last_actions.clone()
        qm.reset()
        first = qm.step_clip(video[:, :3])
        second = qm.step_clip(video[:, 3:])
    assert torch.equal(qm.last_actions, clip_actions[:, 3:])  # the last call's frames
    torch.testing.assert_close(torch.cat([first, second], 1), clip, rtol=0, atol=0)
    with pytest.raises(TypeError, match="family schemes take one tensor"):
        qm.step((video[:, 0],))


def test_training_output_gradient_reaches_the_policy():
    qm = _model("{W8A8,W4A4,skip}").train()
    y = qm(_video(frames=3))
    y.square().mean().backward()
    grads = [p.grad for p in qm.frame_policy.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert qm.last_policy.samples.requires_grad


def test_policy_parameters_live_in_the_state_dict():
    qm = _model("{W8A8,W4A4,skip}")
    video = _video()
    _scramble(qm, video)
    state = qm.state_dict()
    assert "frame_policy.head.weight" in state
    other = resq.convert(_net(), qm.config)
    other.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(video), qm(video))


def test_recognition_average_excludes_skipped_frames():
    outputs = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    actions = torch.tensor([[0, 2, 1, 2], [2, 2, 2, 0]])
    got = recognition_average(outputs, actions, skip_index=2)
    expected = torch.stack([(outputs[0, 0] + outputs[0, 2]) / 2, outputs[1, 3]])
    assert torch.equal(got, expected)
    assert torch.equal(recognition_average(outputs, actions, None), outputs.mean(1))


# ---------------------------------------------------------------- the two training stages
def _teacher():
    return _net()


def test_forced_context_sets_and_restores_the_action():
    qm = _model("{W8A8,W4A4,skip}")
    video = _video(frames=3)
    with torch.no_grad(), qm.frame_policy.forced(2):
        qm(video)
    # skip is refused on the first frame (no output yet): the highest member runs instead
    assert qm.last_actions.tolist() == [[0, 2, 2]] * 3
    assert qm.frame_policy.forced_action is None
    with pytest.raises(ValueError, match="action"):
        with qm.frame_policy.forced(3):
            pass


@pytest.mark.slow
def test_train_policy_lowers_bops_and_leaves_the_backbone_frozen():
    from resq_brevitas.policy.videoiq_training import train_policy

    qm = _model("{W8A8,W4A4,W2A2,skip}")
    clips = [_video(batch=2, frames=4, seed=s) for s in range(2)]
    backbone = {k: v.clone() for k, v in qm.model.state_dict().items()}
    with torch.no_grad():
        qm(clips[0])
    before = qm.last_cost.mean_bops
    history = train_policy(qm, clips, _teacher(), steps=12, lr=0.05, w_efficiency=5.0,
                           progress=False)
    assert len(history) == 12 and history[0]["temperature"] == 5.0
    assert history[-1]["temperature"] < history[0]["temperature"]
    with torch.no_grad():
        qm(clips[0])
    assert qm.last_cost.mean_bops < before
    for key, value in qm.model.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    assert all(p.requires_grad for p in qm.model.parameters())


@pytest.mark.slow
def test_train_any_precision_lowers_the_eq9_loss_and_leaves_the_policy():
    from resq_brevitas.policy.videoiq_training import (
        any_precision_loss_eq9,
        teacher_outputs,
        train_any_precision,
    )

    qm = _model("{W8A8,W4A4,W2A2,skip}")
    teacher = _teacher()
    video = _video(batch=2, frames=3)
    policy = {k: v.clone() for k, v in qm.frame_policy.state_dict().items()}
    with torch.no_grad():
        before = float(any_precision_loss_eq9(qm, video, teacher_outputs(teacher, video)))
    history = train_any_precision(qm, [video], teacher, steps=8, lr=3e-3, progress=False)
    with torch.no_grad():
        after = float(any_precision_loss_eq9(qm, video, teacher_outputs(teacher, video)))
    assert len(history) == 8 and after < before
    for key, value in qm.frame_policy.state_dict().items():
        assert torch.equal(value, policy[key]), key
