"""``recipes/apply_resq.py --qat-steps N``: 'ResQ + QAT' rows, alone and under torchrun."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.test_apply_resq import MYNET, ROOT, SCRIPT, _run, _strict_json

ARGS = ["--model", "mynet:build", "--clips", "mynet:loader", "--scheme", "W4A4",
        "--scheme", "W8A8->W4A4", "--period", "2", "--frames", "4", "--calib-samples", "8",
        "--candidates", "3", "--no-progress", "--out", "out", "--qat-steps", "3"]


def _check(records: list[dict]) -> None:
    methods = [(r["method"], r["scheme"]) for r in records]
    assert methods == [("float", "fp32"), ("frame", "W4A4"), ("resq", "W8A8->W4A4"),
                       ("frame+qat", "W4A4"), ("resq+qat", "W8A8->W4A4")]
    for ptq, qat in zip(records[1:3], records[3:5]):
        assert math.isfinite(qat["sqnr_db"]) and qat["sqnr_db"] != ptq["sqnr_db"]
        assert qat["mean_bops"] == ptq["mean_bops"]  # training changes values, not costs


def test_qat_rows_next_to_the_ptq_rows(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET)
    result = _run(ARGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    _check(_strict_json((tmp_path / "out" / "results.json").read_text()))
    assert "[5/5] resq+qat W8A8->W4A4 T=2" in result.stdout


@pytest.mark.slow
def test_qat_under_torchrun_with_two_cpu_processes(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # --standalone: a local rendezvous on a free port (``--master_port 0`` hands the workers
        # port 0 and rank 1 never finds rank 0's store)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), *ARGS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _check(_strict_json((tmp_path / "out" / "results.json").read_text()))
    assert result.stdout.count("method ") == 1  # rank 0 alone prints the table
