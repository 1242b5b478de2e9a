"""Sparse residual executor: wall time of residual frames vs the dense residual path and the float
model, on clips where a share of the frame changes (a moving object over a still background).

For each frame size and changed share, one clip of ``--frames`` frames (one keyframe, the rest
residual frames against it): a still background (a frame of the demo's synthetic video) and a
square of random texture sliding right by ``--speed`` pixels a frame. The square's side is
chosen so that the changed share of the residual frames (pixels that differ from the keyframe,
averaged over the clip) is the target; 100% is a full-frame texture panning, 0% the still
background alone (the floor of a residual frame). Three models run
every residual frame of every clip, interleaved, ``--repeats`` times (the first round warms up):
the calibrated ResQ model (``W8A8->W4A4``) with ``execution="dense"``, the same model with
``execution="sparse"`` (same ranges, ``resq.with_execution``), and the float demo model.
Printed: medians of ms per residual frame, the ratios, the share of conv tiles the sparse
executor computed, the break-even share (sparse = dense) and the share where sparse reaches half
the float frame; ``--out`` writes ``sparse_speed.png`` and ``sparse_speed.json``.

    python benchmarks/bench_sparse.py [--sizes 64 256] [--shares 0 0.05 0.1 0.25 0.5 1.0]
        [--frames 8] [--repeats 7] [--threads 1] [--tiles auto] [--out benchmarks/figures]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import resq_brevitas as resq
from resq_brevitas import with_execution
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.experiments.figures import new_figure
from resq_brevitas.nn.executors import reset_tile_counters, tiles_of


@dataclass
class Row:
    """One measurement: a frame size, a changed share and the medians of each model."""

    size: int
    target: float
    share: float
    side: int
    float_ms: float
    dense_ms: float
    sparse_ms: dict[str, float]
    tiles: dict[str, float]
    max_abs_diff: float


def union_share(side: int, size: int, frames: int, speed: int) -> float:
    """Changed share of the residual frames of a square of ``side`` moving ``speed`` px a frame:
    the union of its footprints in the keyframe and in frame ``t`` (a random texture changes
    every pixel it covers or uncovers), averaged over ``t = 1 .. frames - 1``."""
    areas = [side * (side + min(speed * t, side)) for t in range(1, frames)]
    return statistics.fmean(areas) / size**2


def side_for(target: float, size: int, frames: int, speed: int) -> int:
    """The square side whose changed share is closest to ``target`` (the square must stay in
    the frame for the whole clip)."""
    sides = range(2, size - speed * (frames - 1) - 1)
    return min(sides, key=lambda a: abs(union_share(a, size, frames, speed) - target))


def moving_object_clip(background: Tensor, target: float, frames: int, speed: int,
                       seed: int) -> tuple[Tensor, int]:
    """``[1, T, 3, H, W]``: ``background`` with a textured square moving right (for
    ``target >= 1`` a full-frame texture panning, for ``target <= 0`` the still background), and
    the square's side (0 without a square)."""
    size = background.shape[-1]
    g = torch.Generator().manual_seed(seed)
    texture = torch.randn(3, size, size, generator=g)
    if target <= 0.0:  # a still clip: the floor of a residual frame
        return background.expand(frames, -1, -1, -1)[None].clone(), 0
    if target >= 1.0:
        return torch.stack([texture.roll(speed * t, dims=-1) for t in range(frames)])[None], 0
    side = side_for(target, size, frames, speed)
    top = (size - side) // 2
    out = []
    for t in range(frames):
        frame = background.clone()
        left = 1 + speed * t
        frame[:, top:top + side, left:left + side] = texture[:, :side, :side]
        out.append(frame)
    return torch.stack(out)[None], side


def changed_share(clip: Tensor) -> float:
    """Mean share of pixels of the residual frames that differ from the keyframe (frame 0)."""
    return float((clip[0, 1:] != clip[0, :1]).any(dim=1).double().mean())


def residual_frame_time(step: Callable[[Tensor], object], clip: Tensor,
                        reset: Callable[[], None] | None) -> float:
    """Seconds per residual frame: frame 0 (the keyframe) untimed, then frames 1.. timed."""
    if reset is not None:
        reset()
    step(clip[:, 0])
    start = time.perf_counter()
    for t in range(1, clip.shape[1]):
        step(clip[:, t])
    return (time.perf_counter() - start) / (clip.shape[1] - 1)


