"""Per-layer temporal state: references, per-row orchestration, costs and calibration taps.

For each batch row (its own stream) a layer either runs a keyframe or a residual frame against
its reference ``(x_ref, z_ref)``. The arithmetic of both (eq. 4-5, RRM truncation, the
``keyframe`` / ``previous`` reference updates with or without error feedback, 0-bit residuals)
lives in :mod:`resq_brevitas.temporal.step`; :class:`LayerState` splits the batch into keyframe
and residual rows, calls :func:`~resq_brevitas.temporal.step.keyframe_step` /
:func:`~resq_brevitas.temporal.step.residual_step` on them and reassembles the rows.

Around that step it adds what only the runtime needs: Dynamic-ResQ's error-bound policy
(eq. 9-11) as the residual quantizer of pool layers (picking a pool quantizer per pixel), RRM
eq. 7's truncated energy, densities and BOPs (:class:`~resq_brevitas.cost.LayerCost`),
calibration observers, and the scene-cut guard (the first ResQ layer of a frame may turn residual
rows into keyframes).

Updates are transactional: :meth:`LayerState.forward` writes a *pending* reference, and the owner
commits it only after the whole model's forward succeeded, so an exception anywhere leaves every
layer as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from resq_brevitas.config import ErrorBoundPolicy
from resq_brevitas.cost import LayerCost
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.policy.error_bound import apply_error_bound_policy, policy_bops
from resq_brevitas.policy.refresh import scene_cut_rows, truncated_energy_eq7
from resq_brevitas.temporal.step import ResidualMode, keyframe_step, residual_step

__all__ = ["StepContext", "LayerState", "Observer"]

#: Calibration hook ``observer(layer_name, kind, tensor)``: kind ``"frame"`` receives every row's
#: input (keyframe ranges are set on frame inputs), ``"residual"`` the residual rows' deltas
#: (after truncation: what the residual quantizers receive).
Observer = Callable[[str, str, Tensor], None]


@dataclass
class StepContext:
    """What every layer needs to know about the current frame, and what it reports back.

    Attributes:
        key_mask: Bool tensor ``[B]``: which rows are keyframes at this step (the scene-cut guard
            may add rows at the first layer).
        observer: Optional calibration hook receiving keyframe inputs and residuals.
        costs: Filled by layers: ``name -> LayerCost``.
        reference: ``"keyframe"`` or ``"previous"``.
        threshold: RRM truncation ``eps`` (0: none).
        policy: Dynamic-ResQ policy settings for pool layers.
        error_feedback: ``previous`` mode: ``x_ref <- x_ref + q(delta)`` (True) or ``x_t``
            (False, ablation only).
        scene_cut: Scene-cut fraction, or ``None``; evaluated at the first layer only.
        record_bit_maps: Store per-pixel bit maps of pool layers in ``bit_maps``.
        keyframe_act_bits: Keyframe activation bits (bit maps of keyframe rows, policy cost).
        bit_maps: ``name -> [B, *S]`` bits each pixel's activation was processed at.
        truncated: Float64 ``[B]``: this frame's truncated energy summed over layers (RRM eq. 7).
        cut: Bool ``[B]``: rows forced to keyframes by a refresh policy (the scene-cut guard
            sets them during the step; the model adds the error-budget refresh's rows after it).
    """

    key_mask: Tensor
    observer: Observer | None = None
    costs: dict[str, LayerCost] = field(default_factory=dict)
    reference: str = "keyframe"
    threshold: float = 0.0
    policy: ErrorBoundPolicy | None = None
    error_feedback: bool = True
    scene_cut: float | None = None
    record_bit_maps: bool = False
    keyframe_act_bits: int = 32
    bit_maps: dict[str, Tensor] = field(default_factory=dict)
    truncated: Tensor | None = None
    cut: Tensor | None = None

    def __post_init__(self) -> None:
        self._update_flags()
        rows = self.key_mask.shape[0]
        if self.truncated is None:
            self.truncated = torch.zeros(rows, dtype=torch.float64)
        if self.cut is None:
            self.cut = torch.zeros(rows, dtype=torch.bool)

    def _update_flags(self) -> None:
        self.all_key = bool(self.key_mask.all())
        self.no_key = not bool(self.key_mask.any())

    def force_keyframes(self, rows: Tensor) -> None:
        """Run ``rows`` (bool ``[B]``) as keyframes from the current layer on."""
        assert self.cut is not None
        rows = rows.to(self.key_mask.device)
        self.cut |= rows.cpu()
        self.key_mask = self.key_mask | rows
        self._update_flags()


class _Residual(NamedTuple):
    """Result of the residual path on the residual rows ``R``."""

    z: Tensor
    x_ref: Tensor
    z_ref: Tensor
    density: Tensor
    truncated: Tensor | None
    bits: Tensor | None
    policy_bops: Tensor | None
    bit_map: Tensor | None


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
    return torch.count_nonzero(flat, dim=1).double() / max(1, flat.shape[1])


class LayerState:
    """Reference tensors of one ResQ layer, for all batch rows.

    Args:
        name: The layer's qualified name in the model (for costs and calibration).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.x_ref: Tensor | None = None
        self.z_ref: Tensor | None = None
        self.context: StepContext | None = None
        self._pending: tuple[Tensor, Tensor] | None = None
        self._input: tuple[Tensor, int] | None = None

    def reset(self) -> None:
        """Forget the references (a new stream starts)."""
        self.x_ref = self.z_ref = None
        self._pending = None
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
            x_ref, z_ref = self._pending
            if detach:
                x_ref, z_ref = x_ref.detach(), z_ref.detach()
            self.x_ref, self.z_ref = x_ref, z_ref
        self._pending = None
        self._input = None

    def _watch_input(self, x: Tensor) -> None:
        # Inference-mode tensors have no version counter: the check is skipped for them.
        if not x.is_inference():
            self._input = (x, x._version)

    def rollback(self) -> None:
        """Drop the pending reference (the model's forward failed)."""
        self._pending = None
        self._input = None

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on ``x``: keyframe rows through the keyframe path, others as residuals."""
        ctx = self.context
        assert ctx is not None, "LayerState.forward called outside a ResQModel step"
        if self._pending is not None:
            raise RuntimeError(
                f"ResQ layer {self.name!r} was called twice in one frame; a ResQ layer must be "
                "called once per forward (reuse the float module for weight sharing)"
            )
        if not ctx.all_key and (self.x_ref is None or self.x_ref.shape != x.shape):
            raise RuntimeError(
                f"ResQ layer {self.name!r} has no keyframe reference of shape {tuple(x.shape)} "
                "for a residual frame"
            )
        if ctx.observer is not None:
            ctx.observer(self.name, "frame", x)
        if ctx.scene_cut is not None:
            self._scene_cut(x)
        rows = x.shape[0]
        key = ctx.key_mask
        residual_bits = policy = density = None
        bit_map = None
        if ctx.all_key:
            z, x_ref, z_ref = keyframe_step(layer, x, **kwargs)
            self._watch_input(x)
        else:
            res_idx = None if ctx.no_key else (~key).nonzero().squeeze(1)
            res = self._residual(layer, _rows(x, res_idx), _rows(self.x_ref, res_idx),
                                 _rows(self.z_ref, res_idx), **kwargs)
            bit_map = res.bit_map
            if res_idx is None:
                z, x_ref, z_ref = res.z, res.x_ref, res.z_ref
                if x_ref is x:
                    self._watch_input(x)
            else:
                key_idx = key.nonzero().squeeze(1)
                z_key, x_key, z_key_ref = keyframe_step(layer, x.index_select(0, key_idx),
                                                        **kwargs)
                z = _assemble(key_idx, z_key, res_idx, res.z)
                x_ref = _assemble(key_idx, x_key, res_idx, res.x_ref)
                z_ref = _assemble(key_idx, z_key_ref, res_idx, res.z_ref)
                if bit_map is not None:
                    key_bits = bit_map.new_full((key_idx.numel(),) + tuple(bit_map.shape[1:]),
                                                ctx.keyframe_act_bits)
                    bit_map = _assemble(key_idx, key_bits, res_idx, bit_map)
            density = _scatter_rows(rows, res_idx, res.density, fill=float("nan"))
            if res.truncated is not None:
                assert ctx.truncated is not None
                ctx.truncated += _scatter_rows(rows, res_idx, res.truncated)
            if res.bits is not None:
                assert res.policy_bops is not None
                residual_bits = _scatter_rows(rows, res_idx, res.bits)
                policy = _scatter_rows(rows, res_idx, res.policy_bops)
        if ctx.record_bit_maps and layer.residual_pool is not None:
            if bit_map is None:  # every row a keyframe
                spatial = _spatial_shape(layer, x)
                bit_map = torch.full((rows,) + spatial, ctx.keyframe_act_bits, dtype=torch.int8)
            ctx.bit_maps[self.name] = bit_map.to("cpu", torch.int8)
        if z_ref is z:
            # The model may modify a layer's output in place (ReLU(inplace=True) right after a
            # conv): the stored reference must not be that tensor.
            z = z.clone()
        self._pending = (x_ref, z_ref)
        ctx.costs[self.name] = LayerCost(
            macs=layer.macs(tuple(x.shape[1:]), tuple(z.shape[1:])),
            key_mask=key,
            residual_bits=residual_bits,
            policy_bops=policy,
            residual_density=density,
            frame_density=_nonzero_share(x).cpu(),
        )
        return z

    def _scene_cut(self, x: Tensor) -> None:
        """Scene-cut guard at the frame's first ResQ layer: residual rows whose residual energy
        exceeds the fraction of the frame's energy become keyframes from here on."""
        ctx = self.context
        assert ctx is not None and ctx.scene_cut is not None
        fraction, ctx.scene_cut = ctx.scene_cut, None  # later layers must not re-decide
        if ctx.all_key:
            return
        assert self.x_ref is not None
        cut = scene_cut_rows(x - self.x_ref, x, fraction) & ~ctx.key_mask.cpu()
        if bool(cut.any()):
            ctx.force_keyframes(cut)

    def _residual(self, layer: ResQLayerMixin, x: Tensor, x_ref: Tensor, z_ref: Tensor,
                  **kwargs: Any) -> _Residual:
        """The residual path on residual rows: :func:`~resq_brevitas.temporal.step.residual_step`
        (truncation, quantization, the output and the next reference), with the Dynamic-ResQ policy
        as its quantizer for pool layers, plus what the runtime reports (RRM eq. 7 energy,
        density, bits, policy cost)."""
        ctx = self.context
        assert ctx is not None
        mode = ResidualMode(reference=ctx.reference, error_feedback=ctx.error_feedback,
                            threshold=ctx.threshold)
        bits = policy = bit_map = None
        if layer.residual_pool is None:
            res = residual_step(layer, x, x_ref, z_ref, mode, **kwargs)
            sent = res.delta
        else:
            assert ctx.policy is not None, "a pool layer needs the Dynamic-ResQ policy"
            qweight = layer.residual_quant_weight()
            chosen: dict[str, Any] = {}

            def quantize(delta: Tensor) -> Tensor:
                # Error-bound policy (eq. 9-11): per pixel, the cheapest pool quantizer whose
                # error is within tau of the next one.
                qdelta, index, units = apply_error_bound_policy(
                    delta, layer.pool_quantize(delta), layer.residual_weight_norm(qweight),
                    ctx.policy, layer.channel_dim)
                chosen["index"], chosen["units"] = index, units
                return qdelta

            res = residual_step(layer, x, x_ref, z_ref, mode, quantize=quantize,
                                qweight=qweight, **kwargs)
            index = chosen["index"]
            pool_bits = torch.tensor(layer.pool_bits, device=index.device)
            bit_map = pool_bits[index]
            positions = layer.spatial_positions(tuple(x.shape[1:]))
            bits = bit_map.reshape(bit_map.shape[0], -1).double().mean(1)
            overhead = policy_bops(len(layer.pool_bits), x.shape[layer.channel_dim], positions,
                                   chosen["units"], ctx.keyframe_act_bits)
            policy = torch.full((x.shape[0],), float(overhead), dtype=torch.float64)
            active = (bit_map > 0).unsqueeze(1 if layer.channel_dim >= 0 else bit_map.dim())
            sent = res.delta * active
        if ctx.observer is not None:
            ctx.observer(self.name, "residual", res.delta)
        truncated = None if res.truncated is None else truncated_energy_eq7(res.truncated)
        return _Residual(res.z, res.x_ref, res.z_ref, _nonzero_share(sent), truncated, bits,
                         policy, bit_map)


def _spatial_shape(layer: ResQLayerMixin, x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:-1]) if layer.channel_dim == -1 else tuple(x.shape[2:])
