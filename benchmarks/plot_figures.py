"""The paper's Fig. 2 and Fig. 6 on the embedded demo.

- Fig. 2: per layer, variance and 4-bit quantization error of frame inputs vs residuals
  (``x_t - x_{t-1}``), from the float model on the evaluation clips; printed and drawn.
- Fig. 6: Dynamic-ResQ ``W8A8->W8A{0,4,8}`` (T=4, ``--tau``) per-pixel bits for every 2-D layer
  over one evaluation clip.

    python benchmarks/plot_figures.py [--tau 1.47] [--out benchmarks/figures]
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import CALIB_SEED, EVAL_SEED
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.experiments.evaluation import layer_statistics
from resq_brevitas.experiments.figures import plot_bit_maps, plot_layer_statistics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tau", type=float, default=1.47,
                   help="eq. 11 tau (1.47: about 0.5x W8A8 BOPs on the demo, RESULTS.md 6)")
    p.add_argument("--period", type=int, default=4)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--bits", type=int, default=4, help="bits of the Fig. 2 quantizer")
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="fast_hadamard_transform")
    model = load_demo_model()
    clips = [make_clip(EVAL_SEED + i, frames=args.frames, size=args.size)[0] for i in range(3)]

    stats = layer_statistics(model, clips, bits=args.bits)
    print(f"Fig. 2: frames vs residuals (x_t - x_(t-1)), {args.bits}-bit min-max quantizer")
    print(f"{'layer':<18} {'var frame':>10} {'var resid':>10} {'MSE frame':>10} "
          f"{'MSE resid':>10}")
    for s in stats:
        print(f"{s.name:<18} {s.frame_var:>10.4g} {s.residual_var:>10.4g} "
              f"{s.frame_qerr:>10.4g} {s.residual_qerr:>10.4g}")
    lower = sum(s.residual_qerr < s.frame_qerr for s in stats)
    print(f"residual quantization error lower than the frame's in {lower}/{len(stats)} layers")
    fig2 = plot_layer_statistics(stats, args.out / "fig2_residuals_vs_frames.png",
                                 bits=args.bits)

    cal = resq.LineSearch(candidates=args.candidates, samples=args.calib_samples)
    config = resq.ResQConfig("W8A8->W8A{0,4,8}", period=args.period, calibration=cal,
                             policy=resq.ErrorBoundPolicy(tau=args.tau))
    n_calib = max(1, math.ceil(args.calib_samples / 16))
    calib = [make_clip(CALIB_SEED + i, frames=16, size=args.size)[0] for i in range(n_calib)]
    qm = resq.calibrate(resq.convert(model, config), calib, progress=False)
    with torch.no_grad():
        qm(clips[0].unsqueeze(0))
    print()
    print(f"Fig. 6: {config.scheme} T={args.period} tau={args.tau:g}: mean residual bits "
          "per layer")
    for name, bits in qm.last_bit_maps.items():
        residual = bits[0][~qm.last_keyframes[0]].float()
        share = {b: float((residual == b).float().mean()) for b in (0, 4, 8)}
        print(f"  {name:<18} mean {residual.mean():.2f}  "
              + "  ".join(f"{b}-bit {100 * v:5.1f}%" for b, v in share.items()))
    fig6 = plot_bit_maps(qm.last_bit_maps, args.out / "fig6_dynamic_bit_maps.png",
                         video=clips[0], keyframes=qm.last_keyframes,
                         title=f"Dynamic-ResQ {config.scheme} T={args.period} "
                               f"tau={args.tau:g}: bits per pixel")
    print(f"wrote {fig2}, {fig6}")


if __name__ == "__main__":
    main()
