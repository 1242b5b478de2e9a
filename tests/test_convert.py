"""convert (rewriters, BN folding, unsupported layers, layer maps, per-layer overrides,
filter_fn) and BOPs counting."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import resq_brevitas as resq
from resq_brevitas.nn import DEFAULT_LAYER_MAP, is_resq_layer
from tests.helpers import bits_per_mac, make_all_layers_net, make_clip, relative_bops


def test_float_model_untouched_and_all_layers_converted() -> None:
    net = make_all_layers_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qm = resq.convert(net, resq.ResQConfig())
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(net.bn, nn.BatchNorm2d) and type(net.stem) is nn.Conv2d
    float_layers = [n for n, m in net.named_modules() if type(m) in DEFAULT_LAYER_MAP]
    assert [n for n, _ in qm.resq_layers()] == float_layers
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())  # folded


def test_keep_batch_norm_option() -> None:
    net = make_all_layers_net()
    qm = resq.convert(net, resq.ResQConfig(fold_bn=False))
    assert isinstance(qm.model.bn, nn.BatchNorm2d)
    clip = make_clip(frames=3)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)["seg"]
    dense = torch.stack([net(clip[:, t])["seg"] for t in range(3)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5


def test_unsupported_layers_reported_by_name() -> None:
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x):
            return self.conv(x)

    with pytest.warns(UserWarning, match=r"rnn \(LSTM\)"):
        qm = resq.convert(WithLSTM())
    assert qm.unsupported_layers == ("rnn (LSTM)",)
    with pytest.raises(ValueError, match=r"rnn \(LSTM\)"):
        resq.convert(WithLSTM(), resq.ResQConfig(strict=True))


def test_no_warning_for_supported_model() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qm = resq.convert(make_all_layers_net())
    assert qm.unsupported_layers == ()


class UniformNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.c = nn.Linear(8, 5)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.c(h.mean((2, 3)))


def test_bops_ratio_resq_vs_w8a8() -> None:
    net = UniformNet()
    clip = make_clip(batch=2, frames=8)
    costs = {}
    for scheme, period in (("W8A8", 4), ("W8A8->W4A4", 4)):
        qm = resq.convert(net, resq.ResQConfig(scheme=scheme, period=period))
        with torch.no_grad():
            qm(clip)
        costs[scheme] = qm.last_cost
    assert costs["W8A8->W4A4"].relative_to(costs["W8A8"]) == pytest.approx(
        relative_bops("W8A8->W4A4", 4))
    static = resq.count_bops(net, (3, 16, 16), "W8A8->W4A4", period=4)
    assert static.mean_bops == pytest.approx(costs["W8A8->W4A4"].mean_bops)
    assert static.per_frame[1] / static.per_frame[0] == pytest.approx(relative_bops("W4A4"))
    assert resq.count_bops(net, (3, 16, 16), "W5A5").relative_to(
        resq.count_bops(net, (3, 16, 16), "W8A8")) == pytest.approx(relative_bops("W5A5"))


def test_per_layer_macs_equal_independent_count() -> None:
    net = make_all_layers_net()
    macs = resq.count_macs(net, (3, 16, 16))
    modules = dict(net.named_modules())
    for name, count in macs.items():
        captured = {}

        def hook(mod, args, out, captured=captured):
            captured["x"] = args[0]

        handle = modules[name].register_forward_hook(hook)
        with torch.no_grad():
            net(torch.zeros(1, 3, 16, 16))
        handle.remove()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            modules[name](captured["x"])
        assert 2 * count == counter.get_total_flops(), name
    qm = resq.convert(net)
    with torch.no_grad():
        qm(make_clip(batch=1, frames=1))
    assert qm.last_cost.macs == macs


def test_cost_report_table_lists_layers() -> None:
    qm = resq.convert(UniformNet())
    with torch.no_grad():
        qm(make_clip(batch=1, frames=4))
    table = qm.last_cost.table()
    for name in ("a", "b", "c", "W8A8->W4A4"):
        assert name in table
    assert qm.last_cost.notation == "W8A8->W4A4"
    assert len(qm.last_cost.per_frame) == 4


def test_is_resq_layer_only_for_converted() -> None:
    qm = resq.convert(UniformNet())
    assert all(is_resq_layer(m) for _, m in qm.resq_layers())
    assert not is_resq_layer(nn.Conv2d(1, 1, 1))


class UntraceableNet(nn.Module):
    """Control flow on the input defeats torch.fx; one BN is foldable, one is not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError("even widths only")
        h = torch.relu(self.bn_a(self.a(x)))
        g = self.b(h)
        return self.bn_b(g) + g  # g has a second reader: bn_b must stay


