"""``calibrate`` minimises each layer's *output* error (eq. 8) on the folded model's float inputs.

The line search itself is tested in ``tests/quant/test_line_search.py``; these tests check the
whole calibration path end to end against a brute force written here without the library: the
inputs it scores (BatchNorm folded, the float model's activations), the op (stride, padding,
transposed conv), the quantized weight, and the objective (output error, not input error).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resq_brevitas as resq
from resq_brevitas.calibrate import activation_ranges

pytestmark = pytest.mark.usefixtures("single_thread")

BITS = 8
CANDIDATES = 20


class _Net(nn.Module):
    """Conv + BN + ReLU (stride 2), a transposed conv, and a 1x1 head that ignores channel 0.

    Channel 0 of the head's input is large (a BN shift of 20) but its head weight is zero, so
    the output-aware threshold of ``head`` can clip it, while the input-MSE threshold cannot.
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            for p in (self.conv.weight, self.up.weight, self.head.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.bn.running_mean.copy_(torch.randn(4, generator=g) * 0.2)
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.bias.copy_(torch.tensor([20.0, 0.0, 0.5, 0.0]))
            self.up.weight.zero_()
            for c in range(4):  # up passes its input through, channel by channel, upsampled
                self.up.weight[c, c] = 0.25
            self.head.weight[:, 0] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.up(F.relu(self.bn(self.conv(x)))))


def _quantize(x: Tensor, threshold: float) -> Tensor:
    scale = 2 * threshold / (2**BITS - 1)
    return torch.clamp(torch.round(x / scale), -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1) * scale


def _reference_thresholds(model: _Net, clips: list[Tensor]) -> tuple[dict[str, float],
                                                                    dict[str, float]]:
    """Per layer, the argmin over eq. 8's candidates of the output error and of the input error,
    on the folded model's float inputs, written without the library."""
    bn = model.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv_w = model.conv.weight * scale.view(-1, 1, 1, 1)
    conv_b = bn.bias - bn.running_mean * scale
    x = torch.cat(clips)
    h = F.relu(F.conv2d(x, conv_w, conv_b, stride=2, padding=1))
    u = model.up(h)
    layers = {
        "conv": (x, conv_w, lambda a, w: F.conv2d(a, w, None, stride=2, padding=1)),
        "up": (h, model.up.weight, lambda a, w: F.conv_transpose2d(a, w, None, 2, 1)),
        "head": (u, model.head.weight, lambda a, w: F.conv2d(a, w)),
    }
    out_best, in_best = {}, {}
    for name, (inputs, weight, op) in layers.items():
        qweight = _quantize(weight, weight.abs().max().item())
        target = op(inputs, weight).double()
        grid = torch.linspace(inputs.min().item(), inputs.max().item(), CANDIDATES).abs()
        thresholds = [t for t in grid.tolist() if t > 0]
        out_err = [(target - op(_quantize(inputs, t), qweight).double()).pow(2).sum().item()
                   for t in thresholds]
        in_err = [(inputs - _quantize(inputs, t)).double().pow(2).sum().item()
                  for t in thresholds]
        out_best[name] = thresholds[min(range(len(thresholds)), key=out_err.__getitem__)]
        in_best[name] = thresholds[min(range(len(thresholds)), key=in_err.__getitem__)]
    return out_best, in_best


@pytest.fixture(scope="module")
def calibrated() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    model = _Net().eval()
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(3, 3, 16, 16, generator=g) for _ in range(2)]
    qm = resq.convert(model, resq.ResQConfig(scheme=f"W{BITS}A{BITS}", period=1))
    resq.calibrate(qm, clips, samples=6, candidates=CANDIDATES, progress=False)
    found = {key.split("/")[0]: value
             for key, value in activation_ranges(qm, ("keyframe",)).items()}
    with torch.no_grad():
        out_best, in_best = _reference_thresholds(model, clips)
    return found, out_best, in_best


def test_calibrated_thresholds_are_the_brute_force_output_error_argmin(calibrated) -> None:
    found, out_best, _ = calibrated
    assert set(found) == set(out_best)
    for name, threshold in out_best.items():
        # log2-domain storage of the threshold rounds it by a few ulps
        assert found[name] == pytest.approx(threshold, rel=1e-5), name


def test_output_aware_range_clips_an_input_channel_the_layer_ignores(calibrated) -> None:
    found, _, in_best = calibrated
    # head's input channel 0 (~20) has zero weight: the input-MSE range keeps it, eq. 8 does not
    assert found["head"] < 0.5 * in_best["head"], (found["head"], in_best["head"])
