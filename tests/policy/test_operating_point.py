"""ErrorBoundPolicy(target_bops=...): tau solved on calibration clips, held-out accuracy of the
operating point, serialisation, and the warning of a policy that sends every residual to 0 bits."""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import CALIB_SEED, EVAL_SEED
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.policy.error_bound import (
    TARGET_TOLERANCE,
    ErrorBoundSelector,
    OperatingPoint,
    clips_of_frames,
    solve_tau,
)

pytestmark = pytest.mark.usefixtures("single_thread")

POOL = "W8A8->W8A{0,4,8}"
SIZE = 16


def _clips(seed: int, count: int, frames: int = 4) -> torch.Tensor:
    """``count`` demo clips ``[count, T, 3, SIZE, SIZE]`` (one batch: each row its own stream)."""
    return torch.stack([make_clip(seed + i, frames=frames, size=SIZE)[0] for i in range(count)])


def _policy(qm: resq.ResQModel) -> ErrorBoundSelector:
    return next(layer.residual.policy for _, layer in qm.resq_layers()
                if hasattr(layer.residual, "policy"))


def _calibrated(model: torch.nn.Module, policy: resq.ErrorBoundPolicy, clips: torch.Tensor,
                fold_bn: bool = True) -> resq.ResQModel:
    config = resq.ResQConfig(POOL, period=4, policy=policy, fold_bn=fold_bn,
                             calibration=resq.LineSearch(candidates=4, samples=clips.shape[0]
                                                         * clips.shape[1]))
    return resq.calibrate(resq.convert(model, config), [clips], progress=False)


def _w8a8_share(qm: resq.ResQModel, model: torch.nn.Module, clips: torch.Tensor) -> float:
    """Mean BOPs per frame on ``clips`` over W8A8 frame quantization's, from count_bops."""
    with torch.no_grad():
        qm(clips)
    reference = resq.count_bops(model, tuple(clips.shape[2:]), "W8A8").mean_bops
    return qm.last_cost.mean_bops / reference


@pytest.fixture(scope="module")
def demo_model() -> torch.nn.Module:
    return load_demo_model()


def test_target_bops_lands_within_5_percent_on_held_out_demo_clips(demo_model) -> None:
    # Clips differ in how much moves (one to three objects): per clip the share varies by
    # 10-15%, so two sets of 128 clips differ by about 1.5% (one standard error) from sampling
    # alone. The held-out share must be the target within the solver's tolerance plus three
    # standard errors of that difference, measured here from 16 groups of 8 held-out clips.
    calib, held_out = _clips(CALIB_SEED, 128), _clips(EVAL_SEED, 128)
    qm = _calibrated(demo_model, resq.ErrorBoundPolicy(target_bops=0.5), calib)
    policy = _policy(qm)
    assert policy.tau is not None and 0 < policy.tau < math.inf
    assert abs(policy.operating_point.bops_share / 0.5 - 1) <= TARGET_TOLERANCE
    groups = torch.tensor([_w8a8_share(qm, demo_model, held_out[i:i + 8])
                           for i in range(0, held_out.shape[0], 8)])
    standard_error = float(groups.std()) / math.sqrt(groups.numel())
    # both sets are samples of the same distribution: the difference's error is sqrt(2) times
    sampling = 3 * math.sqrt(2) * standard_error
    assert abs(float(groups.mean()) - 0.5) <= 0.5 * TARGET_TOLERANCE + sampling, (
        float(groups.mean()), standard_error)
    # what runs is eq. 11 at the solved tau: the raw-tau policy gives the same outputs
    with torch.no_grad():
        solved = qm(held_out[:8])
        raw = qm.with_policy(resq.ErrorBoundPolicy(tau=policy.tau))(held_out[:8])
    assert torch.equal(solved, raw)


def test_solved_tau_survives_config_round_trip_and_state_dict(demo_model) -> None:
    calib = _clips(CALIB_SEED, 8)
    # fold_bn=False: BatchNorm folding changes the parameters a fresh conversion would hold
    qm = _calibrated(demo_model, resq.ErrorBoundPolicy(target_bops=0.6, granularity="region",
                                                       k=2), calib, fold_bn=False)
    config = resq.ResQConfig.from_dict(json.loads(json.dumps(qm.config.to_dict())))
    assert config == qm.config and config.policy.target_bops == 0.6
    buffer = io.BytesIO()
    torch.save(qm.state_dict(), buffer)
    buffer.seek(0)
    fresh = resq.convert(demo_model, config)
    clip = _clips(EVAL_SEED, 2)
    with pytest.raises(RuntimeError, match="no solved tau"):
        with torch.no_grad():
            fresh(clip)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _policy(fresh).tau == _policy(qm).tau
    with torch.no_grad():
        assert torch.equal(fresh(clip), qm(clip))


