"""act_signedness="auto": unsigned keyframe quantizers exactly where calibration inputs are
non-negative, the unsigned grid, persistence and export."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.experiments.metrics import sqnr_db
from resq_brevitas.quant import act_quant, set_act_threshold
from resq_brevitas.quant.quantizers import make_unsigned, quantize_unsigned
from tests.helpers import make_all_layers_net, make_clip

pytestmark = pytest.mark.usefixtures("single_thread")


def test_unsigned_proxy_is_the_unsigned_grid() -> None:
    layer = qnn.QuantIdentity(act_quant=act_quant(4), return_quant_tensor=True)
    make_unsigned(layer.act_quant)
    set_act_threshold(layer.act_quant, 1.5)
    x = torch.linspace(-1, 2, 301)
    out = layer(x)
    assert out.signed is False and float(out.scale) == pytest.approx(1.5 / 15)
    torch.testing.assert_close(out.value, quantize_unsigned(x, 1.5 / 15, 4), rtol=0, atol=0)
    assert float(out.value.min()) == 0.0 and float(out.value.max()) == pytest.approx(1.5)
    assert len(torch.unique(out.value)) == 16  # all 2^4 levels on [0, 1.5]


def _calibration_minima(net: nn.Module, clip: torch.Tensor) -> dict[str, float]:
    """Each supported layer's smallest input over the calibration frames, by hooks on the float
    model (calibration sees the float model's inputs: it runs with quantization disabled)."""
    minima: dict[str, float] = {}
    hooks = []
    for name, module in net.named_modules():
        if type(module) in resq.DEFAULT_LAYER_MAP:
            def hook(mod, args, out, name=name):
                minima[name] = min(minima.get(name, float("inf")), float(args[0].min()))
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for t in range(clip.shape[0]):
            net(clip[t:t + 1])
    for h in hooks:
        h.remove()
    return minima


def _calibrated(net: nn.Module, scheme: str, signedness: str, calib: torch.Tensor):
    qm = resq.convert(net, resq.ResQConfig(scheme, period=3, act_signedness=signedness))
    return resq.calibrate(qm, [calib], samples=calib.shape[0], candidates=12, progress=False)


def test_auto_is_unsigned_exactly_where_calibration_inputs_are_non_negative() -> None:
    net = make_all_layers_net()
    calib = make_clip(batch=1, frames=6, seed=7)[0]
    qm = _calibrated(net, "W8A8->W4A4", "auto", calib)
    minima = _calibration_minima(net, calib)
    expected = {name for name, low in minima.items() if low >= 0}
    assert set(qm.unsigned_inputs) == expected and expected and set(minima) - expected
    for name, layer in qm.resq_layers():
        assert layer.input_quant.is_signed is (name not in expected), name
        assert layer.residual.view.input_quant.is_signed, name  # residuals stay signed
    signed = _calibrated(net, "W8A8->W4A4", "signed", calib)
    assert signed.unsigned_inputs == ()


def test_auto_raises_keyframe_accuracy_and_survives_a_state_dict_round_trip() -> None:
    net = make_all_layers_net()
    calib = make_clip(batch=1, frames=6, seed=7)[0]
    clip = make_clip(batch=2, frames=6, seed=8)
    with torch.no_grad():
        dense = torch.stack([net(clip[:, t])["seg"] for t in range(6)], 1)
    results = {}
    for signedness in ("signed", "auto"):
        qm = _calibrated(net, "W6A6", signedness, calib)
        with torch.no_grad():
            results[signedness] = sqnr_db(dense, qm(clip)["seg"])
    # Every unsigned quantizer resolves its non-negative input twice as finely.
    assert results["auto"] > results["signed"] + 1.0
    state = qm.state_dict()
    rebuilt = resq.convert(net, resq.ResQModel.config_from_state_dict(state))
    rebuilt.load_state_dict(state)
    assert rebuilt.unsigned_inputs == qm.unsigned_inputs
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(clip)["seg"], qm(clip)["seg"], rtol=0, atol=0)


def test_act_signedness_is_validated() -> None:
    with pytest.raises(ValueError, match="act_signedness must be one of"):
        resq.ResQConfig(act_signedness="unsigned")
