"""Calibration time and peak memory as the number of calibration samples ``c`` grows, and how
close calibration gets to its limit.

Each ``c`` runs in a fresh subprocess (peak RSS is per process); the peak RSS growth during
``calibrate`` is reported next to the wall time. The streaming line search keeps memory flat in
``c``: only the time should grow.

The limit: eq. 8's pass 2 must run the layer's op once per candidate ``r`` on every calibration
input of every quantizer (frames for keyframe quantizers, residuals for residual ones). Another
subprocess captures exactly those inputs (what calibration's observers see) and times the bare
``r`` ops on them, in the batches calibration uses; "x limit" is calibration's wall time over
that.

    python benchmarks/bench_calibration.py [--samples 16 64 256] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(samples: int, size: int, candidates: int) -> None:
    import torch

    import resq_brevitas as resq
    from resq_brevitas.demo.model import load_demo_model
    from resq_brevitas.demo.synthetic import make_clip

    torch.set_num_threads(2)
    frames = 16
    clips = [make_clip(5_000 + i, frames=frames, size=size)[0]
             for i in range(-(-samples // frames))]
    qm = resq.convert(load_demo_model(), resq.ResQConfig("W8A8->W4A4", period=4))
    with torch.no_grad():  # warm up allocator and kernels before the baseline is read
        qm(clips[0][:4].unsqueeze(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    resq.calibrate(qm, clips, samples=samples, candidates=candidates, progress=False)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clip_mb = sum(c.numel() * 4 for c in clips) / 2**20
    print(json.dumps({"samples": samples, "seconds": elapsed,
                      "peak_growth_mb": (peak - before) / 1024, "peak_mb": peak / 1024,
                      "clip_data_mb": clip_mb}))


def _bare_limit(samples: int, size: int, candidates: int) -> None:
    """Time ``r`` bare layer ops per quantizer on the inputs calibration sees."""
    import torch

    import resq_brevitas as resq
    from resq_brevitas.calibrate import iter_clips
    from resq_brevitas.demo.model import load_demo_model
    from resq_brevitas.demo.synthetic import make_clip
    from resq_brevitas.nn.residual import value_of

    torch.set_num_threads(2)
    frames = 16
    clips = [make_clip(5_000 + i, frames=frames, size=size)[0]
             for i in range(-(-samples // frames))]
    qm = resq.convert(load_demo_model(), resq.ResQConfig("W8A8->W4A4", period=4))
    layers = dict(qm.resq_layers())
    captured: dict[tuple[str, str], list[torch.Tensor]] = {}

    def keep(name: str, kind: str, x: torch.Tensor) -> None:
        captured.setdefault((name, kind), []).append(x.detach().clone())

    # BatchNorm folds on the first calibration frame (the demo checks its input shapes, so
    # torch.fx cannot trace it); the captured inputs must be those of the folded layers.
    resq.calibrate(qm, clips[:1], samples=2, candidates=2, progress=False)
    with torch.no_grad(), resq.quantization_disabled(qm):
        for clip in iter_clips(qm, clips, samples):
            qm.reset()
            qm.run_clip(clip, adaptive=False, observer=keep)
    with torch.no_grad():
        weights = {}
        for name, layer in layers.items():
            weights[(name, "frame")] = value_of(layer.quant_weight())
            weights[(name, "residual")] = layer.residual.quant_weight()
        start = time.perf_counter()
        for key, inputs in captured.items():
            op, qweight = layers[key[0]].linear_op, weights[key]
            for x in inputs:
                for _ in range(candidates):
                    op(x, qweight)
        elapsed = time.perf_counter() - start
    print(json.dumps({"samples": samples, "seconds": elapsed}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        _child(args.child, args.size, args.candidates)
        return
    if args.bare is not None:
        _bare_limit(args.bare, args.size, args.candidates)
        return
    print(f"demo model, W8A8->W4A4 T=4, frames {args.size}x{args.size}, r={args.candidates}")
    print(f"{'c':>5} {'time s':>8} {'s/sample':>9} {'peak growth MB':>15} {'peak RSS MB':>12} "
          f"{'clip data MB':>13} {'limit s':>8} {'x limit':>8}")

    def child(flag: str, samples: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, flag, str(samples), "--size", str(args.size),
             "--candidates", str(args.candidates)],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        return json.loads(out)

    for samples in args.samples:
        r, bare = child("--child", samples), child("--bare", samples)
        print(f"{r['samples']:>5} {r['seconds']:>8.1f} {r['seconds'] / samples:>9.3f} "
              f"{r['peak_growth_mb']:>15.1f} {r['peak_mb']:>12.1f} {r['clip_data_mb']:>13.2f} "
              f"{bare['seconds']:>8.2f} {r['seconds'] / bare['seconds']:>7.2f}x")


if __name__ == "__main__":
    main()
