"""Plots (matplotlib is an optional extra: ``pip install resq-brevitas[plot]``).

- :func:`plot_accuracy_vs_bops`: accuracy-vs-BOPs curves of frame quantization, ResQ, Dynamic-ResQ
  (a curve over ``tau``) and RRM (a curve over the threshold, at zero-skipping BOPs);
- :func:`plot_bit_maps`: the paper's Fig. 6, Dynamic-ResQ's per-pixel bits per layer over a clip;
- :func:`plot_layer_statistics`: the paper's Fig. 2, variance and quantization error of frames vs
  residuals per layer (data from :func:`resq_brevitas.evaluation.layer_statistics`);
- :func:`plot_analysis`: the per-layer analysis (:func:`resq_brevitas.experiments.analysis.
  analyze`): sensitivity bars per layer and the activation histograms of the worst layers.

Figures are built without pyplot (no global figure state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DPI",
    "accuracy_vs_bops_figure",
    "bit_maps_figure",
    "new_figure",
    "plot_accuracy_vs_bops",
    "plot_analysis",
    "plot_bit_maps",
    "plot_layer_statistics",
]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` not managed by pyplot (no global backend or figure state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install resq-brevitas[plot]") from err
    return Figure(figsize=figsize)


#: Resolution figures are saved at; sizes below are chosen for a screen at this resolution.
DPI = 110
#: Smallest font size used (points): readable at 100% zoom.
MIN_FONT = 9


def _family(r: Any) -> str:
    if r.method == "frame":
        # a tagged variant ("W8A8 auto") is a curve of its own
        _, _, tag = r.scheme.partition(" ")
        return "frame quantization" + (f" {tag}" if tag else "")
    if r.method == "dynamic":
        return f"Dynamic-ResQ {r.scheme} T={r.period}"
    if r.method == "rrm":
        return f"RRM {r.scheme} T<={r.period} (zero-skipping BOPs)"
    return f"ResQ {r.scheme}"


def _x_bops(r: Any) -> float:
    sparse = getattr(r, "sparse_bops", math.nan)
    return sparse if r.method == "rrm" and not math.isnan(sparse) else r.mean_bops


def _point_label(r: Any) -> str:
    if r.method == "frame":
        return r.scheme
    if r.method == "dynamic":
        target = getattr(r, "target_bops", math.nan)
        if not math.isnan(target):
            return f"{target:.2g}x W8A8"
        return f"tau={getattr(r, 'tau', math.nan):.2g}"
    if r.method == "rrm":
        eps = getattr(r, "threshold", math.nan)
        return "eps=0" if math.isnan(eps) else f"eps={eps:.2g}"
    return f"T={r.period}"


_METRIC_LABELS = {"miou_gt": "mIoU vs ground truth (%)", "miou_float": "mIoU vs float model (%)",
                  "sqnr_db": "output SQNR vs float model (dB)"}


def _metric_value(r: Any, metric: str) -> float:
    return getattr(r, metric) * (100 if metric.startswith("miou") else 1)


def accuracy_vs_bops_figure(rows: Sequence[Any], metric: str = "miou_gt",
                            title: str = "Accuracy vs. BOPs") -> Any:
    """The figure of :func:`plot_accuracy_vs_bops` (a matplotlib ``Figure``, not saved)."""
    reference = next((r for r in rows if r.method == "float"), None)
    rows = [r for r in rows if r.method != "float"]
    for candidate in (metric, "miou_float", "sqnr_db"):
        if any(not math.isnan(getattr(r, candidate)) for r in rows):
            metric = candidate
            break
    families: dict[str, list[Any]] = {}
    for r in rows:
        families.setdefault(_family(r), []).append(r)
    fig = new_figure((8.6, 5.8))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    points = []
    for name, members in families.items():
        members = sorted(members, key=_x_bops)
        xs = [_x_bops(r) / 1e9 for r in members]
        ys = [_metric_value(r, metric) for r in members]
        style = {"frame": "o-", "resq": "s-", "dynamic": "^-", "rrm": "D--"}.get(
            members[0].method, "o-")
        ax.plot(xs, ys, style, label=name, markersize=6)
        points += [(_point_label(r), x, y) for r, x, y in zip(members, xs, ys)]
    if reference is not None and math.isfinite(_metric_value(reference, metric)):
        ax.axhline(_metric_value(reference, metric), color="0.35", linestyle=":", linewidth=1.5,
                   label=f"float model ({_metric_value(reference, metric):.1f})")
    ax.margins(x=0.08, y=0.12)
    _annotate_inward(ax, points)
    ax.set_xlabel("GBOPs per frame", fontsize=11)
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric), fontsize=11)
    ax.tick_params(labelsize=10)
    ax.set_title(title, fontsize=12)
    ax.grid(True, alpha=0.3)
    # below the axes: never over the points, never cut at the figure edge (constrained layout)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize=MIN_FONT, frameon=False)
    return fig


def _annotate_inward(ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Label each point on a side that faces the middle of the axes (so labels stay inside)
    and, of those sides, the first whose label box does not cover an earlier label."""
    if not points:
        return
    x_low, x_high = ax.get_xlim()
    y_low, y_high = ax.get_ylim()
    width_pt, height_pt = (ax.figure.get_size_inches() * 72 * ax.get_position().size)
    placed: list[tuple[float, float, float, float]] = []  # label boxes, points from the origin
    for text, x, y in points:
        px = (x - x_low) / (x_high - x_low) * width_pt
        py = (y - y_low) / (y_high - y_low) * height_pt
        right = px > 0.7 * width_pt
        top = py > 0.88 * height_pt
        box_w, box_h = 0.6 * MIN_FONT * len(text), 1.3 * MIN_FONT
        sides = [(-1 if right else 1, -1 if top else 1), (-1 if right else 1, 1 if top else -1)]
        sides += [(dx, 2 * dy) for dx, dy in sides]
        for dx, dy in sides:
            ox, oy = 6 * dx, (6 if dy > 0 else -6) + (dy - (1 if dy > 0 else -1)) * box_h
            x0 = px + ox - (box_w if dx < 0 else 0)
            y0 = py + oy - (box_h if dy < 0 else 0)
            box = (x0, y0, x0 + box_w, y0 + box_h)
            if not any(_overlap(box, other) for other in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(ox, oy),
                    ha="right" if dx < 0 else "left", va="top" if dy < 0 else "bottom",
                    fontsize=MIN_FONT)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]
             ) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def plot_accuracy_vs_bops(rows: Sequence[Any], path: str | Path, metric: str = "miou_gt",
                          title: str = "Accuracy vs. BOPs") -> Path:
    """Accuracy-vs-BOPs curves, one per method/scheme family, and the float model's level.

    Families: frame quantization (one point per scheme), each ResQ scheme (points over ``T``),
    each Dynamic-ResQ scheme and period (points over ``tau`` or ``target_bops``) and each RRM
    scheme (points over the threshold; x is the BOPs of zero-skipping execution,
    ``sparse_bops``). A float row (``method == "float"``) draws a dotted reference line.

    Args:
        rows: ``EvalRow``-like objects with ``method``, ``scheme``, ``period``, ``mean_bops`` and
            the ``metric`` attribute (``tau``, ``threshold``, ``sparse_bops`` where relevant).
        path: Output image path (PNG).
        metric: Row attribute to plot on the y axis (falls back to ``miou_float``, then
            ``sqnr_db`` if all values are NaN).
        title: Figure title.

    Returns:
        The written path.
    """
    return _save(accuracy_vs_bops_figure(rows, metric, title), path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


#: Largest figure (inches at :data:`DPI`) a bit-map figure grows to: fits a 1920x1080 screen.
_SCREEN = (16.5, 9.2)
#: Keyframe columns are framed in this colour.
_KEY_COLOUR = "#d62728"


def bit_maps_figure(bit_maps: Mapping[str, Any], video: Any = None,
                    layers: Sequence[str] | None = None, frames: Sequence[int] | None = None,
                    row: int = 0, title: str = "Dynamic-ResQ policy: bits per pixel",
                    keyframes: Any = None) -> Any:
    """The figure of :func:`plot_bit_maps` (a matplotlib ``Figure``, not saved)."""
    import torch
    from matplotlib.colors import BoundaryNorm, ListedColormap

    maps = {}
    for name, m in bit_maps.items():
        m = torch.as_tensor(m)
        if m.dim() == 4:
            maps[name] = m[row]
    names = [n for n in (layers or list(maps)) if n in maps]
    if not names:
        raise ValueError("bit_maps holds no 2-D (image) bit map to draw")
    steps = maps[names[0]].shape[0]
    frames = list(range(min(steps, 8))) if frames is None else list(frames)
    key = _keyframe_flags(keyframes, row, steps)
    values = sorted({int(v) for n in names for v in maps[n][frames].unique().tolist()})
    # Discrete colours from dark blue (fewest bits) to yellow (most), as in the paper.
    palette = ["#26185f", "#3b6fb6", "#5ec7d9", "#9be06b", "#f6e51b"]
    colors = [palette[int(i * (len(palette) - 1) / max(1, len(values) - 1) + 0.5)]
              for i in range(len(values))]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm([v - 0.5 for v in values] + [values[-1] + 0.5], cmap.N)
    clip = None
    if video is not None:
        clip = torch.as_tensor(video).detach().float()
        if clip.dim() == 5:
            clip = clip[row]
    n_rows, n_cols = len(names) + (clip is not None), len(frames)
    # square cells as large as fit the screen, plus room for layer names and the colour bar
    cell = min(1.3, (_SCREEN[0] - 3.4) / n_cols, (_SCREEN[1] - 1.3) / n_rows)
    fig = new_figure((cell * n_cols + 3.4, cell * n_rows + 1.3))
    # the padding keeps right-aligned layer names off the left edge
    fig.set_layout_engine("constrained", w_pad=0.1, h_pad=0.05)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for col, t in enumerate(frames):
        is_key = key is not None and bool(key[t])
        axes[0][col].set_title(f"t={t}" + (" key" if is_key else ""), fontsize=MIN_FONT,
                               color=_KEY_COLOUR if is_key else "black",
                               fontweight="bold" if is_key else "normal")
        for r in range(n_rows):
            for spine in axes[r][col].spines.values():
                spine.set_edgecolor(_KEY_COLOUR if is_key else "0.5")
                spine.set_linewidth(2.5 if is_key else 0.8)
    first = 0
    if clip is not None:
        for col, t in enumerate(frames):
            img = clip[t, :3].permute(1, 2, 0)
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
            axes[0][col].imshow(img.squeeze(-1).numpy() if img.shape[-1] == 1 else img.numpy())
        axes[0][0].set_ylabel("frame", fontsize=MIN_FONT, rotation=0, ha="right", va="center")
        first = 1
    image = None
    for r, name in enumerate(names, start=first):
        for col, t in enumerate(frames):
            image = axes[r][col].imshow(maps[name][t].numpy(), cmap=cmap, norm=norm,
                                        interpolation="nearest")
        axes[r][0].set_ylabel(name, fontsize=MIN_FONT, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), ticks=values, shrink=0.6,
                           fraction=0.04)
        bar.set_label("activation bits", fontsize=MIN_FONT + 1)
        bar.ax.tick_params(labelsize=MIN_FONT)
    if key is not None:
        title += " (red: keyframes, every pixel at the keyframe bits)"
    fig.suptitle(title, fontsize=MIN_FONT + 2)
    return fig


