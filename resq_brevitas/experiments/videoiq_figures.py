"""VideoIQ figures (issue 10), built without pyplot like :mod:`resq_brevitas.experiments.figures`.

- :func:`plot_precision_timeline`: the paper's Fig. 4, the action the policy chose for every
  frame of a few clips, over thumbnails of the frames;
- :func:`plot_policy_distribution`: the paper's Fig. 5, the share of each action per class and
  overall;
- :func:`plot_tradeoff`: accuracy (or any metric) vs mean BOPs per frame, one curve per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resq_brevitas.experiments.figures import DPI, MIN_FONT, new_figure

__all__ = [
    "ACTION_COLOURS",
    "plot_policy_distribution",
    "plot_precision_timeline",
    "plot_tradeoff",
    "policy_distribution_figure",
    "precision_timeline_figure",
    "tradeoff_figure",
]

#: Colour per action name (other names cycle through the default palette).
ACTION_COLOURS: dict[str, str] = {
    "W8A8": "#1f77b4", "W4A4": "#2ca02c", "W2A2": "#bcbd22", "skip": "#7f7f7f",
    "key": "#d62728", "W8A4": "#17becf", "key (schedule)": "#9467bd",
}
_PALETTE = ("#8c564b", "#e377c2", "#ff7f0e", "#aec7e8", "#98df8a")
#: ``last_actions`` value of a keyframe the schedule forced.
_SCHEDULED = -1


def _colour(name: str, i: int) -> str:
    return ACTION_COLOURS.get(name, _PALETTE[i % len(_PALETTE)])


def _action_name(names: Sequence[str], a: int) -> str:
    return "key (schedule)" if a == _SCHEDULED else names[a]


def _save(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


#: Resolution of the thumbnail figure (Fig. 4): its noisy frames dominate the file size.
_THUMB_DPI = 64


def _check_actions(actions: Any, clips: int | None = None) -> None:
    if getattr(actions, "dim", lambda: 0)() != 2:
        raise ValueError(f"actions must be a [N, T] tensor, got {type(actions).__name__} "
                         f"{tuple(getattr(actions, 'shape', ()))}")
    if clips is not None and actions.shape[0] != clips:
        raise ValueError(f"actions has {actions.shape[0]} rows, expected {clips} (one per clip)")


def precision_timeline_figure(videos: Any, actions: Any, action_names: Sequence[str],
                              titles: Sequence[str] | None = None, mean: float = 0.5,
                              std: float = 0.25) -> Any:
    """The figure of :func:`plot_precision_timeline` (not saved)."""
    if getattr(videos, "dim", lambda: 0)() != 5:
        shape = tuple(getattr(videos, "shape", ()))
        raise ValueError(f"videos must be [N, T, 3, H, W], got {shape}")
    n, t = videos.shape[:2]
    _check_actions(actions, n)
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must have one entry per clip ({n}), got {len(titles)}")
    fig = new_figure((min(16.5, 1.0 * t + 1.5), 1.25 * n + 0.8))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(n, t, squeeze=False)
    seen: dict[str, str] = {}
    for i in range(n):
        for j in range(t):
            ax = axes[i][j]
            image = (videos[i, j].permute(1, 2, 0) * std + mean).clamp(0, 1).cpu().numpy()
            a = int(actions[i, j])
            name = _action_name(action_names, a)
            colour = _colour(name, a)
            seen[name] = colour
            ax.imshow(image, alpha=0.35 if name == "skip" else 1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3.5)
            ax.set_xlabel(name, fontsize=MIN_FONT - 1, color=colour, labelpad=1)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=MIN_FONT - 1, rotation=0, ha="right",
                              va="center")
    from matplotlib.patches import Patch

    fig.legend([Patch(color=c) for c in seen.values()], list(seen), loc="outside lower center",
               ncols=len(seen), fontsize=MIN_FONT, frameon=False)
    fig.suptitle("Chosen action per frame (frames the policy skips are faded)", fontsize=11)
    return fig


def plot_precision_timeline(videos: Any, actions: Any, action_names: Sequence[str],
                            titles: Sequence[str] | None, path: str | Path, mean: float = 0.5,
                            std: float = 0.25) -> Path:
    """VideoIQ Fig. 4: each clip a row of frame thumbnails framed and labelled with the action
    the policy chose for that frame.

    Args:
        videos: ``[N, T, 3, H, W]`` normalised frames.
        actions: ``[N, T]`` action indices into ``action_names`` (``qm.last_actions``; ``-1``
            is a keyframe the schedule forced).
        action_names: The family's action names.
        titles: One row label per clip (class, events), or ``None``.
        path: Output PNG.
        mean: Pixel value the normalisation maps to 0.
        std: Its scale (``pixel = x * std + mean``).

    Returns:
        The written path.

    Raises:
        ValueError: Mismatched shapes.
    """
    return _save(precision_timeline_figure(videos, actions, action_names, titles, mean, std),
                 path, dpi=_THUMB_DPI)


def policy_distribution_figure(actions: Any, labels: Any, action_names: Sequence[str],
                               class_names: Sequence[str]) -> Any:
    """The figure of :func:`plot_policy_distribution` (not saved)."""
    _check_actions(actions)
    if len(labels) != actions.shape[0]:
        raise ValueError(f"labels must have one entry per clip ({actions.shape[0]}), got "
                         f"{len(labels)}")
    groups = [("all clips", [True] * len(labels))] + [
        (name, [int(lab) == c for lab in labels]) for c, name in enumerate(class_names)]
    codes = sorted({int(a) for a in actions.flatten().tolist()})
    fig = new_figure((8.6, 0.42 * len(groups) + 1.8))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    for g, (_, mask) in enumerate(groups):
        rows = [i for i, m in enumerate(mask) if m]
        if not rows:
            continue
        sub = actions[rows].flatten()
        left = 0.0
        for a in codes:
            share = 100.0 * float((sub == a).float().mean())
            name = _action_name(action_names, a)
            ax.barh(g, share, left=left, color=_colour(name, a),
                    label=name if g == 0 else None)
            if share >= 7:
                ax.text(left + share / 2, g, f"{share:.0f}", ha="center", va="center",
                        fontsize=MIN_FONT - 1, color="white")
            left += share
    ax.set_yticks(range(len(groups)), [name for name, _ in groups], fontsize=MIN_FONT)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of frames (%)", fontsize=10)
    ax.set_title("Policy distribution (chosen action per frame)", fontsize=11)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center",
               ncols=len(codes), fontsize=MIN_FONT, frameon=False)
    return fig


def plot_policy_distribution(actions: Any, labels: Any, action_names: Sequence[str],
                             class_names: Sequence[str], path: str | Path) -> Path:
    """VideoIQ Fig. 5: the share of each chosen action over all clips and per class.

    Args:
        actions: ``[N, T]`` action indices (``-1``: a scheduled keyframe).
        labels: ``N`` class labels.
        action_names: The family's action names.
        class_names: Name of each class.
        path: Output PNG.

    Returns:
        The written path.

    Raises:
        ValueError: Mismatched shapes.
    """
    return _save(policy_distribution_figure(actions, labels, action_names, class_names), path)


def tradeoff_figure(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy",
                    float_level: float | None = None, ylabel: str = "accuracy (%)",
                    title: str = "Accuracy vs. BOPs") -> Any:
    """The figure of :func:`plot_tradeoff` (not saved)."""
    families: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if not math.isfinite(r.get("mean_bops", math.nan)):
            continue
        families.setdefault(str(r["method"]), []).append(r)
    fig = new_figure((8.6, 5.8))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    markers = ("o-", "s-", "^", "D", "v", "P", "X")
    for k, (name, members) in enumerate(families.items()):
        members = sorted(members, key=lambda r: r["mean_bops"])
        xs = [r["mean_bops"] / 1e6 for r in members]
        ys = [float(r[metric]) for r in members]
        style = markers[k % len(markers)]
        if len(members) == 1:
            style = style[0]
        ax.plot(xs, ys, style, label=name, markersize=8 if len(members) == 1 else 6)
        for r, x, y in zip(members, xs, ys):
            ax.annotate(str(r.get("label", r.get("scheme", ""))), (x, y),
                        textcoords="offset points", xytext=(5, 4), fontsize=MIN_FONT - 1)
    if float_level is not None and math.isfinite(float_level):
        ax.axhline(float_level, color="0.35", linestyle=":", linewidth=1.5,
                   label=f"float model ({float_level:.1f})")
    ax.set_xlabel("MBOPs per frame", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.1, y=0.1)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3,
               fontsize=MIN_FONT, frameon=False)
    return fig


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "accuracy",
                  float_level: float | None = None, ylabel: str = "accuracy (%)",
                  title: str = "Accuracy vs. BOPs") -> Path:
    """A metric vs mean BOPs per frame, one curve (or point) per ``row["method"]``.

    Args:
        rows: Dicts with ``method``, ``mean_bops``, ``metric`` and optionally ``label`` or
            ``scheme`` (the point's annotation); rows without finite BOPs are left out.
        path: Output PNG.
        metric: The key plotted on the y axis.
        float_level: A dotted reference line (the float model), or ``None``.
        ylabel: Axis label.
        title: Figure title.

    Returns:
        The written path.
    """
    return _save(tradeoff_figure(rows, metric, float_level, ylabel, title), path)