def _randomize_bn(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_untraceable_model_folds_batch_norm_on_first_calibration_frame() -> None:
    net = _randomize_bn(UntraceableNet())
    qm = resq.convert(net, resq.ResQConfig())
    assert qm.bn_fold_pending
    clip = make_clip(batch=1, frames=4)
    resq.calibrate(qm, [clip[0]], samples=4, candidates=4, progress=False)
    assert not qm.bn_fold_pending
    assert isinstance(qm.model.bn_a, nn.Identity)
    assert isinstance(qm.model.bn_b, nn.BatchNorm2d)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = torch.stack([net(clip[:, t]) for t in range(4)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5


class UntraceableTwoInputNet(nn.Module):
    """``forward(image, mask)`` with data-dependent control flow (fx cannot trace it) and a
    conv + BatchNorm on each input."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_image = nn.BatchNorm2d(6)
        self.mask = nn.Conv2d(1, 6, 3, padding=1)
        self.bn_mask = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, image, mask):
        if image.shape[-1] % 2:
            raise ValueError("even widths only")
        h = torch.relu(self.bn_image(self.image(image))) + torch.relu(self.bn_mask(self.mask(mask)))
        return self.head(h)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_untraceable_two_input_model_folds_batch_norm_on_its_first_frame(kind) -> None:
    net = _randomize_bn(UntraceableTwoInputNet())
    qm = resq.convert(net, resq.ResQConfig())
    assert qm.bn_fold_pending
    video = make_clip(batch=1, frames=4, channels=4)
    image, mask = video[:, :, :3].contiguous(), video[:, :, 3:].contiguous()
    clip = (image, mask) if kind == "tuple" else {"image": image, "mask": mask}
    qm.frame_rank = 4  # fx cannot read the ranks off an untraceable model
    resq.calibrate(qm, [clip], samples=4, candidates=4, progress=False)
    assert not qm.bn_fold_pending
    assert isinstance(qm.model.bn_image, nn.Identity) and isinstance(qm.model.bn_mask, nn.Identity)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = torch.stack([net(image[:, t], mask[:, t]) for t in range(4)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5


def test_fx_and_eager_bn_detection_agree() -> None:
    from resq_brevitas.bn_fold import conv_bn_pairs_eager, conv_bn_pairs_fx

    net = make_all_layers_net()
    eager = conv_bn_pairs_eager(net, torch.zeros(1, 3, 16, 16))
    assert eager == conv_bn_pairs_fx(net) == [("stem", "bn")]


class MyConv1d(nn.Conv1d):
    """A user's conv subclass that keeps the parent's forward."""


class SignalNet(nn.Module):
    """1-D signal model: a conv, a transposed conv followed by BatchNorm, a custom conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        # in == out channels: BN folded along the wrong weight axis would not fail, just be wrong.
        self.up = nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.mine = MyConv1d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mine(torch.relu(self.bn(self.up(torch.relu(self.conv(x))))))


def _signal_net() -> SignalNet:
    return _randomize_bn(SignalNet())


def _signal_clip(frames: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 3, 16, generator=g) + 0.1 * torch.randn(
        2, frames, 3, 16, generator=g).cumsum(1)


def test_user_layer_map_converts_folds_on_the_right_axis_and_matches_float() -> None:
    import brevitas.nn as qnn

    from resq_brevitas.nn import conv_transpose_macs, resq_layer_class

    net = _signal_net()
    # MyConv1d keeps Conv1d's forward: converted as a Conv1d (issue 12); the transposed conv
    # has no entry in the default map.
    with pytest.warns(UserWarning, match=r"up \(ConvTranspose1d\)") as caught:
        default = resq.convert(net)
    assert not any("mine" in str(w.message) for w in caught)
    assert [n for n, _ in default.resq_layers()] == ["conv", "mine"]
    resq_transpose1d = resq_layer_class("ResQConvTranspose1d", qnn.QuantConvTranspose1d,
                                        nn.ConvTranspose1d, conv_transpose_macs,
                                        output_channel_dim=1)
    layer_map = {**DEFAULT_LAYER_MAP, nn.ConvTranspose1d: resq_transpose1d,
                 MyConv1d: DEFAULT_LAYER_MAP[nn.Conv1d]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qm = resq.convert(net, resq.ResQConfig(period=3), layer_map=layer_map)
    assert [n for n, _ in qm.resq_layers()] == ["conv", "up", "mine"]
    assert isinstance(qm.model.bn, nn.Identity)  # folded into the transposed conv
    clip = _signal_clip()
    resq.calibrate(qm, [clip[:1, :4]], samples=4, candidates=4, progress=False)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = torch.stack([net(clip[:, t]) for t in range(clip.shape[1])], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5
    macs = resq.count_macs(net, (3, 16), layer_map=layer_map)
    assert qm.last_cost.macs == macs and set(macs) == {"conv", "up", "mine"}
    with pytest.raises(TypeError, match="layer_map must map"):
        resq.convert(net, layer_map={nn.Conv1d: nn.Conv1d})


def test_per_layer_overrides_set_each_layers_bits_and_cost() -> None:
    net = make_all_layers_net()
    config = resq.ResQConfig("W8A8->W4A4", period=4, overrides=(
        resq.LayerOverride("stem", "W8A8->W8A8"),   # keep the first layer at 8 bits
        resq.LayerOverride("head", "W8A8"),         # frame quantization: every frame a keyframe
        resq.LayerOverride("token", "fp32")))       # floating point, counted at 32 bits
    qm = resq.convert(net, config)
    layers = dict(qm.resq_layers())
    assert layers["head"].residual is None and layers["token"].keyframe_precision.is_float
    resq.calibrate(qm, [make_clip(batch=1, frames=4)[0]], samples=4, candidates=4,
                   progress=False)
    clip = make_clip(frames=8)
    with torch.no_grad():
        qm(clip)
    cost = qm.last_cost
    assert cost.notation == config.notation and "stem: W8A8->W8A8" in cost.notation

    for name, macs in cost.macs.items():
        expected = {"stem": "W8A8->W8A8", "head": "W8A8", "token": "fp32"}.get(name, "W8A8->W4A4")
        assert cost.per_layer[name] == pytest.approx(macs * bits_per_mac(expected, 4)), name
    assert cost.keyframe_share == pytest.approx(2 / 8)  # the model's schedule, not the head's
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)["seg"]
    dense = torch.stack([net(clip[:, t])["seg"] for t in range(8)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5


def test_filter_fn_leaves_refused_layers_in_float_and_out_of_the_cost() -> None:
    net = make_all_layers_net()
    qm = resq.convert(net, filter_fn=lambda module, name: not name.startswith("se."))
    assert qm.skipped_layers == ("se.fc1", "se.fc2")
    assert type(qm.model.se.fc1) is nn.Linear and not is_resq_layer(qm.model.se.fc2)
    resq.calibrate(qm, [make_clip(batch=1, frames=4)[0]], samples=4, candidates=4,
                   progress=False)
    clip = make_clip(frames=4)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)["seg"]
    assert not {"se.fc1", "se.fc2"} & set(qm.last_cost.macs)
    dense = torch.stack([net(clip[:, t])["seg"] for t in range(4)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        resq.convert(net, filter_fn="se")
    with pytest.raises(TypeError, match="already converted"):
        resq.convert(qm)


def test_a_state_saved_after_an_eager_fold_loads_into_a_fresh_conversion() -> None:
    """The fold an untraceable model did at calibration is in its state: a freshly converted
    copy (fold still pending) repeats it when it loads, then equals the saved model."""
    net = _randomize_bn(UntraceableNet())
    config = resq.ResQConfig(period=2)
    qm = resq.convert(net, config)
    clip = make_clip(batch=1, frames=4)
    resq.calibrate(qm, [clip[0]], samples=4, candidates=4, progress=False)
    assert qm.folded_batch_norms == (("a", "bn_a"),)
    fresh = resq.convert(net, config)
    assert fresh.bn_fold_pending
    fresh.load_state_dict(qm.state_dict())  # strict: a missing BN key would raise
    assert not fresh.bn_fold_pending
    assert isinstance(fresh.model.bn_a, nn.Identity)
    assert isinstance(fresh.model.bn_b, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(fresh(clip), qm(clip))


def test_fold_pairs_refuses_names_that_are_not_a_layer_and_a_batch_norm() -> None:
    from resq_brevitas.nn.batch_norm import fold_pairs

    net = _randomize_bn(UntraceableNet())
    with pytest.raises(ValueError, match="pairs must name"):
        fold_pairs(net, [("bn_a", "a")])
    with pytest.raises(ValueError, match="pairs must name"):
        fold_pairs(net, [("a", "bn_a"), ("b", "missing")])
    assert isinstance(net.bn_a, nn.BatchNorm2d)  # the valid first pair was not folded either
