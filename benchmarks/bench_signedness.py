"""The demo's table with the paper's signed quantizers and with ``act_signedness="auto"``.

``auto`` makes every keyframe-path activation quantizer whose calibration input never goes below
zero (the post-ReLU tensors) unsigned: the same bits and BOPs, twice the resolution.

    PYTHONPATH=. python benchmarks/bench_signedness.py
"""

from __future__ import annotations

import argparse

import torch

import resq_brevitas as resq
from resq_brevitas.demo.clips import demo_clips
from resq_brevitas.demo.model import NUM_CLASSES, load_demo_model
from resq_brevitas.experiments.evaluation import compare_configs, format_table

SCHEMES = [("W8A8", 1), ("W6A6", 1), ("W5A5", 1), ("W8A8->W4A4", 4), ("W8A8->W8A4", 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    calib, clips, labels = demo_clips(64, 6, 16, 64)
    configs = [resq.ResQConfig(scheme=s, period=t, act_signedness=signedness)
               for signedness in ("signed", "auto") for s, t in SCHEMES]
    rows = compare_configs(model, configs, calib, clips, labels, NUM_CLASSES, progress=False)
    for signedness, chunk in (("signed (eq. 1, the paper's)", rows[1:1 + len(SCHEMES)]),
                              ('act_signedness="auto"', rows[1 + len(SCHEMES):])):
        print(signedness)
        print(format_table([rows[0], *chunk]))
        print()


if __name__ == "__main__":
    main()
