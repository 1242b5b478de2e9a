"""Time-batched clips: every layer runs once over all ``B * T`` frames of a clip.

With the ``keyframe`` reference and a fixed schedule a residual frame depends only on its
keyframe, not on the frames between them, so a clip can go through the model as one batch of
``B * T`` frames (row ``b * T + t``): at each ResQ layer the keyframe rows run the keyframe path,
the residual rows take ``delta = x_t - x_k`` against their own keyframe's input (a gather by
index, or the stream's carried reference when its keyframe came before the chunk) and add that
keyframe's output, exactly as :func:`~resq_brevitas.temporal.step.residual_step` does frame by
frame. Dynamic-ResQ's policy decides per pixel of each frame, so it batches the same way.

:func:`plan_clip` works out, from the schedule and each stream's phase, which rows are keyframes
and where each residual row's reference is; :class:`ClipExecutor` is the per-layer executor that
follows the plan. Modes whose decisions depend on earlier frames (the ``previous`` reference,
adaptive refresh) run frame by frame (:class:`~resq_brevitas.temporal.state.LayerState`); the
model chooses (see :meth:`resq_brevitas.temporal.ResQModel.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.temporal.context import FrameContext
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import LayerState, layer_cost, report_residual
from resq_brevitas.temporal.step import Reference, residual_step

__all__ = ["ClipExecutor", "ClipLayout", "ClipPlan", "NotBatchable", "plan_clip"]


class NotBatchable(RuntimeError):
    """The model does not keep one row per frame at some layer: run the clip frame by frame."""


@dataclass(frozen=True)
class ClipPlan:
    """Which rows of a time-batched chunk are keyframes, and where every row's reference is.

    Rows are ``b * T + t`` (stream ``b``, frame ``t`` of the chunk). References live in a table
    whose first ``B`` entries are the streams' carried references and whose entry ``B + j`` is the
    ``j``-th keyframe row of the chunk (in row order).

    The model runs on the rows in :attr:`order`: the keyframe rows first (in row order), then
    the residual rows, sorted by their reference; every layer then takes its keyframe rows and
    its residual rows as two views instead of two gathers.

    Attributes:
        batch: Streams ``B``.
        frames: Frames ``T`` of the chunk.
        key: Bool ``[B, T]``: keyframes.
        ref_row: Long ``[B * T]``: each row's reference in the table (keyframe rows: their own).
        last_ref: Long ``[B]``: each stream's reference after the chunk.
        phase: Long ``[B]``: each stream's phase after the chunk.
    """

    batch: int
    frames: int
    key: Tensor
    ref_row: Tensor
    last_ref: Tensor
    phase: Tensor

    @property
    def key_rows(self) -> Tensor:
        """Indices of the keyframe rows."""
        return self.key.reshape(-1).nonzero().squeeze(1)

    @property
    def residual_rows(self) -> Tensor:
        """Indices of the residual rows."""
        return (~self.key.reshape(-1)).nonzero().squeeze(1)

    @property
    def uses_carried(self) -> bool:
        """Whether some residual row refers to a reference carried from before the chunk."""
        rows = self.residual_rows
        return bool((self.ref_row.index_select(0, rows) < self.batch).any()) or bool(
            (self.last_ref < self.batch).any())

    def frame_rows(self, t: int) -> Tensor:
        """Row indices of frame ``t`` (one per stream)."""
        return torch.arange(self.batch) * self.frames + t

    @property
    def num_key(self) -> int:
        """Keyframe rows of the chunk."""
        return int(self.key.sum())

    @property
    def order(self) -> Tensor:
        """The rows in the order the model runs them (keyframes first, then residuals by
        reference)."""
        residual = self.residual_rows
        by_ref = torch.sort(self.ref_row.index_select(0, residual), stable=True).indices
        return torch.cat([self.key_rows, residual.index_select(0, by_ref)])

    @property
    def inverse(self) -> Tensor:
        """``inverse[row]``: the position of row ``b * T + t`` in :attr:`order`."""
        return torch.argsort(self.order)


def plan_clip(schedule: KeyframeSchedule, phase: Tensor, frames: int) -> ClipPlan:
    """Plan ``frames`` frames of every stream from the streams' phases (the same schedule
    decisions :meth:`KeyframeSchedule.key_mask` makes frame by frame).

    Args:
        schedule: The keyframe schedule.
        phase: Long ``[B]``: each stream's phase before the chunk (0: no keyframe yet).
        frames: Frames in the chunk (>= 1).
    """
    batch = phase.shape[0]
    keys = []
    for _ in range(frames):
        mask = schedule.key_mask(phase)
        keys.append(mask)
        phase = schedule.advance(phase, mask)
    key = torch.stack(keys, 1)
    flat = key.reshape(-1)
    table = batch + torch.cumsum(flat.long(), 0) - 1  # a keyframe row's table index
    current = torch.arange(batch)
    ref_row = torch.empty(batch * frames, dtype=torch.long)
    for t in range(frames):
        rows = torch.arange(batch) * frames + t
        current = torch.where(key[:, t], table.index_select(0, rows), current)
        ref_row[rows] = current
    return ClipPlan(batch, frames, key, ref_row, current, phase)


@dataclass(frozen=True)
class ClipLayout:
    """What every layer's executor needs of a plan in run order, computed once per chunk.

    Attributes:
        keys: Keyframe rows (the first ``keys`` rows in run order).
        residual_refs: Long ``[rows - keys]``: the table index of each residual row's reference.
        carried: Whether the table needs the carried references.
        key_in_order: Bool ``[rows]``: keyframe rows in run order.
        groups: When every keyframe of the chunk has the same number ``g`` of residual rows
            (and none is carried), ``g``: the residual rows of keyframe ``j`` are then rows
            ``keys + j*g .. keys + (j+1)*g - 1`` and references broadcast instead of being
            gathered; else ``None``.
    """

    keys: int
    residual_refs: Tensor
    carried: bool
    key_in_order: Tensor
    groups: int | None = None

    @classmethod
    def of(cls, plan: ClipPlan) -> ClipLayout:
        order = plan.order
        keys = plan.num_key
        refs = plan.ref_row.index_select(0, order[keys:])
        groups = None
        residual = refs.numel()
        if residual and not plan.uses_carried and residual % keys == 0:
            g = residual // keys
            if torch.equal(refs, (plan.batch + torch.arange(keys)).repeat_interleave(g)):
                groups = g
        return cls(keys, refs, plan.uses_carried, plan.key.reshape(-1).index_select(0, order),
                   groups)


class ClipExecutor:
    """Runs one ResQ layer over a time-batched chunk, following a :class:`ClipPlan`.

    The layer's :class:`LayerState` provides the carried references and receives the pending
    ones (each stream's last keyframe in the chunk, or its carried reference); the owner commits
    them after the whole forward succeeded.

    Args:
        state: The layer's state.
        ctx: The chunk's context (its ``key_mask`` is the plan's, flattened).
        plan: The plan.
    """

    def __init__(self, state: LayerState, ctx: FrameContext, plan: ClipPlan,
                 layout: ClipLayout) -> None:
        self.state = state
        self.ctx = ctx
        self.plan = plan
        self.keys = layout.keys
        self.residual_refs = layout.residual_refs
        self.carried = layout.carried
        self.key_in_order = layout.key_in_order
        self.groups = layout.groups


    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on the chunk's rows, which come in :attr:`ClipPlan.order`."""
        state, ctx, plan = self.state, self.ctx, self.plan
        rows = plan.batch * plan.frames
        if x.shape[0] != rows:
            raise NotBatchable(
                f"ResQ layer {state.name!r} got {x.shape[0]} rows for {plan.batch} streams x "
                f"{plan.frames} frames"
            )
        state.enter(ctx, x)
        inputs = ctx.inputs
        ctx.outputs.layers_run += 1
        if layer.residual is None:  # frame quantized: every row through the keyframe path
            z = layer.keyframe_forward(x, **kwargs)
            self._record(layer, x, z, torch.ones(rows, dtype=torch.bool), None)
            return z
        keys = self.keys
        x_key = x[:keys]
        z_key = layer.keyframe_forward(x_key, **kwargs)
        table_x, table_z, offset = x_key, z_key, plan.batch
        if self.carried:
            if state.ref is None or state.ref.x.shape[1:] != x.shape[1:]:
                raise RuntimeError(
                    f"ResQ layer {state.name!r} has no keyframe reference of shape "
                    f"{tuple(x.shape[1:])} for a residual frame"
                )
            table_x = torch.cat([state.ref.x, x_key])
            table_z = torch.cat([state.ref.z, z_key])
            offset = 0
        res = None
        if keys < rows:
            if self.groups is not None:  # each keyframe row against its own residual rows
                old = Reference(x_key, z_key)
            else:
                refs = (self.residual_refs - offset).to(x.device)
                old = Reference(table_x.index_select(0, refs), table_z.index_select(0, refs))
            res = residual_step(layer.residual, x[keys:], old, inputs.mode, groups=self.groups,
                                **kwargs)
            z = torch.cat([z_key, res.z])
        else:
            z = z_key.clone()  # the model may write into its output; z_key is referenced below
        last = (plan.last_ref - offset).to(x.device)
        state._pending = Reference(table_x.index_select(0, last), table_z.index_select(0, last))
        self._record(layer, x, z, self.key_in_order, res)
        return z

    def _record(self, layer: ResQLayerMixin, x: Tensor, z: Tensor, key: Tensor,
                res: Any) -> None:
        """Costs, bit maps and observations, all in run order (the model un-permutes them)."""
        ctx, state = self.ctx, self.state
        inputs = ctx.inputs
        rows = x.shape[0]
        res_idx = None if res is None else torch.arange(self.keys, rows)
        if inputs.record_bit_maps and layer.residual is not None and layer.residual.has_bit_maps:
            bits = layer.keyframe_precision.bops_act_bits
            bit_map = torch.full((rows,) + layer.spatial_shape(x), bits, dtype=torch.int8)
            if res is not None and res.sent.bit_map is not None:
                bit_map[self.keys:] = res.sent.bit_map.to("cpu", torch.int8)
            ctx.outputs.bit_maps[state.name] = bit_map
        cost = layer_cost(layer, x, z, key, ctx)
        if cost is not None:
            ctx.outputs.costs[state.name] = cost
        if res is not None:
            report_residual(state.name, layer, ctx, cost, res, res_idx, rows)
