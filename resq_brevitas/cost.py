"""Bit operations (BOPs): the paper's cost metric.

A linear layer's cost is ``MACs * weight_bits * activation_bits`` (fp32 operands count as 32
bits). Keyframes are counted at the keyframe precision, residual frames at the residual precision;
a 0-bit residual costs nothing. Only ResQ layers (the convs and linears) are counted: element-wise
work, pooling and normalisation are not, as in the paper. Per-frame figures are means over the batch
rows (each row is its own stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from resq_brevitas.config import Precision, Scheme
from resq_brevitas.nn.layers import RESQ_LAYER_FOR, is_resq_layer

__all__ = ["CostReport", "layer_bops", "count_macs", "count_bops", "build_report"]


def layer_bops(macs: int, precision: Precision) -> int:
    """BOPs of one layer call at a static precision: ``MACs * b_w * b_a``."""
    return macs * precision.bops_weight_bits * precision.bops_act_bits


@dataclass
class CostReport:
    """Cost of a call (a clip, one streamed frame, or a static count).

    Attributes:
        notation: The scheme in the paper's notation (``W8A8->W4A4``).
        per_frame: BOPs of each frame (mean over batch rows).
        per_layer: Mean BOPs per frame of each layer.
        macs: MACs per frame (one sample) of each layer.
        keyframe_share: Share of (row, frame) pairs that were keyframes.
        density: Share of non-zero residual entries per layer (reported by RRM mode; empty here).
    """

    notation: str
    per_frame: list[float]
    per_layer: dict[str, float]
    macs: dict[str, int]
    keyframe_share: float
    density: dict[str, float] = field(default_factory=dict)

    @property
    def mean_bops(self) -> float:
        """Mean BOPs per frame."""
        return sum(self.per_frame) / len(self.per_frame) if self.per_frame else 0.0

    @property
    def total_macs(self) -> int:
        """MACs of one frame through all counted layers."""
        return sum(self.macs.values())

    def relative_to(self, other: CostReport) -> float:
        """This report's mean BOPs over ``other``'s."""
        return self.mean_bops / other.mean_bops

    def table(self) -> str:
        """A readable per-layer table."""
        width = max([len("layer")] + [len(n) for n in self.per_layer])
        lines = [
            f"scheme {self.notation}: mean {self.mean_bops / 1e6:.3f} MBOPs/frame, "
            f"{len(self.per_frame)} frame(s), keyframes {self.keyframe_share:.0%}",
            f"{'layer':<{width}}  {'MACs':>12}  {'MBOPs/frame':>12}  {'share':>6}",
        ]
        total = sum(self.per_layer.values()) or 1.0
        for name, bops in self.per_layer.items():
            lines.append(
                f"{name:<{width}}  {self.macs.get(name, 0):>12,}  {bops / 1e6:>12.3f}  "
                f"{bops / total:>6.1%}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def build_report(
    scheme: Scheme, frames: Sequence[dict[str, tuple[int, Tensor]]]
) -> CostReport:
    """Turn per-frame layer records ``name -> (macs per row, key_mask)`` into a report."""
    per_frame: list[float] = []
    per_layer: dict[str, float] = {}
    macs: dict[str, int] = {}
    key_rows = total_rows = 0
    for record in frames:
        frame_bops = 0.0
        for name, (layer_macs, key_mask) in record.items():
            key_share = key_mask.float().mean().item()
            bops = key_share * layer_bops(layer_macs, scheme.keyframe)
            if key_share < 1.0:
                assert scheme.residual is not None
                bops += (1.0 - key_share) * layer_bops(layer_macs, scheme.residual)
            per_layer[name] = per_layer.get(name, 0.0) + bops
            macs[name] = layer_macs
            frame_bops += bops
        if record:
            first_mask = next(iter(record.values()))[1]
            key_rows += int(first_mask.sum())
            total_rows += first_mask.numel()
        per_frame.append(frame_bops)
    n = max(len(frames), 1)
    return CostReport(
        notation=scheme.notation,
        per_frame=per_frame,
        per_layer={k: v / n for k, v in per_layer.items()},
        macs=macs,
        keyframe_share=key_rows / total_rows if total_rows else 0.0,
    )


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per sample of each supported layer (float or ResQ), from one forward on zeros.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).

    Returns:
        ``name -> MACs`` in call order.
    """
    from resq_brevitas.temporal.model import ResQModel  # counting is downstream of temporal

    net = model.model if isinstance(model, ResQModel) else model
    shape = tuple(int(s) for s in input_shape)
    if not shape:
        raise ValueError("input_shape must be non-empty, got ()")
    macs: dict[str, int] = {}
    handles = []
    for name, module in net.named_modules():
        if is_resq_layer(module) or type(module) in RESQ_LAYER_FOR:
            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                in_shape, out_shape = tuple(args[0].shape[1:]), tuple(out.shape[1:])
                macs[name] = macs.get(name, 0) + _macs_of(mod, in_shape, out_shape)
            handles.append(module.register_forward_hook(hook))
    param = next(net.parameters(), None)
    device = param.device if param is not None else None
    try:
        with torch.no_grad():
            net(torch.zeros((1,) + shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return macs


def _macs_of(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    if is_resq_layer(module):
        return module.macs(in_shape, out_shape)
    resq_class = RESQ_LAYER_FOR[type(module)]
    return resq_class.macs(module, in_shape, out_shape)


def count_bops(
    model: nn.Module, input_shape: Sequence[int], scheme: str | Scheme, period: int = 1
) -> CostReport:
    """Static BOPs of one keyframe period: a keyframe then ``period - 1`` residual frames.

    Args:
        model: A float model, a converted model, or a ``ResQModel``.
        input_shape: One frame's shape without the batch dimension (e.g. ``[C,H,W]``).
        scheme: Scheme or notation; a frame-quantization scheme ignores ``period``.
        period: Keyframe period ``T``.

    Returns:
        A :class:`CostReport` whose ``per_frame`` lists the ``T`` frames of one period.
    """
    scheme = Scheme.parse(scheme)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if scheme.is_dynamic:
        raise ValueError(f"count_bops needs a static scheme; {scheme} depends on the data")
    if scheme.is_frame_quantization:
        period = 1
    macs = count_macs(model, input_shape)
    one = torch.ones(1, dtype=torch.bool)
    frames = [{n: (m, one if t == 0 else ~one) for n, m in macs.items()} for t in range(period)]
    return build_report(scheme, frames)
