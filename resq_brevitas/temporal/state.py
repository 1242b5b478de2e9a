"""Per-layer temporal state and the per-row executor of the runtime.

For each batch row (its own stream) a layer either runs a keyframe or a residual frame against
its reference ``(x_ref, z_ref)``. The arithmetic of both lives in
:mod:`resq_brevitas.temporal.step`; how residuals are quantized lives in the layer's residual path.
:class:`LayerState` splits the batch into keyframe and residual rows, calls
:func:`~resq_brevitas.temporal.step.keyframe_step` / :func:`~resq_brevitas.temporal.step.
residual_step` on them, reassembles the rows and reports what the runtime needs: BOPs
(:class:`~resq_brevitas.nn.cost.LayerCost`), densities, RRM eq. 7's truncated energy, bit maps,
calibration observations, and the first layer's refresh triggers.

Updates are transactional: :meth:`LayerState.forward` writes a *pending* reference, and the owner
commits it only after the whole model's forward succeeded, so an exception anywhere leaves every
layer as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from resq_brevitas.nn.cost import LayerCost
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.policy.refresh import truncated_energy_rrm_eq7
from resq_brevitas.temporal.context import FrameContext
from resq_brevitas.temporal.step import Reference, StepResult, keyframe_step, residual_step

__all__ = ["LayerState", "layer_cost", "report_residual"]


def _rows(values: Tensor, idx: Tensor | None) -> Tensor:
    return values if idx is None else values.index_select(0, idx)


def _assemble(key_idx: Tensor, key_part: Tensor, res_idx: Tensor, res_part: Tensor) -> Tensor:
    """Interleave keyframe rows and residual rows back into batch order."""
    out = key_part.new_empty((key_idx.numel() + res_idx.numel(),) + tuple(key_part.shape[1:]))
    out = out.index_copy(0, key_idx, key_part)
    return out.index_copy(0, res_idx, res_part)


def _scatter_rows(rows: int, idx: Tensor | None, values: Tensor, fill: float = 0.0) -> Tensor:
    """Per-row statistics of the residual rows into a ``[B]`` CPU tensor."""
    values = values.detach().to("cpu", torch.float64)
    if idx is None:
        return values
    out = torch.full((rows,), fill, dtype=torch.float64)
    return out.index_copy(0, idx.cpu(), values)


def _nonzero_share(t: Tensor) -> Tensor:
    flat = t.detach().flatten(1)
    return (torch.count_nonzero(flat, dim=1).double() / max(1, flat.shape[1])).cpu()


class LayerState:
    """Reference tensors of one ResQ layer, for all batch rows, and its per-row executor.

    Args:
        name: The layer's qualified name in the model (for costs and calibration).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ref: Reference | None = None
        self.context: FrameContext | None = None
        self._pending: Reference | None = None
        self._ran = False
        self._input: tuple[Tensor, int] | None = None

    def reset(self, rows: Tensor | None = None) -> None:
        """Forget the references (a new stream starts); ``rows`` restarts some rows only, which
        the schedule then runs as keyframes, so their old references are never read."""
        if rows is None:
            self.ref = None
        self._pending = None
        self._ran = False
        self._input = None

    def verify(self) -> None:
        """Raise if the model modified, in place, an input this layer keeps as its reference.

        Called on every layer before any commits, so a failure leaves all states intact.
        """
        if self._input is not None:
            tensor, version = self._input
            if tensor._version != version:
                raise RuntimeError(
                    f"the input of ResQ layer {self.name!r} was modified in place after the "
                    "layer read it; ResQ keeps it as the layer's reference, so the model must not "
                    "change it in place (e.g. use ReLU(inplace=False) on tensors a layer reads)"
                )

    def commit(self, detach: bool) -> None:
        """Make the pending reference current (after a successful model forward)."""
        if self._pending is not None:
            ref = self._pending
            self.ref = Reference(ref.x.detach(), ref.z.detach()) if detach else ref
        self.rollback()

    def detach(self) -> None:
        """Detach the current reference from autograd (it outlives the graph that made it)."""
        if self.ref is not None:
            self.ref = Reference(self.ref.x.detach(), self.ref.z.detach())

    def rollback(self) -> None:
        """Drop the pending reference (the model's forward failed, or it was committed)."""
        self._pending = None
        self._ran = False
        self._input = None

    def _watch_input(self, x: Tensor) -> None:
        # Inference-mode tensors have no version counter: the check is skipped for them.
        if not x.is_inference():
            self._input = (x, x._version)

    def enter(self, ctx: FrameContext, x: Tensor) -> None:
        """What every executor does first: one call per frame, the frame observation."""
        if self._ran:
            raise RuntimeError(
                f"ResQ layer {self.name!r} was called twice in one frame; a ResQ layer must be "
                "called once per forward (reuse the float module for weight sharing)"
            )
        self._ran = True
        if ctx.inputs.observer is not None:
            ctx.inputs.observer(self.name, "frame", x)

    # ------------------------------------------------------------------ the executor
    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on ``x``: keyframe rows through the keyframe path, others as residuals."""
        ctx = self.context
        assert ctx is not None, "LayerState.forward called outside a ResQModel step"
        self.enter(ctx, x)
        inputs = ctx.inputs
        if ctx.first_layer and inputs.first_layer_triggers:
            self._first_layer_triggers(ctx, x)
        ctx.outputs.layers_run += 1
        frame_quantized = layer.residual is None
        if not (ctx.all_key or frame_quantized) and (self.ref is None
                                                     or self.ref.x.shape != x.shape):
            raise RuntimeError(
                f"ResQ layer {self.name!r} has no keyframe reference of shape {tuple(x.shape)} "
                "for a residual frame"
            )
        rows, streams = x.shape[0], ctx.key_mask.shape[0]
        key = self._row_key_mask(ctx, rows, frame_quantized)
        res: StepResult | None = None
        res_idx: Tensor | None = None
        bit_map = None
        if ctx.all_key or frame_quantized:
            z, ref = keyframe_step(layer, x, **kwargs)
            self._watch_input(x)
        else:
            res_idx = None if ctx.no_key else (~key).nonzero().squeeze(1)
            assert self.ref is not None
            old = Reference(_rows(self.ref.x, res_idx), _rows(self.ref.z, res_idx))
            res = residual_step(layer.residual, _rows(x, res_idx), old, inputs.mode, **kwargs)
            bit_map = res.sent.bit_map
            if res_idx is None:
                z, ref = res.z, res.ref
                if ref.x is x:
                    self._watch_input(x)
            else:
                key_idx = key.nonzero().squeeze(1)
                z_key, key_ref = keyframe_step(layer, x.index_select(0, key_idx), **kwargs)
                z = _assemble(key_idx, z_key, res_idx, res.z)
                ref = Reference(_assemble(key_idx, key_ref.x, res_idx, res.ref.x),
                                _assemble(key_idx, key_ref.z, res_idx, res.ref.z))
                if bit_map is not None:
                    key_bits = bit_map.new_full((key_idx.numel(),) + tuple(bit_map.shape[1:]),
                                                layer.keyframe_precision.bops_act_bits)
                    bit_map = _assemble(key_idx, key_bits, res_idx, bit_map)
        cost = layer_cost(layer, x, z, key, ctx)
        if res is not None:
            report_residual(self.name, layer, ctx, cost, res, res_idx, rows)
        if cost is not None:
            ctx.outputs.costs[self.name] = cost if rows == streams else _per_stream(cost, streams)
        if (inputs.record_bit_maps and layer.residual is not None and layer.residual.has_bit_maps
                and rows == streams):
            if bit_map is None:  # every row a keyframe
                bit_map = torch.full((rows,) + layer.spatial_shape(x),
                                     layer.keyframe_precision.bops_act_bits, dtype=torch.int8)
            ctx.outputs.bit_maps[self.name] = bit_map.to("cpu", torch.int8)
        if ref.z is z:
            # The model may modify a layer's output in place (ReLU(inplace=True) right after a
            # conv): the stored reference must not be that tensor.
            z = z.clone()
        if not frame_quantized:
            self._pending = ref
        return z

    def _row_key_mask(self, ctx: FrameContext, rows: int, frame_quantized: bool) -> Tensor:
        """The keyframe mask over the layer's rows.

        A layer may see a multiple of the stream batch (windows, patches, tokens, heads of each
        frame): that works whenever all streams share a phase (every row is then a keyframe, or
        every row a residual), whatever the layout; with mixed phases the rows of each stream
        are unknown, so it is refused.
        """
        streams = ctx.key_mask.shape[0]
        if frame_quantized:
            return torch.ones(rows, dtype=torch.bool, device=ctx.key_mask.device)
        if rows == streams:
            return ctx.key_mask
        if rows % streams == 0 and (ctx.all_key or ctx.no_key):
            return ctx.key_mask[:1].expand(rows)
        raise RuntimeError(
            f"ResQ layer {self.name!r} sees {rows} rows for {streams} streams whose keyframe "
            "phases differ: which rows belong to which stream is unknown; run the streams with "
            "a shared phase (e.g. qm(video)) or one stream per call"
        )

    def _first_layer_triggers(self, ctx: FrameContext, x: Tensor) -> None:
        """Refresh triggers at the frame's first ResQ layer (e.g. a scene cut): residual rows
        they flag become keyframes from here on."""
        if ctx.all_key or self.ref is None:
            return
        if x.shape[0] != ctx.key_mask.shape[0]:
            raise RuntimeError(
                f"the first ResQ layer {self.name!r} sees {x.shape[0]} rows for "
                f"{ctx.key_mask.shape[0]} streams: a refresh trigger cannot tell them apart"
            )
        residual = ~ctx.key_mask
        for trigger in ctx.inputs.first_layer_triggers:
            flagged = trigger.at_first_layer(x, self.ref.x).to(residual.device) & residual
            if bool(flagged.any()):
                ctx.force_keyframes(flagged)
                residual = ~ctx.key_mask


def _per_stream(cost: LayerCost, streams: int) -> LayerCost:
    """A record over ``k * streams`` rows of one phase as a record over the streams.

    The rows' layout is unknown, so every stream gets the mean over all rows (exact for the
    per-frame means the reports show): ``k`` rows' MACs and BOPs, the mean bits and densities.
    """
    k = cost.key_mask.shape[0] // streams

    def pooled(values: Tensor | None, total: bool) -> Tensor | None:
        if values is None:
            return None
        value = values.double().mean() * (k if total else 1)
        return value.expand(streams).clone()

    return LayerCost(cost.macs * k, cost.key_mask[:streams].clone(), cost.key_bops * k,
                     pooled(cost.residual_bops, True), pooled(cost.residual_bits, False),
                     pooled(cost.policy_bops, True), pooled(cost.residual_density, False),
                     pooled(cost.frame_density, False))


def layer_cost(layer: ResQLayerMixin, x: Tensor, z: Tensor, key: Tensor,
                ctx: FrameContext) -> LayerCost | None:
    """The keyframe part of a layer call's record (``None`` when costs are off): MACs, the
    keyframe rows' BOPs and, if asked for, the input density; residual rows are added by
    :func:`report_residual`."""
    inputs = ctx.inputs
    if not inputs.record_costs:
        return None
    macs = layer.macs(tuple(x.shape[1:]), tuple(z.shape[1:]))
    cost = LayerCost(macs=macs, key_mask=key.cpu(), key_bops=float(layer.keyframe_bops(macs)))
    if inputs.record_density:
        cost.frame_density = _nonzero_share(x)
    return cost


def report_residual(name: str, layer: ResQLayerMixin, ctx: FrameContext,
                    cost: LayerCost | None, res: StepResult, res_idx: Tensor | None,
                    rows: int) -> None:
    """Costs, densities, RRM eq. 7 energy and observations of a layer's residual rows.

    Args:
        name: The layer's name.
        layer: The layer.
        ctx: The frame (or clip) context.
        cost: The layer's record of this call, completed here (``None``: costs are off).
        res: The residual step of the residual rows.
        res_idx: Their row indices (``None``: every row).
        rows: Rows of the call.
    """
    inputs = ctx.inputs
    path = layer.residual
    assert path is not None
    if inputs.observer is not None:
        inputs.observer(name, "residual", res.delta)
    if res.truncated is not None:
        truncated = ctx.outputs.truncated
        assert truncated is not None
        energy = _scatter_rows(rows, res_idx, truncated_energy_rrm_eq7(res.truncated))
        if energy.numel() != truncated.numel():  # k rows per stream, layout unknown: share it
            energy = (energy.sum() / truncated.numel()).expand_as(truncated)
        truncated += energy
    if cost is None:
        return
    x_res = res.delta
    residual_cost = path.cost(cost.macs, res.sent, x_res.shape[0],
                              x_res.shape[layer.channel_dim],
                              layer.spatial_positions(tuple(x_res.shape[1:])),
                              layer.keyframe_precision.bops_act_bits)
    cost.residual_bops = _scatter_rows(rows, res_idx, residual_cost.bops)
    cost.residual_bits = _scatter_rows(rows, res_idx, residual_cost.bits)
    if residual_cost.policy_bops is not None:
        cost.policy_bops = _scatter_rows(rows, res_idx, residual_cost.policy_bops)
    if inputs.record_density:
        density = _nonzero_share(path.density_source(res.delta, res.sent))
        cost.residual_density = _scatter_rows(rows, res_idx, density, fill=float("nan"))
