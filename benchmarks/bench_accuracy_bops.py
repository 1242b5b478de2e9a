"""The demo's accuracy-vs-BOPs curve: frame quantization, ResQ, Dynamic-ResQ and RRM.

Families (all on the embedded demo's evaluation clips, mIoU against ground truth):

- frame quantization W8A8, W6A6, W5A5, W4A4;
- ResQ ``W8A8->W8A4`` at T = 2, 3, 4, 5;
- Dynamic-ResQ ``W8A8->W8A{0,4,8}`` at T = 4 over a sweep of BOPs targets (eq. 11's tau solved
  on the calibration clips for each, ``ErrorBoundPolicy(target_bops=...)``; BOPs include the
  policy), or of raw tau values with ``--taus``;
- RRM (``reference="previous"``, ``W8A8->W8A8``, one keyframe per clip) over a threshold sweep,
  plotted at the BOPs of zero-skipping execution (residual rows times their density).

Prints the table and writes ``<out>/accuracy_vs_bops_dynamic.png`` and ``.json``.

    python benchmarks/bench_accuracy_bops.py [--out benchmarks/figures] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import demo_clips
from resq_brevitas.demo.model import NUM_CLASSES, load_demo_model
from resq_brevitas.experiments.evaluation import compare_configs, format_table
from resq_brevitas.experiments.figures import plot_accuracy_vs_bops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target-bops", type=float, nargs="+",
                   default=[0.9, 0.75, 0.6, 0.5, 0.4, 0.3],
                   help="Dynamic-ResQ operating points, as shares of W8A8's BOPs")
    p.add_argument("--taus", type=float, nargs="+",
                   help="raw tau values instead of --target-bops (their BOPs depend on the model)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    p.add_argument("--eval-clips", type=int, default=6)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="fast_hadamard_transform")
    model = load_demo_model()
    cal = resq.LineSearch(candidates=args.candidates, samples=args.calib_samples)
    calib, clips, labels = demo_clips(args.calib_samples, args.eval_clips, args.frames,
                                      args.size)

    configs = [resq.ResQConfig(s, period=1, calibration=cal)
               for s in ("W8A8", "W6A6", "W5A5", "W4A4")]
    configs += [resq.ResQConfig("W8A8->W8A4", period=t, calibration=cal) for t in (2, 3, 4, 5)]
    policies = ([resq.ErrorBoundPolicy(tau=tau) for tau in args.taus] if args.taus else
                [resq.ErrorBoundPolicy(target_bops=b) for b in args.target_bops])
    configs += [resq.ResQConfig("W8A8->W8A{0,4,8}", period=4, calibration=cal, policy=policy)
                for policy in policies]
    configs += [resq.ResQConfig("W8A8->W8A8", period=args.frames, calibration=cal,
                                reference="previous", threshold=eps)
                for eps in args.thresholds]
    start = time.perf_counter()
    rows = compare_configs(model, configs, calib, clips, labels, NUM_CLASSES, progress=False)
    print(f"demo: {args.eval_clips} clips x {args.frames} frames at {args.size}x{args.size}, "
          f"calibration c={args.calib_samples} r={args.candidates} "
          f"({time.perf_counter() - start:.0f} s)")
    print()
    print(format_table(rows))
    print()
    print("RRM rows: BOPs dense as counted by ResQ; 'zero-skipping' GBOPs (plotted) =")
    for r in rows:
        if r.method == "rrm":
            eps = 0.0 if math.isnan(r.threshold) else r.threshold
            print(f"  eps={eps:<5g} mIoU {100 * r.miou_gt:6.2f}  zero-skipping "
                  f"{r.sparse_bops / 1e9:.4f} GBOPs/frame  density {r.density:.3f}  "
                  f"RRM speedup {r.speedup:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_vs_bops_dynamic.json").write_text(
        json.dumps([r.as_dict() for r in rows], indent=2, allow_nan=True))
    path = plot_accuracy_vs_bops(rows, args.out / "accuracy_vs_bops_dynamic.png",
                                 title="Demo: accuracy vs. BOPs")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
