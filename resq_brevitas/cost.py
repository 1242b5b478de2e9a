"""Bit operations (BOPs): the paper's cost metric, plus RRM's density and speedup.

A linear layer's cost is ``MACs * weight_bits * activation_bits`` (fp32 operands count as 32
bits). Keyframes are counted at the keyframe precision, residual frames at the residual precision;
a 0-bit residual costs nothing. Only ResQ layers (the convs and linears) are counted: element-wise
work, pooling and normalisation are not, as in the paper. Per-frame figures are means over the batch
rows (each row is its own stream).

Dynamic-ResQ: a residual pixel at ``b`` bits costs ``b * b_w * MACs / P`` with ``P`` the number of
input positions (``H_in * W_in``; tokens for ``Linear``), i.e. the layer's MACs are spread evenly
over its input positions; a row costs ``mean bits * b_w * MACs``. The policy's own work is added
(:func:`resq_brevitas.policy.error_bound.policy_bops`).

RRM (``reference="previous"``, ``threshold``): BOPs stay dense (as the ResQ paper counts them);
the report adds the density of the residuals (share of non-zero entries, RRM eq. 9) and RRM's
theoretical speedup of zero-skipping inference over the dense model (RRM eq. 10), and the BOPs a
zero-skipping engine would spend (``mean_sparse_bops``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from resq_brevitas.config import Precision, Scheme
from resq_brevitas.nn.layers import RESQ_LAYER_FOR, is_resq_layer

__all__ = ["CostReport", "LayerCost", "layer_bops", "count_macs", "count_bops", "build_report"]


def layer_bops(macs: int, precision: Precision) -> int:
    """BOPs of one layer call at a static precision: ``MACs * b_w * b_a``."""
    return macs * precision.bops_weight_bits * precision.bops_act_bits


@dataclass
class LayerCost:
    """What one ResQ layer did for one frame (all batch rows).

    Attributes:
        macs: MACs of one row (sample).
        key_mask: Bool ``[B]``: rows run as keyframes.
        residual_bits: Float ``[B]``: mean activation bits over the input positions of each
            residual row (Dynamic-ResQ); ``None`` when the residual precision is static.
        policy_bops: Float ``[B]``: BOPs of the dynamic policy per row (0 on keyframe rows).
        residual_density: Float ``[B]``: share of non-zero entries of each residual row's
            residual after truncation (and after the policy's 0-bit pixels); ignored on
            keyframe rows.
        frame_density: Float ``[B]``: share of non-zero entries of each row's layer input ``x``
            (what a dense zero-skipping engine would process).
    """

    macs: int
    key_mask: Tensor
    residual_bits: Tensor | None = None
    policy_bops: Tensor | None = None
    residual_density: Tensor | None = None
    frame_density: Tensor | None = None


@dataclass
class CostReport:
    """Cost of a call (a clip, one streamed frame, or a static count).

    Attributes:
        notation: The scheme in the paper's notation (``W8A8->W4A4``, ``W8A8->W8A{0,4,8}``).
        per_frame: BOPs of each frame (mean over batch rows), the policy's work included.
        per_layer: Mean BOPs per frame of each layer.
        macs: MACs per frame (one sample) of each layer.
        keyframe_share: Share of (row, frame) pairs that were keyframes.
        density: Share of non-zero residual entries per layer, over residual rows (RRM eq. 9's
            ``rho_hat``); layers that saw no residual row are absent.
        per_frame_policy: Of ``per_frame``, the BOPs of the dynamic policy's own work.
        frame_density: Share of non-zero entries of each layer's input over all rows (RRM's
            ``rho`` of the dense model).
        residual_bits: Mean activation bits of residual pixels per layer (Dynamic-ResQ; static
            bits otherwise).
        speedup: RRM eq. 10, ``sum_l rho_l MACs_l / sum_l rho_hat_l MACs_l`` over all frames,
            with keyframe rows at ``rho_l`` (NaN when no density was recorded).
        per_frame_sparse: BOPs of each frame when zero residual entries are skipped
            (keyframes dense, residual rows times their density, policy work added).
    """

    notation: str
    per_frame: list[float]
    per_layer: dict[str, float]
    macs: dict[str, int]
    keyframe_share: float
    density: dict[str, float] = field(default_factory=dict)
    per_frame_policy: list[float] = field(default_factory=list)
    frame_density: dict[str, float] = field(default_factory=dict)
    residual_bits: dict[str, float] = field(default_factory=dict)
    speedup: float = math.nan
    per_frame_sparse: list[float] = field(default_factory=list)

    @property
    def mean_bops(self) -> float:
        """Mean BOPs per frame."""
        return sum(self.per_frame) / len(self.per_frame) if self.per_frame else 0.0

    @property
    def mean_policy_bops(self) -> float:
        """Mean BOPs per frame of the dynamic policy's own work."""
        return (sum(self.per_frame_policy) / len(self.per_frame_policy)
                if self.per_frame_policy else 0.0)

    @property
    def mean_sparse_bops(self) -> float:
        """Mean BOPs per frame with zero residual entries skipped (RRM-style execution)."""
        if not self.per_frame_sparse:
            return self.mean_bops
        return sum(self.per_frame_sparse) / len(self.per_frame_sparse)

    @property
    def mean_density(self) -> float:
        """MAC-weighted residual density over all layers (RRM eq. 9's overall density)."""
        weights = [(self.macs.get(n, 0), d) for n, d in self.density.items()]
        total = sum(m for m, _ in weights)
        return sum(m * d for m, d in weights) / total if total else math.nan

    @property
    def total_macs(self) -> int:
        """MACs of one frame through all counted layers."""
        return sum(self.macs.values())

    def relative_to(self, other: CostReport) -> float:
        """This report's mean BOPs over ``other``'s."""
        return self.mean_bops / other.mean_bops

    def table(self) -> str:
        """A readable per-layer table."""
        width = max([len("layer")] + [len(n) for n in self.per_layer])
        head = (f"scheme {self.notation}: mean {self.mean_bops / 1e6:.3f} MBOPs/frame, "
                f"{len(self.per_frame)} frame(s), keyframes {self.keyframe_share:.0%}")
        if self.mean_policy_bops:
            head += f", policy {self.mean_policy_bops / 1e6:.3f} MBOPs/frame"
        if not math.isnan(self.speedup):
            head += f", RRM speedup {self.speedup:.2f}x"
        extra = bool(self.density)
        lines = [head, f"{'layer':<{width}}  {'MACs':>12}  {'MBOPs/frame':>12}  {'share':>6}"
                 + (f"  {'res bits':>8}  {'density':>7}" if extra else "")]
        total = sum(self.per_layer.values()) or 1.0
        for name, bops in self.per_layer.items():
            line = (f"{name:<{width}}  {self.macs.get(name, 0):>12,}  {bops / 1e6:>12.3f}  "
                    f"{bops / total:>6.1%}")
            if extra:
                bits = self.residual_bits.get(name, math.nan)
                density = self.density.get(name, math.nan)
                line += f"  {bits:>8.2f}  {density:>7.1%}"
            lines.append(line)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _as_layer_cost(record: LayerCost | tuple[int, Tensor]) -> LayerCost:
    if isinstance(record, LayerCost):
        return record
    macs, key_mask = record
    return LayerCost(macs, key_mask)