def _keyframe_flags(keyframes: Any, row: int, steps: int) -> Any:
    """Bool ``[T]`` of the drawn row's keyframes from ``[T]`` or ``[B, T]`` flags (or ``None``)."""
    if keyframes is None:
        return None
    import torch

    flags = torch.as_tensor(keyframes).bool()
    flags = flags[row] if flags.dim() == 2 else flags
    if flags.dim() != 1 or flags.shape[0] != steps:
        raise ValueError(f"keyframes must be [T] or [B, T] flags with T={steps}, got shape "
                         f"{tuple(torch.as_tensor(keyframes).shape)}")
    return flags


def plot_bit_maps(bit_maps: Mapping[str, Any], path: str | Path, video: Any = None,
                  layers: Sequence[str] | None = None, frames: Sequence[int] | None = None,
                  row: int = 0, title: str = "Dynamic-ResQ policy: bits per pixel",
                  keyframes: Any = None) -> Path:
    """The paper's Fig. 6: the bits the policy chose for every input pixel, per layer and frame.

    One column per frame (keyframe columns framed in red and titled ``key`` when
    ``keyframes`` is given), one row per layer; cells are as large as fit a 1920x1080 screen.

    Args:
        bit_maps: ``name -> [B, T, *S]`` bits, as in ``ResQModel.last_bit_maps``. Layers whose
            maps are not 2-D images (``S`` of another length: Linear, Conv1d) are skipped.
        path: Output image path (PNG).
        video: Optional clip ``[T, C, H, W]`` (or ``[B, T, ...]``, row ``row``) drawn as the
            first row.
        layers: Layers to draw, in order (default: every layer with 2-D maps).
        frames: Frame indices to draw (default: the first 8).
        row: Batch row (stream) to draw.
        title: Figure title.
        keyframes: Bool ``[T]`` or ``[B, T]`` (``ResQModel.last_keyframes``): which frames were
            keyframes, to mark them.

    Returns:
        The written path.

    Raises:
        ValueError: If no layer has a 2-D bit map, or ``keyframes`` has the wrong shape.
    """
    return _save(bit_maps_figure(bit_maps, video, layers, frames, row, title, keyframes), path)


