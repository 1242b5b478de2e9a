"""Executors of a residual path: how it quantizes its residual and applies its layer's op.

An executor is an object chosen once per layer, not a branch in every forward. A residual path
(:mod:`resq_brevitas.nn.residual`) holds one in ``op`` and calls ``op.quantize(quant, delta)``
and ``op(view, q, weight)``:

- :class:`DenseOp` (the default, ``ResQConfig(execution="dense")``): the whole residual through
  the quantizer, then the layer's own op, ``view.inner_forward_impl(q, q_Theta_w(w), None)``;
- :class:`SparseTileOp` (``execution="sparse"``): the quantizer and the op only on the tiles a
  non-zero residual reaches (:mod:`resq_brevitas.nn.sparse`), on CPU.

:func:`build_contribution_op` picks one for a layer and says why a layer's op stays dense;
:func:`apply_execution` installs them on a model's layers (:func:`resq_brevitas.convert` does,
from ``config.execution``). The sparse executor is a runtime executor: while tracing (torch.fx,
TorchScript, ONNX export, ``torch.compile``) or when autograd needs a gradient it runs the dense
path, so exported graphs and QAT are what they are with ``execution="dense"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from resq_brevitas.nn.sparse import (
    DEFAULT_BOX_SLACK,
    ConvGeometry,
    SparseResult,
    broadcast_zeros,
    conv_geometry,
    conv_intensity,
    normalized_tile,
    padded_zeros,
    plan_axes,
    sparse_conv_contribution,
    sparse_linear_contribution,
    sparse_quantize,
    sparse_quantize_rows,
)
from resq_brevitas.quant.fused import is_traced

__all__ = [
    "DEFAULT_DENSE_ABOVE",
    "DEFAULT_MIN_ELEMENTS",
    "DEFAULT_MIN_INTENSITY",
    "ContributionOp",
    "DenseOp",
    "SparseTileOp",
    "TileCounter",
    "apply_execution",
    "build_contribution_op",
    "reset_tile_counters",
    "tiles_of",
]

#: Share of active tiles above which :class:`SparseTileOp` runs the dense path instead: on the
#: demo model at 256 x 256 (one CPU thread) the sparse path stopped paying between 35% and 50%
#: of the tiles (gathering, the halo and the per-box op calls).
DEFAULT_DENSE_ABOVE = 0.5
#: Convs with fewer MACs per input element run their op dense (:func:`build_contribution_op`):
#: a depthwise 3 x 3 conv (9) or a 1 x 1 conv to 4 classes (4) costs less dense than the
#: patch gather of its sparse op (2-8x slower at 10% active tiles on one CPU thread).
DEFAULT_MIN_INTENSITY = 16.0
#: Layer inputs with fewer elements are not tiled, only skipped when they are all zero: each
#: tiled layer costs a few dozen small torch calls (0.2-0.4 ms on one CPU thread), more than
#: tiling saves on a 16 x 64 x 64 input.
DEFAULT_MIN_ELEMENTS = 1 << 16
#: The sparse convolutions' spatial ranks.
_SPARSE_RANKS = (1, 2, 3)


class ContributionOp(Protocol):
    """How a residual path quantizes its residual and applies its layer's op to it (see the
    module docstring)."""

    name: str

    def quantize(self, quant: Callable[[Tensor], Tensor], delta: Tensor,
                 zero_band: Callable[[], float] | None = None) -> Tensor:
        """``quant(delta)``: what the path sends.

        Args:
            quant: The path's quantizer.
            delta: The residual.
            zero_band: ``zero_band()`` is a magnitude that ``quant`` certainly maps to 0 (an
                executor that skips entries may skip those too); ``None``: only exact zeros.
        """

    def __call__(self, view: nn.Module, q: Tensor, weight: Callable[[], Tensor]) -> Tensor:
        """``q * weight()`` with the layer's op, no bias (``weight()`` is the quantized
        weight; an executor calls it only if it computes something)."""


class DenseOp:
    """The whole residual at once: ``quant(delta)``, then ``view.inner_forward_impl(q, qweight,
    None)`` (the layer's own op)."""

    name = "dense"

    def quantize(self, quant: Callable[[Tensor], Tensor], delta: Tensor,
                 zero_band: Callable[[], float] | None = None) -> Tensor:
        return quant(delta)

    def __call__(self, view: nn.Module, q: Tensor, weight: Callable[[], Tensor]) -> Tensor:
        return view.inner_forward_impl(q, weight(), None)

    def __repr__(self) -> str:
        return "DenseOp()"


@dataclass
class TileCounter:
    """Tiles computed and tiles seen since the last reset.

    Attributes:
        computed: Tiles whose op ran (all of them for a call that ran dense).
        total: Tiles in the outputs of the calls counted.
        calls: Calls counted (sparse or dense).
    """

    computed: int = 0
    total: int = 0
    calls: int = 0

    def add(self, computed: int, total: int) -> None:
        """Count one call."""
        self.computed += computed
        self.total += total
        self.calls += 1

    def reset(self) -> None:
        """Start counting again."""
        self.computed = self.total = self.calls = 0


def _runs_eager(*tensors: Tensor) -> bool:
    """Whether the sparse path may run: not traced, and autograd needs no gradient."""
    if is_traced(tensors[0]):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class _Quantized(NamedTuple):
    """What :meth:`SparseTileOp.quantize` knows about the ``q`` it returned.

    Attributes:
        q: The tensor returned.
        padded: The padded buffer ``q`` lives in (:func:`~resq_brevitas.nn.sparse.padded_zeros`).
        state: ``"zero"`` (no tile quantized: ``q`` is zeros), ``"whole"`` (quantized whole: the
            op runs dense) or ``"padded"`` (sparse, in ``padded``).
    """

    q: Tensor
    padded: Tensor | None
    state: str


def _check_share(value: Any, name: str, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 <= value <= maximum):
        raise ValueError(f"{name} must be a number in [0, {maximum}], got {value!r}")


class SparseTileOp:
    """Sparse execution of one layer's residual: :func:`sparse_quantize` (or
    :func:`sparse_quantize_rows`), then :func:`sparse_conv_contribution` (or
    :func:`sparse_linear_contribution`), counting tiles in ``counter`` (the contribution's) and
    ``quant_counter`` (the quantizer's).

    The quantizer writes into a zero buffer padded for the conv's tile plan
    (:func:`padded_zeros`), so the contribution of the tensor it returned reads its patches
    without copying the input once more; when it quantized nothing, ``q`` and the contribution
    are :func:`~resq_brevitas.nn.sparse.broadcast_zeros` (no memory written, no weight
    quantized). The op runs the dense path instead when the call is
    traced or compiled, or when autograd needs a gradient: it is an inference executor, and the
    dense op is the graph to export or train.

    Args:
        geometry: A conv's :class:`ConvGeometry`, or a ``Linear`` layer's ``out_features``.
        tile: Output tile edge(s) of a conv; ``None``: :func:`auto_edge` per layer and dim.
        dense_above: Share of active tiles above which the dense op runs (in ``[0, 1]``).
        sparse_op: Compute the contribution tile by tile (``False``: only the quantization is
            sparse and the layer's op runs dense, for ops too cheap to gain from tiling).
        box_slack: See :func:`use_boxes` (``>= 0``; ``0``: single tiles only).
        min_elements: Inputs with fewer elements are one tile: skipped when no entry is above
            the zero band, else quantized and computed dense (see
            :data:`DEFAULT_MIN_ELEMENTS`).

    Raises:
        ValueError: If ``dense_above`` is outside ``[0, 1]``, ``box_slack`` or
            ``min_elements`` is negative or ``tile`` is malformed.
    """

    name = "sparse"

    def __init__(self, geometry: ConvGeometry | int, tile: int | Sequence[int] | None = None,
                 dense_above: float = DEFAULT_DENSE_ABOVE, sparse_op: bool = True,
                 box_slack: float = DEFAULT_BOX_SLACK,
                 min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
        _check_share(dense_above, "dense_above", 1.0)
        _check_share(box_slack, "box_slack", math.inf)
        if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
            raise ValueError(f"min_elements must be an int >= 0, got {min_elements!r}")
        self.min_elements = min_elements
        self.out_features = geometry if isinstance(geometry, int) else None
        self.geometry = None if isinstance(geometry, int) else geometry
        self.tile = None if self.geometry is None else normalized_tile(tile, self.geometry.rank)
        self.dense_above = float(dense_above)
        self.box_slack = float(box_slack)
        self.sparse_op = bool(sparse_op)
        self.counter = TileCounter()
        self.quant_counter = TileCounter()
        # What the last quantize knows about the q it returned, until the op of that q reads it.
        self._pending: _Quantized | None = None

    def quantize(self, quant: Callable[[Tensor], Tensor], delta: Tensor,
                 zero_band: Callable[[], float] | None = None) -> Tensor:
        self._pending = None
        if not _runs_eager(delta):
            return quant(delta)
        band = 0.0 if zero_band is None else zero_band()
        if delta.numel() < self.min_elements:
            result, padded = self._all_or_nothing(quant, delta, band), None
        elif self.geometry is None:
            result, padded = sparse_quantize_rows(quant, delta, band), None
        else:
            result, padded = self._sparse_quantize(quant, delta, band)
        if result.computed == 0 and result.out.numel():
            state = "zero"  # nothing to send: the op computes nothing either
        elif padded is not None:
            state = "padded"
        else:
            state = "whole"  # quantized whole or by tokens: no padded buffer to hand over
        self._pending = _Quantized(result.out, padded, state)
        self.quant_counter.add(result.computed, result.total)
        return result.out

    def _sparse_quantize(self, quant: Callable[[Tensor], Tensor], delta: Tensor, band: float
                         ) -> tuple[SparseResult, Tensor | None]:
        """:func:`sparse_quantize` of a conv input, into a buffer padded for the op when the op
        is tiled; also returns that buffer's padded view (``None`` if none was made)."""
        assert self.geometry is not None
        if not (self.sparse_op and delta.dim() == self.geometry.rank + 2):
            return sparse_quantize(quant, delta, self.tile, dense_above=self.dense_above,
                                   zero_band=band, box_slack=self.box_slack), None
        plans = plan_axes(self.geometry, delta.shape[2:], self.tile)
        buffers: list[tuple[Tensor, Tensor]] = []

        def padded_interior() -> Tensor:
            buffers.append(padded_zeros(delta, plans))
            return buffers[0][0]

        result = sparse_quantize(quant, delta, self.tile, padded_interior, self.dense_above,
                                 band, self.box_slack)
        # The buffer holds q only if the sparse path wrote q into it.
        return result, buffers[0][1] if buffers and result.out is buffers[0][0] else None

    @staticmethod
    def _all_or_nothing(quant: Callable[[Tensor], Tensor], delta: Tensor, band: float
                        ) -> SparseResult:
        """A small input is one tile: zeros if no entry is above the band, else quantized
        whole (tiling it would cost more in op calls than it skips)."""
        if bool(delta.amax() > band) or bool(delta.amin() < -band):
            return SparseResult(quant(delta), 1, 1)
        return SparseResult(broadcast_zeros(delta, delta.shape), 0, 1)

    def __call__(self, view: nn.Module, q: Tensor, weight: Callable[[], Tensor]) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending.q is not q:
            pending = None  # another tensor than the one quantized last: nothing known about it
        if pending is not None and pending.state == "zero":
            result = self._zero_output(q)
        elif not _runs_eager(q, view.weight):
            return view.inner_forward_impl(q, weight(), None)
        elif (not self.sparse_op or q.numel() < self.min_elements
              or (pending is not None and pending.state == "whole" and self.geometry is not None)):
            total = self._output_tiles(q)
            result = SparseResult(view.inner_forward_impl(q, weight(), None), total, total)
        elif self.geometry is None:
            result = sparse_linear_contribution(q, weight, self.dense_above, self.out_features)
        else:
            padded = pending.padded if pending is not None else None
            result = sparse_conv_contribution(q, weight, self.geometry, self.tile,
                                              self.dense_above, padded, self.box_slack)
        self.counter.add(result.computed, result.total)
        return result.out

    def _output_tiles(self, q: Tensor) -> int:
        """Output tiles (tokens for ``Linear``) of the op on ``q``."""
        if self.geometry is None:
            return q[..., 0].numel()
        assert self.tile is not None
        plans = plan_axes(self.geometry, q.shape[2:], self.tile)
        return math.prod(p.tiles for p in plans) * q.shape[0]

    def _zero_output(self, q: Tensor) -> SparseResult:
        """The contribution of a ``q`` with nothing in it: zeros of the op's output shape."""
        if self.geometry is None:
            assert self.out_features is not None
            shape = (*q.shape[:-1], self.out_features)
        else:
            assert self.tile is not None
            plans = plan_axes(self.geometry, q.shape[2:], self.tile)
            shape = (q.shape[0], self.geometry.out_channels, *(p.out_size for p in plans))
        return SparseResult(broadcast_zeros(q, shape), 0, self._output_tiles(q))

    def __repr__(self) -> str:
        return (f"SparseTileOp(tile={self.tile}, dense_above={self.dense_above}, "
                f"sparse_op={self.sparse_op}, box_slack={self.box_slack})")


def build_contribution_op(layer: nn.Module, execution: str, *,
                          min_intensity: float = DEFAULT_MIN_INTENSITY, **options: Any
                          ) -> tuple[ContributionOp, str | None]:
    """The executor of ``layer``'s residual for ``execution`` and, if its op stays dense
    although sparse was asked for, why.

    Args:
        layer: A ResQ layer (its Brevitas class says which op it runs).
        execution: ``"dense"`` or ``"sparse"``.
        min_intensity: Convs with fewer MACs per input element (:func:`conv_intensity`) run
            their op dense (their quantization stays sparse): gathering patches would cost
            more than the op. ``0``: tile every conv.
        **options: :class:`SparseTileOp` options (``tile``, ``dense_above``, ``box_slack``,
            ``min_elements``).

    Returns:
        ``(op, reason)``: ``reason`` is ``None`` unless a sparse request runs the op dense.

    Raises:
        ValueError: If ``execution`` is neither ``"dense"`` nor ``"sparse"``, or options come
            with ``"dense"``.
    """
    if execution not in ("dense", "sparse"):
        raise ValueError(f"execution must be 'dense' or 'sparse', got {execution!r}")
    if execution == "dense":
        if options or min_intensity != DEFAULT_MIN_INTENSITY:
            raise ValueError(f"options {sorted(options) or ['min_intensity']} apply to "
                             "execution='sparse' only, got execution='dense'")
        return DenseOp(), None
    if isinstance(layer, nn.Linear):
        return SparseTileOp(int(layer.out_features), **options), None
    if not isinstance(layer, nn.modules.conv._ConvNd):
        return DenseOp(), f"no sparse op for {type(layer).__name__}"
    if len(layer.kernel_size) not in _SPARSE_RANKS:
        return DenseOp(), f"{len(layer.kernel_size)}-d convolution"
    try:
        geometry = conv_geometry(layer)
    except ValueError as err:
        return DenseOp(), str(err)
    intensity = conv_intensity(layer)
    if intensity < min_intensity:
        return (SparseTileOp(geometry, sparse_op=False, **options),
                f"{intensity:g} MACs per input element < min_intensity {min_intensity:g}: "
                "op dense, quantization sparse")
    return SparseTileOp(geometry, **options), None


def apply_execution(layers: Iterable[tuple[str, nn.Module]], execution: str,
                    **options: Any) -> tuple[str, ...]:
    """Give every residual path among ``layers`` the executor of ``execution``.

    Args:
        layers: ``(name, ResQ layer)`` pairs (e.g. ``qm.resq_layers()``).
        execution: ``"dense"`` or ``"sparse"``.
        **options: :class:`SparseTileOp` options (``tile``, ``dense_above``, ``box_slack``,
            ``min_elements``).

    Returns:
        ``"name (reason)"`` for each layer that stays dense although sparse was asked for.
    """
    fallbacks = []
    for name, layer in layers:
        path = getattr(layer, "residual", None)
        if path is None:  # frame quantized: no residual op
            continue
        op, reason = build_contribution_op(layer, execution, **options)
        path.op = op
        if reason is not None:
            fallbacks.append(f"{name} ({reason})")
    return tuple(fallbacks)


def tiles_of(layers: Iterable[tuple[str, nn.Module]]) -> TileCounter:
    """The summed op :class:`TileCounter` (``counter``: output tiles) of the sparse executors of
    ``layers`` (``(name, layer)`` pairs, e.g. ``qm.resq_layers()``)."""
    total = TileCounter()
    for _, layer in layers:
        counter = getattr(getattr(getattr(layer, "residual", None), "op", None), "counter", None)
        if counter is not None:
            total.computed += counter.computed
            total.total += counter.total
            total.calls += counter.calls
    return total


def reset_tile_counters(layers: Iterable[tuple[str, nn.Module]]) -> None:
    """Reset both :class:`TileCounter` (op and quantizer) of every sparse executor of
    ``layers``."""
    for _, layer in layers:
        op = getattr(getattr(layer, "residual", None), "op", None)
        for name in ("counter", "quant_counter"):
            counter = getattr(op, name, None)
            if counter is not None:
                counter.reset()
