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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "channel"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model()
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
