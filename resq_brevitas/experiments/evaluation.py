"""Accuracy-vs-cost comparison of quantization schemes on a set of clips.

Used by ``recipes/apply_resq.py`` and the benchmarks: convert + calibrate a float model for each
``(scheme, period)`` (:func:`compare_schemes`) or each full :class:`ResQConfig`
(:func:`compare_configs`: Dynamic-ResQ policies, RRM references and thresholds), run the evaluation
clips, and report accuracy against ground truth and against the float model, output SQNR, and BOPs.
:func:`layer_statistics` measures the paper's Fig. 2 (frames vs residuals, per layer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from resq_brevitas.calibrate import calibrate, copy_ranges, iter_clip_frames
from resq_brevitas.config import LineSearch, ResQConfig, Scheme
from resq_brevitas.convert import convert
from resq_brevitas.cost import count_bops
from resq_brevitas.experiments.metrics import miou
from resq_brevitas.nn.layers import DEFAULT_LAYER_MAP, resq_layer_class_of
from resq_brevitas.policy.base import build_refresh
from resq_brevitas.quant.quantizers import quantize_eq1, scale_eq6
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "COLUMNS",
    "EvalRow",
    "LayerStatistics",
    "clip_batches",
    "primary_output",
    "compare_schemes",
    "compare_configs",
    "method_of",
    "config_label",
    "TABLE_LEGEND",
    "format_table",
    "layer_statistics",
    "segmentation_classes",
]


@dataclass
class EvalRow:
    """One line of the comparison table.

    Attributes:
        method: ``"float"``, ``"frame"`` (frame quantization), ``"resq"``, ``"dynamic"``
            (Dynamic-ResQ) or ``"rrm"`` (``reference="previous"``).
        scheme: The paper's notation.
        period: Keyframe period (1 for frame quantization; the maximum with adaptive refresh).
        miou_gt: mIoU against ground-truth labels (NaN without labels or for non-segmentation).
        miou_float: mIoU against the float model's predictions.
        sqnr_db: Output SQNR against the float model, in dB (over all evaluation frames).
        mean_bops: Mean BOPs per frame (the dynamic policy's work included).
        rel_bops: ``mean_bops`` relative to the W8A8 frame-quantization reference.
        tau: Dynamic-ResQ's ``tau`` (NaN otherwise).
        threshold: RRM truncation threshold (NaN when 0 / not RRM).
        policy_bops: Mean BOPs per frame of the dynamic policy's own work.
        density: MAC-weighted share of non-zero residual entries (NaN without residuals).
        speedup: RRM eq. 10 speedup of zero-skipping inference over the dense model (RRM rows;
            NaN for the others).
        sparse_bops: Mean BOPs per frame when zero residual entries are skipped.
        keyframe_share: Share of frames that were keyframes (forced refreshes included).
        target_bops: Dynamic-ResQ's ``target_bops`` (NaN for a raw ``tau``); ``tau`` is then
            the solved one.
    """

    method: str
    scheme: str
    period: int
    miou_gt: float
    miou_float: float
    sqnr_db: float
    mean_bops: float
    rel_bops: float = math.nan
    tau: float = math.nan
    threshold: float = math.nan
    policy_bops: float = math.nan
    density: float = math.nan
    speedup: float = math.nan
    sparse_bops: float = math.nan
    keyframe_share: float = math.nan
    target_bops: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, shares as fractions (NaN/inf kept: not strict JSON)."""
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The row in the units of :data:`COLUMNS` (mIoU and shares in percent), ``None`` where a
        value does not apply (NaN) or is unbounded (the float model's SQNR against itself)."""
        policy_share = (self.policy_bops / self.mean_bops
                        if self.mean_bops and not math.isnan(self.mean_bops) else math.nan)
        values = {
            "method": self.method, "scheme": self.scheme, "period": self.period,
            "tau": self.tau, "target_bops": self.target_bops, "threshold": self.threshold,
            "miou_gt_pct": 100 * self.miou_gt, "miou_float_pct": 100 * self.miou_float,
            "sqnr_db": self.sqnr_db, "mean_bops": self.mean_bops, "rel_bops": self.rel_bops,
            "policy_bops": self.policy_bops, "policy_pct": 100 * policy_share,
            "density_pct": 100 * self.density, "speedup": self.speedup,
            "sparse_bops": self.sparse_bops, "keyframe_pct": 100 * self.keyframe_share,
        }
        assert list(values) == list(COLUMNS)
        return {k: _finite_or_none(v) for k, v in values.items()}


#: The columns of :meth:`EvalRow.record` (``results.json`` / ``results.csv``), with their units;
#: ``None`` (JSON ``null``, an empty CSV cell, ``-`` in the table) means "does not apply".
COLUMNS = MappingProxyType({
    "method": "float, frame (frame quantization), resq, dynamic (Dynamic-ResQ) or rrm",
    "scheme": "the paper's notation, e.g. W8A8->W4A4",
    "period": "keyframe period T (1: every frame a keyframe)",
    "tau": "Dynamic-ResQ's eq. 11 threshold (the solved one when target_bops is set)",
    "target_bops": "Dynamic-ResQ's target BOPs, as a share of W8A8 frame quantization's",
    "threshold": "RRM truncation threshold eps",
    "miou_gt_pct": "mIoU against the ground-truth labels, percent (null: no labels)",
    "miou_float_pct": "mIoU against the float model's predicted classes, percent",
    "sqnr_db": "output SQNR against the float model, dB (null for the float model itself)",
    "mean_bops": "mean BOPs per frame, the dynamic policy's own work included",
    "rel_bops": "mean_bops over W8A8 frame quantization's (the table's x W8A8)",
    "policy_bops": "mean BOPs per frame of the dynamic policy's own work",
    "policy_pct": "policy_bops as a share of mean_bops, percent",
    "density_pct": "MAC-weighted share of non-zero residual entries, percent",
    "speedup": "RRM eq. 10 speedup of zero-skipping inference over the dense model, x",
    "sparse_bops": "mean BOPs per frame when zero residual entries are skipped",
    "keyframe_pct": "share of frames that were keyframes (forced refreshes included), percent",
})


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def primary_output(out: Any) -> Tensor:
    """The tensor metrics are computed on: the output itself or its first tensor leaf."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return primary_output(out[0])
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def clip_batches(clips: Sequence[Tensor], max_batch: int = 8) -> list[Tensor]:
    """Stack runs of same-shape clips ``[T, C, ...]`` into batches ``[N, T, C, ...]``.

    Batch rows are independent streams, so a batch gives the same per-clip outputs as one clip at
    a time, several times faster.
    """
    batches: list[list[Tensor]] = []
    for clip in clips:
        if batches and batches[-1][0].shape == clip.shape and len(batches[-1]) < max_batch:
            batches[-1].append(clip)
        else:
            batches.append([clip])
    return [torch.stack(b) for b in batches]


def _run_clips(model: Callable[[Tensor], Any], clips: Sequence[Tensor]) -> list[Tensor]:
    with torch.no_grad():
        return [o for batch in clip_batches(clips) for o in primary_output(model(batch)).unbind(0)]


def _float_clip_runner(float_model: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(video: Tensor) -> Tensor:
        return torch.stack([primary_output(float_model(video[:, t]))
                            for t in range(video.shape[1])], 1)
    return run


def _sqnr(reference: list[Tensor], test: list[Tensor]) -> float:
    signal = sum(r.double().pow(2).sum().item() for r in reference)
    noise = sum((r - t).double().pow(2).sum().item() for r, t in zip(reference, test))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def segmentation_classes(outputs: Sequence[Tensor], num_classes: int | None) -> int | None:
    """Classes to score mIoU over: per-frame class scores ``[T, C, H, W]`` have ``C``; labels
    may name more (``num_classes``). ``None`` for outputs that are not segmentation maps."""
    if not outputs or outputs[0].dim() != 4:
        return None
    return max(int(outputs[0].shape[1]), num_classes or 0)


def _segmentation_miou(outputs: list[Tensor], targets: Sequence[Tensor] | None,
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
    on_row: Callable[[EvalRow], None] | None = None,
) -> list[EvalRow]:
    """Evaluate the float model and each ``(scheme, period)`` on the same clips.

    Args:
        float_model: The float model (eval mode; not modified).
        configs: ``(scheme notation, period)`` pairs (static schemes).
        calib_clips: Calibration clips ``[T, C, ...]``.
        eval_clips: Evaluation clips ``[T, C, ...]``.
        labels: Per-clip ground-truth label maps ``[T, H, W]`` (segmentation), or ``None``.
        num_classes: Number of classes for mIoU.
        calibration: Line-search settings (default ``LineSearch()``).
        progress: Show progress bars.
        on_row: Called with each finished row (the float row included), e.g. to print it.

    Returns:
        A float row first, then one row per config, with ``rel_bops`` relative to W8A8 frame
        quantization (computed even if W8A8 is not among ``configs``).
    """
    calibration = calibration or LineSearch()
    full = [ResQConfig(scheme=Scheme.parse(text), period=period, calibration=calibration)
            for text, period in configs]
    return compare_configs(float_model, full, calib_clips, eval_clips, labels, num_classes,
                           progress=progress, on_row=on_row)


def method_of(config: ResQConfig) -> str:
    """The method family of a config: ``frame``, ``resq``, ``dynamic`` or ``rrm``."""
    scheme: Scheme = config.scheme  # type: ignore[assignment]
    if scheme.is_frame_quantization:
        return "frame"
    if config.reference == "previous":
        return "rrm"
    return "dynamic" if config.policy is not None else "resq"


def compare_configs(
    float_model: nn.Module,
    configs: Sequence[ResQConfig],
    calib_clips: Sequence[Tensor],
    eval_clips: Sequence[Tensor],
    labels: Sequence[Tensor] | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    include_float: bool = True,
    on_model: Callable[[ResQConfig, ResQModel], None] | None = None,
    on_row: Callable[[EvalRow], None] | None = None,
    prepare: Callable[[ResQConfig, ResQModel], ResQModel] | None = None,
) -> list[EvalRow]:
    """Evaluate the float model and each full configuration on the same clips.

    Calibration is shared where it cannot differ: keyframe ranges between configs with the same
    keyframe precision, and all ranges (and a fitted refresh polynomial) between configs that
    differ only in the Dynamic-ResQ policy (the pool is calibrated in floating point, where the
    policy does not change the residuals); a policy that fits itself (``target_bops``) is then
    fitted on the calibration clips, as :func:`resq_brevitas.calibrate` would.

    mIoU against the float model needs no labels: for segmentation outputs (``[T, C, H, W]``
    class scores) the float model's argmax is the reference, over ``C`` classes.

    Args:
        float_model: The float model (eval mode; not modified).
        configs: The configurations, each with its own calibration settings.
        calib_clips: Calibration clips ``[T, C, ...]``.
        eval_clips: Evaluation clips ``[T, C, ...]``.
        labels: Per-clip ground-truth label maps ``[T, H, W]`` (segmentation), or ``None``.
        num_classes: Number of classes for mIoU.
        progress: Show progress bars.
        include_float: Start with the float model's row.
        prepare: ``prepare(config, qm) -> model`` between calibration and evaluation (e.g.
            QAT); it must not modify ``qm`` in place (calibrated models are reused), so return
            a trained copy.
        on_model: Called as ``on_model(config, qm)`` after each config's evaluation (e.g. to run
            one more clip and keep its ``last_bit_maps``).
        on_row: Called with each finished row (the float row included), e.g. to print it.

    Returns:
        Rows (float first if ``include_float``), ``rel_bops`` relative to W8A8 frame quantization.
    """
    if not all(isinstance(c, ResQConfig) for c in configs):
        raise TypeError("configs must be a sequence of resq_brevitas.ResQConfig")
    float_model = float_model.eval()
    float_out = _run_clips(_float_clip_runner(float_model), eval_clips)
    classes = segmentation_classes(float_out, num_classes)
    float_pred = [o.argmax(1) for o in float_out] if classes is not None else None
    reference = _w8a8_bops(float_model, eval_clips[0])
    rows = []
    report = on_row or (lambda row: None)
    if include_float:
        rows.append(EvalRow("float", "fp32", 1, _segmentation_miou(float_out, labels, classes),
                            _segmentation_miou(float_out, float_pred, classes), math.inf,
                            math.nan))
        report(rows[-1])
    keyframe_models: dict[str, ResQModel] = {}
    calibrated_models: dict[Any, ResQModel] = {}
    calib_clips = clip_batches(calib_clips)
    bar = tqdm(configs, desc="schemes", disable=not progress)
    for config in bar:
        bar.set_description_str(f"schemes: {config_label(config)}")
        qm = _calibrated_config(float_model, config, calib_clips, keyframe_models,
                                calibrated_models)
        if prepare is not None:  # e.g. QAT; calibrated models are shared: prepare copies
            qm = prepare(config, qm)
        qm.measure_density = True  # the table reports densities and RRM's speedup for every row
        outputs, costs = [], []
        with torch.no_grad():
            for batch in clip_batches(eval_clips):
                outputs.extend(primary_output(qm(batch)).unbind(0))
                costs.extend([qm.last_cost] * len(batch))
        row = _row(config, qm, outputs, costs, float_out, float_pred, labels, classes)
        row.rel_bops = row.mean_bops / reference
        rows.append(row)
        report(row)
        if on_model is not None:
            on_model(config, qm)
    return rows


def config_label(config: ResQConfig) -> str:
    """A short name of a config for progress bars and logs, e.g. ``W8A8->W4A4 T=4``."""
    scheme: Scheme = config.scheme  # type: ignore[assignment]
    label = scheme.notation if scheme.is_frame_quantization else (
        f"{scheme.notation} T={config.period}")
    policy = config.policy
    if policy is not None:
        target = getattr(policy, "target_bops", None)
        label += (f" target_bops={target:g}" if target is not None
                  else f" tau={getattr(policy, 'tau', math.nan):g}")
    if config.threshold:
        label += f" eps={config.threshold:g}"
    return label


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _policy_tau(config: ResQConfig, qm: ResQModel) -> float:
    """The ``tau`` the model's policy runs at (solved for a target), NaN without one."""
    if config.policy is None:
        return math.nan
    for policy in _policies(qm):
        tau = getattr(policy, "tau", None)
        if tau is not None:
            return float(tau)
    return float(getattr(config.policy, "tau", math.nan))


def _policies(qm: ResQModel) -> list[Any]:
    """The distinct precision-policy objects of ``qm``'s pool layers."""
    found = {id(p): p for _, layer in qm.resq_layers()
             if (p := getattr(layer.residual, "policy", None)) is not None}
    return list(found.values())


def _row(config: ResQConfig, qm: ResQModel, outputs: list[Tensor], costs: list[Any],
         float_out: list[Tensor], float_pred: list[Tensor] | None,
         labels: Sequence[Tensor] | None, num_classes: int | None) -> EvalRow:
    method = method_of(config)
    scheme: Scheme = config.scheme  # type: ignore[assignment]
    target = getattr(config.policy, "target_bops", None)
    return EvalRow(
        method=method,
        scheme=scheme.notation,
        period=qm.period,
        miou_gt=_segmentation_miou(outputs, labels, num_classes),
        miou_float=_segmentation_miou(outputs, float_pred, num_classes),
        sqnr_db=_sqnr(float_out, outputs),
        mean_bops=_mean([c.mean_bops for c in costs]),
        tau=_policy_tau(config, qm),
        threshold=config.threshold if config.threshold > 0 else math.nan,
        policy_bops=_mean([c.mean_policy_bops for c in costs]),
        density=_mean([c.mean_density for c in costs]),
        # RRM's eq. 10 speedup describes zero-skipping RRM execution: RRM rows only
        speedup=_mean([c.speedup for c in costs]) if method == "rrm" else math.nan,
        sparse_bops=_mean([c.mean_sparse_bops for c in costs]),
        keyframe_share=_mean([c.keyframe_share for c in costs]),
        target_bops=target if target is not None else math.nan,
    )


def _calibrated(float_model: nn.Module, config: ResQConfig, clips: Sequence[Tensor],
                keyframe_models: dict[str, ResQModel]) -> ResQModel:
    """Convert and calibrate, reusing keyframe ranges of an earlier config with the same keyframe
    precision (they are calibrated on frame inputs, independent of period and residual scheme)."""
    qm = convert(float_model, config)
    key = f"{config.scheme.keyframe}/{config.weight_granularity}/{config.act_signedness}"
    source = keyframe_models.get(key)
    if source is None or config.scheme.keyframe.is_float or config.overrides:
        calibrate(qm, clips, progress=False)
        if not config.scheme.keyframe.is_float and not config.overrides:
            keyframe_models[key] = qm
        return qm
    copy_ranges(source, qm, paths=("keyframe",))
    if qm.calibrated:  # frame quantization: nothing else to calibrate
        return qm
    return calibrate(qm, clips, paths=("residual",), progress=False)


def _calibrated_config(float_model: nn.Module, config: ResQConfig, clips: Sequence[Tensor],
                       keyframe_models: dict[str, ResQModel],
                       models: dict[Any, ResQModel]) -> ResQModel:
    """:func:`_calibrated`, plus reuse of a calibrated model across Dynamic-ResQ policies."""
    policy = config.policy
    # Only the policy differs, which calibration never sees (a refresh fit runs the quantized
    # model, so it does): the calibrated model with the new policy is what calibrating from
    # scratch would give.
    fits = any(getattr(build_refresh(r), "needs_fit", False) for r in config.refresh)
    key = None
    if policy is not None and not fits:
        key = json.dumps({k: v for k, v in config.to_dict().items() if k != "policy"},
                         sort_keys=True)
    if key is not None and key in models:
        return _fit_policies(models[key].with_policy(policy), clips, config.calibration.samples)
    qm = _calibrated(float_model, config, clips, keyframe_models)
    if key is not None:
        models[key] = qm
    return qm


def _fit_policies(qm: ResQModel, clips: Sequence[Tensor], samples: int) -> ResQModel:
    """Fit the policies that fit themselves (``needs_fit``) as calibration would, after
    ``with_policy`` (which swaps a policy in without fitting it)."""
    if qm.period > 1:
        for policy in _policies(qm):
            if getattr(policy, "needs_fit", False):
                policy.fit(qm, iter_clip_frames(qm, clips, samples), samples, False)
    qm.reset()
    return qm


def _w8a8_bops(float_model: nn.Module, clip: Tensor) -> float:
    return count_bops(float_model, tuple(clip.shape[1:]), "W8A8").mean_bops


class _Column(NamedTuple):
    """One table column: a :data:`COLUMNS` key (or ``param``: tau or eps), its header, format."""

    key: str
    header: str
    fmt: str
    extended: bool = False


#: The table's columns, in the units of :data:`COLUMNS` (the header names them).
_TABLE = (
    _Column("method", "method", "s"),
    _Column("scheme", "scheme", "s"),
    _Column("period", "T", "d"),
    _Column("param", "tau/eps", ".3g", True),
    _Column("target_bops", "target", ".2f", True),
    _Column("miou_gt_pct", "mIoU GT %", ".2f"),
    _Column("miou_float_pct", "mIoU float %", ".2f"),
    _Column("sqnr_db", "SQNR dB", ".2f"),
    _Column("mean_bops", "BOPs/frame", ".4g"),
    _Column("rel_bops", "x W8A8", ".4f"),
    _Column("policy_pct", "policy %", ".1f", True),
    _Column("density_pct", "density %", ".1f", True),
    _Column("speedup", "RRM eta", ".2f", True),
)
#: What ``-`` means in the table (``null`` in results.json, an empty cell in results.csv).
TABLE_LEGEND = "-: does not apply (null in results.json, an empty cell in results.csv)"


def format_table(rows: Sequence[EvalRow]) -> str:
    """A fixed-width table of the rows in the units of :data:`COLUMNS` (mIoU in percent, BOPs
    per frame, SQNR in dB); Dynamic-ResQ / RRM rows add tau/eps, target, policy share, density
    and RRM speedup columns. ``-`` marks a value that does not apply."""
    records = [r.record() for r in rows]
    for record in records:
        record["param"] = record["tau"] if record["method"] == "dynamic" else record["threshold"]
    extended = any(r.method in ("dynamic", "rrm") for r in rows)
    columns = [c for c in _TABLE if extended or not c.extended]
    if not any(r["target_bops"] is not None for r in records):
        columns = [c for c in columns if c.key != "target_bops"]
    cells = [[_cell(record[c.key], c.fmt) for c in columns] for record in records]
    widths = [max([len(c.header)] + [len(row[i]) for row in cells])
              for i, c in enumerate(columns)]
    left = {"method", "scheme"}

    def line(values: Sequence[str]) -> str:
        return " ".join(v.ljust(w) if c.key in left else v.rjust(w)
                        for v, w, c in zip(values, widths, columns)).rstrip()

    header = line([c.header for c in columns])
    return "\n".join([header, "-" * len(header), *(line(row) for row in cells)])


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@dataclass
class LayerStatistics:
    """The paper's Fig. 2 for one layer: frames vs residuals.

    Attributes:
        name: Layer name.
        frame_var: Variance of the layer's frame inputs.
        residual_var: Variance of its residuals ``x_t - x_{t-1}``.
        frame_qerr: Mean squared quantization error of the frame inputs at ``bits``.
        residual_qerr: Mean squared quantization error of the residuals at ``bits``.
    """

    name: str
    frame_var: float
    residual_var: float
    frame_qerr: float
    residual_qerr: float


def layer_statistics(float_model: nn.Module, clips: Sequence[Tensor], bits: int = 4,
                     layers: Sequence[str] | None = None) -> list[LayerStatistics]:
    """Per-layer variance and quantization error of frames vs residuals (the paper's Fig. 2).

    Each clip runs frame by frame through the float model; every conv/linear layer's input
    ``x_t`` and residual ``x_t - x_{t-1}`` are quantized with eq. 1 at ``bits`` with the
    min-max range of eq. 6/7 (per tensor, per frame), and variance and mean squared error are
    averaged over frames.

    Args:
        float_model: The float model (not modified).
        clips: Clips ``[T, C, ...]`` (T >= 2).
        bits: Bit width of the quantizer (>= 2).
        layers: Layer names to keep (default: all supported layers, in call order).

    Returns:
        One :class:`LayerStatistics` per layer.
    """
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    modules = {n: m for n, m in float_model.named_modules()
               if resq_layer_class_of(m, DEFAULT_LAYER_MAP) is not None}
    if layers is not None:
        missing = sorted(set(layers) - set(modules))
        if missing:
            raise ValueError(f"layers not found among supported layers: {missing}")
        modules = {n: modules[n] for n in layers}
    sums: dict[str, list[float]] = {n: [0.0, 0.0, 0.0, 0.0, 0.0] for n in modules}
    previous: dict[str, Tensor] = {}

    def qerr(x: Tensor) -> float:
        scale = scale_eq6(x.max(), x.min(), bits).clamp_min(1e-12)
        return float((x - quantize_eq1(x, scale, bits)).pow(2).mean())

    def hook(name: str):
        def run(module: nn.Module, args: tuple, out: Any) -> None:
            x = args[0].detach().float()
            if name in previous:
                delta = x - previous[name]
                acc = sums[name]
                acc[0] += float(x.var())
                acc[1] += float(delta.var())
                acc[2] += qerr(x)
                acc[3] += qerr(delta)
                acc[4] += 1
            previous[name] = x
        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for clip in clips:
                previous.clear()
                if clip.shape[0] < 2:
                    raise ValueError(f"clips need >= 2 frames, got shape {tuple(clip.shape)}")
                for t in range(clip.shape[0]):
                    float_model(clip[t:t + 1])
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for name, (fv, rv, fq, rq, n) in sums.items():
        if n:
            out.append(LayerStatistics(name, fv / n, rv / n, fq / n, rq / n))
    return out
