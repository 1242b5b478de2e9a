"""The eq. 8 line-search observer for torch.ao and torchao pt2e."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from resq_brevitas.observers import (
    LineSearchObserver,
    attach_output_consumers,
    freeze_observers,
    line_search_observers,
    resq_qconfig,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def outlier_tensor() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[3, 5], x[40, 1], x[17, 30] = 14.0, -11.0, 9.0
    return x


def brute_force_threshold(x: torch.Tensor, quant_min: int, quant_max: int, r: int) -> float:
    """Independent eq. 8 with the identity layer: torch's own fake-quant, every grid point."""
    bits = (quant_max - quant_min + 1).bit_length() - 1
    zero_point = quant_min + 2 ** (bits - 1)
    best, best_err = None, float("inf")
    for s in torch.linspace(x.min().item(), x.max().item(), r, dtype=torch.float64).tolist():
        if s == 0:
            continue
        scale = 2 * abs(s) / (2**bits - 1)
        q = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
        err = (q.double() - x.double()).pow(2).sum().item()
        if err < best_err:
            best, best_err = abs(s), err
    return best


@pytest.mark.parametrize("dtype,quant_min,quant_max", [
    (torch.qint8, -8, 7), (torch.quint8, 0, 15), (torch.quint8, 0, 255)])
def test_range_is_brute_force_argmin_at_observer_bits(dtype, quant_min, quant_max):
    x = outlier_tensor()
    observer = LineSearchObserver(dtype=dtype, quant_min=quant_min, quant_max=quant_max,
                                  candidates=20, samples=64)
    observer(x)
    assert bool(observer.frozen)  # 64 rows seen: searched and frozen
    expected = brute_force_threshold(x, quant_min, quant_max, 20)
    assert float(observer.threshold) == pytest.approx(expected, rel=1e-6)
    if observer.bits <= 4:
        assert expected < x.abs().max().item()  # the outliers are clipped, not covered
    scale, zero_point = observer.calculate_qparams()
    bits = observer.bits
    assert scale.item() == pytest.approx(2 * expected / (2**bits - 1), rel=1e-6)
    assert zero_point.item() == quant_min + 2 ** (bits - 1)


def test_four_bit_range_is_scored_as_four_bit():
    x = outlier_tensor()
    four = LineSearchObserver(dtype=torch.qint8, quant_min=-8, quant_max=7)
    eight = LineSearchObserver(dtype=torch.qint8, quant_min=-128, quant_max=127)
    four(x), eight(x)
    assert (four.bits, eight.bits) == (4, 8)
    # Coarser steps favour a tighter range: the 4-bit choice differs from the 8-bit one.
    assert float(four.threshold) < float(eight.threshold)


def test_search_is_cached_frozen_and_survives_state_dict():
    x = outlier_tensor()
    observer = LineSearchObserver(dtype=torch.qint8, quant_min=-8, quant_max=7, samples=96)
    calls = []
    search = observer.search
    observer.search = lambda: calls.append(1) or search()
    observer(x[:32])
    first = observer.calculate_qparams()
    observer.calculate_qparams()
    assert len(calls) == 1  # cached until a new sample arrives
    observer(x[32:])
    observer(x)  # 96 rows: the search runs once more and freezes
    assert bool(observer.frozen) and len(calls) == 2
    frozen = observer.calculate_qparams()
    observer(100 * x)  # ignored once frozen: no observation, no search
    for _ in range(3):
        assert torch.equal(observer.calculate_qparams()[0], frozen[0])
    assert len(calls) == 2 and observer.rows_seen == 96
    assert not torch.equal(first[0], frozen[0])

    restored = LineSearchObserver(dtype=torch.qint8, quant_min=-8, quant_max=7, samples=96)
    restored.load_state_dict(observer.state_dict())
    assert bool(restored.frozen)
    assert torch.equal(restored.calculate_qparams()[0], frozen[0])
    restored.reset_range()
    assert not bool(restored.frozen) and restored.calculate_qparams()[0].item() == 1.0


