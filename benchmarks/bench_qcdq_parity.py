"""QCDQ export in onnxruntime against PyTorch, per optimisation level, on real architectures.

For each model and scheme: the quantization error of the ResQ model against the float model
(output SQNR, what the scheme costs), and the disagreement of the exported QCDQ stream in
onnxruntime with the PyTorch ResQ model at each graph optimisation level (output SQNR; ``inf``:
bit for bit). Models: the demo (loaded with ``load_demo_model``, its own calibration clips), a
MobileNetV3-style block (hard-swish, SE), a ResNet basic block, and a ViT-style block with
LayerNorm, a float ``nn.MultiheadAttention``, GELU and hard-swish (the test models of
``tests/deploy``).

    PYTHONPATH=. python benchmarks/bench_qcdq_parity.py
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.demo.clips import demo_clips
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.deploy import OnnxStream, export
from resq_brevitas.deploy.parity import sqnr_db
from resq_brevitas.deploy.runtime import OPTIMIZATIONS
from tests.deploy.test_export import MobileBlockNet, ResBlockNet
from tests.deploy.test_export_graphs import AttentionNet, not_attention
from tests.helpers import make_clip

SCHEMES = [("W8A8", 1), ("W8A8->W4A4", 4)]


def _block(net_class: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    net = net_class().eval()
    if hasattr(net, "bn"):  # warmed-up BN statistics, as tests/deploy/test_export.py does
        with torch.no_grad():
            net.bn.running_mean.uniform_(-0.3, 0.3)
            net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _cases(size: int, frames: int) -> list[tuple[str, nn.Module, list, torch.Tensor, dict]]:
    calib, clips, _ = demo_clips(32, 1, frames, size)
    cases = [("demo (DemoSegNet)", load_demo_model(), calib, clips[0][None], {})]
    block_calib = [make_clip(batch=2, frames=4, size=16, seed=s) for s in range(4)]
    block_video = make_clip(batch=1, frames=frames, size=16, seed=99, drift=0.15)
    for name, net_class, options in (
            ("MobileNetV3 block (hard-swish, SE)", MobileBlockNet, {}),
            ("ResNet basic block", ResBlockNet, {}),
            ("ViT block (LayerNorm, float MHA, GELU)", AttentionNet,
             {"filter_fn": not_attention})):
        cases.append((name, _block(net_class), block_calib, block_video, options))
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="demo frame size")
    p.add_argument("--frames", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # unsupported-layer and calibration-size notes
    header = ["model", "scheme", "T", "quant SQNR dB", *[f"ort {lv}" for lv in OPTIMIZATIONS],
              "opset"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, model, calib, video, options in _cases(args.size, args.frames):
        with torch.no_grad():
            dense = torch.stack([model(video[:, t]) for t in range(video.shape[1])], 1)
        for scheme, period in SCHEMES:
            qm = resq.convert(model, resq.ResQConfig(scheme=scheme, period=period), **options)
            resq.calibrate(qm, calib, samples=32, progress=False)
            qm.eval()
            with torch.no_grad():
                reference = qm(video)
            with tempfile.TemporaryDirectory() as out:
                manifest = export(qm, video[:, 0], out, format="qcdq")
                agree = [sqnr_db(reference.numpy(), OnnxStream(out, optimization=lv).run(video))
                         for lv in OPTIMIZATIONS]
            row = [name, scheme, str(period), f"{sqnr_db(dense.numpy(), reference.numpy()):.2f}",
                   *[f"{a:.1f}" for a in agree], str(manifest.opset)]
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
