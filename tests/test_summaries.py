"""What users print: ``print(qm)`` is a short summary, ``print(qm.last_cost)`` shows RRM's
speedup only for RRM runs."""

from __future__ import annotations

import math

import pytest
import torch

import resq_brevitas as resq
from resq_brevitas.demo.model import DemoSegNet
from tests.helpers import make_all_layers_net, make_clip


def test_print_model_is_a_short_summary() -> None:
    torch.manual_seed(0)
    config = resq.ResQConfig("W8A8->W8A{0,4,8}", period=3, policy=resq.ErrorBoundPolicy(tau=2.5))
    qm = resq.convert(DemoSegNet().eval(), config)
    text = repr(qm)
    layers = len(list(qm.resq_layers()))
    assert len(text.splitlines()) <= 6 < len(repr(qm.model).splitlines())
    assert "act_quant" not in text and "weight_quant" not in text  # no Brevitas internals
    assert text.startswith("ResQModel(DemoSegNet, scheme=W8A8->W8A{0,4,8}, period=3")
    assert f"{layers} ResQ layers: Conv2d x" in text and "not calibrated" in text
    assert "ErrorBoundPolicy(tau=2.5," in text
    assert str(qm) == text


def test_summary_names_floating_point_layers_and_calibration() -> None:
    config = resq.ResQConfig("W8A8->W4A4", period=2, calibration=resq.LineSearch(candidates=4))
    qm = resq.convert(make_all_layers_net(), config, filter_fn=lambda m, name: name != "head")
    resq.calibrate(qm, [make_clip(batch=1, frames=4)[0]], samples=4, progress=False)
    text = repr(qm)
    assert ", calibrated" in text and "left in floating point: 1 (head)" in text


def test_target_policy_repr_leaves_out_the_unused_tau() -> None:
    assert repr(resq.ErrorBoundPolicy(target_bops=0.5)) == (
        "ErrorBoundPolicy(target_bops=0.5, granularity='pixel', k=4)")
    assert repr(resq.ErrorBoundPolicy(tau=3.0)).startswith("ErrorBoundPolicy(tau=3.0,")


@pytest.mark.parametrize("rrm,shown", [(True, True), (False, False), (None, True)])
def test_cost_table_shows_rrm_speedup_only_in_rrm_mode(rrm, shown) -> None:
    report = resq.CostReport("W8A8->W8A8", [4.0, 1.0], {"conv": 2.5}, {"conv": 1}, 0.5,
                             speedup=3.0, rrm=rrm)
    assert ("RRM speedup 3.00x" in report.table()) is shown
    unmeasured = resq.CostReport("W8A8->W8A8", [4.0], {"conv": 4.0}, {"conv": 1}, 1.0,
                                 speedup=math.nan, rrm=True)
    assert "RRM speedup" not in unmeasured.table()
