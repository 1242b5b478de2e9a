"""Bad input gets a clear error and leaves the model working and its stream intact."""

from __future__ import annotations

import pytest
import torch

import resq_brevitas as resq
from tests.helpers import make_all_layers_net, make_clip


@pytest.fixture(scope="module")
def streaming_model() -> resq.ResQModel:
    qm = resq.convert(make_all_layers_net(), resq.ResQConfig(period=4))
    return resq.calibrate(qm, [make_clip(batch=1, frames=6)[0]], samples=6, candidates=6,
                          progress=False)


BAD_FRAMES = [
    ("channels", torch.randn(2, 5, 16, 16), ValueError, r"3 channels.*got 5"),
    ("rank", torch.randn(2, 3, 16), ValueError, r"rank 4.*got rank 3"),
    ("nan", torch.full((2, 3, 16, 16), float("nan")), ValueError, "NaN or Inf"),
    ("inf", torch.full((2, 3, 16, 16), float("inf")), ValueError, "NaN or Inf"),
    ("batch", torch.randn(3, 3, 16, 16), ValueError, "changed mid-stream"),
    ("size", torch.randn(2, 3, 20, 20), ValueError, "changed mid-stream"),
    ("dtype", torch.ones(2, 3, 16, 16, dtype=torch.long), TypeError, "floating-point"),
    ("type", [[1.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("label,frame,error,match", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frame_mid_stream_leaves_stream_intact(streaming_model, label, frame, error,
                                                   match) -> None:
    qm = streaming_model
    clip = make_clip(batch=2, frames=6, seed=11)
    with torch.no_grad():
        expected = qm(clip)["seg"]
        qm.reset()
        got = [qm.step(clip[:, t])["seg"] for t in range(3)]
        with pytest.raises(error, match=match):
            qm.step(frame)
        got += [qm.step(clip[:, t])["seg"] for t in range(3, 6)]
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


def test_new_shape_allowed_after_reset(streaming_model) -> None:
    qm = streaming_model
    with torch.no_grad():
        qm.reset()
        qm.step(torch.randn(2, 3, 16, 16))
        qm.reset()
        out = qm.step(torch.randn(3, 3, 20, 20))
    assert out["seg"].shape == (3, 4, 20, 20)


@pytest.mark.parametrize(
    "video,error,match",
    [
        (torch.randn(2, 3, 16, 16), ValueError, "rank 5"),
        (torch.randn(2, 0, 3, 16, 16), ValueError, "at least one frame"),
        (torch.randn(1, 4, 2, 16, 16), ValueError, "3 channels"),
        (torch.tensor(float("nan")).expand(1, 4, 3, 16, 16).clone(), ValueError, "NaN"),
    ],
)
def test_bad_video_leaves_stream_intact(streaming_model, video, error, match) -> None:
    qm = streaming_model
    clip = make_clip(batch=2, frames=5, seed=12)
    with torch.no_grad():
        expected = qm(clip)["seg"]
        qm.reset()
        got = [qm.step(clip[:, t])["seg"] for t in range(2)]
        with pytest.raises(error, match=match):
            qm(video)
        got += [qm.step(clip[:, t])["seg"] for t in range(2, 5)]
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


def test_failure_inside_the_model_rolls_back(streaming_model) -> None:
    """An error raised by the wrapped model mid-forward leaves every layer's reference as it was."""
    qm = streaming_model
    clip = make_clip(batch=2, frames=4, seed=13)
    with torch.no_grad():
        expected = qm(clip)["seg"]
        qm.reset()
        got = [qm.step(clip[:, 0])["seg"]]
        conv1d = dict(qm.resq_layers())["conv1d"]

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        conv1d.residual.contribution = broken
        try:
            with pytest.raises(RuntimeError, match="boom"):
                qm.step(clip[:, 1])
        finally:
            del conv1d.residual.contribution  # the class's method again
        got += [qm.step(clip[:, t])["seg"] for t in range(1, 4)]
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


def test_calibrate_errors_keep_model_usable(streaming_model) -> None:
    qm = streaming_model
    clip = make_clip(batch=1, frames=4, seed=14)
    with torch.no_grad():
        before = qm(clip)["seg"]
    with pytest.raises(ValueError, match="at least one frame"):
        resq.calibrate(qm, [], progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        resq.calibrate(qm, iter([clip[0]]), progress=False)
    with pytest.raises(TypeError, match="clips"):
        resq.calibrate(qm, clip, progress=False)
    with pytest.raises(TypeError, match="qm must be a ResQModel"):
        resq.calibrate(make_all_layers_net(), [clip[0]], progress=False)
    with pytest.raises(ValueError, match="at least 2 frames"):
        resq.calibrate(qm, [clip[0, :1]], progress=False)
    with pytest.raises(ValueError, match="channels"):
        resq.calibrate(qm, [torch.randn(4, 5, 16, 16)], progress=False)
    with torch.no_grad():
        after = qm(clip)["seg"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_convert_rejects_bare_layer() -> None:
    with pytest.raises(ValueError, match="nn.Sequential"):
        resq.convert(torch.nn.Conv2d(3, 3, 1))


def test_a_reused_frame_buffer_is_not_the_reference(streaming_model) -> None:
    """Decoders write each frame into one buffer: the model must keep its own copies."""
    qm = streaming_model
    clip = make_clip(batch=2, frames=6, seed=15)
    with torch.no_grad():
        expected = qm(clip)["seg"]
        qm.reset()
        buffer = torch.empty_like(clip[:, 0])
        got = []
        for t in range(6):
            buffer.copy_(clip[:, t])
            got.append(qm.step(buffer)["seg"])
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


@pytest.mark.parametrize("execution", ["auto", "sequential"])
def test_editing_a_clip_after_forward_does_not_reach_the_stream(streaming_model,
                                                                execution) -> None:
    qm = streaming_model
    qm.clip_execution = execution
    try:
        clip = make_clip(batch=2, frames=7, seed=16)
        with torch.no_grad():
            qm(clip[:, :5])
            expected = [qm.step(clip[:, t])["seg"] for t in (5, 6)]
            edited = clip.clone()
            qm(edited[:, :5])
            edited.zero_()  # the caller reuses its clip tensor
            got = [qm.step(clip[:, t])["seg"] for t in (5, 6)]
    finally:
        qm.clip_execution = "auto"
    torch.testing.assert_close(torch.stack(got, 1), torch.stack(expected, 1), rtol=0, atol=0)


def test_step_after_forward_has_its_own_autograd_graph() -> None:
    qm = resq.convert(make_all_layers_net(), resq.ResQConfig(period=4))
    resq.calibrate(qm, [make_clip(batch=1, frames=4)[0]], samples=4, candidates=4,
                   progress=False)
    clip = make_clip(batch=1, frames=6, seed=17).requires_grad_(True)
    qm.train()
    qm(clip[:, :4])["seg"].sum().backward()
    first = clip.grad.clone()
    out = qm.step(clip[:, 4].detach())["seg"]  # a residual frame against the clip's keyframe
    out.sum().backward()                         # must not backward through the clip's graph
    torch.testing.assert_close(clip.grad, first, rtol=0, atol=0)


def test_dtype_and_device_mismatches_are_clear_errors(streaming_model) -> None:
    qm = streaming_model
    clip = make_clip(batch=2, frames=4, seed=18)
    with torch.no_grad():
        expected = qm(clip)["seg"]
        qm.reset()
        got = [qm.step(clip[:, 0])["seg"]]
        for bad in (clip[:, 1].double(), clip[:, 1].half()):
            with pytest.raises(TypeError, match="frame must have the model's dtype"):
                qm.step(bad)
        with pytest.raises(TypeError, match="video must have the model's dtype"):
            qm(clip.double())
        got += [qm.step(clip[:, t])["seg"] for t in range(1, 4)]
    torch.testing.assert_close(torch.stack(got, 1), expected, rtol=0, atol=0)


def test_switches_refuse_what_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        with resq.quantization_disabled(42):
            pass
