"""Accuracy-vs-cost comparison of quantization schemes on a set of clips.

Used by ``recipes/apply_resq.py`` and the benchmarks: convert + calibrate a float model for each
``(scheme, period)``, run the evaluation clips, and report accuracy against ground truth and against
the float model, output SQNR, and BOPs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from resq_brevitas.calibrate import calibrate
from resq_brevitas.config import LineSearch, ResQConfig, Scheme
from resq_brevitas.convert import convert
from resq_brevitas.metrics import miou
from resq_brevitas.quant.line_search import act_threshold, set_act_threshold

__all__ = ["EvalRow", "load_object", "primary_output", "compare_schemes", "format_table"]


@dataclass
class EvalRow:
    """One line of the comparison table.

    Attributes:
        method: ``"float"``, ``"frame"`` (frame quantization) or ``"resq"``.
        scheme: The paper's notation.
        period: Keyframe period (1 for frame quantization).
        miou_gt: mIoU against ground-truth labels (NaN without labels or for non-segmentation).
        miou_float: mIoU against the float model's predictions.
        sqnr_db: Output SQNR against the float model, in dB (over all evaluation frames).
        mean_bops: Mean BOPs per frame.
        rel_bops: ``mean_bops`` relative to the W8A8 frame-quantization reference.
    """

    method: str
    scheme: str
    period: int
    miou_gt: float
    miou_float: float
    sqnr_db: float
    mean_bops: float
    rel_bops: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON/CSV)."""
        return asdict(self)


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"``.

    Raises:
        ValueError: If ``spec`` is not of that form or the attribute does not exist.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def primary_output(out: Any) -> Tensor:
    """The tensor metrics are computed on: the output itself or its first tensor leaf."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return primary_output(out[0])
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _run_clips(model: Callable[[Tensor], Any], clips: Sequence[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        return [primary_output(model(clip.unsqueeze(0)))[0] for clip in clips]


def _float_clip_runner(float_model: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(video: Tensor) -> Tensor:
        return torch.stack([primary_output(float_model(video[:, t]))
                            for t in range(video.shape[1])], 1)
    return run


def _sqnr(reference: list[Tensor], test: list[Tensor]) -> float:
    signal = sum(r.double().pow(2).sum().item() for r in reference)
    noise = sum((r - t).double().pow(2).sum().item() for r, t in zip(reference, test))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _segmentation_miou(outputs: list[Tensor], targets: list[Tensor] | None,
                       num_classes: int | None) -> float:
    if targets is None or num_classes is None or outputs[0].dim() != 4:
        return math.nan
    pred = torch.cat([o.argmax(1).flatten() for o in outputs])
    target = torch.cat([t.flatten() for t in targets])
    return miou(pred, target, num_classes)


def compare_schemes(
    float_model: nn.Module,
    configs: Sequence[tuple[str, int]],
    calib_clips: Sequence[Tensor],
    eval_clips: Sequence[Tensor],
    labels: Sequence[Tensor] | None = None,
    num_classes: int | None = None,
    calibration: LineSearch | None = None,
    progress: bool = True,
) -> list[EvalRow]:
    """Evaluate the float model and each ``(scheme, period)`` on the same clips.

    Args:
        float_model: The float model (eval mode; not modified).
        configs: ``(scheme notation, period)`` pairs.
        calib_clips: Calibration clips ``[T, C, ...]``.
        eval_clips: Evaluation clips ``[T, C, ...]``.
        labels: Per-clip ground-truth label maps ``[T, H, W]`` (segmentation), or ``None``.
        num_classes: Number of classes for mIoU.
        calibration: Line-search settings (default ``LineSearch()``).
        progress: Show progress bars.

    Returns:
        A float row first, then one row per config, with ``rel_bops`` relative to W8A8 frame
        quantization (computed even if W8A8 is not among ``configs``).
    """
    float_model = float_model.eval()
    calibration = calibration or LineSearch()
    float_out = _run_clips(_float_clip_runner(float_model), eval_clips)
    float_pred = [o.argmax(1) for o in float_out] if float_out[0].dim() == 4 else None
    rows = [EvalRow("float", "fp32", 1, _segmentation_miou(float_out, labels, num_classes),
                    _segmentation_miou(float_out, float_pred, num_classes), math.inf,
                    math.nan)]
    keyframe_ranges: dict[str, dict[str, float]] = {}
    for scheme_text, period in tqdm(configs, desc="schemes", disable=not progress):
        scheme = Scheme.parse(scheme_text)
        config = ResQConfig(scheme=scheme, period=period, calibration=calibration)
        qm = _calibrated(float_model, config, calib_clips, keyframe_ranges)
        outputs, bops = [], []
        with torch.no_grad():
            for clip in eval_clips:
                outputs.append(primary_output(qm(clip.unsqueeze(0)))[0])
                bops.append(qm.last_cost.mean_bops)
        rows.append(EvalRow(
            method="frame" if scheme.is_frame_quantization else "resq",
            scheme=scheme.notation,
            period=qm.period,
            miou_gt=_segmentation_miou(outputs, labels, num_classes),
            miou_float=_segmentation_miou(outputs, float_pred, num_classes),
            sqnr_db=_sqnr(float_out, outputs),
            mean_bops=sum(bops) / len(bops),
        ))
    reference = _w8a8_bops(float_model, eval_clips[0])
    for row in rows[1:]:
        row.rel_bops = row.mean_bops / reference
    return rows


def _calibrated(float_model: nn.Module, config: ResQConfig, clips: Sequence[Tensor],
                keyframe_ranges: dict[str, dict[str, float]]):
    """Convert and calibrate, reusing keyframe ranges of an earlier config with the same keyframe
    precision (they are calibrated on frame inputs, independent of period and residual scheme)."""
    qm = convert(float_model, config)
    key = f"{config.scheme.keyframe}/{config.weight_granularity}"
    cached = keyframe_ranges.get(key)
    if cached is None or config.scheme.keyframe.is_float:
        calibrate(qm, clips, progress=False)
        if not config.scheme.keyframe.is_float:
            keyframe_ranges[key] = {n: act_threshold(layer.input_quant)
                                    for n, layer in qm.resq_layers()}
        return qm
    for name, layer in qm.resq_layers():
        set_act_threshold(layer.input_quant, cached[name])
    if config.scheme.is_frame_quantization or qm.period == 1:
        qm.calibrated = True
        return qm
    return calibrate(qm, clips, paths=("residual",), progress=False)


def _w8a8_bops(float_model: nn.Module, clip: Tensor) -> float:
    from resq_brevitas.cost import count_bops

    return count_bops(float_model, tuple(clip.shape[1:]), "W8A8").mean_bops


def format_table(rows: Sequence[EvalRow]) -> str:
    """A fixed-width table of the rows."""
    header = (f"{'method':<7} {'scheme':<14} {'T':>2} {'mIoU(GT)':>9} {'mIoU(float)':>11} "
              f"{'SQNR dB':>8} {'GBOPs/frame':>12} {'x W8A8':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        def pct(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{100 * v:.2f}"
        sqnr = "inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.2f}"
        bops = "-" if math.isnan(r.mean_bops) else f"{r.mean_bops / 1e9:.4f}"
        rel = "-" if math.isnan(r.rel_bops) else f"{r.rel_bops:.4f}"
        lines.append(f"{r.method:<7} {r.scheme:<14} {r.period:>2} {pct(r.miou_gt):>9} "
                     f"{pct(r.miou_float):>11} {sqnr:>8} {bops:>12} {rel:>7}")
    return "\n".join(lines)
