"""Bit operations (BOPs): what one layer call costs, and the report over frames.

A linear layer's cost is ``MACs * weight_bits * activation_bits`` (fp32 operands count as 32
bits, :func:`precision_bops`). Keyframe rows are counted at the layer's keyframe precision,
residual rows at what its residual path reports (:class:`LayerCost`): the static precision, 0 for
a 0-bit residual, or for a Dynamic-ResQ pool ``mean bits * b_w * MACs`` (a pixel at ``b`` bits
costs ``b * b_w * MACs / P``, with ``P`` input positions) plus the policy's own work. Only ResQ
layers (the convs and linears) are counted: element-wise work, pooling and normalisation are not,
as in the paper. Per-frame figures are means over the batch rows (each row is its own stream).

RRM (``reference="previous"``, ``threshold``): BOPs stay dense (as the ResQ paper counts them);
the report adds the density of the residuals (share of non-zero entries, RRM eq. 9), RRM's
theoretical speedup of zero-skipping inference over the dense model (RRM eq. 10,
:func:`rrm_speedup_eq10`) and the BOPs a zero-skipping engine would spend (``mean_sparse_bops``).

:class:`CostTally` folds per-frame records into a :class:`CostReport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resq_brevitas.config import Precision

__all__ = ["CostReport", "CostTally", "LayerCost", "precision_bops", "rrm_speedup_eq10"]


def precision_bops(macs: int, precision: Precision) -> int:
    """BOPs of one layer call at a static precision: ``MACs * b_w * b_a``."""
    return macs * precision.bops_weight_bits * precision.bops_act_bits


def rrm_speedup_eq10(dense_work: float, sparse_work: float) -> float:
    """RRM eq. 10: ``sum_l rho_l MACs_l / sum_l rho_hat_l MACs_l`` (NaN when nothing counted).

    Args:
        dense_work: ``sum rho_l * MACs_l`` over layers and frames (density of the layer inputs).
        sparse_work: The same with residual rows at their residual density ``rho_hat``.
    """
    if dense_work == 0 and sparse_work == 0:
        return math.nan
    if sparse_work == 0:
        return math.inf
    return dense_work / sparse_work


@dataclass
class LayerCost:
    """What one ResQ layer did for one frame (all batch rows).

    Attributes:
        macs: MACs of one row (sample).
        key_mask: Bool ``[B]``: rows run as keyframes.
        key_bops: BOPs of one keyframe row.
        residual_bops: Float64 ``[B]``: BOPs of each residual row (ignored on keyframe rows);
            ``None`` when every row was a keyframe.
        residual_bits: Float64 ``[B]``: mean activation bits of each residual row's pixels.
        policy_bops: Float64 ``[B]``: BOPs of the precision policy's own work per row (0 on
            keyframe rows), or ``None``.
        residual_density: Float64 ``[B]``: share of non-zero entries of each residual row's
            residual after truncation (and after the policy's 0-bit pixels), or ``None``.
        frame_density: Float64 ``[B]``: share of non-zero entries of each row's layer input
            (what a dense zero-skipping engine would process), or ``None``.
    """

    macs: int
    key_mask: Tensor
    key_bops: float
    residual_bops: Tensor | None = None
    residual_bits: Tensor | None = None
    policy_bops: Tensor | None = None
    residual_density: Tensor | None = None
    frame_density: Tensor | None = None

    def select(self, rows: Tensor) -> LayerCost:
        """The record of some rows only (``rows``: long indices), e.g. one frame of a clip that
        ran as one batch."""
        def pick(values: Tensor | None) -> Tensor | None:
            return None if values is None else values.index_select(0, rows)

        key = self.key_mask.index_select(0, rows)
        residual = None if bool(key.all()) else pick(self.residual_bops)
        return LayerCost(self.macs, key, self.key_bops, residual,
                         None if residual is None else pick(self.residual_bits),
                         None if residual is None else pick(self.policy_bops),
                         None if residual is None else pick(self.residual_density),
                         pick(self.frame_density))


@dataclass
class CostReport:
    """Cost of a call (a clip, one streamed frame, or a static count).

    Attributes:
        notation: The scheme in the paper's notation (``W8A8->W4A4``, ``W8A8->W8A{0,4,8}``), with
            per-layer overrides in brackets.
        per_frame: BOPs of each frame (mean over batch rows), the policy's work included.
        per_layer: Mean BOPs per frame of each layer.
        macs: MACs per frame (one sample) of each layer.
        keyframe_share: Share of (row, frame) pairs that were keyframes.
        density: Share of non-zero residual entries per layer, over residual rows (RRM eq. 9's
            ``rho_hat``); layers that saw no residual row are absent.
        per_frame_policy: Of ``per_frame``, the BOPs of the dynamic policy's own work.
        frame_density: Share of non-zero entries of each layer's input over all rows (RRM's
            ``rho`` of the dense model).
        residual_bits: Mean activation bits of residual pixels per layer.
        speedup: RRM eq. 10 over all frames, keyframe rows at ``rho_l`` (NaN when no density was
            recorded).
        per_frame_sparse: BOPs of each frame when zero residual entries are skipped (keyframes
            dense, residual rows times their density, policy work added).
        rrm: Whether the call ran in RRM mode (``reference="previous"``); :meth:`table` shows
            RRM's speedup only then. ``None`` (not said): shown whenever it was measured.
        float_operations: ``"module: what"`` of the weight-free operations that ran in
            floating point and are not counted in BOPs (attention matmuls).
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
    rrm: bool | None = None
    float_operations: tuple[str, ...] = ()

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
        if not math.isnan(self.speedup) and self.rrm is not False:
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
        lines.extend(f"not counted (floating point): {op}" for op in self.float_operations)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _cpu(values: Tensor) -> Tensor:
    return values.detach().to("cpu", torch.float64)