def build_report(
    scheme: Scheme, frames: Sequence[dict[str, LayerCost | tuple[int, Tensor]]]
) -> CostReport:
    """Turn per-frame layer records into a report.

    Args:
        scheme: The scheme the records were produced with.
        frames: One dict per frame, ``name -> LayerCost`` (or the static ``(macs, key_mask)``).

    Returns:
        The report; per-frame numbers are means over batch rows.
    """
    per_frame: list[float] = []
    per_frame_policy: list[float] = []
    per_frame_sparse: list[float] = []
    per_layer: dict[str, float] = {}
    macs: dict[str, int] = {}
    density_sum: dict[str, float] = {}
    bits_sum: dict[str, float] = {}
    residual_rows: dict[str, int] = {}
    frame_density_sum: dict[str, float] = {}
    frame_rows: dict[str, int] = {}
    dense_work = sparse_work = 0.0
    key_rows = total_rows = 0
    res_weight_bits = scheme.residual.bops_weight_bits if scheme.residual is not None else 0
    for record in frames:
        frame_bops = frame_policy = frame_sparse = 0.0
        for name, raw in record.items():
            cost = _as_layer_cost(raw)
            key = cost.key_mask.detach().to("cpu", torch.bool)
            rows = key.numel()
            n_key = int(key.sum())
            res = ~key
            key_bops = n_key * layer_bops(cost.macs, scheme.keyframe)
            res_bops = policy = res_sparse = 0.0
            if n_key < rows:
                assert scheme.residual is not None
                if cost.residual_bits is not None:
                    bits = cost.residual_bits.detach().double().cpu()[res]
                    res_row_bops = bits * (cost.macs * res_weight_bits)
                    bits_sum[name] = bits_sum.get(name, 0.0) + float(bits.sum())
                else:
                    static = float(layer_bops(cost.macs, scheme.residual))
                    res_row_bops = torch.full((rows - n_key,), static, dtype=torch.float64)
                    bits_sum[name] = (bits_sum.get(name, 0.0)
                                      + (rows - n_key) * scheme.residual.bops_act_bits)
                res_bops = float(res_row_bops.sum())
                if cost.policy_bops is not None:
                    policy = float(cost.policy_bops.detach().double().cpu()[res].sum())
                if cost.residual_density is not None:
                    dens = cost.residual_density.detach().double().cpu()[res]
                    density_sum[name] = density_sum.get(name, 0.0) + float(dens.sum())
                    res_sparse = float((res_row_bops * dens).sum())
                else:
                    res_sparse = res_bops
                residual_rows[name] = residual_rows.get(name, 0) + rows - n_key
            if cost.frame_density is not None:
                fdens = cost.frame_density.detach().double().cpu()
                frame_density_sum[name] = frame_density_sum.get(name, 0.0) + float(fdens.sum())
                frame_rows[name] = frame_rows.get(name, 0) + rows
                dense_work += cost.macs * float(fdens.sum())
                sparse_work += cost.macs * float(fdens[key].sum())
                if cost.residual_density is not None:
                    sparse_work += cost.macs * float(
                        cost.residual_density.detach().double().cpu()[res].sum())
                else:
                    sparse_work += cost.macs * float(fdens[res].sum())
            bops = (key_bops + res_bops + policy) / rows
            per_layer[name] = per_layer.get(name, 0.0) + bops
            macs[name] = cost.macs
            frame_bops += bops
            frame_policy += policy / rows
            frame_sparse += (key_bops + res_sparse + policy) / rows
        if record:
            first_mask = _as_layer_cost(next(iter(record.values()))).key_mask
            key_rows += int(first_mask.sum())
            total_rows += first_mask.numel()
        per_frame.append(frame_bops)
        per_frame_policy.append(frame_policy)
        per_frame_sparse.append(frame_sparse)
    n = max(len(frames), 1)
    if dense_work == 0 and sparse_work == 0:
        speedup = math.nan
    elif sparse_work == 0:
        speedup = math.inf
    else:
        speedup = dense_work / sparse_work
    return CostReport(
        notation=scheme.notation,
        per_frame=per_frame,
        per_layer={k: v / n for k, v in per_layer.items()},
        macs=macs,
        keyframe_share=key_rows / total_rows if total_rows else 0.0,
        density={k: v / residual_rows[k] for k, v in density_sum.items() if residual_rows[k]},
        per_frame_policy=per_frame_policy,
        frame_density={k: v / frame_rows[k] for k, v in frame_density_sum.items()},
        residual_bits={k: v / residual_rows[k] for k, v in bits_sum.items() if residual_rows[k]},
        speedup=speedup,
        per_frame_sparse=per_frame_sparse,
    )


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per sample of each supported layer (float or ResQ), from one forward on zeros.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).

    Returns:
        ``name -> MACs`` in call order.
    """
    from resq_brevitas.temporal.model import ResQModel  # counting is downstream of temporal

    net = model.model if isinstance(model, ResQModel) else model
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        raise ValueError("input_shape must be non-empty, got ()")
    macs: dict[str, int] = {}
    handles = []
    for name, module in net.named_modules():
        if is_resq_layer(module) or type(module) in RESQ_LAYER_FOR:
            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                in_shape, out_shape = tuple(args[0].shape[1:]), tuple(out.shape[1:])
                macs[name] = macs.get(name, 0) + _macs_of(mod, in_shape, out_shape)
            handles.append(module.register_forward_hook(hook))
    param = next(net.parameters(), None)
    device = param.device if param is not None else None
    try:
        with torch.no_grad():
            net(torch.zeros((1,) + shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return macs


def _macs_of(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    if is_resq_layer(module):
        return module.macs(in_shape, out_shape)
    resq_class = RESQ_LAYER_FOR[type(module)]
    return resq_class.macs(module, in_shape, out_shape)


def count_bops(
    model: nn.Module, input_shape: Sequence[int], scheme: str | Scheme, period: int = 1
) -> CostReport:
    """Static BOPs of one keyframe period: a keyframe then ``period - 1`` residual frames.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).
        scheme: Scheme or notation; a frame-quantization scheme ignores ``period``.
        period: Keyframe period ``T``.

    Returns:
        A :class:`CostReport` whose ``per_frame`` lists the ``T`` frames of one period.
    """
    scheme = Scheme.parse(scheme)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if scheme.is_dynamic:
        raise ValueError(f"count_bops needs a static scheme; {scheme} depends on the data")
    if scheme.is_frame_quantization:
        period = 1
    macs = count_macs(model, input_shape)
    one = torch.ones(1, dtype=torch.bool)
    frames = [{n: (m, one if t == 0 else ~one) for n, m in macs.items()} for t in range(period)]
    return build_report(scheme, frames)
