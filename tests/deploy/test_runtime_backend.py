"""OnnxStream picks its backend from the manifest's format; ``backend=`` still overrides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.deploy import Manifest, OnnxStream
from resq_brevitas.deploy.runtime import backend_for
from tests.helpers import make_clip

pytest.importorskip("onnxruntime")
pytest.importorskip("qonnx")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def qm() -> resq.ResQModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    config = resq.ResQConfig("W8A8->W4A4", period=2, calibration=resq.LineSearch(candidates=4))
    return resq.calibrate(resq.convert(net, config), [make_clip(batch=1, frames=4, size=8)[0]],
                          samples=4, progress=False)


@pytest.mark.parametrize("fmt,expected", [("qonnx", "qonnx"), ("qcdq", "onnxruntime")])
def test_backend_follows_the_manifest_format(qm, tmp_path, fmt: str, expected: str) -> None:
    video = make_clip(batch=1, frames=3, size=8, seed=1)
    resq.export(qm, video[:, 0], tmp_path, format=fmt)
    stream = OnnxStream(tmp_path)  # a qonnx folder in onnxruntime fails on its Quant nodes
    assert stream.backend == expected
    out = stream.run(video)
    with torch.no_grad():
        reference = qm(video).numpy()
    assert out.shape == reference.shape
    # the graphs ran (not just opened): outputs follow the PyTorch model up to export rounding
    assert np.abs(out - reference).max() <= 0.05 * np.abs(reference).max()


def test_an_explicit_backend_overrides_the_format(qm, tmp_path) -> None:
    video = make_clip(batch=1, frames=3, size=8, seed=2)
    resq.export(qm, video[:, 0], tmp_path, format="qonnx")
    # the override is honoured even where it cannot work: onnxruntime knows no Quant op
    with pytest.raises(Exception, match="Quant"):
        OnnxStream(tmp_path, backend="onnxruntime")


def test_backend_for_rejects_formats_without_step_graphs() -> None:
    manifest = Manifest(format="fx", period=4, files={"graph_module": "g.pt"})
    with pytest.raises(ValueError, match=r"format 'fx' has no ONNX step graphs"):
        backend_for(manifest)
    assert backend_for(manifest, "onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'tvm'"):
        backend_for(manifest, "tvm")