def crossing(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """The first ``x`` where ``ys`` crosses ``level`` upwards (linear interpolation); ``None``
    if it never does, ``-inf`` if it starts above."""
    if ys[0] > level:
        return -math.inf
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y0 <= level < y1:
            return x0 + (level - y0) * (x1 - x0) / (y1 - y0)
    return None


def build_models(size: int, scheme: str, frames: int, tiles: Sequence[str]
                 ) -> tuple[nn.Module, resq.ResQModel, dict[str, resq.ResQModel]]:
    """The float demo model, the calibrated dense ResQ model and its sparse copies."""
    model = load_demo_model()
    dense = resq.convert(model, resq.ResQConfig(scheme, period=frames))
    resq.calibrate(dense, [make_clip(7, frames=16, size=size)[0]], samples=16, progress=False)
    dense.measure_density = False  # the density count (a host sync per layer) in neither model
    sparse = {}
    for tile in tiles:
        options = {} if tile == "auto" else {"tile": int(tile)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dense-fallback report, printed once below
            sparse[tile] = with_execution(dense, "sparse", **options)
        sparse[tile].measure_density = False
    return model, dense, sparse


def measure(size: int, args: argparse.Namespace) -> list[Row]:
    """All shares of one frame size, interleaved."""
    model, dense, sparse = build_models(size, args.scheme, args.frames, args.tiles)
    background = make_clip(11, frames=1, size=size)[0][0]
    clips = {target: moving_object_clip(background, target, args.frames, args.speed, seed=3)
             for target in args.shares}
    times: dict[tuple[float, str], list[float]] = {}
    runners: dict[str, tuple[Callable[[Tensor], object], Callable[[], None] | None]] = {
        "float": (model, None), "dense": (dense.step, dense.reset),
        **{f"sparse:{t}": (m.step, m.reset) for t, m in sparse.items()}}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            for target, (clip, _) in clips.items():
                for name, (step, reset) in runners.items():
                    times.setdefault((target, name), []).append(
                        residual_frame_time(step, clip, reset))
        rows = []
        for target, (clip, side) in clips.items():
            reference = dense(clip)
            diffs, tile_shares = [], {}
            for tile, m in sparse.items():
                reset_tile_counters(m.resq_layers())
                diffs.append(float((m(clip) - reference).abs().max()))
                counter = tiles_of(m.resq_layers())
                tile_shares[tile] = counter.computed / max(counter.total, 1)
            med = {name: 1e3 * statistics.median(times[(target, name)][1:]) for name in runners}
            rows.append(Row(size, target, changed_share(clip), side, med["float"], med["dense"],
                            {t: med[f"sparse:{t}"] for t in sparse}, tile_shares, max(diffs)))
    fallbacks = next(iter(sparse.values())).dense_fallback_layers
    print(f"\n{size}x{size}: layers whose op runs dense under execution='sparse': "
          f"{', '.join(fallbacks) or 'none'}")
    return rows


def report(rows: Sequence[Row], tiles: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Print the table of one frame size and return its break-even shares per tile setting."""
    head = f"{'target':>6} {'changed':>7} {'float ms':>8} {'dense ms':>8}"
    for tile in tiles:
        head += f" | {'sparse[' + tile + '] ms':>16} {'/dense':>6} {'/float':>6} {'tiles':>5}"
    print(head + "  max|diff|")
    print("-" * len(head))
    for r in rows:
        line = f"{r.target:6.0%} {r.share:7.1%} {r.float_ms:8.2f} {r.dense_ms:8.2f}"
        for tile in tiles:
            s = r.sparse_ms[tile]
            line += (f" | {s:16.2f} {s / r.dense_ms:6.2f} {s / r.float_ms:6.2f} "
                     f"{r.tiles[tile]:5.0%}")
        print(line + f"  {r.max_abs_diff:.1e}")
    shares = [r.share for r in rows]
    summary = {}
    for tile in tiles:
        vs_dense = [r.sparse_ms[tile] / r.dense_ms for r in rows]
        vs_float = [r.sparse_ms[tile] / r.float_ms for r in rows]
        summary[tile] = {"break_even": crossing(shares, vs_dense, 1.0),
                         "half_float": crossing(shares, vs_float, 0.5)}
        be, hf = summary[tile]["break_even"], summary[tile]["half_float"]
        half = ("never (above it even with nothing changed)" if hf == -math.inf
                else f"up to {_share_text(hf)} changed area")
        print(f"sparse[{tile}]: as fast as dense at {_share_text(be)} changed area; "
              f"at or below 0.5x the float frame: {half}")
    return summary


def _share_text(x: float | None) -> str:
    if x is None:
        return "above every share measured"
    if x == -math.inf:
        return "below every share measured"
    return f"{x:.0%}"


def plot(rows: Sequence[Row], tiles: Sequence[str], path: Path, title: str) -> None:
    """ms per residual frame against the changed share, one panel per frame size."""
    sizes = sorted({r.size for r in rows})
    fig = new_figure((5.5 * len(sizes), 4.2))
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        part = [r for r in rows if r.size == size]
        x = [100 * r.share for r in part]
        ax.plot(x, [r.dense_ms for r in part], "s-", label="ResQ residual frame, dense")
        for tile in tiles:
            ax.plot(x, [r.sparse_ms[tile] for r in part], "o-",
                    label=f"ResQ residual frame, sparse (tile {tile})")
        ax.plot(x, [r.float_ms for r in part], "^--", label="float model frame")
        ax.plot(x, [0.5 * r.float_ms for r in part], ":", color="grey",
                label="0.5x float frame (target)")
        ax.set_xticks([0, 10, 25, 50, 100])
        ax.set_xlabel("changed area of the residual frames (%)")
        ax.set_ylabel("wall time per frame (ms, median)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{size}x{size} frames")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25, 0.5, 1.0],
                   help="changed shares; 0 is a still clip")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--speed", type=int, default=2, help="pixels the object moves per frame")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scheme", default="W8A8->W4A4")
    p.add_argument("--tiles", nargs="+", default=["auto"],
                   help="tile settings of the sparse executor: 'auto' or an edge in pixels")
    p.add_argument("--out", type=Path, default=None, help="folder for the plot and JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    title = (f"demo model {args.scheme}, {args.frames}-frame clips (1 keyframe), "
             f"{args.threads} thread(s), median of {args.repeats}")
    print(title)
    rows, summary = [], {}
    for size in args.sizes:
        part = measure(size, args)
        summary[size] = report(part, args.tiles)
        rows += part
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(rows, args.tiles, args.out / "sparse_speed.png", title)
        (args.out / "sparse_speed.json").write_text(json.dumps(
            {"title": title, "rows": [asdict(r) for r in rows], "summary": summary},
            indent=1, default=str))
        print(f"wrote {args.out / 'sparse_speed.png'} and {args.out / 'sparse_speed.json'}")


if __name__ == "__main__":
    main()
