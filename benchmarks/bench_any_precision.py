"""Any-precision residual weights (VideoIQ section 3.4) against separately quantized ones.

``ResQConfig(residual_weights="truncated")`` takes each residual weight from the keyframe's
integer weight by dropping its least significant bits (mean re-aligned); ``"separate"`` (ResQ)
quantizes it on its own. Same demo model, clips and calibration settings for both; the stored
weight memory counts every layer's integer weights (plus, for truncation, one float32 mean offset
per tensor or output channel and residual precision).

    PYTHONPATH=. python benchmarks/bench_any_precision.py
"""

from __future__ import annotations

import argparse

import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import demo_clips
from resq_brevitas.demo.model import NUM_CLASSES, load_demo_model
from resq_brevitas.experiments.evaluation import compare_configs, format_table

SCHEMES = ["W8A8->W4A4", "W8A8->W4A8", "W8A8->W6A6", "W8A8->W2A8"]


def stored_weight_bytes(model: torch.nn.Module, config: resq.ResQConfig) -> float:
    """Bytes of the integer weights a deployment stores for ``config`` (bias excluded)."""
    qm = resq.convert(model, config)
    total = 0.0
    for _, layer in qm.resq_layers():
        numel = layer.weight.numel()
        key_bits = layer.keyframe_precision.bops_weight_bits
        total += numel * key_bits / 8
        res = layer.residual_precision
        if res is None:
            continue
        if config.residual_weights == "separate":
            total += numel * res.bops_weight_bits / 8
        else:
            channels = layer.weight.shape[layer.output_channel_dim]
            total += 4 * (channels if config.weight_granularity == "channel" else 1)
    return total


def weight_error(model: torch.nn.Module, config: resq.ResQConfig) -> tuple[float, float]:
    """Over all ResQ layers: the residual weight's relative squared error
    ``sum ||q(w) - w||^2 / sum ||w||^2`` and the share of its entries that are exactly 0."""
    qm = resq.convert(model, config)
    err = norm = zeros = count = 0.0
    with torch.no_grad():
        for _, layer in qm.resq_layers():
            w, q = layer.weight, layer.residual.quant_weight()
            err += float((q - w).square().sum())
            norm += float(w.square().sum())
            zeros += float((q == 0).sum())
            count += w.numel()
    return err / norm, zeros / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "channel"))
    p.add_argument("--weights-only", action="store_true",
                   help="only the residual weights' error and zero share (no evaluation)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    print(f"{'scheme':<12} {'kind':<10} {'rel. sq. error':>14} {'exact zeros':>11}")
    for scheme in SCHEMES:
        for kind in ("separate", "truncated"):
            cfg = resq.ResQConfig(scheme=scheme, residual_weights=kind,
                                  weight_granularity=args.granularity)
            err, zeros = weight_error(model, cfg)
            print(f"{scheme:<12} {kind:<10} {err:>14.4f} {zeros:>11.1%}")
    print()
    if args.weights_only:
        return
    calib, clips, labels = demo_clips(64, 6, 16, 64)
    kinds = ("separate", "truncated")
    configs = [resq.ResQConfig(scheme=s, period=4, residual_weights=kind,
                               weight_granularity=args.granularity)
               for kind in kinds for s in SCHEMES]
    rows = compare_configs(model, configs, calib, clips, labels, NUM_CLASSES, progress=False)
    n = len(SCHEMES)
    for i, kind in enumerate(kinds):
        print(f'residual_weights="{kind}" (weight_granularity="{args.granularity}")')
        print(format_table([rows[0], *rows[1 + i * n:1 + (i + 1) * n]]))
        print()
    print(f"{'scheme':<12} {'separate KiB':>12} {'truncated KiB':>13} {'saving':>7}")
    for cfg_sep, cfg_tru in zip(configs[:n], configs[n:]):
        sep, tru = stored_weight_bytes(model, cfg_sep), stored_weight_bytes(model, cfg_tru)
        print(f"{cfg_sep.scheme.notation:<12} {sep / 1024:>12.1f} {tru / 1024:>13.1f} "
              f"{1 - tru / sep:>7.1%}")


if __name__ == "__main__":
    main()
