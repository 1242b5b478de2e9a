"""Plots (matplotlib is an optional extra: ``pip install resq-brevitas[plot]``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "plot_accuracy_vs_bops"]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` not managed by pyplot (no global backend or figure state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install resq-brevitas[plot]") from err
    return Figure(figsize=figsize)


def plot_accuracy_vs_bops(rows: Sequence[Any], path: str | Path, metric: str = "miou_gt",
                          title: str = "Accuracy vs. BOPs") -> Path:
    """Accuracy-vs-BOPs curves, one per method/scheme family (frame quantization, each ResQ scheme).

    Args:
        rows: ``EvalRow``-like objects with ``method``, ``scheme``, ``period``, ``mean_bops`` and
            the ``metric`` attribute.
        path: Output image path (PNG).
        metric: Row attribute to plot on the y axis (falls back to ``miou_float``, then
            ``sqnr_db`` if all values are NaN).
        title: Figure title.

    Returns:
        The written path.
    """
    rows = [r for r in rows if r.method != "float"]
    for candidate in (metric, "miou_float", "sqnr_db"):
        if any(not math.isnan(getattr(r, candidate)) for r in rows):
            metric = candidate
            break
    families: dict[str, list[Any]] = {}
    for r in rows:
        key = "frame quantization" if r.method == "frame" else f"{r.method}: {r.scheme}"
        families.setdefault(key, []).append(r)
    fig = new_figure((6.4, 4.4))
    ax = fig.subplots()
    for name, members in families.items():
        members = sorted(members, key=lambda r: r.mean_bops)
        xs = [r.mean_bops / 1e9 for r in members]
        ys = [getattr(r, metric) * (100 if metric.startswith("miou") else 1) for r in members]
        ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(members, xs, ys):
            text = r.scheme if r.method == "frame" else f"T={r.period}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GBOPs per frame")
    ax.set_ylabel({"miou_gt": "mIoU vs ground truth (%)", "miou_float": "mIoU vs float (%)",
                   "sqnr_db": "output SQNR (dB)"}.get(metric, metric))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