def plot_layer_statistics(stats: Sequence[Any], path: str | Path, bits: int | None = None,
                          title: str = "Residuals vs. frames") -> Path:
    """The paper's Fig. 2: per-layer variance (top) and quantization error (bottom) of frames
    and residuals.

    Args:
        stats: ``LayerStatistics``-like objects (``name``, ``frame_var``, ``residual_var``,
            ``frame_qerr``, ``residual_qerr``).
        path: Output image path (PNG).
        bits: Bit width the errors were measured at (for the label).
        title: Figure title.

    Returns:
        The written path.
    """
    if not stats:
        raise ValueError("stats must hold at least one layer")
    fig = new_figure((max(6.0, 0.55 * len(stats) + 2), 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(stats)))
    width = 0.4
    for ax, (frame_attr, res_attr, label) in (
        (top, ("frame_var", "residual_var", "variance")),
        (bottom, ("frame_qerr", "residual_qerr",
                  f"quantization MSE{f' ({bits}-bit)' if bits else ''}")),
    ):
        ax.bar([x - width / 2 for x in xs], [getattr(s, frame_attr) for s in stats], width,
               label="frames", color="#3b6fb6")
        ax.bar([x + width / 2 for x in xs], [getattr(s, res_attr) for s in stats], width,
               label="residuals", color="#f6a51b")
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    bottom.set_xticks(xs)
    bottom.set_xticklabels([s.name for s in stats], rotation=60, ha="right", fontsize=6)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _finite(value: float, floor: float) -> float:
    """A bar height: NaN as 0 (no bar), infinities clamped (no quantization error at all)."""
    if math.isnan(value):
        return 0.0
    return floor if math.isinf(value) else value