class _Sums:
    """Per-layer running sums of a :class:`CostTally`."""

    def __init__(self) -> None:
        self.bops = 0.0
        self.residual_rows = 0
        self.bits = 0.0
        self.density = 0.0
        self.density_rows = 0
        self.frame_density = 0.0
        self.frame_rows = 0


class CostTally:
    """Folds per-frame layer records into a :class:`CostReport`.

    Args:
        notation: The notation the report carries.
    """

    def __init__(self, notation: str) -> None:
        self.notation = notation
        self.frames = 0
        self.per_frame: list[float] = []
        self.per_frame_policy: list[float] = []
        self.per_frame_sparse: list[float] = []
        self.macs: dict[str, int] = {}
        self.layers: dict[str, _Sums] = {}
        self.key_rows = 0
        self.total_rows = 0
        self.dense_work = 0.0
        self.sparse_work = 0.0

    def add_frame(self, records: dict[str, LayerCost], key_mask: Tensor | None = None) -> None:
        """Add one frame's records (``name -> LayerCost`` over the ``B`` streams).

        Args:
            records: The layers' records.
            key_mask: Bool ``[B]``: the frame's keyframe rows, for ``keyframe_share`` (default:
                the first record's).
        """
        if key_mask is None and records:
            key_mask = next(iter(records.values())).key_mask
        streams = key_mask.numel() if key_mask is not None else 0
        self.add_clip(records, streams, 1, None if key_mask is None else key_mask.view(-1, 1))

    def add_clip(self, records: dict[str, LayerCost], streams: int, frames: int,
                 key_mask: Tensor | None) -> None:
        """Add the records of ``frames`` frames of ``streams`` streams at once: every record's
        per-row tensors hold ``streams * frames`` rows, row ``b * frames + t``.

        Args:
            records: The layers' records.
            streams: ``B``.
            frames: ``T``.
            key_mask: Bool ``[B, T]``: keyframe rows, for ``keyframe_share``.
        """
        frame = torch.zeros(frames, dtype=torch.float64)
        policy = torch.zeros(frames, dtype=torch.float64)
        sparse = torch.zeros(frames, dtype=torch.float64)
        for name, cost in records.items():
            bops, layer_policy, layer_sparse = self._add_layer(name, cost, streams, frames)
            frame += bops
            policy += layer_policy
            sparse += layer_sparse
        if key_mask is not None:
            self.key_rows += int(key_mask.sum())
            self.total_rows += key_mask.numel()
        self.frames += frames
        self.per_frame.extend(frame.tolist())
        self.per_frame_policy.extend(policy.tolist())
        self.per_frame_sparse.extend(sparse.tolist())

    def _add_layer(self, name: str, cost: LayerCost, streams: int, frames: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Fold one record in; returns its per-frame (BOPs, policy BOPs, zero-skipping BOPs),
        means over the streams."""
        sums = self.layers.setdefault(name, _Sums())
        self.macs[name] = cost.macs
        key = cost.key_mask.detach().to("cpu", torch.bool).view(streams, frames)
        res = ~key
        n_res = int(res.sum())
        zero = torch.zeros(frames, dtype=torch.float64)
        key_total = key.sum(0).double() * cost.key_bops
        res_total, policy, res_sparse = zero, zero, zero

        def frame_sums(values: Tensor, mask: Tensor) -> Tensor:
            grid = _cpu(values).view(streams, frames)
            return torch.where(mask, grid, torch.zeros_like(grid)).sum(0)

        if n_res:
            assert cost.residual_bops is not None and cost.residual_bits is not None
            res_total = frame_sums(cost.residual_bops, res)
            sums.bits += float(frame_sums(cost.residual_bits, res).sum())
            sums.residual_rows += n_res
            if cost.policy_bops is not None:
                policy = frame_sums(cost.policy_bops, res)
            res_sparse = res_total
            if cost.residual_density is not None:
                sums.density += float(frame_sums(cost.residual_density, res).sum())
                sums.density_rows += n_res
                res_sparse = frame_sums(_cpu(cost.residual_bops) * _cpu(cost.residual_density),
                                        res)
        if cost.frame_density is not None:
            frame_density = _cpu(cost.frame_density).view(streams, frames)
            sums.frame_density += float(frame_density.sum())
            sums.frame_rows += streams * frames
            self.dense_work += cost.macs * float(frame_density.sum())
            self.sparse_work += cost.macs * float(frame_sums(frame_density, key).sum())
            residual = (cost.residual_density if cost.residual_density is not None
                        else frame_density)
            self.sparse_work += cost.macs * float(frame_sums(residual, res).sum())
        bops = (key_total + res_total + policy) / streams
        sums.bops += float(bops.sum())
        return bops, policy / streams, (key_total + res_sparse + policy) / streams

    def report(self) -> CostReport:
        """The report of every frame added so far."""
        n = max(self.frames, 1)
        layers = self.layers
        return CostReport(
            notation=self.notation,
            per_frame=list(self.per_frame),
            per_layer={k: s.bops / n for k, s in layers.items()},
            macs=dict(self.macs),
            keyframe_share=self.key_rows / self.total_rows if self.total_rows else 0.0,
            density={k: s.density / s.density_rows for k, s in layers.items() if s.density_rows},
            per_frame_policy=list(self.per_frame_policy),
            frame_density={k: s.frame_density / s.frame_rows for k, s in layers.items()
                           if s.frame_rows},
            residual_bits={k: s.bits / s.residual_rows for k, s in layers.items()
                           if s.residual_rows},
            speedup=rrm_speedup_eq10(self.dense_work, self.sparse_work),
            per_frame_sparse=list(self.per_frame_sparse),
        )
