"""Sparse residual computation in plain PyTorch: only the output tiles a residual reaches.

A residual frame's contribution ``q(delta) * q_Theta_w(w)`` (eq. 5, no bias) is zero wherever the
receptive field of an output holds no non-zero quantized residual entry: unchanged pixels,
0-bit pixels of a Dynamic-ResQ pool, entries RRM truncated, or residuals that quantize to 0.

- :func:`sparse_conv_contribution` cuts a convolution's *output* into tiles (:func:`plan_axes`:
  stride, padding, dilation, groups, transposed convs with their output padding), finds the tiles
  whose input patch (the tile's receptive field, halo included) holds a non-zero entry
  (:func:`active_tiles`), and runs the layer's own op, with padding 0, on those patches only:
  either on the bounding box of each batch row's active tiles as one patch (slices, no gather;
  chosen when the box is compact, :func:`use_boxes`) or on the batch of single-tile patches
  (one batched gather and one scatter). Every computed output element sees exactly the inputs
  and weights the dense op gives it, so the result equals the dense op up to float summation
  order; skipped tiles cost nothing but the activity test.
- :func:`sparse_linear_contribution`: the same for ``Linear`` layers, tokens (rows) as tiles.
- :func:`sparse_quantize` / :func:`sparse_quantize_rows`: the residual quantizer applied only to
  the tiles (tokens) holding an entry it does not round to 0.

DeltaCNN does this with custom CUDA kernels; here each step is a torch op on CPU. The executors
that use these functions inside a ResQ model live in :mod:`resq_brevitas.nn.executors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUTO_GRID",
    "DEFAULT_BOX_SLACK",
    "DEFAULT_TILE",
    "MIN_EDGE",
    "AxisPlan",
    "Box",
    "ConvGeometry",
    "SparseResult",
    "active_tiles",
    "auto_edge",
    "broadcast_zeros",
    "bounding_boxes",
    "conv_geometry",
    "conv_intensity",
    "max_abs",
    "normalized_tile",
    "padded_zeros",
    "plan_axes",
    "sparse_conv_contribution",
    "sparse_linear_contribution",
    "sparse_quantize",
    "sparse_quantize_rows",
    "use_boxes",
]

#: Largest default tile edge per spatial rank (see :func:`auto_edge`).
DEFAULT_TILE: Mapping[int, int] = MappingProxyType({1: 64, 2: 16, 3: 8})
#: Smallest default tile edge.
MIN_EDGE = 4
#: Default tiles per dim.
AUTO_GRID = 16
#: Compute a bounding box of tiles when it holds at most this many times the active tiles: a box
#: is read and written with slice copies, single tiles with ``index`` / ``index_put_`` on strided
#: views, which took 2-5 ns per element on one CPU thread (several times a slice copy), so a box
#: up to twice the active area is still the cheaper of the two (demo model at 256 x 256, one
#: thread, 5/10/25% changed area: 0.60/0.81/0.83x the dense residual frame with boxes,
#: 0.74/0.99/1.23x with single tiles only).
DEFAULT_BOX_SLACK = 2.0

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class SparseResult(NamedTuple):
    """The contribution and how many tiles it took.

    Attributes:
        out: The bias-free contribution, the same shape as the dense op's output.
        computed: Tiles (conv output tiles or ``Linear`` tokens) actually computed.
        total: Tiles in the output.
    """

    out: Tensor
    computed: int
    total: int


# ---------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution's op is, enough to cut it into tiles.

    Attributes:
        kernel_size: Kernel extent per spatial dim.
        stride: Stride per spatial dim.
        dilation: Dilation per spatial dim.
        padding: ``(before, after)`` zero padding per spatial dim; ``None`` for Brevitas's strided
            ``"same"`` padding, which depends on the input size (see :meth:`pads`).
        groups: Channel groups.
        out_channels: Output channels.
        transposed: Whether the op is a transposed convolution.
        output_padding: Transposed convs: extra output positions at the end of each dim.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...] | None
    groups: int
    out_channels: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        """Number of spatial dims."""
        return len(self.kernel_size)

    def pads(self, in_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding per dim for an input of spatial size ``in_size``.

        Brevitas's strided ``"same"`` padding is TensorFlow's: the total makes the output
        ``ceil(size / stride)`` and the odd pixel goes after (``QuantConv2d.
        conv2d_same_zeros_pad_stride``).
        """
        if self.padding is not None:
            return self.padding
        pads = []
        for size, k, s, d in zip(in_size, self.kernel_size, self.stride, self.dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)


