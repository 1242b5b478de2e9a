"""Per-layer quantization analysis of a ResQ model (what AIMET's QuantAnalyzer does, for ResQ).

:func:`analyze` streams clips once through a calibrated :class:`~resq_brevitas.ResQModel` and
measures, for every ResQ layer:

- **sensitivity**: the model's output SQNR against the float model when only that layer's
  keyframe quantizers are enabled, when only its residual quantizers are, and when all but that
  layer's are; for the whole model also with all quantizers, weights only and activations only;
- **local errors** (on the float model's activations): SQNR of the layer's own output with its
  activation, weight or both quantizers, for frames (keyframe path) and residuals (residual
  path); the SQNR of the quantized input itself; and, where the frame inputs never go below zero,
  what an unsigned quantizer with the same threshold would give (the bit a signed quantizer
  wastes on a post-ReLU tensor);
- **activation ranges** of frames and residuals, as calibration sees them: the calibrated
  threshold against the observed min/max/percentiles, the share of clipped, negative and zero
  entries, and a histogram;
- **weight ranges** per output channel, and the weight's quantization error with a per-tensor
  and a per-channel scale;
- the paper's **Fig. 2**: variance and quantization error of frames vs residuals, both quantized
  at the same bit width with a min-max range (eq. 6/7).

The keyframe quantizers of a layer are its own Brevitas proxies (``input_quant``,
``weight_quant``), the residual quantizers those under ``layer.residual``
(:func:`layer_quantizers`); :class:`QuantizerSwitch` enables and disables subsets and restores
every flag exactly. Residuals are the model's own (against its reference), so a frame-quantized
model has no residual statistics.

Everything is accumulated per batch of clips (sums, counts, fixed-range histograms): memory does
not grow with the number of clips, and the float reference of each clip is computed once for all
configurations. :func:`format_analysis` prints the tables, :func:`write_analysis` writes JSON,
CSV and the pictures (:func:`resq_brevitas.experiments.figures.plot_analysis`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjectorBase
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from torch import Tensor, nn
from tqdm.auto import tqdm

from resq_brevitas.calibrate import _as_batched_clip, calibrate
from resq_brevitas.config import LineSearch, ResQConfig, Scheme
from resq_brevitas.convert import convert
from resq_brevitas.experiments.evaluation import clip_batches, primary_output
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.nn.residual import value_of
from resq_brevitas.quant.line_search import act_threshold
from resq_brevitas.quant.quantizers import quantize_eq1, scale_eq6
from resq_brevitas.temporal.inputs import ClipInputs
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "PERCENTILES",
    "AnalysisReport",
    "LayerAnalysis",
    "QuantizerSwitch",
    "RangeStats",
    "WeightStats",
    "analyze",
    "format_analysis",
    "layer_quantizers",
    "run_analysis",
    "write_analysis",
]

#: Percentiles of ``|x|`` reported for every activation range.
PERCENTILES: tuple[float, ...] = (50.0, 99.0, 99.9, 99.99)
_PATHS = ("keyframe", "residual")
_KINDS = ("all", "act", "weight")
# Histograms span [-_HIST_SPAN * threshold, _HIST_SPAN * threshold]: what lies beyond is clipped
# anyway, and the exact maximum is tracked apart.
_HIST_SPAN = 2.0


# ---------------------------------------------------------------------------- quantizer switches
def _proxy_kind(proxy: nn.Module) -> str:
    if isinstance(proxy, WeightQuantProxyFromInjectorBase):
        return "weight"
    if isinstance(proxy, ActQuantProxyFromInjectorBase):
        return "act"
    return "other"  # bias quantizers and the like


def _holds_quantizer(proxy: nn.Module) -> bool:
    """Whether the proxy quantizes when enabled (an fp32 path's or an absent output quantizer's
    proxy never does: it is no part of the path's quantizers)."""
    disabled = proxy.disable_quant
    try:
        proxy.disable_quant = False
        return bool(proxy.is_quant_enabled)
    finally:
        proxy.disable_quant = disabled


def layer_quantizers(layer: nn.Module, path: str, kind: str = "all") -> list[nn.Module]:
    """The Brevitas quant proxies of one path of a ResQ layer.

    Args:
        layer: A ResQ layer.
        path: ``"keyframe"`` (the layer's own proxies: ``input_quant``, ``weight_quant``, ...) or
            ``"residual"`` (every proxy under ``layer.residual``: its view, or a pool).
        kind: ``"all"``, ``"act"`` (activation quantizers) or ``"weight"``.

    Returns:
        The proxies that hold a quantizer (empty for a frame-quantized layer's residual path or
        a floating-point path).

    Raises:
        TypeError: ``layer`` is not a ResQ layer.
        ValueError: Unknown ``path`` or ``kind``.
    """
    if not isinstance(layer, ResQLayerMixin):
        raise TypeError(f"layer must be a ResQ layer, got {type(layer).__name__}")
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if path == "residual":
        found = [] if layer.residual is None else list(layer.residual.modules())
    else:
        found = [m for name, m in layer.named_modules()
                 if name != "residual" and not name.startswith("residual.")]
    return [m for m in found if isinstance(m, QuantProxyFromInjector) and _holds_quantizer(m)
            and (kind == "all" or _proxy_kind(m) == kind)]


class QuantizerSwitch:
    """Enable or disable subsets of a model's quantizers, restoring every flag exactly.

    The flags found at construction are the model's configuration: "enabled" means enabled as
    the model had it (a quantizer the user had disabled stays disabled).

    Args:
        model: Any module holding Brevitas quant proxies.
    """

    def __init__(self, model: nn.Module) -> None:
        self.proxies = [m for m in model.modules()
                        if isinstance(m, QuantProxyFromInjector) and hasattr(m, "disable_quant")]
        self._originally_enabled = {id(p): not p.disable_quant for p in self.proxies}

    @contextmanager
    def _flags(self, enabled: Callable[[nn.Module], bool]) -> Iterator[None]:
        previous = [p.disable_quant for p in self.proxies]
        try:
            for proxy in self.proxies:
                proxy.disable_quant = not (self._originally_enabled[id(proxy)] and enabled(proxy))
            yield
        finally:
            for proxy, old in zip(self.proxies, previous):
                proxy.disable_quant = old

    def only(self, proxies: Iterable[nn.Module]) -> AbstractContextManager[None]:
        """Only ``proxies`` quantize (those the model had enabled) for the block's duration."""
        chosen = {id(p) for p in proxies}
        return self._flags(lambda p: id(p) in chosen)

    def without(self, proxies: Iterable[nn.Module]) -> AbstractContextManager[None]:
        """Every quantizer the model had enabled except ``proxies``, for the block's duration."""
        chosen = {id(p) for p in proxies}
        return self._flags(lambda p: id(p) not in chosen)

    def original(self) -> AbstractContextManager[None]:
        """The model's own configuration, for the block's duration."""
        return self._flags(lambda p: True)


# ---------------------------------------------------------------------------- accumulators
class _Sqnr:
    """Streaming SQNR: sums of ``ref^2`` and ``(ref - test)^2`` in float64."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: Tensor, test: Tensor) -> None:
        ref = reference.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((ref - test.detach().double()).pow(2).sum())

    @property
    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf if self.signal > 0 else math.nan
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


@dataclass
class RangeStats:
    """Activation range statistics of one quantizer input (frames or residuals of one layer).

    Attributes:
        threshold: The calibrated threshold ``max(r_max, -r_min)`` of the path's quantizer
            (its highest-bit one for a pool); NaN for a floating-point path.
        bits: That quantizer's bits (``None`` for floating point).
        count: Entries observed.
        min: Smallest observed value.
        max: Largest observed value.
        mean: Mean.
        std: Standard deviation.
        percentiles: ``"p50"``, ``"p99"``, ... of ``|x|`` (from the histogram: resolution
            ``2 * hist_range / bins``; one beyond the histogram is reported as ``max |x|``).
        clipped: Share of entries beyond the quantizer's integer range (NaN for floating point).
        negative: Share of entries below zero.
        zeros: Share of exact zeros.
        fig2_mse: Mean squared error of a min-max (eq. 6/7) quantizer at the report's
            ``fig2_bits``, per tensor and call (the paper's Fig. 2).
        hist_range: The histogram spans ``[-hist_range, hist_range]``.
        histogram: Counts of equal-width bins over that span.
        overflow: Entries outside the span (counted in no bin).
    """

    threshold: float
    bits: int | None
    count: int
    min: float
    max: float
    mean: float
    std: float
    percentiles: dict[str, float]
    clipped: float
    negative: float
    zeros: float
    fig2_mse: float
    hist_range: float
    histogram: list[int]
    overflow: int

    @property
    def variance(self) -> float:
        """``std ** 2``."""
        return self.std ** 2

    @property
    def nonnegative(self) -> bool:
        """Whether no observed entry is below zero (a signed quantizer wastes its sign bit)."""
        return self.count > 0 and self.min >= 0.0


def _clip_limits(threshold: float, bits: int) -> tuple[float, float]:
    """Inputs beyond these round outside eq. 1's integer range ``[-2^(b-1), 2^(b-1) - 1]``."""
    scale = 2.0 * threshold / (2 ** bits - 1)
    return -(2 ** (bits - 1) + 0.5) * scale, (2 ** (bits - 1) - 0.5) * scale


def _minmax_sse(x: Tensor, bits: int) -> float:
    """Squared error of eq. 1 with the min-max range of ``x`` itself (eq. 6/7)."""
    scale = scale_eq6(x.max(), x.min(), bits).clamp_min(1e-12)
    return float((x - quantize_eq1(x, scale, bits)).double().pow(2).sum())


class _RangeAccumulator:
    """Streaming :class:`RangeStats` (sums, counts and a fixed-range histogram)."""

    def __init__(self, threshold: float, bits: int | None, bins: int, fig2_bits: int) -> None:
        self.threshold = threshold
        self.bits = bits
        self.bins = bins
        self.fig2_bits = fig2_bits
        self.count = 0
        self.total = 0.0
        self.squares = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.clipped = 0
        self.negative = 0
        self.zeros = 0
        self.fig2_sse = 0.0
        self.span: float | None = _HIST_SPAN * threshold if bits is not None else None
        self.histogram = torch.zeros(bins, dtype=torch.float64)
        self.overflow = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        if self.span is None:  # floating point: span the first batch seen
            peak = float(x.abs().max())
            self.span = _HIST_SPAN * peak if peak > 0 else 1.0
        self.count += x.numel()
        self.total += float(x.double().sum())
        self.squares += float(x.double().pow(2).sum())
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        if self.bits is not None:
            lo, hi = _clip_limits(self.threshold, self.bits)
            self.clipped += int(((x < lo) | (x > hi)).sum())
        self.negative += int((x < 0).sum())
        self.zeros += int((x == 0).sum())
        self.fig2_sse += _minmax_sse(x, self.fig2_bits)
        self.histogram += torch.histc(x, self.bins, -self.span, self.span).double()
        self.overflow += int((x.abs() > self.span).sum())

    def _abs_percentile(self, q: float) -> float:
        """``q``-th percentile of ``|x|`` from the histogram (linear within a bin)."""
        half = self.bins // 2  # bins is even: bin ``half + k`` and ``half - 1 - k`` fold
        folded = self.histogram[half:] + self.histogram[:half].flip(0)
        peak = max(abs(self.low), abs(self.high))
        width = float(self.span) / half
        target = q / 100.0 * self.count
        cumulative = folded.cumsum(0)
        index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
        if index >= folded.numel():  # beyond the histogram: the exact peak bounds it
            return peak
        before = float(cumulative[index - 1]) if index else 0.0
        inside = float(folded[index])
        fraction = (target - before) / inside if inside else 0.0
        return min((index + fraction) * width, peak)

    def result(self) -> RangeStats | None:
        if self.count == 0:
            return None
        mean = self.total / self.count
        variance = max(0.0, self.squares / self.count - mean * mean)
        return RangeStats(
            threshold=self.threshold, bits=self.bits, count=self.count, min=self.low,
            max=self.high, mean=mean, std=math.sqrt(variance),
            percentiles={f"p{q:g}": self._abs_percentile(q) for q in PERCENTILES},
            clipped=self.clipped / self.count if self.bits is not None else math.nan,
            negative=self.negative / self.count, zeros=self.zeros / self.count,
            fig2_mse=self.fig2_sse / self.count, hist_range=float(self.span),
            histogram=[int(v) for v in self.histogram.tolist()], overflow=self.overflow)


# ---------------------------------------------------------------------------- weights
@dataclass
class WeightStats:
    """Ranges of a layer's weight per output channel.

    Attributes:
        bits: Keyframe weight bits (``None``: floating point).
        granularity: The model's weight granularity (``"tensor"`` or ``"channel"``).
        channel_absmax: ``max |w|`` of every output channel.
        min: Smallest weight.
        max: Largest weight.
        spread: Largest over smallest non-zero channel ``max |w|`` (1: balanced channels).
        tensor_mse: Quantization MSE of the weight at ``bits`` with one per-tensor scale (eq. 7).
        channel_mse: The same with one scale per output channel.
    """

    bits: int | None
    granularity: str
    channel_absmax: list[float]
    min: float
    max: float
    spread: float
    tensor_mse: float
    channel_mse: float


def _weight_stats(layer: ResQLayerMixin) -> WeightStats:
    weight = layer.weight.detach().float()
    per_channel = weight.transpose(0, layer.output_channel_dim).flatten(1)
    absmax = per_channel.abs().amax(1)
    positive = absmax[absmax > 0]
    spread = float(positive.max() / positive.min()) if positive.numel() else math.nan
    bits = layer.keyframe_precision.weight_bits
    tensor_mse = channel_mse = math.nan
    if bits:
        tensor_scale = scale_eq6(weight.max(), weight.min(), bits).clamp_min(1e-12)
        tensor_mse = float((weight - quantize_eq1(weight, tensor_scale, bits)).pow(2).mean())
        channel_scale = scale_eq6(per_channel.amax(1), per_channel.amin(1), bits).clamp_min(1e-12)
        quantized = quantize_eq1(per_channel, channel_scale[:, None], bits)
        channel_mse = float((per_channel - quantized).pow(2).mean())
    return WeightStats(bits, layer.weight_granularity, [float(v) for v in absmax.tolist()],
                       float(weight.min()), float(weight.max()), spread, tensor_mse, channel_mse)


# ---------------------------------------------------------------------------- results
@dataclass
class LayerAnalysis:
    """Everything :func:`analyze` measured for one ResQ layer.

    Attributes:
        name: Qualified layer name.
        layer_type: Its class (``ResQConv2d``, ...).
        keyframe: Keyframe precision.
        residual: Residual precision (``None``: frame quantized).
        keyframe_only_db: Model output SQNR with only this layer's keyframe quantizers.
        residual_only_db: ... with only its residual quantizers (NaN: no residual path).
        all_but_db: ... with every quantizer but this layer's.
        local_db: SQNR of the layer's own output on float inputs, and of its quantized input:
            ``keyframe_act``, ``keyframe_weight``, ``keyframe`` (both), ``keyframe_input``,
            ``keyframe_act_unsigned`` (an unsigned quantizer with the same threshold, only where
            the frame inputs are non-negative), and ``residual_act``, ``residual_weight``,
            ``residual``, ``residual_input``.
        frames: Range statistics of the frame inputs (``None``: never reached).
        residuals: Range statistics of the residuals (``None``: no residual path or frame).
        weights: Weight ranges.
    """

    name: str
    layer_type: str
    keyframe: str
    residual: str | None
    keyframe_only_db: float
    residual_only_db: float
    all_but_db: float
    local_db: dict[str, float]
    frames: RangeStats | None
    residuals: RangeStats | None
    weights: WeightStats

    @property
    def sensitivity_db(self) -> float:
        """The lower of the keyframe-only and residual-only SQNRs: the damage this layer's
        quantizers do on their own (lower is worse)."""
        values = [v for v in (self.keyframe_only_db, self.residual_only_db) if not math.isnan(v)]
        return min(values) if values else math.nan


@dataclass
class AnalysisReport:
    """The result of :func:`analyze`.

    Attributes:
        notation: The model's scheme in the paper's notation.
        period: Its keyframe period.
        clips: Clips (batch rows) analysed.
        frames: Frames analysed (summed over clips).
        fig2_bits: Bit width of the Fig. 2 errors.
        sqnr_db: Output SQNR of the model as configured (all its quantizers).
        weights_only_db: ... with only weight quantizers.
        activations_only_db: ... with only activation quantizers.
        disabled_db: ... with no quantizer, against ``float_model`` (high unless the converted
            model differs from the float one); NaN when the reference is the model itself.
        layers: One :class:`LayerAnalysis` per ResQ layer, in module order.
    """

    notation: str
    period: int
    clips: int
    frames: int
    fig2_bits: int
    sqnr_db: float
    weights_only_db: float
    activations_only_db: float
    disabled_db: float
    layers: list[LayerAnalysis] = field(default_factory=list)

    def ranked(self) -> list[LayerAnalysis]:
        """Layers from the most to the least sensitive (:attr:`LayerAnalysis.sensitivity_db`)."""
        return sorted(self.layers, key=lambda r: (math.isnan(r.sensitivity_db),
                                                  r.sensitivity_db))

    def layer(self, name: str) -> LayerAnalysis:
        """The analysis of the layer called ``name``.

        Raises:
            KeyError: No such layer.
        """
        for item in self.layers:
            if item.name == name:
                return item
        raise KeyError(f"no ResQ layer named {name!r}; layers: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (histograms included); :meth:`from_dict` reads it back."""
        data = asdict(self)
        for item, layer in zip(data["layers"], self.layers):
            item["sensitivity_db"] = layer.sensitivity_db
        data["ranking"] = [r.name for r in self.ranked()]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisReport:
        """The report :meth:`to_dict` (or ``analysis.json``) describes.

        Raises:
            TypeError: ``data`` is not a mapping.
            KeyError: A field is missing.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping (from to_dict), got {type(data).__name__}")

        def ranges(item: Mapping[str, Any] | None) -> RangeStats | None:
            return None if item is None else RangeStats(**item)

        layers = [LayerAnalysis(**{
            **{k: v for k, v in item.items() if k != "sensitivity_db"},
            "frames": ranges(item["frames"]), "residuals": ranges(item["residuals"]),
            "weights": WeightStats(**item["weights"])}) for item in data["layers"]]
        scalars = {f.name: data[f.name] for f in fields(cls) if f.name != "layers"}
        return cls(**scalars, layers=layers)


# ---------------------------------------------------------------------------- the observer
@dataclass
class _Target:
    """The quantizer a path's range statistics refer to."""

    threshold: float
    bits: int | None


def _path_target(layer: ResQLayerMixin, path: str) -> _Target:
    """The threshold and bits of a path's (highest-bit) activation quantizer."""
    targets = [t for t in layer.calibration_targets() if t.path == path]
    if not targets:
        return _Target(math.nan, None)
    top = max(targets, key=lambda t: t.bits)
    return _Target(act_threshold(top.proxy), top.bits)


def _quantize_unsigned(x: Tensor, threshold: float, bits: int) -> Tensor:
    """An unsigned ``bits``-bit quantizer with the same threshold: ``[0, threshold]`` on
    ``2^b`` levels (what a signed one spends on a non-negative tensor is half of that)."""
    scale = threshold / (2 ** bits - 1)
    return scale * torch.clamp(torch.round(x / scale), 0, 2 ** bits - 1)


class _LayerProbe:
    """Streaming statistics of one layer, fed by the model's calibration observer."""

    def __init__(self, layer: ResQLayerMixin, switch: QuantizerSwitch, bins: int,
                 fig2_bits: int) -> None:
        self.layer = layer
        self.switch = switch
        with torch.no_grad(), switch.original():  # the model's own quantized weights
            self.key_qweight = value_of(layer.quant_weight()).detach()
        key, res = _path_target(layer, "keyframe"), _path_target(layer, "residual")
        self.key_target = key
        self.frames = _RangeAccumulator(key.threshold, key.bits, bins, fig2_bits)
        self.residuals = _RangeAccumulator(res.threshold, res.bits, bins, fig2_bits)
        self.local: dict[str, _Sqnr] = {}
        self.key_act = layer_quantizers(layer, "keyframe", "act")
        self.res_act = layer_quantizers(layer, "residual", "act")
        self.res_weight = layer_quantizers(layer, "residual", "weight")

    def _add(self, key: str, reference: Tensor, test: Tensor) -> None:
        self.local.setdefault(key, _Sqnr()).add(reference, test)

    def _quantized_input(self, x: Tensor) -> Tensor:
        with self.switch.only(self.key_act):
            return value_of(self.layer.input_quant(x)) if self.key_act else x

    def frame(self, x: Tensor) -> None:
        """A frame input: ranges and the keyframe path's local errors."""
        layer = self.layer
        self.frames.add(x)
        weight = layer.weight.detach()
        reference = layer.linear_op(x, weight)
        quantized = self._quantized_input(x)
        self._add("keyframe_input", x, quantized)
        self._add("keyframe_act", reference, layer.linear_op(quantized, weight))
        self._add("keyframe_weight", reference, layer.linear_op(x, self.key_qweight))
        self._add("keyframe", reference, layer.linear_op(quantized, self.key_qweight))
        target = self.key_target
        if target.bits is not None:
            unsigned = _quantize_unsigned(x, target.threshold, target.bits)
            self._add("keyframe_act_unsigned", reference, layer.linear_op(unsigned, weight))

    def _contribution(self, delta: Tensor, proxies: Sequence[nn.Module]) -> tuple[Tensor, Tensor]:
        """``(q(delta), q(delta) * q(w))`` of the residual path with only ``proxies`` on."""
        path = self.layer.residual
        assert path is not None
        with self.switch.only(proxies):
            sent = path.quantize(delta)
            if sent.q is None:
                zeros = torch.zeros_like(delta)
                return zeros, torch.zeros_like(self.layer.linear_op(delta, self.layer.weight))
            return sent.q, path.contribution(sent)

    def residual(self, delta: Tensor) -> None:
        """A residual: ranges and the residual path's local errors."""
        self.residuals.add(delta)
        reference = self.layer.linear_op(delta, self.layer.weight.detach())
        sent, act = self._contribution(delta, self.res_act)
        self._add("residual_input", delta, sent)
        self._add("residual_act", reference, act)
        self._add("residual_weight", reference, self._contribution(delta, self.res_weight)[1])
        self._add("residual", reference,
                  self._contribution(delta, self.res_act + self.res_weight)[1])

    def local_db(self) -> dict[str, float]:
        values = {key: acc.db for key, acc in self.local.items()}
        frames = self.frames.result()
        if frames is None or not frames.nonnegative:
            values.pop("keyframe_act_unsigned", None)
        return values


# ---------------------------------------------------------------------------- clips
def _batches(qm: ResQModel, clips: Iterable[Any], max_batch: int
             ) -> Iterator[tuple[ClipInputs, int]]:
    """Consecutive same-shape clips stacked into batches of at most ``max_batch`` rows (a longer
    item stays whole), each with the number of items of ``clips`` it holds.

    Each item is read as :func:`~resq_brevitas.calibrate.calibrate` reads it (a clip
    ``[T, ...]``, a batch ``[B, T, ...]``, a ``(clip, labels)`` pair, or a tuple/dict of them
    for a model with several inputs) and validated against the model before any layer runs.
    """
    pending: list[ClipInputs] = []
    rows = 0
    for index, raw in enumerate(clips):
        clip = qm.check_video(_as_batched_clip(qm, raw, index), f"clips[{index}]")
        shapes = [leaf.shape[1:] for leaf in clip.leaves]
        if pending and (shapes != [leaf.shape[1:] for leaf in pending[0].leaves]
                        or rows + clip.batch > max_batch):
            yield _concat(pending), len(pending)
            pending, rows = [], 0
        pending.append(clip)
        rows += clip.batch
    if pending:
        yield _concat(pending), len(pending)


def _concat(clips: list[ClipInputs]) -> ClipInputs:
    """Same-shape validated clips as one batch (rows in order)."""
    if len(clips) == 1:
        return clips[0]
    first = clips[0]
    leaves = tuple(torch.cat(parts) for parts in zip(*(c.leaves for c in clips)))
    return ClipInputs(first.kind, first.keys, leaves)


# ---------------------------------------------------------------------------- analysis
def _check_arguments(qm: Any, clips: Any, float_model: Any, fig2_bits: Any, bins: Any,
                     max_batch: Any) -> None:
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    if not qm.calibrated:
        raise ValueError("qm must be calibrated (resq.calibrate) before it is analysed, "
                         "got an uncalibrated model")
    if clips is None or isinstance(clips, Tensor) or not isinstance(clips, Iterable):
        raise TypeError(f"clips must be an iterable of clip tensors, got {type(clips).__name__}")
    if float_model is not None and (not isinstance(float_model, nn.Module)
                                    or isinstance(float_model, ResQModel)):
        raise TypeError(f"float_model must be the float nn.Module or None, got "
                        f"{type(float_model).__name__}")
    for name, value, low in (("fig2_bits", fig2_bits, 2), ("bins", bins, 8),
                             ("max_batch", max_batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if bins % 2:
        raise ValueError(f"bins must be even (the histogram is symmetric about 0), got {bins}")


def _variants(qm: ResQModel, switch: QuantizerSwitch
              ) -> list[tuple[tuple[str, str], Callable[[], AbstractContextManager[None]]]]:
    """Every configuration to run: ``((what, layer), context factory)``."""
    weights = [p for p in switch.proxies if _proxy_kind(p) == "weight"]
    acts = [p for p in switch.proxies if _proxy_kind(p) == "act"]
    found: list[tuple[tuple[str, str], Callable[[], AbstractContextManager[None]]]] = [
        (("model", ""), switch.original),
        (("weights_only", ""), lambda: switch.only(weights)),
        (("activations_only", ""), lambda: switch.only(acts)),
    ]
    for name, layer in qm.resq_layers():
        key = layer_quantizers(layer, "keyframe")
        res = layer_quantizers(layer, "residual")
        found.append((("keyframe_only", name), lambda key=key: switch.only(key)))
        if layer.residual is not None:
            found.append((("residual_only", name), lambda res=res: switch.only(res)))
        found.append((("all_but", name), lambda both=key + res: switch.without(both)))
    return found


def _float_reference(float_model: nn.Module, batch: ClipInputs) -> Tensor:
    return torch.stack([primary_output(batch.frame(t).call(float_model))
                        for t in range(batch.frames)], 1)


def _observed_pass(qm: ResQModel, batch: ClipInputs, probes: dict[str, _LayerProbe],
                   switch: QuantizerSwitch) -> Tensor:
    """The model with no quantizer (the float model, with its temporal decomposition), feeding
    every layer's probe; returns its outputs ``[B, T, ...]``."""

    def observe(name: str, kind: str, x: Tensor) -> None:
        probe = probes[name]
        probe.frame(x) if kind == "frame" else probe.residual(x)

    outputs = []
    with switch.only(()):
        qm.reset()
        try:
            for t in range(batch.frames):
                outputs.append(primary_output(qm.run_frame(batch.frame(t), adaptive=False,
                                                           observer=observe)))
        finally:
            qm.reset()
    return torch.stack(outputs, 1)


def analyze(qm: ResQModel, clips: Iterable[Any], float_model: nn.Module | None = None, *,
            fig2_bits: int = 4, bins: int = 1024, max_batch: int = 8,
            progress: bool = True) -> AnalysisReport:
    """Per-layer sensitivity, local errors, activation and weight ranges of a calibrated model.

    Clips are read once, batch by batch (memory does not grow with their number). For each batch
    the float reference is computed once, then the model runs in every configuration: as it is,
    weights only, activations only, and per layer keyframe-only, residual-only and all-but.
    The model's quantizer flags, training modes and stream state are restored afterwards
    (``last_cost`` holds the last configuration's run).

    Args:
        qm: A calibrated ResQ model.
        clips: An iterable (a one-shot generator is fine) of clips ``[T, C, ...]``, batches
            ``[B, T, C, ...]`` or ``(clip, labels)`` pairs (for a model with several inputs, a
            tuple/dict of them per clip), read and validated as ``calibrate`` reads them;
            residual statistics need T >= 2.
        float_model: The float model the output SQNRs are measured against, run frame by frame
            (default: ``qm`` with every quantizer disabled, which equals it by contract).
        fig2_bits: Bit width of Fig. 2's frame-vs-residual quantization errors.
        bins: Histogram bins per activation range (over twice the threshold, both signs).
        max_batch: Clips of the same shape run together, at most this many rows per batch.
        progress: Show a progress bar.

    Returns:
        The :class:`AnalysisReport`.

    Raises:
        TypeError: ``qm`` is not a ResQModel, ``clips`` not an iterable of tensors, or
            ``float_model`` not a float module.
        ValueError: ``qm`` is not calibrated, an argument is out of range, a clip is malformed or
            there is no clip.
    """
    _check_arguments(qm, clips, float_model, fig2_bits, bins, max_batch)
    switch = QuantizerSwitch(qm)
    probes = {name: _LayerProbe(layer, switch, bins, fig2_bits)
              for name, layer in qm.resq_layers()}
    variants = _variants(qm, switch)
    sqnr = {key: _Sqnr() for key, _ in variants}
    disabled = _Sqnr()
    modes = [(m, m.training) for m in qm.modules()]
    density, qm.measure_density = qm.measure_density, False  # host syncs nobody reads here
    size = len(clips) if hasattr(clips, "__len__") else None  # type: ignore[arg-type]
    # One tick per item of ``clips`` and model run: the float pass plus every configuration.
    bar = tqdm(total=None if size is None else size * (len(variants) + 1), desc="analysis",
               unit="run", disable=not progress, leave=False)
    rows = frames = 0
    qm.eval()
    try:
        with torch.no_grad():
            for batch, items in _batches(qm, clips, max_batch):
                observed = _observed_pass(qm, batch, probes, switch)
                bar.update(items)
                reference = observed
                if float_model is not None:
                    reference = _float_reference(float_model.eval(), batch)
                    disabled.add(reference, observed)
                for key, context in variants:
                    with context():
                        sqnr[key].add(reference, primary_output(qm(batch.value)))
                    bar.update(items)
                rows += batch.batch
                frames += batch.batch * batch.frames
    finally:
        bar.close()
        qm.measure_density = density
        for module, mode in modes:
            module.training = mode
        qm.reset()
    if rows == 0:
        raise ValueError("clips must contain at least one clip, got none")
    return _report(qm, probes, sqnr, disabled if float_model is not None else None, rows,
                   frames, fig2_bits)


def _report(qm: ResQModel, probes: dict[str, _LayerProbe], sqnr: dict[tuple[str, str], _Sqnr],
            disabled: _Sqnr | None, rows: int, frames: int, fig2_bits: int) -> AnalysisReport:
    def db(what: str, name: str = "") -> float:
        acc = sqnr.get((what, name))
        return acc.db if acc is not None else math.nan

    layers = []
    for name, layer in qm.resq_layers():
        probe = probes[name]
        layers.append(LayerAnalysis(
            name=name, layer_type=type(layer).__name__, keyframe=str(layer.keyframe_precision),
            residual=None if layer.residual_precision is None else str(layer.residual_precision),
            keyframe_only_db=db("keyframe_only", name), residual_only_db=db("residual_only", name),
            all_but_db=db("all_but", name), local_db=probe.local_db(),
            frames=probe.frames.result(), residuals=probe.residuals.result(),
            weights=_weight_stats(layer)))
    return AnalysisReport(
        notation=qm.notation, period=qm.period, clips=rows, frames=frames, fig2_bits=fig2_bits,
        sqnr_db=db("model"), weights_only_db=db("weights_only"),
        activations_only_db=db("activations_only"),
        disabled_db=disabled.db if disabled is not None else math.nan, layers=layers)


# ---------------------------------------------------------------------------- output
def _num(value: float | None, fmt: str = ".2f") -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.3f}"


def _scheme_of(r: LayerAnalysis) -> str:
    return r.keyframe if r.residual is None else f"{r.keyframe}->{r.residual}"


def _sensitivity_table(report: AnalysisReport) -> list[str]:
    rank = {r.name: i + 1 for i, r in enumerate(report.ranked())}
    width = max(12, *(len(r.name) for r in report.layers))
    schemes = max(11, *(len(_scheme_of(r)) for r in report.layers))
    header = (f"{'rank':>4} {'layer':<{width}} {'type':<19} {'scheme':<{schemes}} {'key only':>8} "
              f"{'res only':>8} {'all but':>8} | local dB: {'k act':>6} {'k wgt':>6} "
              f"{'k uns':>6} {'r act':>6} {'r wgt':>6}")
    lines = [header, "-" * len(header)]
    for r in report.layers:
        local = r.local_db
        lines.append(
            f"{rank[r.name]:>4} {r.name:<{width}} {r.layer_type:<19} {_scheme_of(r):<{schemes}} "
            f"{_num(r.keyframe_only_db):>8} {_num(r.residual_only_db):>8} "
            f"{_num(r.all_but_db):>8} |           {_num(local.get('keyframe_act')):>6} "
            f"{_num(local.get('keyframe_weight')):>6} "
            f"{_num(local.get('keyframe_act_unsigned')):>6} "
            f"{_num(local.get('residual_act')):>6} {_num(local.get('residual_weight')):>6}")
    return lines


def _range_cells(stats: RangeStats | None) -> str:
    if stats is None:
        return f"{'-':>7} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {'-':>7}"
    return (f"{_num(stats.threshold, '.3g'):>7} {_num(stats.min, '.3g'):>7} "
            f"{_num(stats.max, '.3g'):>7} {_num(stats.percentiles['p99.99'], '.3g'):>7} "
            f"{_num(stats.threshold / stats.std if stats.std else math.nan, '.1f'):>7} "
            f"{_pct(stats.clipped):>7}")


def _range_table(report: AnalysisReport) -> list[str]:
    width = max(12, *(len(r.name) for r in report.layers))
    cells = f"{'thr':>7} {'min':>7} {'max':>7} {'p99.99':>7} {'thr/std':>7} {'clip%':>7}"
    header = (f"{'layer':<{width}} | frames:   {cells} | residuals: {cells} | "
              f"{'w spread':>8} {'w mse t/c':>9}")
    lines = [header, "-" * len(header)]
    for r in report.layers:
        w = r.weights
        ratio = w.tensor_mse / w.channel_mse if w.channel_mse else math.nan
        lines.append(f"{r.name:<{width}} |           {_range_cells(r.frames)} |            "
                     f"{_range_cells(r.residuals)} | {_num(w.spread, '.1f'):>8} "
                     f"{_num(ratio, '.1f'):>9}")
    return lines


def _fig2_table(report: AnalysisReport) -> list[str]:
    width = max(12, *(len(r.name) for r in report.layers))
    header = (f"{'layer':<{width}} {'frame var':>10} {'resid var':>10} "
              f"{'frame mse':>10} {'resid mse':>10}")
    lines = [header, "-" * len(header)]
    for r in report.layers:
        if r.frames is None or r.residuals is None:
            continue
        lines.append(f"{r.name:<{width}} {r.frames.variance:>10.3g} {r.residuals.variance:>10.3g} "
                     f"{r.frames.fig2_mse:>10.3g} {r.residuals.fig2_mse:>10.3g}")
    return lines if len(lines) > 2 else []


def format_analysis(report: AnalysisReport, worst: int = 3) -> str:
    """The report as terminal tables: sensitivities, ranges, Fig. 2, and the worst layers.

    Args:
        report: From :func:`analyze`.
        worst: How many of the most sensitive layers to name at the end.

    Returns:
        The text.
    """
    lines = [
        f"analysis of {report.notation} (T={report.period}): {report.clips} clips, "
        f"{report.frames} frames; output SQNR vs float: model {_num(report.sqnr_db)} dB, "
        f"weights only {_num(report.weights_only_db)} dB, activations only "
        f"{_num(report.activations_only_db)} dB, no quantizer {_num(report.disabled_db)} dB",
        "",
        "output SQNR (dB) with only this layer's keyframe / residual quantizers, and with all but "
        "its own; local: SQNR of the layer's own output on float inputs (k uns: an unsigned "
        "quantizer of the same threshold, where the frame inputs are >= 0)",
        *_sensitivity_table(report),
        "",
        "activation ranges (float model, as calibration sees them); w spread: largest / smallest "
        "channel max|w|; w mse t/c: weight MSE per-tensor / per-channel",
        *_range_table(report),
    ]
    fig2 = _fig2_table(report)
    if fig2:
        lines += ["", f"Fig. 2: frames vs residuals, variance and {report.fig2_bits}-bit min-max "
                      "quantization MSE", *fig2]
    lines.append("")
    for i, r in enumerate(report.ranked()[:worst]):
        lines.append(f"worst {i + 1}: {r.name} ({_num(r.sensitivity_db)} dB alone; model "
                     f"without it {_num(r.all_but_db)} dB)")
    return "\n".join(lines)


def _csv_row(r: LayerAnalysis) -> dict[str, Any]:
    row: dict[str, Any] = {
        "layer": r.name, "type": r.layer_type, "keyframe": r.keyframe, "residual": r.residual,
        "keyframe_only_db": r.keyframe_only_db, "residual_only_db": r.residual_only_db,
        "all_but_db": r.all_but_db, "sensitivity_db": r.sensitivity_db,
    }
    for key in ("keyframe_act", "keyframe_weight", "keyframe", "keyframe_input",
                "keyframe_act_unsigned", "residual_act", "residual_weight", "residual",
                "residual_input"):
        row[f"local_{key}_db"] = r.local_db.get(key, math.nan)
    for prefix, stats in (("frame", r.frames), ("residual", r.residuals)):
        for attr in ("threshold", "min", "max", "mean", "std", "clipped", "negative", "zeros",
                     "fig2_mse"):
            row[f"{prefix}_{attr}"] = getattr(stats, attr) if stats is not None else math.nan
        for q in PERCENTILES:
            row[f"{prefix}_p{q:g}"] = stats.percentiles[f"p{q:g}"] if stats else math.nan
    row.update(weight_min=r.weights.min, weight_max=r.weights.max,
               weight_spread=r.weights.spread, weight_tensor_mse=r.weights.tensor_mse,
               weight_channel_mse=r.weights.channel_mse)
    return row


def write_analysis(report: AnalysisReport, out_dir: str | Path, prefix: str = "analysis",
                   worst: int = 3) -> list[Path]:
    """Write ``<prefix>.json`` (everything), ``<prefix>.csv`` (one row per layer) and, with
    matplotlib, ``<prefix>.png`` (sensitivities and the worst layers' histograms) and
    ``<prefix>_fig2.png`` (frames vs residuals, when the model has residuals).

    Args:
        report: From :func:`analyze`.
        out_dir: Output folder (created).
        prefix: File name stem.
        worst: Layers whose histograms are drawn.

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{prefix}.json", out / f"{prefix}.csv"
    json_path.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=True))
    rows = [_csv_row(r) for r in report.layers]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = [json_path, csv_path]
    try:
        from resq_brevitas.experiments.figures import plot_analysis, plot_layer_statistics
    except ImportError:  # pragma: no cover - figures itself imports nothing optional
        return written
    try:
        written.append(plot_analysis(report, out / f"{prefix}.png", worst=worst))
        stats = _fig2_rows(report)
        if stats:
            written.append(plot_layer_statistics(
                stats, out / f"{prefix}_fig2.png", bits=report.fig2_bits,
                title=f"Residuals vs. frames ({report.notation}, T={report.period})"))
    except ImportError as err:  # matplotlib is an optional extra
        print(f"(no analysis figures: {err})")
    return written


@dataclass
class _Fig2Row:
    name: str
    frame_var: float
    residual_var: float
    frame_qerr: float
    residual_qerr: float


def _fig2_rows(report: AnalysisReport) -> list[_Fig2Row]:
    return [_Fig2Row(r.name, r.frames.variance, r.residuals.variance, r.frames.fig2_mse,
                     r.residuals.fig2_mse)
            for r in report.layers if r.frames is not None and r.residuals is not None]


def run_analysis(float_model: nn.Module, scheme: str | Scheme, periods: Sequence[int] | None,
                 calib_clips: Sequence[Tensor], eval_clips: Iterable[Any], out_dir: str | Path,
                 calibration: LineSearch | None = None, weight_granularity: str = "tensor",
                 progress: bool = True) -> list[Path]:
    """Convert, calibrate and analyse ``float_model`` at ``scheme``; print and write the report
    (what ``recipes/apply_resq.py --analyze`` runs).

    Args:
        float_model: The float model (not modified).
        scheme: The scheme to analyse (``"W8A8"``, ``"W8A8->W4A4"``, ...).
        periods: Keyframe periods; the first one is used (default 4).
        calib_clips: Calibration clips ``[T, C, ...]`` (same-shape ones are batched).
        eval_clips: Clips to analyse.
        out_dir: Folder for ``analysis.json``, ``analysis.csv`` and the pictures.
        calibration: Line-search settings (default ``LineSearch()``).
        weight_granularity: ``"tensor"`` or ``"channel"``.
        progress: Show progress bars.

    Returns:
        The written paths.
    """
    period = periods[0] if periods else 4
    config = ResQConfig(scheme=Scheme.parse(scheme), period=period,
                        weight_granularity=weight_granularity,
                        calibration=calibration or LineSearch())
    qm = calibrate(convert(float_model, config), clip_batches(list(calib_clips)),
                   progress=progress)
    report = analyze(qm, eval_clips, float_model, progress=progress)
    print()
    print(format_analysis(report))
    return write_analysis(report, Path(out_dir), prefix="analysis")
