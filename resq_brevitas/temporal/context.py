"""One frame's temporal context: what goes into every layer, what comes out, and how executors
are attached to the layers.

:class:`StepInputs` is fixed before the frame (the scheduled keyframe rows, the residual mode,
the calibration observer, what to record); :class:`StepOutputs` is what the layers report (costs,
bit maps, RRM eq. 7 energy, rows a first-layer trigger turned into keyframes).
:class:`FrameContext` pairs them for the layers of one frame: its :attr:`FrameContext.key_mask`
is the scheduled rows plus the rows forced so far, computed, never assigned by a layer.

:func:`attached` is the only place where a ResQ layer's executor is set and restored; the
runtime (:class:`~resq_brevitas.temporal.ResQModel`) and the export step modules use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.nn.cost import LayerCost
from resq_brevitas.nn.layers import ResQLayerMixin, TemporalExecutor
from resq_brevitas.temporal.step import ResidualMode

__all__ = ["FrameContext", "Observer", "StepInputs", "StepOutputs", "attached"]

#: Calibration hook ``observer(layer_name, kind, tensor)``: kind ``"frame"`` receives every row's
#: input (keyframe ranges are set on frame inputs), ``"residual"`` the residual rows' deltas
#: (after truncation: what the residual quantizers receive).
Observer = Callable[[str, str, Tensor], None]


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one frame is told.

    Attributes:
        key_mask: Bool ``[B]`` on the frame's device: rows that are keyframes before the frame
            (scheduled, or forced by a refresh trigger's ``before_frame``).
        mode: Reference rule and truncation of residual frames.
        observer: Optional calibration hook.
        first_layer_triggers: Refresh triggers consulted at the frame's first ResQ layer
            (``at_first_layer(x, x_ref)``, e.g. the scene-cut guard).
        record_costs: Fill ``StepOutputs.costs`` (calibration turns it off).
        record_density: Count non-zero entries for RRM's density and eq. 10 (a host sync per
            layer; calibration turns it off).
        record_bit_maps: Keep the per-pixel bits of pool layers.
    """

    key_mask: Tensor
    mode: ResidualMode
    observer: Observer | None = None
    first_layer_triggers: tuple[Any, ...] = ()
    record_costs: bool = True
    record_density: bool = True
    record_bit_maps: bool = False


@dataclass
class StepOutputs:
    """What the layers of one frame report.

    Attributes:
        costs: ``name -> LayerCost``.
        bit_maps: ``name -> int8 [B, *S]`` bits each pixel's activation was processed at.
        truncated: Float64 ``[B]``: this frame's truncated energy summed over layers (RRM eq. 7).
        forced: Bool ``[B]`` (CPU): rows a first-layer trigger turned into keyframes.
        layers_run: ResQ layers that have run on this frame.
    """

    costs: dict[str, LayerCost] = field(default_factory=dict)
    bit_maps: dict[str, Tensor] = field(default_factory=dict)
    truncated: Tensor | None = None
    forced: Tensor | None = None
    layers_run: int = 0


class FrameContext:
    """The inputs and outputs of one frame, as its layers see them.

    Args:
        inputs: What the layers are told.
    """

    def __init__(self, inputs: StepInputs) -> None:
        self.inputs = inputs
        rows = inputs.key_mask.shape[0]
        self.outputs = StepOutputs(truncated=torch.zeros(rows, dtype=torch.float64),
                                   forced=torch.zeros(rows, dtype=torch.bool))
        self._set_mask(inputs.key_mask)

    def _set_mask(self, mask: Tensor) -> None:
        self._key_mask = mask
        self.all_key = bool(mask.all())
        self.no_key = not bool(mask.any())

    @property
    def key_mask(self) -> Tensor:
        """Rows that are keyframes for the layer about to run (inputs plus forced rows)."""
        return self._key_mask

    @property
    def first_layer(self) -> bool:
        """Whether no ResQ layer has run on this frame yet."""
        return self.outputs.layers_run == 0

    def force_keyframes(self, rows: Tensor) -> None:
        """Run ``rows`` (bool ``[B]``) as keyframes from the current layer on."""
        assert self.outputs.forced is not None
        self.outputs.forced |= rows.cpu()
        self._set_mask(self._key_mask | rows.to(self._key_mask.device))


@contextmanager
def attached(layers: Iterable[tuple[str, ResQLayerMixin]],
             executor_of: Callable[[str], TemporalExecutor]) -> Iterator[None]:
    """Attach an executor to every layer for the duration of the block (restored on exit).

    Args:
        layers: ``(name, layer)`` pairs.
        executor_of: The executor of each layer, by name.
    """
    items = list(layers)
    previous = [layer._temporal for _, layer in items]
    try:
        for name, layer in items:
            layer._temporal = executor_of(name)
        yield
    finally:
        for (_, layer), old in zip(items, previous):
            layer._temporal = old
