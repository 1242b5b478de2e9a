"""Train the VideoIQ demo's float TSN-style action classifier (CPU, a few minutes on 1 thread).

Usage (from the repository root, with the package importable)::

    python recipes/train_recognition_demo.py --threads 1

writes ``resq_brevitas/demo/actionnet.pt`` (the shipped checkpoint was produced by exactly this
command). Training follows TSN's segment consensus: each step draws clips of
``action_clips(seed=--seed)``, runs ``--segments`` random frames of each through the per-frame
backbone, averages their logits and takes the cross-entropy with the clip's label.
Flips are label-aware augmentation (a horizontal flip swaps ``left`` and ``right``, a vertical
one ``up`` and ``down``). Held-out clip accuracy (all frames averaged) on
``action_clips(seed=--eval-seed)`` is printed every ``--eval-every`` steps and at the end; the
run is deterministic for a given thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from resq_brevitas.demo.action_model import ACTION_FRAME_SIZE, DemoActionNet, clip_logits
from resq_brevitas.demo.actions import NUM_ACTIONS, action_clips
from resq_brevitas.demo.training import adamw_decay_groups, warmup_cosine

DEFAULT_OUT = (Path(__file__).resolve().parent.parent / "resq_brevitas" / "demo"
               / "actionnet.pt")
#: Label permutations of the flips: horizontal swaps left (1) and right (2), vertical up (3)
#: and down (4).
HFLIP = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7])
VFLIP = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimisation steps")
    parser.add_argument("--batch-clips", type=int, default=16, help="clips per step")
    parser.add_argument("--segments", type=int, default=6, help="frames per clip per step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    parser.add_argument("--train-clips", type=int, default=1600, help="clips in the pool")
    parser.add_argument("--eval-clips", type=int, default=240, help="held-out clips")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between checks")
    parser.add_argument("--seed", type=int, default=0, help="training data and init seed")
    parser.add_argument("--eval-seed", type=int, default=1, help="held-out set seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="state_dict output path")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_clips", "segments", "train_clips", "eval_clips", "eval_every",
                 "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_seed == args.seed:
        parser.error("--eval-seed must differ from --seed so evaluation clips are held out")
    if args.segments > 16:
        parser.error("--segments must be <= 16 (the clips' frames)")
    return args


@torch.no_grad()
def clip_accuracy(model: DemoActionNet, videos: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of clips whose all-frame mean logits pick the label."""
    model.eval()
    preds = []
    for start in range(0, videos.shape[0], 32):
        v = videos[start:start + 32].float()
        logits = model(v.flatten(0, 1)).unflatten(0, v.shape[:2])
        preds.append(clip_logits(logits).argmax(-1))
    return float((torch.cat(preds) == labels).float().mean())


def train(args: argparse.Namespace) -> tuple[DemoActionNet, float]:
    """Train; returns the model (eval mode) and its held-out clip accuracy."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    videos, labels = action_clips(args.train_clips, seed=args.seed, size=ACTION_FRAME_SIZE)
    videos = videos.half()  # halves the pool's memory; widened per batch
    eval_videos, eval_labels = action_clips(args.eval_clips, seed=args.eval_seed,
                                            size=ACTION_FRAME_SIZE)
    model = DemoActionNet()
    optimizer = adamw_decay_groups(model, args.lr, weight_decay=1e-2)
    scheduler = warmup_cosine(optimizer, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    frames = videos.shape[1]
    model.train()
    bar = tqdm(range(args.steps), desc="training")
    for step in bar:
        idx = torch.randint(0, videos.shape[0], (args.batch_clips,), generator=gen)
        t = torch.rand(args.batch_clips, frames, generator=gen).argsort(1)[:, :args.segments]
        x = videos[idx.unsqueeze(1), t].float()  # [B, S, 3, H, W]
        y = labels[idx]
        h = torch.rand(args.batch_clips, generator=gen) < 0.5
        x = torch.where(h.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(h, HFLIP[y], y)
        v = torch.rand(args.batch_clips, generator=gen) < 0.5
        x = torch.where(v.view(-1, 1, 1, 1, 1), x.flip(-2), x)
        y = torch.where(v, VFLIP[y], y)
        logits = model(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        loss = F.cross_entropy(clip_logits(logits), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = clip_accuracy(model, eval_videos, eval_labels)
            model.train()
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, held-out clip accuracy "
                      f"{100 * acc:.2f}%")
    model.eval()
    return model, clip_accuracy(model, eval_videos, eval_labels)


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, report held-out accuracy, save the state_dict."""
    args = parse_args(argv)
    start = time.perf_counter()
    model, acc = train(args)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out clip accuracy ({args.eval_clips} clips, seed {args.eval_seed}): "
          f"{100 * acc:.2f}% (chance {100 / NUM_ACTIONS:.1f}%)")
    print(f"params: {params}  train time: {elapsed:.1f} s")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
