"""The per-action paths of a ResQ layer under a family scheme (VideoIQ, DESIGN section 4).

A family scheme lets a learned policy pick, per frame, one action of a family:

- a *frame family* ``{W8A8,W4A4,W2A2,skip}``: the frame runs every layer at one precision. The
  highest member is the layer's keyframe path itself; every other member is a
  :class:`~resq_brevitas.nn.residual.StaticResidual` whose weight is the truncated view of the
  keyframe's integer weight (VideoIQ's any-precision weights, :mod:`resq_brevitas.quant.
  any_precision`) and whose activation quantizer has its own range (calibrated on frame
  inputs); the layer's bias is added (:meth:`FamilyPaths.frame_forward`);
- a *residual family* ``W8A8->{W8A4,W4A4,skip,key}``: each residual frame runs its residual
  through one member's residual path. The highest member is the layer's ``residual``; the
  others are residual paths of their own (truncated from the keyframe's weight or separately
  quantized, per ``residual_weights``), calibrated on residuals.

``skip`` and ``key`` have no path here: they are the per-frame executor's business
(:mod:`resq_brevitas.temporal.actions`). The extra paths share the layer's weight
``Parameter`` like the residual view does (the layer ties them).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from resq_brevitas.config import Precision, Scheme
from resq_brevitas.nn.residual import CalibrationTarget, ResidualPath, StaticResidual

__all__ = ["FamilyPaths"]


class FamilyPaths(nn.Module):
    """The extra paths of one layer under a family scheme, by action index.

    Args:
        brevitas_class: The layer's Brevitas class.
        scheme: The family scheme.
        weight_granularity: ``"tensor"`` or ``"channel"`` (as the keyframe's).
        layer_kwargs: The layer's constructor arguments.
        residual_weights: ``"truncated"`` or ``"separate"`` for a residual family's members (a
            frame family always truncates: that is what makes one integer weight serve all).
    """

    def __init__(self, brevitas_class: type[nn.Module], scheme: Scheme, weight_granularity: str,
                 layer_kwargs: dict[str, Any], residual_weights: str) -> None:
        super().__init__()
        self.side = scheme.family_side
        top = scheme.keyframe if self.side == "frame" else scheme.residual
        key_bits = scheme.keyframe.weight_bits
        truncated = self.side == "frame" or residual_weights == "truncated"
        truncate_from = key_bits if truncated else None
        #: Action index -> precision of every precision action.
        self.precisions: dict[int, Precision] = {
            i: a.precision for i, a in enumerate(scheme.family) if a.precision is not None}
        #: Action indices served by the layer's own path (keyframe path, or ``layer.residual``).
        self.own = frozenset(i for i, p in self.precisions.items() if p == top)
        self.paths = nn.ModuleDict({
            str(i): StaticResidual(brevitas_class, p, weight_granularity, layer_kwargs,
                                   truncate_from)
            for i, p in self.precisions.items() if i not in self.own})

    def tie(self, weight: nn.Parameter) -> None:
        """Make every path's view use the layer's weight ``Parameter``."""
        for path in self.paths.values():
            path.view.weight = weight

    def path(self, index: int) -> ResidualPath:
        """The extra path of action ``index`` (not one of :attr:`own`)."""
        return self.paths[str(index)]

    def frame_forward(self, layer: Any, index: int, x: Tensor, **kwargs: Any) -> Tensor:
        """A frame family's member ``index`` on a frame input: ``q_b(x) * W_b + bias``."""
        if index in self.own:
            return layer.keyframe_forward(x, **kwargs)
        path = self.path(index)
        z = path.contribution(path.quantize(x), **kwargs)
        if layer.bias is None:
            return z
        shape = [1] * z.dim()
        shape[layer.channel_dim] = -1
        return z + layer.bias.view(shape)

    def calibration_targets(self) -> list[CalibrationTarget]:
        """Frame family: the members' activation quantizers on frame inputs (keyframe slots
        1, 2, ...); residual family: on residuals (residual slots after the layer's own)."""
        targets = []
        path_kind = "keyframe" if self.side == "frame" else "residual"
        for slot, (_, path) in enumerate(sorted(self.paths.items()), start=1):
            for target in path.calibration_targets():
                targets.append(CalibrationTarget(path_kind, 100 + slot, target.bits,
                                                 target.proxy, target.view))
        return targets