def test_bad_observer_arguments():
    with pytest.raises(ValueError, match=r"2\^b levels.*quant_max=9"):
        LineSearchObserver(dtype=torch.quint8, quant_min=0, quant_max=9)
    with pytest.raises(ValueError, match="qscheme must be per-tensor"):
        LineSearchObserver(qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match="candidates must be >= 2, got 1"):
        LineSearchObserver(candidates=1)
    with pytest.raises(ValueError, match="act_bits must be 2..8 .* got 9"):
        resq_qconfig(act_bits=9)
    with pytest.raises(TypeError, match="prepared must be a torch.fx.GraphModule"):
        attach_output_consumers(nn.Linear(2, 2))


class ConvNet(nn.Module):
    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        # pt2e's conv-BN QAT rewrite re-traces dozens of patterns (a minute on 2 cores): the pt2e
        # test leaves BN out; unroll folds BN before QAT anyway.
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.conv2(y))
        return self.fc(torch.flatten(y, 1))


def batches(n: int, seed: int, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 4, 4, generator=g) for _ in range(n)]


def output_scale(prepared: nn.Module) -> float:
    """Scale of the last fake-quant before the graph output: one step of the output."""
    node = [n for n in prepared.graph.nodes if n.op == "output"][0].args[0]
    return float(prepared.get_submodule(node.target).scale)


@pytest.mark.filterwarnings(
    "ignore:torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor "
    "creation functions:UserWarning")
def test_prepare_qat_fx_calibrate_train_convert():
    torch.manual_seed(0)
    model = ConvNet().train()
    example = batches(1, 0)[0]
    qconfig = resq_qconfig(8, 8, qat=True, samples=8, candidates=10)
    prepared = prepare_qat_fx(model, QConfigMapping().set_global(qconfig), (example,))
    attached = attach_output_consumers(prepared)
    assert attached  # at least the first conv's input scores by its output error
    for x in batches(2, 1):
        prepared(x)  # calibration: 8 rows per observer, then searched and frozen
    observers = line_search_observers(prepared)
    assert observers and all(bool(o.frozen) for o in observers.values())
    thresholds = {k: float(o.threshold) for k, o in observers.items()}
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for x in batches(3, 2):
        loss = prepared(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert {k: float(o.threshold) for k, o in observers.items()} == thresholds  # not re-searched
    prepared.eval()
    held_out = batches(1, 3)[0]
    with torch.no_grad():
        fake_quant = prepared(held_out)
    step = output_scale(prepared)
    first_scale = float(observers[next(iter(observers))].calculate_qparams()[0])
    previous_engine = torch.backends.quantized.engine
    # qnnpack: no 16-bit accumulation saturation, so full 8-bit ranges are exact.
    torch.backends.quantized.engine = "qnnpack"
    try:
        converted = convert_fx(copy.deepcopy(prepared))
        with torch.no_grad():
            real = converted(held_out)
    finally:
        torch.backends.quantized.engine = previous_engine
    assert (real - fake_quant).abs().max().item() <= 3 * step
    # The searched range is what the converted graph quantizes its input with.
    scales = [float(getattr(converted, n.args[1].target)) for n in converted.graph.nodes
              if n.target is torch.quantize_per_tensor]
    assert scales and scales[0] == pytest.approx(first_scale, rel=1e-6)


def test_output_aware_pass_beats_input_error_on_held_out_batch():
    """Channel 0 has big tails but almost no weight: eq. 8's output error should clip it."""

    def data(seed: int, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, 16, generator=g)
        x[:, 0] = 6.0 * torch.randn(rows, generator=g).pow(3)
        return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] *= 0.01
    qconfig = resq_qconfig(4, 8, qat=True, samples=256, candidates=20)
    mapping = QConfigMapping().set_global(qconfig)
    calibration, held_out = data(0, 256), data(1, 512)
    errors = {}
    for mode in ("input", "output"):
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), mapping, (calibration[:2],))
        if mode == "output":
            assert list(attach_output_consumers(prepared).values())[0] == ["0"]
        prepared(calibration)
        assert all(bool(o.frozen) for o in line_search_observers(prepared).values())
        prepared.eval()
        with torch.no_grad():
            errors[mode] = (prepared(held_out) - model(held_out)).pow(2).mean().item()
    assert errors["output"] < errors["input"], errors


