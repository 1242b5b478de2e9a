"""PTQ vs label-free QAT (``resq.train_qat``) on the demo, and what a training step costs.

For W8A8->W4A4 T=4, W8A8->W2A2 T=4 and frame W4A4: output SQNR against the float model and
mIoU (against ground truth and the float model) after calibration and after QAT (distilling the
float model on 8-frame clips drawn from the calibration seeds, never the evaluation clips); the
wall time of one training step relative to one time-batched forward of the same clip (measured
side by side in this process); and, with
``--processes 2``, the time of the same number of steps on 2 gloo processes (each on its half of
the clips) relative to one.

    PYTHONPATH=. python benchmarks/bench_qat.py [--steps 400] [--timing-only] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import resq_brevitas as resq
from resq_brevitas.demo.clips import CALIB_SEED, EVAL_SEED, demo_clips
from resq_brevitas.demo.model import NUM_CLASSES, load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.experiments.evaluation import compare_configs, format_table
from resq_brevitas.train import FloatTeacher, build_optimizer, distillation_loss, qat_step

SCHEMES = [("W8A8->W4A4", 4), ("W8A8->W2A2", 4), ("W4A4", 1)]


def _time_step(qm: resq.ResQModel, clip: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """Seconds of one QAT step and of one batched no-grad forward, alternated."""
    qm = copy.deepcopy(qm).train()
    teacher = FloatTeacher(qm)
    target = teacher(clip)
    optimiser = build_optimizer(qm, 1e-5)
    step_s, forward_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        qat_step(qm, clip, optimiser, lambda out, span: distillation_loss(out, target[:, span]))
        step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            qm(clip)
        forward_s.append(time.perf_counter() - start)
    return min(step_s), min(forward_s)


def _worker(rank: int, world: int, port: int, path: str, clips: list, steps: int,
            rates: tuple[float, float], out: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    qm = torch.load(path, weights_only=False)
    dist.barrier()
    start = time.perf_counter()
    resq.train_qat(qm, clips, steps=steps, lr=rates[0], scale_lr=rates[1], progress=False)
    dist.barrier()
    if rank == 0:
        out["seconds"] = time.perf_counter() - start
    dist.destroy_process_group()


def _distributed_seconds(qm: resq.ResQModel, clips: list, steps: int, world: int,
                         rates: tuple[float, float]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    # The calibrated model through a file (torch.save pickles it): spawn's own pickling of the
    # tensors as shared-memory handles fails ("bad value(s) in fds_to_keep").
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qm.pt")
        torch.save(qm, path)
        mp.spawn(_worker, args=(world, port, path, clips, steps, rates, out), nprocs=world,
                 join=True)
    return float(out["seconds"])


def _accuracy_table(model: torch.nn.Module, configs: list, calib: list, clips: list,
                    labels: list, train_clips: list, args: argparse.Namespace
                    ) -> resq.ResQModel:
    """Print PTQ vs QAT for every config; return the QAT-trained first config's model."""
    trained = {}

    def qat(config: resq.ResQConfig, qm: resq.ResQModel) -> resq.ResQModel:
        qm = copy.deepcopy(qm)
        resq.train_qat(qm, train_clips, steps=args.steps, lr=args.lr, scale_lr=args.scale_lr,
                       progress=False)
        trained[config.notation] = qm
        return qm

    ptq = compare_configs(model, configs, calib, clips, labels, NUM_CLASSES, progress=False)
    qat_rows = compare_configs(model, configs, calib, clips, labels, NUM_CLASSES,
                               progress=False, include_float=False, prepare=qat)
    for row in qat_rows:
        row.method += "+qat"
    print(f"QAT: {args.steps} steps of one 8-frame clip ({len(train_clips)} clips from the "
          f"calibration seeds, distilling the float model), lr={args.lr:g}, "
          f"scale_lr={args.scale_lr:g}")
    print(format_table([*ptq, *qat_rows]))
    for before, after in zip(ptq[1:], qat_rows):
        print(f"{before.scheme:>12} T={before.period}: SQNR {before.sqnr_db:.2f} -> "
              f"{after.sqnr_db:.2f} dB ({after.sqnr_db - before.sqnr_db:+.2f} dB)")
    return trained[configs[0].notation]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale-lr", type=float, default=1e-2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-clips", type=int, default=64,
                   help="8-frame training clips, seeds CALIB_SEED.. (the first ones are the "
                        "calibration scenes)")
    p.add_argument("--dist-steps", type=int, default=24,
                   help="steps per process in the 1-vs-N processes timing")
    p.add_argument("--timing-only", action="store_true",
                   help="skip the PTQ/QAT accuracy table: time a calibrated W8A8->W4A4 model")
    args = p.parse_args()
    if not 1 <= args.train_clips < EVAL_SEED - CALIB_SEED:
        p.error(f"--train-clips must be in 1..{EVAL_SEED - CALIB_SEED - 1} (seeds below the "
                f"evaluation clips'), got {args.train_clips}")
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    calib, clips, labels = demo_clips(64, 6, 16, 64)
    configs = [resq.ResQConfig(scheme=s, period=t) for s, t in SCHEMES]
    # 8-frame clips (two periods of T = 4) from the calibration seeds: label-free QAT trains on
    # calibration-like data, never on the evaluation clips.
    train_clips = [make_clip(CALIB_SEED + i, frames=8)[0][None] for i in range(args.train_clips)]
    if args.timing_only:
        qm = resq.calibrate(resq.convert(model, configs[0]), calib, progress=False)
    else:
        qm = _accuracy_table(model, configs, calib, clips, labels, train_clips, args)
    step_s, forward_s = _time_step(qm, train_clips[0])
    print(f"one QAT step / one batched forward (W8A8->W4A4 T=4, 8 frames 64x64): "
          f"{step_s * 1e3:.0f} ms / {forward_s * 1e3:.0f} ms = {step_s / forward_s:.2f}x")
    if args.processes > 1:
        steps = args.dist_steps
        rates = (args.lr, args.scale_lr)
        one = _distributed_seconds(qm, train_clips, steps * args.processes, 1, rates)
        many = _distributed_seconds(qm, train_clips, steps, args.processes, rates)
        print(f"{steps * args.processes} clips: 1 process {one:.2f} s, {args.processes} "
              f"processes ({steps} steps each) {many:.2f} s: speedup {one / many:.2f}x")


if __name__ == "__main__":
    main()