def _padding_pairs(layer: Any) -> tuple[tuple[int, int], ...] | None:
    """The layer's zero padding as ``(before, after)`` pairs (``None``: size-dependent)."""
    rank = len(layer.kernel_size)
    if getattr(layer, "is_same_padded_strided", False):
        return None
    padding = layer.padding
    if padding == "valid":
        return ((0, 0),) * rank
    if padding == "same":
        # torch pads d * (k - 1) in total, the odd pixel after (at::_convolution_mode).
        totals = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((int(p), int(p)) for p in padding)


def conv_geometry(layer: Any) -> ConvGeometry:
    """The :class:`ConvGeometry` of a torch/Brevitas convolution (``nn.modules.conv._ConvNd``).

    Raises:
        TypeError: If ``layer`` is not a convolution.
        ValueError: If its padding mode is not ``"zeros"`` (a reflected or circular pad makes the
            border read the interior, which the tile test below does not model).
    """
    if not isinstance(layer, nn.modules.conv._ConvNd):
        raise TypeError(f"layer must be a convolution (nn.modules.conv._ConvNd), got "
                        f"{type(layer).__name__}")
    if layer.padding_mode != "zeros":
        raise ValueError(f"layer padding_mode must be 'zeros' for sparse execution, got "
                         f"{layer.padding_mode!r}")
    transposed = bool(layer.transposed)
    return ConvGeometry(
        kernel_size=tuple(layer.kernel_size), stride=tuple(layer.stride),
        dilation=tuple(layer.dilation), padding=_padding_pairs(layer), groups=int(layer.groups),
        out_channels=int(layer.out_channels), transposed=transposed,
        output_padding=tuple(layer.output_padding) if transposed else ())


