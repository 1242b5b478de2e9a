"""Train the embedded demo's float DemoSegNet on synthetic video frames (CPU, ~10 minutes).

Usage (from the repository root, with the package installed, e.g. ``pip install -e .``)::

    python recipes/train_demo.py --out resq_brevitas/demo/segnet.pt

The shipped checkpoint was produced by ``python recipes/train_demo.py --threads 1`` (the
defaults otherwise); the run is deterministic for a given thread count. Every ``--eval-every``
steps the held-out mIoU on a few clips is printed, so convergence can be read off the log (the
last evaluations agree to within noise); at the end the script prints, per BatchNorm layer, the
largest and median folded scale ``|gamma| / sqrt(running_var + eps)``: a channel whose scale is
far above the median is a near-constant channel blown up by BN, which quantizes badly.

Training frames are sampled from clips of ``SyntheticVideoDataset(seed=--seed)``; the held-out
mIoU is measured on whole clips of ``SyntheticVideoDataset(seed=--eval-seed)``, whose clip
seeds are disjoint from the training ones.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from resq_brevitas.demo.model import FRAME_SIZE, NUM_CLASSES, DemoSegNet
from resq_brevitas.demo.synthetic import SyntheticVideoDataset
from resq_brevitas.demo.training import adamw_decay_groups, warmup_cosine
from resq_brevitas.experiments.metrics import miou

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "resq_brevitas" / "demo" / "segnet.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak Adam learning rate")
    parser.add_argument(
        "--train-clips", type=int, default=3000, help="clips in the training frame pool"
    )
    parser.add_argument(
        "--clip-frames", type=int, default=4, help="length of each generated training clip"
    )
    parser.add_argument(
        "--frames-per-clip", type=int, default=2, help="frames kept from each training clip"
    )
    parser.add_argument("--eval-clips", type=int, default=32, help="held-out clips")
    parser.add_argument(
        "--bg-weight", type=float, default=0.3, help="cross-entropy weight of the background"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=1e-2,
        help="AdamW decoupled weight decay of conv/linear weights and BN scales (not biases)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=500, help="steps between held-out checks (8 clips)"
    )
    parser.add_argument(
        "--noise-aug", type=float, default=0.2,
        help="sensor-noise augmentation: each training frame gets white Gaussian noise of a "
        "std drawn uniformly from [0, NOISE_AUG] (normalised units; the data's own sensor "
        "noise is 0.032); 0 turns it off",
    )
    parser.add_argument("--seed", type=int, default=0, help="training data and init seed")
    parser.add_argument("--eval-seed", type=int, default=1, help="held-out dataset seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads; use 1 when other processes share the cores, since an "
        "oversubscribed OpenMP pool can be several times slower than a single thread",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="state_dict output path")
    args = parser.parse_args(argv)
    if args.frames_per_clip > args.clip_frames:
        parser.error("--frames-per-clip must be <= --clip-frames")
    if args.noise_aug < 0:
        parser.error(f"--noise-aug must be >= 0, got {args.noise_aug}")
    if args.eval_seed == args.seed:
        parser.error("--eval-seed must differ from --seed so evaluation clips are held out")
    names = ("steps", "eval_every", "batch_size", "train_clips", "clip_frames",
             "frames_per_clip", "eval_clips")
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_frame_pool(
    num_clips: int, clip_frames: int, frames_per_clip: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect evenly spaced frames from many short clips.

    Consecutive frames are near-duplicates, so many short clips give far more distinct
    object instances per second of generation than a few long ones; with too few instances
    the network memorises shapes instead of learning them.
    """
    dataset = SyntheticVideoDataset(
        num_clips, frames=clip_frames, size=FRAME_SIZE, num_classes=NUM_CLASSES, seed=seed
    )
    idx = torch.linspace(0, dataset.frames - 1, frames_per_clip).round().long()
    videos, labels = [], []
    for i in tqdm(range(num_clips), desc="generating clips", leave=False):
        video, label = dataset[i]
        videos.append(video[idx])
        # uint8 labels quarter the pool's memory; they are widened per batch.
        labels.append(label[idx].to(torch.uint8))
    return torch.cat(videos), torch.cat(labels)


def bn_scale_spread(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Per BatchNorm layer: (largest, median) folded channel scale ``|gamma|/sqrt(var+eps)``."""
    spread = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            scale = module.weight.detach().abs() / torch.sqrt(module.running_var + module.eps)
            spread[name] = (float(scale.max()), float(scale.median()))
    return spread


@torch.no_grad()
def evaluate(model: DemoSegNet, num_clips: int, seed: int) -> float:
    """mIoU of ``model`` over every frame of ``num_clips`` clips of dataset ``seed``."""
    model.eval()
    dataset = SyntheticVideoDataset(num_clips, size=FRAME_SIZE, num_classes=NUM_CLASSES, seed=seed)
    preds, targets = [], []
    for i in range(num_clips):
        video, label = dataset[i]
        preds.append(model(video).argmax(dim=1))
        targets.append(label)
    return miou(torch.cat(preds), torch.cat(targets), NUM_CLASSES)


def train(args: argparse.Namespace) -> tuple[DemoSegNet, float]:
    """Train a DemoSegNet; returns the model (eval mode) and its held-out mIoU."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    frames, labels = build_frame_pool(
        args.train_clips, args.clip_frames, args.frames_per_clip, args.seed
    )
    model = DemoSegNet(num_classes=NUM_CLASSES)
    optimizer = adamw_decay_groups(model, args.lr, args.weight_decay)
    # Short linear warm-up, then cosine decay to ~0: robust for Adam on small nets.
    scheduler = warmup_cosine(optimizer, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    # Background covers most pixels but mIoU weighs every class equally; down-weighting it
    # spends the loss on telling the shapes apart.
    class_weight = torch.ones(NUM_CLASSES)
    class_weight[0] = args.bg_weight
    model.train()
    progress = tqdm(range(args.steps), desc="training")
    for step in progress:
        idx = torch.randint(0, frames.shape[0], (args.batch_size,), generator=gen)
        x, y = frames[idx], labels[idx].long()
        # Flips keep every class's shape identity, so they are free, label-exact augmentation.
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        vflip = torch.rand(args.batch_size, generator=gen) < 0.5
        x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
        y = torch.where(vflip.view(-1, 1, 1), y.flip(-2), y)
        if args.noise_aug > 0:
            # Real networks see many noise realisations of a scene; without this the demo's
            # logits followed its sensor noise (a second realisation: 19.6 dB output SQNR).
            std = args.noise_aug * torch.rand(args.batch_size, 1, 1, 1, generator=gen)
            x = x + std * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), y, weight=class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            score = evaluate(model, min(8, args.eval_clips), args.eval_seed)
            model.train()
            progress.write(f"step {step + 1}: loss {loss.item():.4f}, held-out mIoU (8 clips) "
                           f"{score:.4f}")
    model.eval()
    return model, evaluate(model, args.eval_clips, args.eval_seed)


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, report held-out mIoU, save the state_dict."""
    args = parse_args(argv)
    start = time.perf_counter()
    model, score = train(args)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out mIoU ({args.eval_clips} clips, seed {args.eval_seed}): {score:.4f}")
    print(f"params: {params}  train time: {elapsed:.1f} s")
    for name, (largest, median) in bn_scale_spread(model).items():
        print(f"BN {name}: folded scale max {largest:.3g}, median {median:.3g} "
              f"(x{largest / median:.1f})")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
