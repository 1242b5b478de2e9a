"""Export of family-scheme models with a learned frame policy (VideoIQ, issue 10 item 7): the
policy graph and one step graph per action, driven frame by frame in onnxruntime (and qonnx),
against the PyTorch model's outputs and chosen actions."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import resq_brevitas as resq
from resq_brevitas.deploy import Manifest, OnnxStream, export, export_artifacts
from resq_brevitas.deploy.runtime import SCHEDULED_KEYFRAME, PolicyOnnxStream
from tests.helpers import force_policy, scramble_policy

SIZE = 16
FRAMES = 8
PERIOD = 4
FRAME_FAMILY = "{W8A8,W4A4,W2A2,skip}"
RESIDUAL_FAMILY = "W8A8->{W8A4,W4A4,skip,key}"
CALIB = [torch.randn(2, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s))
         for s in range(2)]
SEARCH = resq.LineSearch(candidates=6, samples=8)
# input_size < SIZE: the exported policy graph downsamples the frame as PyTorch does.
POLICY = resq.LearnedFramePolicy(input_size=8, channels=(4,), hidden=8)
# Outputs of the graphs and of PyTorch agree to float rounding (measured ~1e-7); one flipped
# quantization step of the W2A2 member would be ~1e-1.
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1)).eval()


def _video(batch: int = 3, frames: int = FRAMES, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, 3, SIZE, SIZE, generator=g)
    return base + 0.1 * torch.randn(batch, frames, 3, SIZE, SIZE, generator=g).cumsum(1)


def _model(scheme: str, period: int = PERIOD) -> resq.ResQModel:
    config = resq.ResQConfig(scheme=scheme, period=period, policy=POLICY, calibration=SEARCH)
    qm = resq.convert(_net(), config)
    resq.calibrate(qm, CALIB, progress=False)
    return qm.eval()


def _fixed(scheme: str, period: int = PERIOD) -> resq.ResQModel:
    qm = resq.convert(_net(), resq.ResQConfig(scheme=scheme, period=period, calibration=SEARCH))
    resq.calibrate(qm, CALIB, progress=False)
    return qm.eval()


def _policy_actions(qm: resq.ResQModel, video: torch.Tensor, carry: bool) -> torch.Tensor:
    """The eval argmax of the PyTorch policy per frame (skip masked on the first frame), with
    the LSTM state carried or restarted every frame: what a runtime that forgets it computes."""
    policy = qm.frame_policy
    skip = [a.kind for a in qm.config.scheme.family].index("skip")
    chosen, state = [], None
    with torch.no_grad():
        for t in range(video.shape[1]):
            logits, new_state = policy(video[:, t], state if carry else None)
            if t == 0:
                logits = logits.clone()
                logits[:, skip] = -1e9
            chosen.append(logits.argmax(-1))
            state = new_state
    return torch.stack(chosen, 1)


def _constants(path) -> list[np.ndarray]:
    """Every constant tensor of an ONNX graph: initializers and ``Constant`` nodes."""
    graph = onnx.load(str(path)).graph
    found = [numpy_helper.to_array(t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            found += [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    return found


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return _video()


def _scrambled(scheme: str, video: torch.Tensor, seed: int) -> tuple[Any, ...]:
    """A family model whose policy takes varied actions on ``video``; its outputs and actions."""
    qm = _model(scheme)
    scramble_policy(qm, video, seed=seed)
    with torch.no_grad():
        reference = qm(video).numpy()
    return qm, reference, qm.last_actions.numpy()


@pytest.fixture(scope="module")
def frame_family(video):
    return _scrambled(FRAME_FAMILY, video, seed=0)


@pytest.fixture(scope="module")
def residual_family(video):
    return _scrambled(RESIDUAL_FAMILY, video, seed=1)


def _exported(family: tuple[Any, ...], video: torch.Tensor, out: Path) -> Path:
    export(family[0], video[:, 0], out, format="qcdq")
    return out


@pytest.fixture(scope="module")
def frame_dir(frame_family, video, tmp_path_factory):
    return _exported(frame_family, video, tmp_path_factory.mktemp("frame_family"))


@pytest.fixture(scope="module")
def residual_dir(residual_family, video, tmp_path_factory):
    return _exported(residual_family, video, tmp_path_factory.mktemp("residual_family"))


def _assert_sensitive(qm: resq.ResQModel, video: torch.Tensor, actions: np.ndarray) -> None:
    """The clip would expose a runtime that restarts the LSTM state every frame, or that runs
    the policy after the step graph (each frame then takes the previous frame's decision)."""
    carried = _policy_actions(qm, video, carry=True)
    restarted = _policy_actions(qm, video, carry=False)
    assert not torch.equal(carried, restarted)
    policy_chosen = actions != SCHEDULED_KEYFRAME
    assert not np.array_equal(actions[:, 1:][policy_chosen[:, 1:]],
                              actions[:, :-1][policy_chosen[:, 1:]])


# ---------------------------------------------------------------- frame family (VideoIQ)
@pytest.mark.parametrize("format", ["qcdq", "qonnx"])
def test_frame_family_stream_reproduces_pytorch_outputs_and_actions(
        format, frame_family, frame_dir, video, tmp_path):
    qm, reference, actions = frame_family
    # Every action of the family is taken somewhere in the clip, skip included.
    assert set(np.unique(actions)) == {0, 1, 2, 3}
    _assert_sensitive(qm, video, actions)
    out = frame_dir if format == "qcdq" else tmp_path
    if format == "qonnx":
        export(qm, video[:, 0], out, format="qonnx")
    stream = OnnxStream(out)
    assert isinstance(stream, PolicyOnnxStream)
    assert stream.backend == ("onnxruntime" if format == "qcdq" else "qonnx")
    y = stream.run(video)
    np.testing.assert_array_equal(stream.last_actions, actions)
    for t in range(FRAMES):  # frame by frame
        np.testing.assert_allclose(y[:, t], reference[:, t], rtol=0, atol=ATOL)
    # A skipped frame is the row's previous output, bit for bit (nothing ran).
    rows, frames = np.nonzero(actions == 3)
    assert rows.size and all(np.array_equal(y[r, t], y[r, t - 1]) for r, t in zip(rows, frames))
    # The policy state carried to the end is PyTorch's after the clip.
    with torch.no_grad():
        state = None
        for t in range(FRAMES):
            _, state = qm.frame_policy(video[:, t], state)
    for got, want in zip(stream.policy_state, state):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


def test_stepping_frame_by_frame_equals_run_and_reset_restarts(frame_family, frame_dir, video):
    _, reference, actions = frame_family
    stream = OnnxStream(frame_dir)
    stream.run(video[:, :3])  # a previous stream, then a new one
    stream.reset()
    steps = np.stack([stream.step(video[:, t]) for t in range(FRAMES)], 1)
    np.testing.assert_allclose(steps, reference, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(stream.last_actions, actions)
    assert stream.last_logits.shape == (3, FRAMES, 4)


def test_frame_family_manifest_lists_actions_graphs_and_policy_state(frame_family, frame_dir,
                                                                    video):
    qm, _, _ = frame_family
    manifest = Manifest.read(frame_dir)
    data = json.loads((frame_dir / "manifest.json").read_text())
    assert data["version"] == 3 and Manifest.from_dict(data) == manifest
    assert [(a.index, a.name, a.kind, a.graph, a.file) for a in manifest.actions] == [
        (0, "W8A8", "precision", "keyframe", "keyframe.onnx"),
        (1, "W4A4", "precision", "frame_W4A4", "frame_W4A4.onnx"),
        (2, "W2A2", "precision", "frame_W2A2", "frame_W2A2.onnx"),
        (3, "skip", "skip", None, None)]
    assert all((frame_dir / a.file).is_file() for a in manifest.actions if a.file)
    assert manifest.files == {"policy": "policy.onnx", "keyframe": "keyframe.onnx",
                              "frame_W4A4": "frame_W4A4.onnx", "frame_W2A2": "frame_W2A2.onnx"}
    policy = manifest.policy
    assert (policy.side, policy.skip_index, policy.key_index, policy.top_index) == (
        "frame", 3, None, 0)
    # The default inputs ("frame", "difference") carry the previous downsampled frame too.
    assert [(e.name, e.shape) for e in policy.state] == [("policy.h", [3, 8]),
                                                         ("policy.c", [3, 8]),
                                                         ("policy.previous", [3, 3, 8, 8])]
    assert manifest.state == []  # frame-family graphs carry no ResQ state
    session = ort.InferenceSession(str(frame_dir / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == ["frame", "policy.h", "policy.c",
                                                      "policy.previous"]
    assert [o.name for o in session.get_outputs()] == ["logits", "policy.h_out",
                                                       "policy.c_out", "policy.previous_out"]
    assert manifest.parity["levels"]["faithful"]["faithful"]
    # Each lower member's graph stores its own float copy of the truncated weight (exactly the
    # PyTorch view); the keyframe graph keeps integer weights.
    assert "float32 copy" in manifest.actions[1].weights
    first = next(layer for _, layer in qm.resq_layers())
    with torch.no_grad():
        view = first.family.path(1).quant_weight().numpy()
    stored = _constants(frame_dir / "frame_W4A4.onnx")
    assert any(a.shape == view.shape and np.array_equal(a, view) for a in stored)
    key = _constants(frame_dir / "keyframe.onnx")
    assert any(a.dtype == np.int8 and a.shape == view.shape for a in key)
    assert not any(a.shape == view.shape and a.dtype == np.float32 for a in key)


# ---------------------------------------------------------------- residual family (ResQ + policy)
def test_residual_family_stream_reproduces_pytorch_with_skip_key_and_schedule(
        residual_family, residual_dir, video):
    qm, reference, actions = residual_family
    # Both residual precisions, skip, the policy's key and the schedule's keyframes occur.
    assert set(np.unique(actions)) == {SCHEDULED_KEYFRAME, 0, 1, 2, 3}
    assert (actions[:, 1:] == 3).any()  # a learned refresh, not only the stream start
    # After a refresh a row's schedule restarts: in some frame rows are at different phases
    # (a runtime with one phase for the whole batch differs there).
    scheduled = actions == SCHEDULED_KEYFRAME
    assert (scheduled.any(0) & ~scheduled.all(0)).any()
    _assert_sensitive(qm, video, actions)
    stream = OnnxStream(residual_dir)
    y = stream.run(video)
    np.testing.assert_array_equal(stream.last_actions, actions)
    for t in range(FRAMES):
        np.testing.assert_allclose(y[:, t], reference[:, t], rtol=0, atol=ATOL)
    manifest = stream.manifest
    assert [(a.name, a.graph) for a in manifest.actions] == [
        ("W8A4", "residual"), ("W4A4", "residual_W4A4"), ("skip", None), ("key", "keyframe")]
    assert (manifest.policy.side, manifest.period) == ("residual", PERIOD)
    assert len(manifest.state) == 2 * len(list(qm.resq_layers()))
    assert manifest.io("residual_W4A4").inputs == ["frame", *manifest.state_names]


# ---------------------------------------------------------------- forced policies
@pytest.mark.parametrize("scheme,fixed_scheme,period", [
    (FRAME_FAMILY, "W8A8", 1), (RESIDUAL_FAMILY, "W8A8->W8A4", 3)])
def test_policy_forced_to_one_action_streams_like_the_fixed_precision_export(
        scheme, fixed_scheme, period, video, tmp_path):
    family = _model(scheme, period=period)
    force_policy(family, 0)
    fixed = _fixed(fixed_scheme, period=period)
    export(family, video[:, 0], tmp_path / "family", format="qcdq")
    export(fixed, video[:, 0], tmp_path / "fixed", format="qcdq")
    stream = OnnxStream(tmp_path / "family")
    y = stream.run(video)
    expected = OnnxStream(tmp_path / "fixed").run(video)
    assert not isinstance(OnnxStream(tmp_path / "fixed"), PolicyOnnxStream)
    np.testing.assert_array_equal(y, expected)
    with torch.no_grad():
        np.testing.assert_allclose(y, fixed(video).numpy(), rtol=0, atol=ATOL)
    taken = set(np.unique(stream.last_actions))
    assert taken == ({0} if period == 1 else {0, SCHEDULED_KEYFRAME})


@pytest.mark.parametrize("how", ["context", "head"])
def test_skip_is_refused_on_the_first_frame_then_reuses_it(how, video, tmp_path):
    """``forced(skip)`` is exported as ``forced_action`` (the first frame falls back to the top
    member, W8A8); a head whose logits favour skip, then W4A4, has skip masked on the first frame
    by the host (the argmax of the rest, W4A4), as ``FramePolicyNetwork.sample`` masks it."""
    qm = _model(FRAME_FAMILY)
    if how == "head":
        force_policy(qm, 3)
        with torch.no_grad():
            qm.frame_policy.head.bias[1] = 10.0
    forced = qm.frame_policy.forced(3) if how == "context" else contextlib.nullcontext()
    with forced, torch.no_grad():
        reference = qm(video).numpy()
        expected_actions = qm.last_actions.numpy()
        manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert manifest.policy.forced_action == (3 if how == "context" else None)
    assert qm.frame_policy.forced_action is None
    stream = OnnxStream(tmp_path)
    y = stream.run(video)
    np.testing.assert_array_equal(stream.last_actions, expected_actions)
    first = 0 if how == "context" else 1
    assert (stream.last_actions[:, 0] == first).all() and (stream.last_actions[:, 1:] == 3).all()
    np.testing.assert_allclose(y, reference, rtol=0, atol=ATOL)
    assert all(np.array_equal(y[:, t], y[:, 0]) for t in range(FRAMES))


# ---------------------------------------------------------------- bad input
def test_bad_formats_and_frames_are_rejected_and_nothing_is_written(frame_family, video,
                                                                    tmp_path):
    qm, _, _ = frame_family
    with pytest.raises(ValueError, match=r"format must be one of .*got 'fx'"):
        export(qm, video[:, 0], tmp_path / "fx", format="fx")
    with pytest.raises(ValueError, match=r"formats item 'fx' cannot express a learned frame"):
        export_artifacts(qm, _net(), video[:, 0], tmp_path / "art", ["qcdq", "fx"])
    with pytest.raises(ValueError, match="example_frame"):
        export(qm, video[:, 0, :2], tmp_path / "channels", format="qcdq")
    with pytest.raises(ValueError, match=r"input_size=8 must divide .* shape \(3, 3, 20, 20\)"):
        export(qm, torch.randn(3, 3, 20, 20), tmp_path / "size", format="qcdq")
    assert not any(tmp_path.iterdir())


def test_policy_stream_refuses_an_export_without_a_policy(video, tmp_path):
    export(_fixed("W8A8->W4A4"), video[:, 0], tmp_path, format="qcdq")
    with pytest.raises(ValueError, match="without a learned frame policy"):
        PolicyOnnxStream(tmp_path)
    stream = OnnxStream(tmp_path)
    assert type(stream) is OnnxStream


# ---------------------------------------------------------------- truncated weights of plain ResQ
def test_truncated_residual_weights_export_as_float_copies_and_stream_like_pytorch(video,
                                                                                  tmp_path):
    """``residual_weights="truncated"`` (one integer weight for both paths in PyTorch): the
    residual graph stores the truncated, mean-aligned weight itself, not a fresh 4-bit one."""
    qm = resq.convert(_net(), resq.ResQConfig(scheme="W8A8->W4A4", period=PERIOD,
                                              residual_weights="truncated", calibration=SEARCH))
    resq.calibrate(qm, CALIB, progress=False)
    qm.eval()
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert manifest.extra["truncated_weights_stored_as_float"] == [
        f"resq_residual_step.{name}.layer.residual.view" for name, _ in qm.resq_layers()]
    with torch.no_grad():
        reference = qm(video).numpy()
        view = next(layer for _, layer in qm.resq_layers()).residual.quant_weight().numpy()
    np.testing.assert_allclose(OnnxStream(tmp_path).run(video), reference, rtol=0, atol=ATOL)
    assert any(a.shape == view.shape and np.array_equal(a, view)
               for a in _constants(tmp_path / "residual.onnx"))


class _CheckedNet(nn.Module):
    """``_net``'s layers behind a check on values: torch.fx cannot trace it (eager steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite")
        return self.body(x)


def test_untraceable_model_exports_eager_action_graphs(video, tmp_path):
    config = resq.ResQConfig(scheme=RESIDUAL_FAMILY, period=PERIOD, policy=POLICY,
                             calibration=SEARCH)
    qm = resq.convert(_CheckedNet().eval(), config)
    resq.calibrate(qm, CALIB, progress=False)
    qm.eval()
    scramble_policy(qm, video, seed=1)
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert manifest.graph_source == "eager"
    with torch.no_grad():
        reference = qm(video).numpy()
    stream = OnnxStream(tmp_path)
    np.testing.assert_allclose(stream.run(video), reference, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(stream.last_actions, qm.last_actions.numpy())
    assert {0, 1} <= set(np.unique(stream.last_actions))  # both residual members' graphs ran


# ---------------------------------------------------------------- policy inputs and state
def _frozen_video() -> torch.Tensor:
    """Drifting clips whose row 0 freezes on frame 2 for frames 3-5 (bit-identical copies)."""
    video = _video()
    video[0, 3:6] = video[0, 2]
    return video


def test_policy_graph_carries_the_previous_frame_and_matches_pytorch_over_frames(tmp_path):
    inputs = ("frame", "difference", "mean_abs_difference")
    config = resq.ResQConfig(scheme=RESIDUAL_FAMILY, period=PERIOD, calibration=SEARCH,
                             policy=resq.LearnedFramePolicy(input_size=8, channels=(4,),
                                                            hidden=8, inputs=inputs))
    qm = resq.convert(_net(), config)
    resq.calibrate(qm, CALIB, progress=False)
    qm.eval()
    video = _frozen_video()
    scramble_policy(qm, video, seed=2)
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    names = [e.name for e in manifest.policy.state]
    assert names == ["policy.h", "policy.c", "policy.previous"]
    session = ort.InferenceSession(str(tmp_path / "policy.onnx"))
    state = [np.zeros(e.shape, dtype=np.float32) for e in manifest.policy.state]
    torch_state = None
    for t in range(FRAMES):
        frame = video[:, t]
        with torch.no_grad():
            logits, torch_state = qm.frame_policy(frame, torch_state)
        feeds = {"frame": frame.numpy(), **dict(zip(names, state))}
        got, *state = session.run(None, feeds)
        np.testing.assert_allclose(got, logits.numpy(), rtol=0, atol=1e-5)
        for mine, want in zip(state, torch_state):
            np.testing.assert_allclose(mine, want.numpy(), rtol=0, atol=1e-5)
        # The carried previous frame is this frame downsampled, so the frozen copies see a
        # zero difference; a graph fed a black previous frame instead would see the frame.
        np.testing.assert_allclose(state[2], torch.nn.functional.adaptive_avg_pool2d(
            frame, 8).numpy(), rtol=0, atol=1e-6)
        if t == 4:  # row 0 frozen: the previous frame changes the logits
            black = session.run(None, {**feeds, "policy.previous": np.zeros_like(state[2])})[0]
            assert np.abs(black[0] - got[0]).max() > 1e-3


def test_a_frame_only_policy_exports_the_lstm_state_alone(video, tmp_path):
    config = resq.ResQConfig(scheme=FRAME_FAMILY, period=PERIOD, calibration=SEARCH,
                             policy=resq.LearnedFramePolicy(input_size=8, channels=(4,),
                                                            hidden=8, inputs=("frame",)))
    qm = resq.convert(_net(), config)
    resq.calibrate(qm, CALIB, progress=False)
    qm.eval()
    scramble_policy(qm, video, seed=0)
    with torch.no_grad():
        reference = qm(video).numpy()
        actions = qm.last_actions.numpy()
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert [e.name for e in manifest.policy.state] == ["policy.h", "policy.c"]
    session = ort.InferenceSession(str(tmp_path / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == ["frame", "policy.h", "policy.c"]
    stream = OnnxStream(tmp_path)
    np.testing.assert_allclose(stream.run(video), reference, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(stream.last_actions, actions)