def test_prepare_fx_ptq_with_output_consumers_and_freeze():
    torch.manual_seed(0)
    model = ConvNet().eval()
    example = batches(1, 0)[0]
    qconfig = resq_qconfig(8, 8, samples=64)
    prepared = prepare_fx(model, QConfigMapping().set_global(qconfig), (example,))
    attached = attach_output_consumers(prepared)
    # BN is folded into the first conv at prepare: its consumer sees the folded weight.
    assert any(names == ["conv"] for names in attached.values())
    for x in batches(2, 1):
        prepared(x)
    assert freeze_observers(prepared) > 0  # 8 rows < 64: frozen on request
    assert all(bool(o.frozen) for o in line_search_observers(prepared).values())


def test_pt2e_prepare_qat_calibrate_train_convert():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from resq_brevitas.observers import PT2ELineSearchObserver, ResQQuantizer

    torch.manual_seed(0)
    model = ConvNet(bn=False).train()
    example = batches(1, 0)[0]
    exported = torch.export.export(model, (example,)).module()
    quantizer = ResQQuantizer(default=(8, 8), qat=True, samples=8, candidates=10)
    prepared = prepare_qat_pt2e(exported, quantizer)
    attached = attach_output_consumers(prepared)
    assert len(attached) == 3  # conv, conv2 and fc read their own observer
    for x in batches(2, 1):
        prepared(x)
    observers = line_search_observers(prepared)
    assert len(observers) == 3
    assert all(isinstance(o, PT2ELineSearchObserver) and bool(o.frozen)
               for o in observers.values())
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for x in batches(2, 2):
        loss = prepared(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    move_exported_model_to_eval(prepared)
    held_out = batches(1, 3)[0]
    with torch.no_grad():
        fake_quant = prepared(held_out)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        real = converted(held_out)
    # pt2e keeps fp32 ops between q/dq pairs: the output matches to float rounding, well within
    # one step of the last layer's input quantizer times its largest weight column sum.
    last = observers[list(observers)[-1]]
    step = float(last.calculate_qparams()[0]) * model.fc.weight.abs().sum(1).max().item()
    assert (real - fake_quant).abs().max().item() <= step
    ranges = {(n.args[3], n.args[4]) for n in converted.graph.nodes
              if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)}
    assert (-128, 127) in ranges


def test_pt2e_unrolled_clip_gets_keyframe_and_residual_bits():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from resq_brevitas.deploy import unroll
    from resq_brevitas.observers import resq_pt2e_quantizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    clip = torch.randn(2, 2, 3, 6, 6)
    unrolled = unroll(net, 2, clip)
    exported = torch.export.export(unrolled, (clip,)).module()
    quantizer = resq_pt2e_quantizer(unrolled, "W8A8->W4A4", samples=4, candidates=8)
    prepared = prepare_qat_pt2e(exported, quantizer)
    attach_output_consumers(prepared)
    prepared(clip)
    prepared(clip)
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        fake_quant = prepared(clip)
    converted = convert_pt2e(prepared)
    ranges = [(n.args[3], n.args[4]) for n in converted.graph.nodes
              if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)]
    # Two keyframe call sites at 8 bits and two residual call sites at 4 bits (activations).
    assert sorted(set(ranges)) == [(-128, 127), (-8, 7)]
    assert ranges.count((-8, 7)) == ranges.count((-128, 127)) == 2
    with torch.no_grad():
        torch.testing.assert_close(converted(clip), fake_quant, rtol=1e-5, atol=1e-5)
