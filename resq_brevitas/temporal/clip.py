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

from resq_brevitas.nn.cost import LayerCost
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.temporal.context import FrameContext
from resq_brevitas.temporal.schedule import KeyframeSchedule
from resq_brevitas.temporal.state import (
    LayerState,
    _assemble,
    _nonzero_share,
    report_residual,
)
from resq_brevitas.temporal.step import Reference, residual_step

__all__ = ["ClipExecutor", "ClipPlan", "NotBatchable", "plan_clip"]


class NotBatchable(RuntimeError):
    """The model does not keep one row per frame at some layer: run the clip frame by frame."""


@dataclass(frozen=True)
class ClipPlan:
    """Which rows of a time-batched chunk are keyframes, and where every row's reference is.

    Rows are ``b * T + t`` (stream ``b``, frame ``t`` of the chunk). References live in a table
    whose first ``B`` entries are the streams' carried references and whose entry ``B + j`` is the
    ``j``-th keyframe row of the chunk (in row order).

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

    def __init__(self, state: LayerState, ctx: FrameContext, plan: ClipPlan) -> None:
        self.state = state
        self.ctx = ctx
        self.plan = plan

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        state, ctx, plan = self.state, self.ctx, self.plan
        rows = plan.batch * plan.frames
        if x.shape[0] != rows:
            raise NotBatchable(
                f"ResQ layer {state.name!r} got {x.shape[0]} rows for {plan.batch} streams x "
                f"{plan.frames} frames"
            )
        if state._ran:
            raise RuntimeError(
                f"ResQ layer {state.name!r} was called twice in one frame; a ResQ layer must be "
                "called once per forward (reuse the float module for weight sharing)"
            )
        state._ran = True
        inputs = ctx.inputs
        if inputs.observer is not None:
            inputs.observer(state.name, "frame", x)
        ctx.outputs.layers_run += 1
        if layer.residual is None:  # frame quantized: every row through the keyframe path
            z = layer.keyframe_forward(x, **kwargs)
            self._record(layer, x, z, torch.ones(rows, dtype=torch.bool), None, None)
            return z
        key_idx, res_idx = plan.key_rows, plan.residual_rows
        device = x.device
        z_key = layer.keyframe_forward(x.index_select(0, key_idx.to(device)), **kwargs)
        x_key = x.index_select(0, key_idx.to(device))
        table_x, table_z = x_key, z_key
        if plan.uses_carried:
            if state.ref is None or state.ref.x.shape[1:] != x.shape[1:]:
                raise RuntimeError(
                    f"ResQ layer {state.name!r} has no keyframe reference of shape "
                    f"{tuple(x.shape[1:])} for a residual frame"
                )
            table_x = torch.cat([state.ref.x, x_key])
            table_z = torch.cat([state.ref.z, z_key])
            offset = 0
        else:
            offset = plan.batch  # the table starts at the chunk's first keyframe
        res = None
        if res_idx.numel():
            refs = (plan.ref_row.index_select(0, res_idx) - offset).to(device)
            old = Reference(table_x.index_select(0, refs), table_z.index_select(0, refs))
            res = residual_step(layer.residual, x.index_select(0, res_idx.to(device)), old,
                                inputs.mode, **kwargs)
            z = _assemble(key_idx.to(device), z_key, res_idx.to(device), res.z)
        else:
            z = z_key.clone()  # the model may write into its output; z_key is referenced below
        last = (plan.last_ref - offset).to(device)
        state._pending = Reference(table_x.index_select(0, last), table_z.index_select(0, last))
        self._record(layer, x, z, plan.key.reshape(-1), res, res_idx)
        return z

    def _record(self, layer: ResQLayerMixin, x: Tensor, z: Tensor, key: Tensor,
                res: Any, res_idx: Tensor | None) -> None:
        ctx, state = self.ctx, self.state
        inputs = ctx.inputs
        rows = x.shape[0]
        if inputs.record_bit_maps and layer.residual is not None and layer.residual.has_bit_maps:
            bits = layer.keyframe_precision.bops_act_bits
            bit_map = torch.full((rows,) + layer.spatial_shape(x), bits, dtype=torch.int8)
            if res is not None and res.sent.bit_map is not None:
                bit_map[res_idx] = res.sent.bit_map.to("cpu", torch.int8)
            ctx.outputs.bit_maps[state.name] = bit_map
        cost = None
        if inputs.record_costs:
            macs = layer.macs(tuple(x.shape[1:]), tuple(z.shape[1:]))
            cost = LayerCost(macs=macs, key_mask=key.cpu(),
                             key_bops=float(layer.keyframe_bops(macs)))
            if inputs.record_density:
                cost.frame_density = _nonzero_share(x)
            ctx.outputs.costs[state.name] = cost
        if res is not None:
            report_residual(state.name, layer, ctx, cost, res, res_idx, rows)
