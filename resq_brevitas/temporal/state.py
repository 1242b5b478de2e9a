"""Per-layer temporal state: the one place where keyframe/residual decomposition happens.

For each batch row (its own stream) a layer either runs a keyframe,
``z_k = q_Phi_a(x_k) * q_Phi_w(w) + b``, or a residual frame,
``z_t = q_Theta_a(x_t - x_ref) * q_Theta_w(w) + z_ref`` (eq. 4-5). With the ``keyframe`` reference
mode the reference ``(x_ref, z_ref)`` is set at keyframes and kept for the following frames.

Updates are transactional: :meth:`LayerState.forward` writes a *pending* reference, and the owner
commits it only after the whole model's forward succeeded, so an exception anywhere leaves every
layer as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.nn.layers import ResQLayerMixin

__all__ = ["StepContext", "LayerState", "Observer"]

#: Calibration hook ``observer(layer_name, kind, tensor)``: kind ``"frame"`` receives every row's
#: input (keyframe ranges are set on frame inputs), ``"residual"`` the residual rows' deltas.
Observer = Callable[[str, str, Tensor], None]


@dataclass
class StepContext:
    """What every layer needs to know about the current frame.

    Attributes:
        key_mask: Bool tensor ``[B]``: which rows are keyframes at this step.
        observer: Optional calibration hook receiving keyframe inputs and residuals.
        costs: Filled by layers: ``name -> (macs per row, key_mask)``.
    """

    key_mask: Tensor
    observer: Observer | None = None
    costs: dict[str, tuple[int, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.all_key = bool(self.key_mask.all())
        self.no_key = not bool(self.key_mask.any())


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

    def reset(self) -> None:
        """Forget the references (a new stream starts)."""
        self.x_ref = self.z_ref = None
        self._pending = None

    def commit(self, detach: bool) -> None:
        """Make the pending reference current (after a successful model forward)."""
        if self._pending is not None:
            x_ref, z_ref = self._pending
            if detach:
                x_ref, z_ref = x_ref.detach(), z_ref.detach()
            self.x_ref, self.z_ref = x_ref, z_ref
        self._pending = None

    def rollback(self) -> None:
        """Drop the pending reference (the model's forward failed)."""
        self._pending = None

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        """Run ``layer`` on ``x``: keyframe rows through the keyframe path, others as residuals."""
        ctx = self.context
        assert ctx is not None, "LayerState.forward called outside a ResQModel step"
        if self._pending is not None:
            raise RuntimeError(
                f"ResQ layer {self.name!r} was called twice in one frame; a ResQ layer must be "
                "called once per forward (reuse the float module for weight sharing)"
            )
        key = ctx.key_mask
        if not ctx.all_key and (self.x_ref is None or self.x_ref.shape != x.shape):
            raise RuntimeError(
                f"ResQ layer {self.name!r} has no keyframe reference of shape {tuple(x.shape)} "
                "for a residual frame"
            )
        if ctx.observer is not None:
            ctx.observer(self.name, "frame", x)
        if ctx.all_key:
            z = layer.keyframe_forward(x, **kwargs)
            x_ref, z_ref = x, z
        elif ctx.no_key:
            delta = x - self.x_ref
            if ctx.observer is not None:
                ctx.observer(self.name, "residual", delta)
            z = layer.residual_forward(delta, **kwargs) + self.z_ref
            x_ref, z_ref = self.x_ref, self.z_ref
        else:
            z = self._mixed_forward(layer, x, key, **kwargs)
            row_shape = (-1,) + (1,) * (x.dim() - 1)
            x_ref = torch.where(key.view(row_shape), x, self.x_ref)
            z_ref = torch.where(key.view((-1,) + (1,) * (z.dim() - 1)), z, self.z_ref)
        self._pending = (x_ref, z_ref)
        ctx.costs[self.name] = (layer.macs(tuple(x.shape[1:]), tuple(z.shape[1:])), key)
        return z

    def _mixed_forward(self, layer: ResQLayerMixin, x: Tensor, key: Tensor, **kwargs: Any
                       ) -> Tensor:
        ctx = self.context
        assert ctx is not None and self.x_ref is not None and self.z_ref is not None
        key_idx = key.nonzero().squeeze(1)
        res_idx = (~key).nonzero().squeeze(1)
        x_key = x.index_select(0, key_idx)
        delta = x.index_select(0, res_idx) - self.x_ref.index_select(0, res_idx)
        if ctx.observer is not None:
            ctx.observer(self.name, "residual", delta)
        z_key = layer.keyframe_forward(x_key, **kwargs)
        z_res = layer.residual_forward(delta, **kwargs) + self.z_ref.index_select(0, res_idx)
        z = z_key.new_empty((x.shape[0],) + tuple(z_key.shape[1:]))
        z = z.index_copy(0, key_idx, z_key)
        return z.index_copy(0, res_idx, z_res)
