"""Figures read on a screen: sizes, font sizes, nothing cut at the edge, a float reference line,
keyframe columns marked."""

from __future__ import annotations

import math

import pytest
import torch

from resq_brevitas.experiments.evaluation import EvalRow

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from resq_brevitas.experiments.figures import (  # noqa: E402
    DPI,
    MIN_FONT,
    accuracy_vs_bops_figure,
    bit_maps_figure,
)

SCREEN = (1920, 1080)


def _demo_like_rows() -> list[EvalRow]:
    rows = [EvalRow("float", "fp32", 1, 0.89, 1.0, math.inf, math.nan)]
    for scheme, bops, acc in (("W8A8", 2.17e9, 0.887), ("W6A6", 1.22e9, 0.875),
                              ("W5A5", 0.85e9, 0.66), ("W4A4", 0.54e9, 0.2)):
        rows.append(EvalRow("frame", scheme, 1, acc, acc, 20.0, bops))
    for scheme, period, bops, acc in (("W8A8->W4A4", 2, 1.36e9, 0.86),
                                      ("W8A8->W4A4", 4, 0.95e9, 0.72),
                                      ("W8A8->W8A4", 2, 1.63e9, 0.875),
                                      ("W8A8->W8A4", 4, 1.36e9, 0.77)):
        rows.append(EvalRow("resq", scheme, period, acc, acc, 20.0, bops))
    rows.append(EvalRow("dynamic", "W8A8->W8A{0,4,8}", 4, 0.88, 0.88, 20.0, 1.1e9,
                        target_bops=0.5))
    return rows


def _texts_inside(fig) -> list[Text]:
    """Every visible, non-empty text of the figure, checked to lie inside the canvas."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    hidden = set()  # tick labels of ticks outside the view limits are not drawn
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks():
                if not min(limits) <= tick.get_loc() <= max(limits):
                    hidden |= {id(tick.label1), id(tick.label2)}
    texts = [t for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -0.5 and box.y0 >= -0.5, text.get_text()
        assert box.x1 <= width + 0.5 and box.y1 <= height + 0.5, text.get_text()
    return texts


def _pixels(fig) -> tuple[float, float]:
    w, h = fig.get_size_inches()
    return w * DPI, h * DPI


def test_accuracy_plot_fits_a_screen_with_readable_uncut_labels() -> None:
    fig = accuracy_vs_bops_figure(_demo_like_rows())
    width, height = _pixels(fig)
    assert 800 <= width <= SCREEN[0] and height <= SCREEN[1]
    texts = _texts_inside(fig)
    assert min(t.get_fontsize() for t in texts) >= MIN_FONT
    labels = {t.get_text() for t in texts}
    # the rightmost point (W8A8) is labelled inside the canvas (it was cut before)
    assert {"W8A8", "W4A4", "T=2", "0.5x W8A8", "float model (89.0)"} <= labels


def test_accuracy_plot_draws_the_float_reference_line() -> None:
    fig = accuracy_vs_bops_figure(_demo_like_rows())
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("float model")]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == pytest.approx([89.0, 89.0])
    no_float = accuracy_vs_bops_figure(_demo_like_rows()[1:])
    assert not [ln for ln in no_float.axes[0].get_lines()
                if ln.get_label().startswith("float model")]


def test_bit_map_figure_fits_a_screen_and_marks_keyframes() -> None:
    layers = {f"dw_block.block.{i}": torch.randint(0, 3, (1, 16, 32, 32)) * 4 for i in range(11)}
    keyframes = torch.zeros(1, 16, dtype=torch.bool)
    keyframes[:, ::4] = True
    fig = bit_maps_figure(layers, video=torch.randn(16, 3, 32, 32), keyframes=keyframes)
    width, height = _pixels(fig)
    assert width <= SCREEN[0] and height <= SCREEN[1]
    texts = _texts_inside(fig)
    assert min(t.get_fontsize() for t in texts) >= MIN_FONT
    titles = [ax.get_title() for ax in fig.axes[:8]]  # first row: 8 frames by default
    assert titles == ["t=0 key", "t=1", "t=2", "t=3", "t=4 key", "t=5", "t=6", "t=7"]
    assert {t.get_text() for t in texts} >= set(layers)
    with pytest.raises(ValueError, match=r"keyframes must be \[T\] or \[B, T\]"):
        bit_maps_figure(layers, keyframes=torch.zeros(5, dtype=torch.bool))
