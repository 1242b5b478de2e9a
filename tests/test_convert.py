"""convert (rewriters, BN folding, unsupported layers), config parsing and BOPs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import resq_brevitas as resq
from resq_brevitas.nn import DEFAULT_LAYER_MAP, is_resq_layer
from tests.helpers import make_all_layers_net, make_clip


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


@pytest.mark.parametrize(
    "text,key,residual",
    [
        ("W8A8->W4A4", (8, (8,)), (4, (4,))),
        ("w8a8 -> w8a4", (8, (8,)), (8, (4,))),
        ("W4A4", (4, (4,)), None),
        ("fp32", (None, None), None),
        ("W8A8->W8A{0,4,8}", (8, (8,)), (8, (0, 4, 8))),
        ("fp32->W4A4", (None, None), (4, (4,))),
    ],
)
def test_scheme_notation_parses(text: str, key, residual) -> None:
    scheme = resq.Scheme.parse(text)
    assert (scheme.keyframe.weight_bits, scheme.keyframe.act_bits) == key
    if residual is None:
        assert scheme.residual is None and scheme.is_frame_quantization
    else:
        assert (scheme.residual.weight_bits, scheme.residual.act_bits) == residual
    assert resq.Scheme.parse(scheme.notation) == scheme


@pytest.mark.parametrize(
    "text",
    ["", "W8", "A8W8", "W8A8->", "->W4A4", "W8A8->W4A4->W2A2", "W1A1", "W8A17", "W8A{4,0}",
     "W8A{4,4}", "int8", "W0A8", "W8A0"],
)
def test_invalid_scheme_strings_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        resq.ResQConfig(scheme=text)


def test_config_validation_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        resq.ResQConfig(period=0)
    with pytest.raises(TypeError, match="period must be an int"):
        resq.ResQConfig(period=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_granularity"):
        resq.ResQConfig(weight_granularity="row")
    with pytest.raises(ValueError, match="reference"):
        resq.ResQConfig(reference="next")
    with pytest.raises(TypeError, match="scheme"):
        resq.ResQConfig(scheme=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidates"):
        resq.LineSearch(candidates=1)
    with pytest.raises(TypeError, match="config"):
        resq.convert(make_all_layers_net(), "W8A8->W4A4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        resq.convert("not a model")  # type: ignore[arg-type]


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
    assert costs["W8A8->W4A4"].relative_to(costs["W8A8"]) == pytest.approx((64 + 3 * 16) / 4 / 64)
    static = resq.count_bops(net, (3, 16, 16), "W8A8->W4A4", period=4)
    assert static.mean_bops == pytest.approx(costs["W8A8->W4A4"].mean_bops)
    assert static.per_frame[1] / static.per_frame[0] == pytest.approx(16 / 64)
    assert resq.count_bops(net, (3, 16, 16), "W5A5").relative_to(
        resq.count_bops(net, (3, 16, 16), "W8A8")) == pytest.approx(25 / 64)


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


def test_fx_and_eager_bn_detection_agree() -> None:
    from resq_brevitas.bn_fold import conv_bn_pairs_eager, conv_bn_pairs_fx

    net = make_all_layers_net()
    eager = conv_bn_pairs_eager(net, torch.zeros(1, 3, 16, 16))
    assert eager == conv_bn_pairs_fx(net) == [("stem", "bn")]