def conv_intensity(layer: nn.Module) -> float:
    """MACs per input element of a conv: ``C_out / groups * prod(kernel) / prod(stride)``
    (transposed: no division by the stride). Tiling pays for itself only when the op does
    enough work per input element it gathers (see
    :func:`resq_brevitas.nn.executors.build_contribution_op`)."""
    per_input = layer.out_channels / layer.groups * math.prod(layer.kernel_size)
    if not layer.transposed:
        per_input /= math.prod(layer.stride)
    return per_input


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial dim of the output is cut into tiles and where their inputs lie.

    Tile ``j`` covers outputs ``[j * tile, (j + 1) * tile)``; its receptive field is the input
    patch ``[j * step, j * step + patch)`` of the input padded by ``pad_before`` / ``pad_after``
    (negative values crop). The patch op (the conv with padding 0) returns ``op_size`` outputs, of
    which the tile's are ``[crop, crop + tile)`` (zero-extended where the op does not reach).

    Attributes:
        pad_before: Zeros added before the input (negative: entries dropped).
        pad_after: Zeros added after the input (negative: entries dropped).
        patch: Input extent of one tile's receptive field, halo included.
        step: Input distance between the patches of adjacent tiles.
        tile: Output extent of one tile.
        tiles: Number of tiles.
        crop: Offset of the tile in the patch op's output.
        op_size: Output extent of the patch op.
        out_size: The layer's output extent.
    """

    pad_before: int
    pad_after: int
    patch: int
    step: int
    tile: int
    tiles: int
    crop: int
    op_size: int
    out_size: int


def _conv_axis(size: int, k: int, s: int, d: int, pads: tuple[int, int], tile: int,
               rank: int) -> AxisPlan:
    """A convolution: output ``o`` reads inputs ``o * s - before + i * d``, ``i < k``."""
    halo = d * (k - 1)
    out = (size + pads[0] + pads[1] - halo - 1) // s + 1
    tile = max(1, min(tile or auto_edge(out, rank), out))
    tiles = -(-max(out, 0) // tile)
    patch = (tile - 1) * s + halo + 1
    step = tile * s
    length = (tiles - 1) * step + patch
    return AxisPlan(pads[0], length - size - pads[0], patch, step, tile, tiles, 0, tile, out)


def _transposed_axis(size: int, k: int, s: int, d: int, pads: tuple[int, int], extra: int,
                     tile: int, rank: int) -> AxisPlan:
    """A transposed convolution: input ``i`` writes outputs ``i * s - before + j * d``, ``j < k``.

    The tile is a multiple of the stride so that every tile has the same input patch layout.
    """
    halo = d * (k - 1)
    out = (size - 1) * s - pads[0] - pads[1] + halo + extra + 1
    tile = tile or auto_edge(out, rank)
    per_tile = max(1, -(-min(tile, out) // s))          # inputs advanced per tile
    tile = per_tile * s
    tiles = -(-out // tile)
    first = -((halo - pads[0]) // s)                    # ceil((before - halo) / s)
    last = (tile - 1 + pads[0]) // s                    # floor((tile - 1 + before) / s)
    patch = last - first + 1
    length = (tiles - 1) * per_tile + patch
    op_size = (patch - 1) * s + halo + 1
    return AxisPlan(-first, length - size + first, patch, per_tile, tile, tiles,
                    pads[0] - first * s, op_size, out)


def plan_axes(geometry: ConvGeometry, in_size: Sequence[int],
              tile: Sequence[int]) -> tuple[AxisPlan, ...]:
    """One :class:`AxisPlan` per spatial dim for an input of spatial size ``in_size``
    (``tile``: output tile edge per dim, 0 for :func:`auto_edge`)."""
    pads = geometry.pads(in_size)
    plans = []
    for i, size in enumerate(in_size):
        k, s, d = geometry.kernel_size[i], geometry.stride[i], geometry.dilation[i]
        if geometry.transposed:
            plans.append(_transposed_axis(size, k, s, d, pads[i], geometry.output_padding[i],
                                          tile[i], geometry.rank))
        else:
            plans.append(_conv_axis(size, k, s, d, pads[i], tile[i], geometry.rank))
    return tuple(plans)


def auto_edge(size: int, rank: int) -> int:
    """The default tile edge along a dim of ``size`` outputs (inputs, for the quantizer).

    About :data:`AUTO_GRID` tiles per dim, between :data:`MIN_EDGE` and ``DEFAULT_TILE[rank]``:
    a frame is cut into a similar grid at every resolution of a network, so a moving object
    covers a similar share of tiles in every layer. Why these bounds: a tile of a 3 x 3 conv
    reads a ``(tile + 2)``-wide patch (2.25x the tile's own work at 4, 1.27x at 16), small
    patches cost a per-patch overhead in the conv, and large tiles cover more unchanged pixels.
    On the demo model (``benchmarks/bench_sparse.py --tiles auto 8 16``, RESULTS.md section 8)
    this rule and fixed edges of 8 and 16 were within measurement noise of each other.
    """
    return max(MIN_EDGE, min(DEFAULT_TILE.get(rank, MIN_EDGE), size // AUTO_GRID))


def normalized_tile(tile: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """Tile edges per dim from ``None`` (automatic), one int or one int per dim; 0 stands for
    :func:`auto_edge`.

    Raises:
        ValueError: If ``tile`` is none of these.
    """
    if tile is None:
        return (0,) * rank
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile,) * rank
    if (not isinstance(tile, Sequence) or len(tile) != rank
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tile)):
        raise ValueError(f"tile must be an int >= 0 or {rank} ints >= 0 (0: automatic), got "
                         f"{tile!r}")
    return tuple(tile)


# ---------------------------------------------------------------------------- convolutions
def _padded(x: Tensor, plans: Sequence[AxisPlan]) -> Tensor:
    """``x`` padded (or cropped) per the plans, so that the tiles' patches tile it exactly."""
    pads: list[int] = []
    for plan in reversed(plans):  # F.pad lists the last dim first
        pads += [plan.pad_before, plan.pad_after]
    return F.pad(x, pads) if any(pads) else x


def padded_zeros(like: Tensor, plans: Sequence[AxisPlan]) -> tuple[Tensor, Tensor]:
    """A zero buffer for a layer input ``like`` ``[B, C, *S]`` with the plans' padding around it.

    Returns:
        ``(interior, padded)``: ``interior`` is the ``[B, C, *S]`` view to write the input into,
        ``padded`` the view of the same buffer that :func:`sparse_conv_contribution` reads
        (what :func:`_padded` would copy), so a caller that writes its input into ``interior``
        saves that copy.
    """
    shape = list(like.shape[:2])
    for size, plan in zip(like.shape[2:], plans):
        shape.append(max(plan.pad_before, 0) + size + max(plan.pad_after, 0))
    buffer = like.new_zeros(shape)
    interior, padded = buffer, buffer
    for i, (size, plan) in enumerate(zip(like.shape[2:], plans)):
        interior = interior.narrow(2 + i, max(plan.pad_before, 0), size)
        length = (plan.tiles - 1) * plan.step + plan.patch
        padded = padded.narrow(2 + i, max(-plan.pad_before, 0), length)
    return interior, padded


def broadcast_zeros(like: Tensor, shape: Sequence[int]) -> Tensor:
    """A zero tensor of ``shape`` that writes no memory: one zero broadcast with stride 0.

    What a call that skipped every tile returns. It is read-only (an in-place op on it raises);
    adding it to the reference, as a residual step does, is an ordinary add.
    """
    return like.new_zeros(()).expand(*shape)


def max_abs(x: Tensor, dim: int) -> Tensor:
    """``|x|.amax(dim, keepdim=True)`` without a full-size ``|x|`` temporary.

    Two reductions write only the reduced tensors: on CPU this is several times faster than
    ``x.abs().amax(dim)`` and far faster than ``(x != 0).any(dim)``, which allocate a tensor of
    ``x``'s size first (fresh pages for every frame).
    """
    return torch.maximum(x.amax(dim, keepdim=True), x.amin(dim, keepdim=True).neg_())


def active_tiles(padded: Tensor, plans: Sequence[AxisPlan]) -> Tensor:
    """Bool ``[B, *tiles]``: tiles whose receptive field holds a non-zero entry.

    Args:
        padded: The input padded per the plans (:func:`_padded` or :func:`padded_zeros`).
        plans: The tile plans.

    The max of ``|x|`` over channels (:func:`max_abs`), then a max pool whose window is the
    tile's patch and whose stride is the patch step: the patch of every tile, halo included.
    """
    rank = len(plans)
    mask = max_abs(padded, 1)
    pooled = _MAX_POOLS[rank](mask, [p.patch for p in plans], [p.step for p in plans])
    return pooled.squeeze(1) > 0


def _gather_patches(padded: Tensor, plans: Sequence[AxisPlan],
                    index: tuple[Tensor, ...]) -> Tensor:
    """``[N, C, *patch]``: the input patches of the tiles ``index`` (batch, tile per dim).

    ``unfold`` makes a strided view of all patches (no copy); indexing it copies only the
    requested ones.
    """
    rank = len(plans)
    view = padded
    for i, plan in enumerate(plans):
        view = view.unfold(2 + i, plan.patch, plan.step)
    # [B, C, *tiles, *patch] -> [B, *tiles, C, *patch]
    view = view.permute(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    return view[index]


def _patch_op(patches: Tensor, weight: Tensor, geometry: ConvGeometry,
              plans: Sequence[AxisPlan], counts: Sequence[int] | None = None) -> Tensor:
    """The layer's op on a batch of patches (padding 0): ``[N, C_out, *(counts * tile)]``.

    ``counts`` (default all 1) is the number of adjacent tiles per dim a patch covers: a box of
    tiles reads one patch ``(count - 1) * step + patch`` long and gives ``count * tile``
    outputs, which continue one another exactly as single tiles would.
    """
    rank = geometry.rank
    if not geometry.transposed:
        return _CONV_FUNCTIONS[rank](patches, weight, None, geometry.stride, 0,
                                     geometry.dilation, geometry.groups)
    out = _TRANSPOSED_FUNCTIONS[rank](patches, weight, None, geometry.stride, 0, 0,
                                      geometry.groups, geometry.dilation)
    counts = counts or (1,) * rank
    pads: list[int] = []
    for i in reversed(range(rank)):  # keep [crop, crop + count * tile): negative pads crop
        plan = plans[i]
        pads += [-plan.crop, plan.crop + counts[i] * plan.tile - out.shape[2 + i]]
    return F.pad(out, pads) if any(pads) else out


class Box(NamedTuple):
    """A box of tiles of one batch row: tiles ``lo[i] .. hi[i]`` (inclusive) along dim ``i``."""

    row: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Tiles per dim."""
        return tuple(high - low + 1 for low, high in zip(self.lo, self.hi))

    @property
    def tiles(self) -> int:
        """Tiles in the box."""
        return math.prod(self.counts)


def bounding_boxes(index: tuple[Tensor, ...]) -> list[Box]:
    """The bounding box of the active tiles of each batch row (``index`` from ``nonzero``)."""
    if index[0].numel() == 0:
        return []
    coords = torch.stack(index[1:], dim=1)
    if bool(index[0][0] == index[0][-1]):  # one batch row (the usual stream): no split
        lo, hi = coords.aminmax(dim=0)
        return [Box(int(index[0][0]), tuple(lo.tolist()), tuple(hi.tolist()))]
    rows, counts = torch.unique_consecutive(index[0], return_counts=True)  # nonzero is sorted
    boxes = []
    for row, part in zip(rows.tolist(), coords.split(counts.tolist())):
        lo, hi = part.aminmax(dim=0)
        boxes.append(Box(row, tuple(lo.tolist()), tuple(hi.tolist())))
    return boxes


def use_boxes(boxes: Sequence[Box], computed: int, slack: float) -> bool:
    """Whether to compute bounding boxes instead of single tiles.

    A box is read and written with slices (memory speed, no index arithmetic per element) but
    also computes its inactive tiles; single tiles cost a gather and a scatter per element
    (``index`` / ``index_put_`` on strided views are several times slower than a slice copy on
    CPU). A compact change (one moving object) fills its box; scattered changes do not.
    """
    return sum(box.tiles for box in boxes) <= slack * computed


def _narrow_box(x: Tensor, box: Box, starts: Sequence[int], lengths: Sequence[int]) -> Tensor:
    """``x[row:row+1]`` narrowed to ``[starts[i], starts[i] + lengths[i])`` along spatial dims."""
    view = x.narrow(0, box.row, 1)
    for i, (start, length) in enumerate(zip(starts, lengths)):
        view = view.narrow(2 + i, start, length)
    return view


def _tile_view(out: Tensor, tiles: Sequence[int], tile: Sequence[int]) -> Tensor:
    """``[B, *tiles, C, *tile]`` view of a ``[B, C, *(tiles * tile)]`` tensor (any strides)."""
    rank = len(tiles)
    view = out
    for i, edge in enumerate(tile):
        view = view.unfold(2 + i, edge, edge)
    return view.permute(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))


def _scatter_tiles(values: Tensor, index: tuple[Tensor, ...], batch: int,
                   plans: Sequence[AxisPlan]) -> Tensor:
    """A zero output with the tiles ``index`` set to ``values``, cropped to the output size.

    Tiles do not overlap, so scattering into zeros is a plain indexed write.
    """
    grid = [p.tiles * p.tile for p in plans]
    out = values.new_zeros((batch, values.shape[1], *grid))
    _tile_view(out, [p.tiles for p in plans], [p.tile for p in plans]).index_put_(index, values)
    for i, plan in enumerate(plans):
        if grid[i] != plan.out_size:
            out = out.narrow(2 + i, 0, plan.out_size)
    return out


def _dense_conv(q: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor:
    """The whole op at once, as the layer computes it (zero padding, bias-free)."""
    rank = geometry.rank
    pads = geometry.pads(q.shape[2:])
    if geometry.transposed:  # torch pads transposed convs symmetrically
        return _TRANSPOSED_FUNCTIONS[rank](q, weight, None, geometry.stride,
                                           [before for before, _ in pads],
                                           geometry.output_padding, geometry.groups,
                                           geometry.dilation)
    if any(before != after for before, after in pads):
        flat: list[int] = []
        for before, after in reversed(pads):
            flat += [before, after]
        q, pads = F.pad(q, flat), ((0, 0),) * rank
    return _CONV_FUNCTIONS[rank](q, weight, None, geometry.stride,
                                 [before for before, _ in pads], geometry.dilation,
                                 geometry.groups)


def _resolve(weight: Tensor | Callable[[], Tensor]) -> Tensor:
    return weight if isinstance(weight, Tensor) else weight()


def sparse_conv_contribution(q: Tensor, weight: Tensor | Callable[[], Tensor],
                             geometry: ConvGeometry,
                             tile: int | Sequence[int] | None = None,
                             dense_above: float = 1.0,
                             padded: Tensor | None = None,
                             box_slack: float = DEFAULT_BOX_SLACK) -> SparseResult:
    """The bias-free conv of ``q`` computed tile by tile over the output, active tiles only.

    Args:
        q: Quantized residual ``[B, C_in, *S]`` (batch first).
        weight: The quantized weight ``q_Theta_w(w)`` in the layer's layout, or a callable
            returning it, called only if some tile is computed.
        geometry: The layer's op (:func:`conv_geometry`).
        tile: Output tile edge (one int, or one per spatial dim); default :func:`auto_edge`.
            Transposed convs round it up to a multiple of the stride.
        dense_above: When more than this share of tiles is active, compute the whole output
            with the dense op (same result; it skips the gather and the halo). ``1.0``: never.
        padded: ``q`` already padded per the plan (the ``padded`` view of
            :func:`padded_zeros` whose ``interior`` holds ``q``); ``None`` pads a copy.
        box_slack: Compute each batch row's bounding box of active tiles as one patch when the
            boxes hold at most this many times the active tiles (:func:`use_boxes`); ``0``:
            always single tiles.

    Returns:
        A :class:`SparseResult`: the output ``[B, C_out, *S_out]``, the tiles computed and the
        tiles in the output (a dense fallback computes all of them).

    Raises:
        ValueError: If ``q``'s rank does not match the geometry, or ``tile`` is malformed.
    """
    rank = geometry.rank
    if q.dim() != rank + 2:
        raise ValueError(f"q must be [B, C, *S] with {rank} spatial dims, got shape "
                         f"{tuple(q.shape)}")
    plans = plan_axes(geometry, q.shape[2:], normalized_tile(tile, rank))
    shape = (q.shape[0], geometry.out_channels, *(p.out_size for p in plans))
    if any(p.out_size <= 0 for p in plans):  # an empty output, as the dense op gives
        return SparseResult(q.new_zeros(shape), 0, 0)
    if padded is None:
        padded = _padded(q, plans)
    active = active_tiles(padded, plans)
    total = active.numel()
    index = active.nonzero(as_tuple=True)
    computed = int(index[0].numel())
    if computed > dense_above * total:
        return SparseResult(_dense_conv(q, _resolve(weight), geometry), total, total)
    if computed == 0:
        return SparseResult(broadcast_zeros(q, shape), 0, total)
    boxes = bounding_boxes(index)
    if use_boxes(boxes, computed, box_slack):
        return _box_contribution(padded, _resolve(weight), geometry, plans, boxes, shape, total)
    values = _patch_op(_gather_patches(padded, plans, index), _resolve(weight), geometry,
                       plans)
    return SparseResult(_scatter_tiles(values, index, q.shape[0], plans), computed, total)


def _box_contribution(padded: Tensor, weight: Tensor, geometry: ConvGeometry,
                      plans: Sequence[AxisPlan], boxes: Sequence[Box], shape: Sequence[int],
                      total: int) -> SparseResult:
    """The op on one patch per box (a slice of ``padded``), written into a zero output."""
    grid = [p.tiles * p.tile for p in plans]
    out = padded.new_zeros((shape[0], shape[1], *grid))
    for box in boxes:
        counts = box.counts
        patch = _narrow_box(padded, box, [lo * p.step for lo, p in zip(box.lo, plans)],
                            [(n - 1) * p.step + p.patch for n, p in zip(counts, plans)])
        values = _patch_op(patch, weight, geometry, plans, counts)
        _narrow_box(out, box, [lo * p.tile for lo, p in zip(box.lo, plans)],
                    [n * p.tile for n, p in zip(counts, plans)]).copy_(values)
    for i, plan in enumerate(plans):
        if grid[i] != plan.out_size:
            out = out.narrow(2 + i, 0, plan.out_size)
    return SparseResult(out, sum(box.tiles for box in boxes), total)


# ---------------------------------------------------------------------------- quantization
def sparse_quantize(quant: Callable[[Tensor], Tensor], delta: Tensor,
                    tile: int | Sequence[int] | None = None,
                    out: Tensor | Callable[[], Tensor] | None = None,
                    dense_above: float = 1.0, zero_band: float = 0.0,
                    box_slack: float = DEFAULT_BOX_SLACK) -> SparseResult:
    """``quant(delta)`` computed only on the tiles of ``delta`` with an entry above
    ``zero_band`` in magnitude.

    Exact for an elementwise quantizer with a fixed scale that maps ``[-zero_band, zero_band]``
    to 0 (eq. 1 with the calibrated ``ParameterScaling`` of
    :func:`resq_brevitas.quant.act_quant`: half a step rounds to 0): a tile of such entries
    quantizes to zeros, so it is skipped. This matters beyond unchanged pixels: a global
    channel gate (squeeze-excitation) changes every pixel after it a little, by less than half
    a residual step. Dims that are not a multiple of the tile leave border strips, which are
    quantized whole.

    Args:
        quant: The quantizer (a tensor in, the de-quantized tensor of the same shape out).
        delta: The residual ``[B, C, *S]``.
        tile: Tile edge(s) over ``S``; default :func:`auto_edge`.
        out: A zero tensor of ``delta``'s shape to write into (e.g. the ``interior`` of
            :func:`padded_zeros`), or a callable making one (called only on the sparse path);
            ``None`` allocates one.
        dense_above: When more than this share of tiles is active, return ``quant(delta)``
            itself, not written into ``out`` (gathering most tiles costs more than the quantizer
            skips). ``1.0``: never.
        zero_band: A magnitude ``quant`` certainly maps to 0 (``0.0``: exact zeros only).
        box_slack: As in :func:`sparse_conv_contribution`.

    Returns:
        A :class:`SparseResult`: ``q``, and the tiles quantized (boxes count whole) out of the
        tiles in the divisible part of ``S`` (all of them, when it quantized ``delta`` whole).
        With no tile to quantize (and no border strip), ``q`` is :func:`broadcast_zeros`.
    """
    rank = delta.dim() - 2
    spatial = delta.shape[2:]
    if delta.numel() == 0:
        return SparseResult(quant(delta), 0, 0)
    # A dim shorter than a tile is one tile.
    edges = tuple(min(edge or auto_edge(size, rank), size)
                  for edge, size in zip(normalized_tile(tile, rank), spatial))
    tiles = [size // edge for size, edge in zip(spatial, edges)]
    main = delta
    for i, (count, edge) in enumerate(zip(tiles, edges)):
        main = main.narrow(2 + i, 0, count * edge)
    active = _MAX_POOLS[rank](max_abs(main, 1), edges, edges).squeeze(1) > zero_band
    index = active.nonzero(as_tuple=True)
    computed, total = int(index[0].numel()), active.numel()
    if computed > dense_above * total:
        return SparseResult(quant(delta), total, total)
    strips = [size - count * edge for size, count, edge in zip(spatial, tiles, edges)]
    if computed == 0 and not any(strips):
        return SparseResult(broadcast_zeros(delta, delta.shape), 0, total)
    if out is None:
        out = delta.new_zeros(delta.shape)
    elif not isinstance(out, Tensor):
        out = out()
    boxes = bounding_boxes(index)
    if use_boxes(boxes, computed, box_slack):
        for box in boxes:
            starts = [lo * edge for lo, edge in zip(box.lo, edges)]
            lengths = [n * edge for n, edge in zip(box.counts, edges)]
            _narrow_box(out, box, starts, lengths).copy_(
                quant(_narrow_box(main, box, starts, lengths)))
        computed = sum(box.tiles for box in boxes)
    elif computed:
        main_out = out
        for i, (count, edge) in enumerate(zip(tiles, edges)):
            main_out = main_out.narrow(2 + i, 0, count * edge)
        values = quant(_tile_view(main, tiles, edges)[index])
        _tile_view(main_out, tiles, edges).index_put_(index, values)
    for i, (count, edge, rest) in enumerate(zip(tiles, edges, strips)):
        if rest:  # the border strip along dim i, whole
            strip = delta.narrow(2 + i, count * edge, rest)
            out.narrow(2 + i, count * edge, rest).copy_(quant(strip))
    return SparseResult(out, computed, total)


def sparse_quantize_rows(quant: Callable[[Tensor], Tensor], delta: Tensor,
                         zero_band: float = 0.0) -> SparseResult:
    """``quant(delta)`` for a ``Linear`` input ``[..., F]``, only on tokens with a feature above
    ``zero_band`` in magnitude (see :func:`sparse_quantize`)."""
    rows = delta.reshape(-1, delta.shape[-1])
    index = (max_abs(rows, 1).squeeze(1) > zero_band).nonzero().squeeze(1)
    if index.numel() == 0:
        return SparseResult(broadcast_zeros(delta, delta.shape), 0, rows.shape[0])
    out = rows.new_zeros(rows.shape)
    out.index_copy_(0, index, quant(rows.index_select(0, index)))
    return SparseResult(out.view(delta.shape), int(index.numel()), rows.shape[0])


# ---------------------------------------------------------------------------- linear layers
def sparse_linear_contribution(q: Tensor, weight: Tensor | Callable[[], Tensor],
                               dense_above: float = 1.0, out_features: int | None = None
                               ) -> SparseResult:
    """``F.linear(q, weight)`` computed only for the tokens (rows) with a non-zero feature.

    Args:
        q: Quantized residual ``[..., in_features]``.
        weight: ``[out_features, in_features]``, or a callable returning it (called only if
            some token is computed).
        dense_above: As in :func:`sparse_conv_contribution`.
        out_features: The output width; needed when ``weight`` is a callable.

    Returns:
        A :class:`SparseResult` whose tiles are tokens (every leading index of ``q``).

    Raises:
        ValueError: If ``weight`` is a callable and ``out_features`` is missing.
    """
    if isinstance(weight, Tensor):
        out_features = weight.shape[0]
    elif out_features is None:
        raise ValueError("out_features is needed when weight is a callable, got None")
    rows = q.reshape(-1, q.shape[-1])
    index = (max_abs(rows, 1).squeeze(1) > 0).nonzero().squeeze(1)
    total, computed = rows.shape[0], int(index.numel())
    if computed > dense_above * total:
        return SparseResult(F.linear(q, _resolve(weight)), total, total)
    if computed == 0:
        return SparseResult(broadcast_zeros(q, (*q.shape[:-1], out_features)), 0, total)
    out = rows.new_zeros((total, out_features))
    out.index_copy_(0, index, F.linear(rows.index_select(0, index), _resolve(weight)))
    return SparseResult(out.view(*q.shape[:-1], out_features), computed, total)
