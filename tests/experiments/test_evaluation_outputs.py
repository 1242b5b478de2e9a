"""The comparison's outputs: one set of units in records and table, strict-JSON values, mIoU
against the float model without labels, rows reported as they finish."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.experiments.evaluation import (
    COLUMNS,
    EvalRow,
    compare_configs,
    config_label,
    format_table,
)
from resq_brevitas.experiments.metrics import miou
from tests.helpers import make_clip

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [
    EvalRow("float", "fp32", 1, 0.91, 1.0, math.inf, math.nan),
    EvalRow("frame", "W8A8", 1, 0.9, 0.95, 30.0, 4e9, rel_bops=1.0),
    EvalRow("dynamic", "W8A8->W8A{0,4,8}", 4, math.nan, 0.9234, 26.5, 1.5e9, rel_bops=0.375,
            tau=2.5, target_bops=0.4, policy_bops=3e7, density=0.25),
    EvalRow("rrm", "W8A8->W8A8", 16, 0.8, 0.85, 20.0, 3e9, threshold=0.05, speedup=2.5),
]


def test_records_use_percent_and_null_for_what_does_not_apply() -> None:
    for row in ROWS:
        record = row.record()
        assert list(record) == list(COLUMNS)
        assert record["miou_float_pct"] == pytest.approx(100 * row.miou_float)
        # strict JSON: NaN and inf become null
        json.loads(json.dumps(record, allow_nan=False))
    float_row, _, dynamic, _ = (r.record() for r in ROWS)
    assert float_row["sqnr_db"] is None and float_row["mean_bops"] is None
    assert dynamic["miou_gt_pct"] is None and dynamic["density_pct"] == pytest.approx(25.0)
    assert dynamic["policy_pct"] == pytest.approx(100 * 3e7 / 1.5e9)


def test_table_shows_the_records_values_in_the_same_units() -> None:
    lines = format_table(ROWS).splitlines()
    header = lines[0].replace("mIoU GT %", "mIoU_GT_%").replace("mIoU float %", "mIoU_float_%")
    header = header.replace("SQNR dB", "SQNR_dB").replace("x W8A8", "x_W8A8")
    header = header.replace("policy %", "policy_%").replace("density %", "density_%")
    names = header.replace("RRM eta", "RRM_eta").split()
    assert names[names.index("mIoU_GT_%"):names.index("mIoU_GT_%") + 2] == [
        "mIoU_GT_%", "mIoU_float_%"]
    keys = {"mIoU_GT_%": "miou_gt_pct", "mIoU_float_%": "miou_float_pct", "SQNR_dB": "sqnr_db",
            "BOPs/frame": "mean_bops", "x_W8A8": "rel_bops", "density_%": "density_pct",
            "RRM_eta": "speedup", "target": "target_bops"}
    for row, line in zip(ROWS, lines[2:]):
        cells = dict(zip(names, line.split()))
        record = row.record()
        for name, key in keys.items():
            value = record[key]
            if value is None:
                assert cells[name] == "-", (name, line)
            else:
                assert float(cells[name]) == pytest.approx(value, rel=5e-3, abs=5e-3), name


class SegNet(nn.Module):
    """Per-pixel class scores [B, 3, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_miou_against_float_needs_no_labels_and_rows_arrive_as_they_finish(capsys) -> None:
    torch.manual_seed(0)
    net = SegNet().eval()
    calib = list(make_clip(batch=2, frames=4, size=8, seed=1))
    clips = list(make_clip(batch=2, frames=4, size=8, seed=2))
    configs = [resq.ResQConfig("W8A8->W4A4", period=2, calibration=resq.LineSearch(4, 8)),
               resq.ResQConfig("W4A4", calibration=resq.LineSearch(4, 8))]
    finished: list[EvalRow] = []
    independent: dict[str, float] = {}

    def score(config: resq.ResQConfig, qm: resq.ResQModel) -> None:
        with torch.no_grad():
            pred = qm(torch.stack(clips)).argmax(2)
            ref = torch.stack([torch.stack([net(c[t:t + 1])[0] for t in range(4)])
                               for c in clips]).argmax(2)
        independent[config.scheme.notation] = miou(pred, ref, 3)

    rows = compare_configs(net, configs, calib, clips, labels=None, num_classes=None,
                           progress=True, on_model=score, on_row=finished.append)
    assert finished == rows
    assert math.isnan(rows[0].miou_gt) and rows[0].miou_float == 1.0
    for row in rows[1:]:
        assert row.miou_float == pytest.approx(independent[row.scheme])
    bar = capsys.readouterr().err
    assert "schemes: W8A8->W4A4 T=2" in bar and "schemes: W4A4" in bar


def test_config_labels_name_the_operating_point() -> None:
    pool = "W8A8->W8A{0,4,8}"
    assert config_label(resq.ResQConfig("W4A4")) == "W4A4"
    assert config_label(resq.ResQConfig(pool, period=2, policy=resq.ErrorBoundPolicy(
        target_bops=0.5))) == f"{pool} T=2 target_bops=0.5"
    assert config_label(resq.ResQConfig(pool, policy=resq.ErrorBoundPolicy(tau=3))) == (
        f"{pool} T=4 tau=3")
    assert config_label(resq.ResQConfig("W8A8->W8A8", reference="previous", threshold=0.1)
                        ).endswith("eps=0.1")
