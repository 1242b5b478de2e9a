"""The README's own-training-loop example runs, and it trains."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _user_loop() -> str:
    text = README.read_text()
    match = re.search(r"<!-- user-loop -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its user-loop example"
    return match.group(1)


def test_readme_user_loop_runs_and_lowers_the_distillation_loss() -> None:
    code = _user_loop()
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the README's code, as a user would run it
    qm, clips, float_model = namespace["qm"], namespace["clips"], namespace["float_model"]
    assert not qm.training

    def loss() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(
                qm(v), float_model(v.flatten(0, 1)).unflatten(0, v.shape[:2]))) for v in clips)

    trained = loss()
    # the same code with the optimiser steps removed: the untrained model's loss
    exec(code.replace("optimiser.step()", "pass"), namespace)
    qm = namespace["qm"]
    assert trained < loss()