def _sensitivity_bars(ax: Any, report: Any) -> None:
    layers = report.layers
    finite = [v for r in layers for v in (r.keyframe_only_db, r.residual_only_db, r.all_but_db)
              if not math.isnan(v) and not math.isinf(v)]
    cap = (max(finite) + 10.0) if finite else 100.0
    xs = list(range(len(layers)))
    series = [("keyframe_only_db", "only its keyframe quantizers", "#3b6fb6"),
              ("residual_only_db", "only its residual quantizers", "#f6a51b"),
              ("all_but_db", "all but its quantizers", "#7a7a7a")]
    # A frame-quantized model has no residual quantizers: no empty bar slot for them.
    series = [s for s in series if any(not math.isnan(getattr(r, s[0])) for r in layers)]
    width = 0.8 / len(series)
    for i, (attr, label, colour) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [_finite(getattr(r, attr), cap) for r in layers], width,
               label=label, color=colour)
    if not math.isnan(report.sqnr_db) and not math.isinf(report.sqnr_db):
        ax.axhline(report.sqnr_db, color="#c0392b", lw=1, ls="--",
                   label=f"whole model {report.sqnr_db:.1f} dB")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.name for r in layers], rotation=50, ha="right", fontsize=6)
    ax.set_ylabel("output SQNR vs float (dB)", fontsize=8)
    ax.set_title(f"Per-layer sensitivity: {report.notation}, T={report.period} (lower = worse)",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)


