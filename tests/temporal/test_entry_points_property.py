"""Random bad inputs for every public entry point (hypothesis is not installed: a seeded
generator draws the cases): each is a ``TypeError``/``ValueError`` naming the argument, raised
before any layer runs, and the model then behaves exactly as a fresh one. Non-contiguous and
channels-last inputs are accepted and give the same result as contiguous ones."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import resq_brevitas as resq
from resq_brevitas.temporal.outputs import stack_outputs
from tests.helpers import (
    SlidingClip3DNet,
    TwoInputFlowNet,
    make_clip,
    make_sliding_clips,
    make_two_input_clip,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FRAMES = 5


def _image_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


#: model name -> (float model, good clip [B, T, ...] per input, input_shape of one frame)
MODELS = {
    "conv2d": (_image_net, lambda: make_clip(2, FRAMES, 3, 8, seed=1), (3, 8, 8)),
    "flow": (TwoInputFlowNet, lambda: make_two_input_clip(2, FRAMES, size=8, seed=2),
             [(3, 8, 8), (3, 8, 8)]),
    "conv3d": (SlidingClip3DNet, lambda: make_sliding_clips(2, FRAMES, window=3, size=8, seed=3),
               (3, 3, 8, 8)),
}
ENTRIES = ("step", "forward", "step_clip", "run_clip", "calibrate", "analyze", "count_macs",
           "count_bops")
# entry point -> the argument its messages must name
ARGUMENT = {"step": "frame", "forward": "video", "step_clip": "video", "run_clip": "video",
            "calibrate": "clips", "analyze": "clips", "count_macs": "input_shape",
            "count_bops": "input_shape"}


def _leaf_defects(time_dim: bool) -> dict:
    """Defects of one input tensor: ``name -> (make(leaf, rng), error)``."""
    c = 2 if time_dim else 1

    def nan(leaf, rng):
        out = leaf.clone()
        out.view(-1)[rng.randrange(out.numel())] = rng.choice(
            [float("nan"), float("inf"), -float("inf")])
        return out

    return {
        "rank_more": (lambda leaf, rng: leaf.unsqueeze(-1), ValueError),
        "rank_less": (lambda leaf, rng: leaf[..., 0], ValueError),
        "channels": (lambda leaf, rng: torch.cat([leaf, leaf.narrow(c, 0, 1)], c), ValueError),
        "dtype_float32": (lambda leaf, rng: leaf.float(), TypeError),
        "dtype_int": (lambda leaf, rng: leaf.long(), TypeError),
        "device": (lambda leaf, rng: leaf.to("meta"), TypeError),
        "nan_inf": (nan, ValueError),
        "empty_batch": (lambda leaf, rng: leaf[:0], ValueError),
        "empty_space": (lambda leaf, rng: leaf[..., :0], ValueError),
        "device_string": (lambda leaf, rng: "cuda:0", TypeError),
        "not_a_tensor": (lambda leaf, rng: leaf.tolist(), TypeError),
    }


STRUCTURE_DEFECTS = ("drop_input", "extra_input", "as_dict_wrong_names")
SHAPE_DEFECTS = {
    "rank": (lambda s, rng: s[:-1], ValueError),
    "channels": (lambda s, rng: (s[0] + 1, *s[1:]), ValueError),
    "zero": (lambda s, rng: (*s[:-1], 0), ValueError),
    "negative": (lambda s, rng: (*s[:-1], -3), ValueError),
    "float_entry": (lambda s, rng: (*s[:-1], 8.0), TypeError),
    "string": (lambda s, rng: "3x8x8", TypeError),
}


def _draw_cases(count: int, seed: int) -> list[tuple[str, str, str, int]]:
    rng = random.Random(seed)
    leaf_defects = sorted(_leaf_defects(False))
    cases = []
    for i in range(count):
        model = rng.choice(sorted(MODELS))
        entry = ENTRIES[i % len(ENTRIES)]  # every entry point gets its share
        if entry.startswith("count"):
            defect = rng.choice(sorted(SHAPE_DEFECTS))
        elif model == "flow" and rng.random() < 0.25:
            defect = rng.choice(STRUCTURE_DEFECTS)
        else:
            defect = rng.choice(leaf_defects)
            if entry in ("calibrate", "analyze") and defect == "rank_less":
                defect = "rank_more"  # a clip one rank down is a valid unbatched clip
        cases.append((model, entry, defect, rng.randrange(2**31)))
    return cases


CASES = _draw_cases(80, seed=20261202)


@pytest.fixture(scope="module")
def models():
    """Per model: a calibrated float64 ResQModel, its good clip, and a fresh model's outputs
    (stepped and clip)."""
    built = {}
    for name, (make_net, make, shape) in MODELS.items():
        torch.manual_seed(0)
        clip = tree_map(lambda t: t.double(), make())
        qm = resq.convert(make_net().eval().double(), resq.ResQConfig(period=3))
        resq.calibrate(qm, [tree_map(lambda t: t[:1], clip)], samples=FRAMES, candidates=5,
                       progress=False)
        fresh = copy.deepcopy(qm)
        with torch.no_grad():
            stepped = stack_outputs([fresh.step(_frame(clip, t)) for t in range(FRAMES)])
            forward = fresh(clip)
        built[name] = (qm, clip, shape, stepped, forward)
    return built


def _frame(clip, t: int):
    return tree_map(lambda leaf: leaf[:, t], clip)


def _equal(a, b) -> None:
    for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def _spoil(value, defect: str, rng: random.Random, time_dim: bool):
    """``value`` (a tensor or a tuple of tensors) with one defect, and the error it must give."""
    if defect in STRUCTURE_DEFECTS:
        assert isinstance(value, tuple)
        if defect == "drop_input":
            return value[:1], TypeError
        if defect == "extra_input":
            return (*value, value[0]), TypeError
        return {"first": value[0], "second": value[1]}, TypeError
    make, error = _leaf_defects(time_dim)[defect]
    if isinstance(value, tuple):
        i = rng.randrange(len(value))
        return tuple(make(v, rng) if j == i else v for j, v in enumerate(value)), error
    return make(value, rng), error


def _call_bad(qm, entry: str, bad) -> None:
    with torch.no_grad():
        if entry == "step":
            qm.step(bad)
        elif entry == "forward":
            qm(bad)
        elif entry == "step_clip":
            qm.step_clip(bad)
        elif entry == "run_clip":
            qm.run_clip(bad)
        elif entry == "calibrate":
            resq.calibrate(qm, [bad], samples=FRAMES, candidates=5, progress=False)
        elif entry == "analyze":
            resq.analyze(qm, [bad], progress=False)
        elif entry == "count_macs":
            resq.count_macs(qm, bad)
        else:
            resq.count_bops(qm, bad, "W8A8->W4A4", period=3)


@pytest.mark.parametrize("model,entry,defect,seed", CASES,
                         ids=[f"{i}-{m}-{e}-{d}" for i, (m, e, d, _) in enumerate(CASES)])
def test_a_bad_input_is_refused_and_changes_nothing(models, model, entry, defect, seed) -> None:
    qm, clip, shape, stepped, forward = models[model]
    rng = random.Random(seed)
    if entry.startswith("count"):
        make, error = SHAPE_DEFECTS[defect]
        one = shape[0] if isinstance(shape, list) else shape
        bad = make(tuple(one), rng)
        if isinstance(shape, list):  # the first input's shape spoilt
            bad = [bad, *shape[1:]]
    elif entry == "step":
        bad, error = _spoil(_frame(clip, 2), defect, rng, time_dim=False)
    else:
        bad, error = _spoil(tree_map(lambda t: t[:, 2:], clip), defect, rng, time_dim=True)
    ranges = resq.activation_ranges(qm)
    qm.reset()
    with torch.no_grad():
        outs = [qm.step(_frame(clip, t)) for t in range(2)]
        with pytest.raises(error) as raised:
            _call_bad(qm, entry, bad)
        assert ARGUMENT[entry] in str(raised.value), str(raised.value)
        assert resq.activation_ranges(qm) == ranges
        if entry in ("calibrate", "analyze"):  # both end with a reset: a fresh clip is as new
            _equal(qm(clip), forward)
        else:  # the stream continues as if the bad call never happened
            outs += [qm.step(_frame(clip, t)) for t in range(2, FRAMES)]
            _equal(stack_outputs(outs), stepped)


def _layouts(leaf: torch.Tensor, frame: bool) -> list[torch.Tensor]:
    """The same values as a non-contiguous view and, for frames, in channels-last order."""
    views = [leaf.transpose(-1, -2).contiguous().transpose(-1, -2)]
    if frame and leaf.dim() == 4:
        views.append(leaf.contiguous(memory_format=torch.channels_last))
    if frame and leaf.dim() == 5:
        views.append(leaf.contiguous(memory_format=torch.channels_last_3d))
    return views


@pytest.mark.parametrize("model", sorted(MODELS))
def test_non_contiguous_and_channels_last_inputs_give_the_same_result(models, model) -> None:
    qm, clip, _, stepped, forward = models[model]
    for variant in range(2):
        def relaid(leaf: torch.Tensor, frame: bool, variant: int = variant) -> torch.Tensor:
            views = _layouts(leaf, frame)
            out = views[min(variant, len(views) - 1)]
            assert not out.is_contiguous()
            return out

        with torch.no_grad():
            _equal(qm(tree_map(lambda t: relaid(t, False), clip)), forward)
            qm.reset()
            outs = [qm.step(tree_map(lambda t: relaid(t, True), _frame(clip, t)))
                    for t in range(FRAMES)]
            _equal(stack_outputs(outs), stepped)
            qm.reset()
            out, _ = qm.run_clip(tree_map(lambda t: relaid(t, False), clip))
            _equal(out, forward)
