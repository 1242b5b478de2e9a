"""The demo's quantization profile against benchmarks/RESULTS.md section 8's acceptance criteria.

Measures what does not involve ResQ's result: folded BatchNorm scale spread, Fig. 2's premise per
layer input (``var(x_t - x_(t-d)) / var(x_t)`` at d = 1..3, float model) and ``resq.analyze`` of
W8A8 frame quantization (local 8-bit activation SQNR, threshold / std per layer).

    python benchmarks/demo_profile.py [--checkpoint PATH] [--out DIR] [--calib-frames 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import CALIB_FRAMES, demo_clips
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.experiments.analysis import analyze, format_analysis, write_analysis
from resq_brevitas.experiments.evaluation import clip_batches


def residual_ratios(model: torch.nn.Module, clips: list[torch.Tensor]) -> dict[str, list[float]]:
    """Per conv / linear layer input: ``var(x_t - x_(t-d)) / var(x_t)`` for d = 1, 2, 3."""
    inputs: dict[str, list[torch.Tensor]] = {}
    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    hooks = [m.register_forward_pre_hook(
        lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
        for n, m in model.named_modules() if isinstance(m, kinds)]
    with torch.no_grad():
        for clip in clips:
            model(clip)
    for h in hooks:
        h.remove()
    ratios = {}
    for name, xs in inputs.items():
        den = sum(float((x - x.mean()).pow(2).mean()) for x in xs)
        ratios[name] = [sum(float((x[d:] - x[:-d]).pow(2).mean()) for x in xs) / den
                        for d in (1, 2, 3)]
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    p.add_argument("--calib-frames", type=int, default=CALIB_FRAMES)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model(args.checkpoint)
    calib, clips, _ = demo_clips(64, 6, 16, 64, calib_frames=args.calib_frames)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            s = (m.weight.abs() / torch.sqrt(m.running_var + m.eps)).detach()
            print(f"BN {name}: folded scale max {float(s.max()):.3g}, median "
                  f"{float(s.median()):.3g} (x{float(s.max() / s.median()):.1f})")
    print("var(x_t - x_(t-d)) / var(x_t), d = 1 2 3")
    for name, r in residual_ratios(model, clips).items():
        print(f"  {name:18s} " + " ".join(f"{v:.3f}" for v in r))
    config = resq.ResQConfig("W8A8", calibration=resq.LineSearch(candidates=20, samples=64))
    qm = resq.calibrate(resq.convert(model, config), clip_batches(calib), progress=False)
    report = analyze(qm, clips, model, progress=False)
    print(format_analysis(report))
    write_analysis(report, args.out, prefix="demo_profile_w8a8")
    print(f"W8A8 output SQNR {report.sqnr_db:.2f} dB")
    for r in report.layers:
        f = r.frames
        print(f"  {r.name:18s} local act {r.local_db.get('keyframe_act', float('nan')):6.2f} dB"
              f"  threshold/std {f.threshold / f.std:6.2f}  clipped {100 * f.clipped:.3f}%")


if __name__ == "__main__":
    main()