def test_a_policy_sending_every_residual_to_zero_bits_warns(demo_model) -> None:
    calib = _clips(CALIB_SEED, 4)
    with pytest.warns(UserWarning, match=r"100\.0% of the residual pixels to 0 bits"):
        qm = _calibrated(demo_model, resq.ErrorBoundPolicy(tau=1e12), calib)
    assert _policy(qm).operating_point.zero_share == 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = _calibrated(demo_model, resq.ErrorBoundPolicy(tau=0.0), calib)
    assert not [w for w in caught if "0 bits" in str(w.message)]
    assert _policy(qm).operating_point.zero_share < 0.5


def test_out_of_reach_targets_are_clamped_with_a_warning(demo_model) -> None:
    calib = _clips(CALIB_SEED, 4)
    with pytest.warns(UserWarning, match="out of reach"):
        low = _calibrated(demo_model, resq.ErrorBoundPolicy(target_bops=0.01), calib)
    assert _policy(low).operating_point.zero_share == 1.0  # as low as the scheme goes
    with pytest.warns(UserWarning, match="out of reach"):
        high = _calibrated(demo_model, resq.ErrorBoundPolicy(target_bops=5.0), calib)
    top = _calibrated(demo_model, resq.ErrorBoundPolicy(tau=0.0), calib)
    assert _policy(high).operating_point.bops_share == pytest.approx(
        _policy(top).operating_point.bops_share, rel=1e-6)
    assert _policy(low).operating_point.bops_share < 0.5 * _policy(high).operating_point.bops_share


def test_solve_tau_finds_a_known_curve() -> None:
    """A smooth decreasing share 1 / (1 + tau) and a staircase, without a model."""
    def smooth(tau: float) -> OperatingPoint:
        return OperatingPoint(1.0 / (1.0 + tau), 0.0)

    tau, point = solve_tau(smooth, 0.25)
    assert abs(point.bops_share / 0.25 - 1) <= TARGET_TOLERANCE
    assert tau == pytest.approx(3.0, rel=0.05)

    def stairs(tau: float) -> OperatingPoint:
        return OperatingPoint(0.8 if tau < 10 else 0.2, 0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reachable ends: no warning
        tau, point = solve_tau(stairs, 0.45)
    assert point.bops_share in (0.8, 0.2) and 0 < tau < math.inf


def test_clips_of_frames_regroups_by_clip_start() -> None:
    frames = [torch.full((2, 1), float(i)) for i in range(5)]
    clips = clips_of_frames(zip([True, False, False, True, False], frames))
    assert [tuple(c.shape) for c in clips] == [(2, 3, 1), (2, 2, 1)]
    assert torch.equal(clips[1][:, 1], frames[4])
    with pytest.raises(ValueError, match="at least one frame"):
        clips_of_frames([])


def test_clips_of_frames_keeps_each_input_of_a_multi_input_frame() -> None:
    frames = [{"frame": torch.full((2, 3), float(i)), "mask": torch.full((2, 1), -float(i))}
              for i in range(4)]
    clips = clips_of_frames(zip([True, False, True, False], frames))
    assert [sorted(c) for c in clips] == [["frame", "mask"]] * 2
    assert tuple(clips[0]["frame"].shape) == (2, 2, 3)
    assert tuple(clips[1]["mask"].shape) == (2, 2, 1)
    assert torch.equal(clips[1]["mask"][:, 0], frames[2]["mask"])
    pairs = clips_of_frames(zip([True, False], [(f["frame"], f["mask"]) for f in frames[:2]]))
    assert torch.equal(pairs[0][1][:, 1], frames[1]["mask"])


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_target_bops_is_solved_on_a_model_with_several_inputs(kind) -> None:
    from tests.helpers import MaskGuidedSegNet, TwoInputFlowNet, make_mask_clip, make_two_input_clip

    torch.manual_seed(0)
    if kind == "tuple":
        net, clip = TwoInputFlowNet().eval(), make_two_input_clip(4, 4, size=12, seed=3)
    else:
        net, clip = MaskGuidedSegNet().eval(), make_mask_clip(4, 4, size=12, seed=3)
    config = resq.ResQConfig(POOL, period=4, policy=resq.ErrorBoundPolicy(target_bops=0.5),
                             calibration=resq.LineSearch(candidates=4, samples=16))
    qm = resq.calibrate(resq.convert(net, config), [clip], progress=False)
    point = _policy(qm).operating_point
    assert abs(point.bops_share / 0.5 - 1) <= TARGET_TOLERANCE
    with torch.no_grad():  # the fit measured what the model spends on the same clip
        qm(clip)
    frames = [tuple(leaf.shape[2:]) for leaf in (clip if kind == "tuple" else clip.values())]
    shapes = frames if kind == "tuple" else dict(zip(clip, frames))
    reference = resq.count_bops(net, shapes, "W8A8").mean_bops
    assert qm.last_cost.mean_bops / reference == pytest.approx(point.bops_share, rel=1e-6)


def test_target_bops_is_validated() -> None:
    with pytest.raises(ValueError, match=r"target_bops must be a finite number > 0, got 0\.0"):
        resq.ErrorBoundPolicy(target_bops=0)
    with pytest.raises(TypeError, match="target_bops must be a real number, got str"):
        resq.ErrorBoundPolicy(target_bops="half")  # type: ignore[arg-type]
