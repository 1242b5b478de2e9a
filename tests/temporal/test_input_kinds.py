"""Frames of any rank and several inputs per frame: a two-input flow model (tuple in, tuple
out), a mask-guided segmentation model (dict in, nested dict out) and a 3D-CNN streaming
sliding clips ``[B, N, C, T', H, W]``: convert, calibrate, exact with quantization disabled,
streaming == clip, rows independent, reset == fresh."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import resq_brevitas as resq
from resq_brevitas.temporal.outputs import (
    flatten_outputs,
    output_names,
    stack_outputs,
    unflatten_outputs,
)
from tests.helpers import (
    MaskGuidedSegNet,
    SlidingClip3DNet,
    TwoInputFlowNet,
    make_mask_clip,
    make_sliding_clips,
    make_two_input_clip,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = {
    "flow": (TwoInputFlowNet, lambda b, t, seed: make_two_input_clip(b, t, size=12, seed=seed)),
    "vos": (MaskGuidedSegNet, lambda b, t, seed: make_mask_clip(b, t, size=12, seed=seed)),
    "conv3d": (SlidingClip3DNet,
               lambda b, t, seed: make_sliding_clips(b, t, window=3, size=8, seed=seed)),
}


def _float_net(family: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(3)
    net = FAMILIES[family][0]().eval()
    if isinstance(net, SlidingClip3DNet):
        with torch.no_grad():  # non-trivial statistics for the folded BatchNorm
            net.bn.running_mean.uniform_(-0.3, 0.3)
            net.bn.running_var.uniform_(0.5, 2.0)
    return net.to(dtype)


def _clip(family: str, batch: int, frames: int, seed: int, dtype: torch.dtype):
    return tree_map(lambda t: t.to(dtype), FAMILIES[family][1](batch, frames, seed))


def _frame(clip, t: int):
    return tree_map(lambda leaf: leaf[:, t], clip)


def _rows(clip, rows: slice):
    return tree_map(lambda leaf: leaf[rows], clip)


def _call(net: nn.Module, frame):
    if isinstance(frame, tuple):
        return net(*frame)
    if isinstance(frame, dict):
        return net(**frame)
    return net(frame)


# float64 throughout: torch's CPU reductions (the mean before the VOS model's Linear) may sum
# in another order for another batch size, ~1e-17 apart; a flipped quantization rounding would
# be a whole quantization step (>= 1e-3 here), so 1e-12 still asserts the same arithmetic.
EXACT = 1e-12


def _assert_trees_equal(a, b, atol: float = EXACT) -> None:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


_CALIBRATED: dict[tuple[str, torch.dtype], resq.ResQModel] = {}


def _calibrated(family: str, dtype: torch.dtype = torch.float64) -> resq.ResQModel:
    """A calibrated model per family (a copy: tests may change its stream)."""
    key = (family, dtype)
    if key not in _CALIBRATED:
        qm = resq.convert(_float_net(family, dtype), resq.ResQConfig(period=3))
        _CALIBRATED[key] = resq.calibrate(qm, [_clip(family, 1, 5, 7, dtype)], samples=5,
                                          candidates=6, progress=False)
    return copy.deepcopy(_CALIBRATED[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_frame_shape_comes_from_the_first_layers(family) -> None:
    qm = resq.convert(_float_net(family, torch.float32), resq.ResQConfig(period=3))
    specs = qm.expected_inputs
    if family == "conv3d":
        assert (specs[0].rank, specs[0].channels, specs[0].layer) == (5, 3, "stem")
        assert qm.frame_rank == 5
    elif family == "flow":
        assert [(specs[k].rank, specs[k].channels, specs[k].layer) for k in (0, 1)] == [
            (4, 3, "enc1"), (4, 3, "enc2")]
    else:
        assert (specs["frame"].channels, specs["mask"].channels) == (3, 1)
        assert (specs["frame"].layer, specs["mask"].layer) == ("image", "mask")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_disabled_equals_the_float_model(family) -> None:
    net = _float_net(family, torch.float32)
    qm = resq.convert(copy.deepcopy(net), resq.ResQConfig(period=3))
    resq.calibrate(qm, [_clip(family, 1, 4, 7, torch.float32)], samples=4, candidates=4,
                   progress=False)
    clip = _clip(family, 2, 5, 1, torch.float32)
    with torch.no_grad(), resq.quantization_disabled(qm):
        got = qm(clip)
        qm.reset()
        stepped = [qm.step(_frame(clip, t)) for t in range(5)]
    with torch.no_grad():
        expected = stack_outputs([_call(net, _frame(clip, t)) for t in range(5)])
    for out in (got, stack_outputs(stepped)):
        for x, y in zip(tree_flatten(out)[0], tree_flatten(expected)[0]):
            assert float((x - y).abs().max() / y.abs().max()) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_the_clip_time_batched_or_not(family) -> None:
    qm = _calibrated(family)
    clip = _clip(family, 2, 7, 2, torch.float64)
    with torch.no_grad():
        batched = qm(clip)
        qm.clip_execution = "sequential"
        sequential = qm(clip)
        qm.clip_execution = "auto"
        qm.reset()
        stepped = stack_outputs([qm.step(_frame(clip, t)) for t in range(7)])
        qm.reset()
        chunks = [qm.step_clip(tree_map(lambda x: x[:, :4], clip)),
                  qm.step_clip(tree_map(lambda x: x[:, 4:], clip))]
    _assert_trees_equal(batched, stepped)
    _assert_trees_equal(sequential, stepped)
    _assert_trees_equal(tree_map(lambda a, b: torch.cat([a, b], 1), *chunks), stepped)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_independent_streams(family) -> None:
    qm = _calibrated(family)
    clip = _clip(family, 3, 5, 4, torch.float64)
    other = tree_map(lambda a, b: torch.cat([a[:1], b[1:]]), clip, _clip(family, 3, 5, 99,
                                                                           torch.float64))
    with torch.no_grad():
        ref = _rows(qm(clip), slice(0, 1))
        changed = _rows(qm(other), slice(0, 1))
        alone = qm(_rows(clip, slice(0, 1)))
    _assert_trees_equal(changed, ref)
    _assert_trees_equal(alone, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_equals_a_fresh_model(family) -> None:
    qm = _calibrated(family)
    fresh = copy.deepcopy(qm)
    clip_a, clip_b = _clip(family, 2, 4, 5, torch.float64), _clip(family, 2, 5, 6, torch.float64)
    with torch.no_grad():
        for t in range(4):
            qm.step(_frame(clip_a, t))
        qm.reset()
        after = [qm.step(_frame(clip_b, t)) for t in range(5)]
        from_fresh = [fresh.step(_frame(clip_b, t)) for t in range(5)]
    _assert_trees_equal(stack_outputs(after), stack_outputs(from_fresh))


@pytest.mark.parametrize("family", FAMILIES)
def test_unbatched_clips_calibrate_as_batched_ones(family) -> None:
    """An unbatched clip (``[N, C, T', H, W]`` for the 3D model: 5-D like a batched image clip)
    is read by the model's frame rank, so it calibrates exactly as the same clip batched."""
    clip = _clip(family, 1, 4, 8, torch.float64)
    ranges = []
    for clips in ([_rows(clip, 0)], [clip]):  # rows 0: the unbatched clip
        qm = resq.convert(_float_net(family, torch.float64), resq.ResQConfig(period=3))
        resq.calibrate(qm, clips, samples=4, candidates=5, progress=False)
        ranges.append(resq.activation_ranges(qm))
    assert ranges[0] == ranges[1]


def test_a_dataloader_pair_of_several_inputs_and_labels() -> None:
    """``((image1, image2), labels)`` is a pair; ``(image1, image2)`` the inputs themselves."""
    clip = _clip("flow", 2, 4, 9, torch.float64)
    ranges = []
    for clips in ([clip], [(clip, torch.zeros(2))]):
        qm = resq.convert(_float_net("flow", torch.float64), resq.ResQConfig(period=3))
        resq.calibrate(qm, clips, samples=8, candidates=5, progress=False)
        ranges.append(resq.activation_ranges(qm))
    assert ranges[0] == ranges[1]


def test_count_macs_of_a_sliding_clip_model_and_a_two_input_model() -> None:
    """MACs of each layer against the convolution arithmetic: out elements x in x kernel."""
    qm = _calibrated("conv3d", torch.float32)
    c, t, h, w = 3, 4, 8, 8
    macs = resq.count_macs(qm, (c, t, h, w))
    assert macs == {"stem": 8 * t * h * w * 3 * 27, "temporal": 8 * t * h * w * 8 * 3,
                    "spatial": 8 * t * (h // 2) * (w // 2) * 8 * 9, "fc": 4 * 8}
    report = resq.count_bops(qm, (c, t, h, w), "W8A8->W4A4", period=3)
    total = sum(macs.values())
    assert report.mean_bops == pytest.approx(total * (64 + 2 * 16) / 3)
    flow = resq.convert(_float_net("flow", torch.float32), resq.ResQConfig(period=3))
    h = w = 12
    expected = {"enc1": 8 * h * w * 27, "enc2": 8 * h * w * 27,
                "fuse": 8 * (h // 2) * (w // 2) * 16 * 9, "flow": 2 * (h // 2) * (w // 2) * 72}
    assert resq.count_macs(flow, [(3, h, w), (3, h, w)]) == expected
    vos = resq.convert(_float_net("vos", torch.float32), resq.ResQConfig(period=3))
    by_name = resq.count_macs(vos, {"frame": (3, h, w), "mask": (1, h, w)})
    assert by_name["mask"] == 8 * h * w * 9 and by_name["score"] == 8


def test_a_token_model_needs_its_frame_rank_to_read_unbatched_clips() -> None:
    """A Linear first layer takes any rank: ``[T, N, D]`` could be unbatched frames ``[N, D]``
    or a batch of ``[D]`` frames. Calibration refuses to guess; ``frame_rank`` decides."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval().double()
    clip = torch.randn(5, 4, 6, dtype=torch.float64)  # T=5 frames of 4 tokens
    qm = resq.convert(copy.deepcopy(net), resq.ResQConfig(period=3))
    assert qm.frame_rank is None
    with pytest.raises(ValueError, match=r"cannot tell whether clips\[0\].*frame_rank"):
        resq.calibrate(qm, [clip], samples=5, candidates=5, progress=False)
    qm.frame_rank = 3
    resq.calibrate(qm, [clip], samples=5, candidates=5, progress=False)
    batched = resq.convert(copy.deepcopy(net), resq.ResQConfig(period=3))
    batched.frame_rank = 3
    resq.calibrate(batched, [clip[None]], samples=5, candidates=5, progress=False)
    assert resq.activation_ranges(qm) == resq.activation_ranges(batched)
    with pytest.raises(ValueError, match="frame_rank"):
        _calibrated("conv3d").frame_rank = 4  # the first Conv3d takes rank 5


def test_the_input_structure_is_part_of_the_stream() -> None:
    qm = _calibrated("vos")
    clip = _clip("vos", 2, 4, 10, torch.float64)
    with torch.no_grad():
        expected = qm(clip)
        qm.reset()
        got = [qm.step(_frame(clip, 0))]
        frame = _frame(clip, 1)
        # An input forward does not take is refused by the signature check, before the stream.
        with pytest.raises(TypeError, match=r"frame .* does not fit the model's forward"):
            qm.step({"frame": frame["frame"], "mask": frame["mask"], "extra": frame["mask"]})
        with pytest.raises(ValueError, match=r"frame\['mask'\] must have 1 channels"):
            qm.step({"frame": frame["frame"], "mask": frame["frame"]})
        got += [qm.step(_frame(clip, t)) for t in range(1, 4)]
    _assert_trees_equal(stack_outputs(got), expected)


@pytest.mark.parametrize("convert_to", ["double", "to"])
def test_a_dtype_change_mid_stream_moves_the_references(convert_to) -> None:
    """``.double()`` mid-stream: the references become float64 with the weights (never a mix),
    float32 frames are refused, and the stream continues (exact with quantization disabled)."""
    net = _float_net("flow", torch.float32)
    qm = resq.convert(copy.deepcopy(net), resq.ResQConfig(period=8))
    clip = _clip("flow", 2, 5, 11, torch.float32)
    with torch.no_grad(), resq.quantization_disabled(qm):
        outs = [qm.step(_frame(clip, t)) for t in range(2)]
        qm.double() if convert_to == "double" else qm.to(torch.float64)
        refs = [state.ref for state in qm._states.values()]
        assert all(r.x.dtype == r.z.dtype == torch.float64 for r in refs)
        with pytest.raises(TypeError, match=r"frame\[0\] must have the model's dtype"):
            qm.step(_frame(clip, 2))
        outs += [qm.step(tree_map(lambda x: x.double(), _frame(clip, t))) for t in range(2, 5)]
    assert all(leaf.dtype == torch.float64 for leaf in tree_flatten(outs[2:])[0])
    with torch.no_grad():
        expected = [net.double()(*tree_map(lambda x: x.double(), _frame(clip, t)))
                    for t in range(5)]
    for x, y in zip(tree_flatten(outs)[0], tree_flatten(expected)[0]):
        assert float((x.double() - y).abs().max() / y.abs().max()) <= 1e-5


def test_output_helpers_round_trip_and_name_every_leaf() -> None:
    out = {"out": torch.ones(2, 3), "aux": {"score": torch.zeros(2)}, "list": [torch.ones(1)]}
    leaves, spec = flatten_outputs(out)
    assert output_names(out) == ["out", "aux.score", "list.0"]
    again = unflatten_outputs([leaf * 2 for leaf in leaves], spec)
    assert torch.equal(again["aux"]["score"], out["aux"]["score"] * 2)
    assert output_names(torch.ones(1)) == ["output"]
    with pytest.raises(TypeError, match=r"model output aux\.n must be a Tensor"):
        flatten_outputs({"aux": {"n": 3}})
    assert math.prod(stack_outputs([out, out])["out"].shape) == 2 * 2 * 3