def _histogram(ax: Any, stats: Any, title: str, colour: str) -> None:
    if stats is None:
        ax.text(0.5, 0.5, "not observed / no residual path", ha="center", va="center",
                fontsize=7, transform=ax.transAxes)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    bins = len(stats.histogram)
    width = 2 * stats.hist_range / bins
    edges = [-stats.hist_range + i * width for i in range(bins + 1)]
    # One filled step outline, not a bar per bin: a thousand bars take seconds to draw.
    ax.stairs(stats.histogram, edges, fill=True, color=colour)
    ax.set_yscale("log")
    if not math.isnan(stats.threshold):
        for sign in (-1, 1):
            ax.axvline(sign * stats.threshold, color="#c0392b", lw=0.8, ls="--")
    clipped = "" if math.isnan(stats.clipped) else f", clipped {100 * stats.clipped:.3f}%"
    ax.set_title(f"{title}: thr {stats.threshold:.3g}, range [{stats.min:.3g}, {stats.max:.3g}]"
                 f"{clipped}", fontsize=6)
    ax.tick_params(labelsize=6)


def plot_analysis(report: Any, path: str | Path, worst: int = 3) -> Path:
    """The per-layer analysis: sensitivity bars (top) and, for the ``worst`` most sensitive
    layers, histograms of their frame inputs and residuals with the calibrated thresholds.

    Args:
        report: An ``AnalysisReport`` (``layers``, ``ranked()``, ``sqnr_db``, ``notation``,
            ``period``).
        path: Output image path (PNG).
        worst: Layers whose histograms are drawn.

    Returns:
        The written path.

    Raises:
        ValueError: If the report has no layer or ``worst`` is negative.
    """
    if not report.layers:
        raise ValueError("report must hold at least one layer")
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ValueError(f"worst must be an int >= 0, got {worst!r}")
    chosen = report.ranked()[:worst]
    residuals = any(r.residuals is not None for r in report.layers)
    fig = new_figure((max(7.0, 0.5 * len(report.layers) + 2), 3.4 + 2.0 * len(chosen)))
    grid = fig.add_gridspec(1 + len(chosen), 1 + residuals,
                            height_ratios=[1.6] + [1.0] * len(chosen))
    _sensitivity_bars(fig.add_subplot(grid[0, :]), report)
    for row, layer in enumerate(chosen, start=1):
        _histogram(fig.add_subplot(grid[row, 0]), layer.frames, f"{layer.name} frames", "#3b6fb6")
        if residuals:
            _histogram(fig.add_subplot(grid[row, 1]), layer.residuals, f"{layer.name} residuals",
                       "#f6a51b")
    fig.tight_layout()
    return _save(fig, path)
