"""VideoIQ figures: Fig. 4 (actions per frame), Fig. 5 (policy distribution), trade-off."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from resq_brevitas.experiments.videoiq_figures import (  # noqa: E402
    plot_policy_distribution,
    plot_precision_timeline,
    plot_tradeoff,
    policy_distribution_figure,
    precision_timeline_figure,
)

NAMES = ["W8A8", "W4A4", "W2A2", "skip"]


def test_timeline_frames_each_thumbnail_in_its_actions_colour(tmp_path):
    videos = torch.zeros(2, 3, 3, 8, 8)
    actions = torch.tensor([[0, 3, 1], [2, 0, 3]])
    fig = precision_timeline_figure(videos, actions, NAMES, ["a", "b"])
    axes = fig.axes
    assert len(axes) == 6
    labels = [ax.get_xlabel() for ax in axes]
    assert labels == ["W8A8", "skip", "W4A4", "W2A2", "W8A8", "skip"]
    colours = {ax.get_xlabel(): ax.spines["left"].get_edgecolor() for ax in axes}
    assert len(set(colours.values())) == 4  # one colour per action
    path = plot_precision_timeline(videos, actions, NAMES, None, tmp_path / "f4.png")
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="one per clip"):
        precision_timeline_figure(videos, actions[:1], NAMES)


def test_distribution_bars_are_the_shares_of_each_action(tmp_path):
    actions = torch.tensor([[0, 0, 3, 3], [1, 1, 1, 1]])
    labels = torch.tensor([0, 1])
    fig = policy_distribution_figure(actions, labels, NAMES, ["c0", "c1"])
    ax = fig.axes[0]
    widths = {}
    for patch in ax.patches:  # (y row, action colour) -> share
        widths.setdefault(round(patch.get_y() + patch.get_height() / 2), []).append(
            round(patch.get_width(), 6))
    assert sorted(widths[0]) == [25.0, 25.0, 50.0]  # all clips: W8A8 2/8, W4A4 4/8, skip 2/8
    assert sorted(widths[1]) == [0.0, 50.0, 50.0]  # class c0: W8A8 and skip, no W4A4
    assert sorted(widths[2]) == [0.0, 0.0, 100.0]
    assert plot_policy_distribution(actions, labels, NAMES, ["c0", "c1"],
                                    tmp_path / "f5.png").stat().st_size > 0
    with pytest.raises(ValueError, match="labels"):
        policy_distribution_figure(actions, labels[:1], NAMES, ["c0"])


def test_tradeoff_draws_one_curve_per_method_and_skips_rows_without_bops(tmp_path):
    rows = [{"method": "uniform", "scheme": "W8A8", "accuracy": 90.0, "mean_bops": 2e8},
            {"method": "uniform", "scheme": "W4A4", "accuracy": 85.0, "mean_bops": 5e7},
            {"method": "learned", "scheme": "policy", "accuracy": 89.0, "mean_bops": 8e7},
            {"method": "float", "scheme": "fp32", "accuracy": 91.0, "mean_bops": float("nan")}]
    path = plot_tradeoff(rows, tmp_path / "t.png", float_level=91.0)
    assert path.stat().st_size > 0
    from resq_brevitas.experiments.videoiq_figures import tradeoff_figure

    ax = tradeoff_figure(rows).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"uniform", "learned"}
    assert list(lines["uniform"].get_xdata()) == [50.0, 200.0]  # MBOPs, sorted by cost
