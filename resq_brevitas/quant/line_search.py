"""Output-aware line-search range setter (eq. 8), as pure torch plus Brevitas glue.

Eq. 8 picks the activation range whose quantization minimises the layer's *output* error
``||X * w - q(X) * q(w)||_F^2`` over the calibration samples ``X``, searching
``linspace(min X, max X, r)``. Because eq. 6 is symmetric, only ``|S_i|`` matters: each grid
point ``S_i != 0`` is a candidate threshold ``max(r_max, -r_min) = |S_i|``.

The streaming form (:class:`StreamingLineSearch`) takes two passes over the data: pass 1 reduces
min/max, pass 2 accumulates one SSE per candidate. Memory is independent of the number of
samples, and both reductions are all-reduced when ``torch.distributed`` is initialised, so every
rank ends with the same range.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from brevitas.core.scaling import ParameterScaling
from torch import Tensor, nn

from resq_brevitas.quant.quantizers import quantize_eq1, quantize_unsigned

__all__ = [
    "LinearOp",
    "candidate_thresholds",
    "output_sse",
    "line_search",
    "StreamingLineSearch",
    "act_threshold",
    "copy_act_threshold",
    "scaling_threshold",
    "distributed_initialized",
    "set_act_threshold",
]

#: ``op(x, weight) -> y``: the consumer layer's own linear op (no bias: it cancels in eq. 8).
LinearOp = Callable[[Tensor, Tensor], Tensor]

# Threshold used when the observed range is exactly zero (e.g. residuals of a static clip):
# any positive value maps zeros to zeros.
_ZERO_RANGE_THRESHOLD = 1e-8
# Elements of stacked candidate inputs per op call: bounds the line search's working memory.
_CHUNK_ELEMENTS = 1 << 20


def distributed_initialized() -> bool:
    """Whether reductions must be all-reduced across ranks."""
    return dist.is_available() and dist.is_initialized()


def candidate_thresholds(x_min: float, x_max: float, candidates: int) -> Tensor:
    """Candidate thresholds ``|S_i|`` of eq. 8, ``S = linspace(min X, max X, r)``, zeros dropped.

    Args:
        x_min: ``min X`` over the calibration samples.
        x_max: ``max X`` over the calibration samples.
        candidates: ``r``.

    Returns:
        A 1-D float64 tensor of positive thresholds (one tiny threshold if the range is zero).
    """
    grid = torch.linspace(float(x_min), float(x_max), candidates, dtype=torch.float64).abs()
    grid = grid[grid > 0]
    if grid.numel() == 0:
        return torch.tensor([_ZERO_RANGE_THRESHOLD], dtype=torch.float64)
    return grid


def output_sse(
    x: Tensor, thresholds: Tensor, bits: int, op: LinearOp, weight: Tensor, qweight: Tensor,
    signed: bool = True,
) -> Tensor:
    """Eq. 8's objective for each candidate on one batch of samples.

    Candidates are stacked along the batch dimension (in chunks of bounded size) so each chunk is
    one call of the layer's op.

    Args:
        x: Layer inputs ``X`` (batch first).
        thresholds: Candidate thresholds (1-D).
        bits: Activation bit width.
        op: The layer's linear op.
        weight: Float weight ``w``.
        qweight: Quantized weight ``q(w)``.
        signed: Eq. 1's signed grid (``s = 2 t / (2^b - 1)``); ``False``: the unsigned one of
            :func:`~resq_brevitas.quant.quantizers.quantize_unsigned` (``s = t / (2^b - 1)``).

    Returns:
        float64 tensor ``[len(thresholds)]`` of ``||op(X, w) - op(q(X), q(w))||_F^2``.
    """
    with torch.no_grad():
        target = op(x, weight)
        scales = ((2.0 if signed else 1.0) * thresholds / (2**bits - 1)).to(x.dtype)
        quantize = quantize_eq1 if signed else quantize_unsigned
        per_chunk = max(1, _CHUNK_ELEMENTS // max(1, x.numel()))
        sse = []
        for chunk in scales.split(per_chunk):
            view = (-1,) + (1,) * x.dim()
            quantized = quantize(x.unsqueeze(0), chunk.view(view), bits)
            approx = op(quantized.flatten(0, 1), qweight).unflatten(0, (len(chunk), x.shape[0]))
            err = approx.sub_(target.unsqueeze(0)).flatten(1)
            # Squares summed in float64: float16/bfloat16 errors of large activations would
            # overflow if squared in their own dtype (every candidate inf, argmin meaningless).
            sse.append(torch.linalg.vector_norm(err, dim=1, dtype=torch.float64).square())
    return torch.cat(sse)


def line_search(
    x: Tensor, bits: int, op: LinearOp, weight: Tensor, qweight: Tensor, candidates: int = 20
) -> tuple[float, Tensor, Tensor]:
    """All-in-memory line search, eq. 8.

    Args:
        x: All calibration samples ``X`` concatenated along the batch dimension.
        bits: Activation bit width.
        op: The layer's linear op.
        weight: Float weight.
        qweight: Quantized weight.
        candidates: ``r``.

    Returns:
        ``(threshold, thresholds, sse)``: the chosen threshold, all candidates and their SSE.
    """
    thresholds = candidate_thresholds(x.min().item(), x.max().item(), candidates)
    sse = output_sse(x, thresholds, bits, op, weight, qweight)
    return float(thresholds[int(torch.argmin(sse))]), thresholds, sse


class StreamingLineSearch:
    """Two-pass streaming eq. 8 with memory independent of the number of samples.

    Usage: call :meth:`observe_range` on every sample (pass 1), then :meth:`accumulate` on the same
    samples (pass 2), then :meth:`result`.

    Args:
        bits: Activation bit width.
        candidates: ``r``.

    Attributes:
        signed: The grid pass 2 scores (may be switched after pass 1, e.g. to unsigned when
            every sample was non-negative).
    """

    def __init__(self, bits: int, candidates: int = 20) -> None:
        self.bits = bits
        self.candidates = candidates
        self.signed = True
        self.x_min = float("inf")
        self.x_max = float("-inf")
        self._thresholds: Tensor | None = None
        self._sse: Tensor | None = None

    def observe_range(self, x: Tensor) -> None:
        """Pass 1: fold ``x`` into the running min/max."""
        if self._thresholds is not None:
            raise RuntimeError("observe_range called after pass 2 started")
        self.x_min = min(self.x_min, x.min().item())
        self.x_max = max(self.x_max, x.max().item())

    @property
    def observed(self) -> bool:
        """Whether pass 1 saw any sample (on this rank)."""
        return self.x_min <= self.x_max

    def thresholds(self) -> Tensor:
        """The candidate thresholds; the first call ends pass 1 (all-reducing min/max)."""
        if self._thresholds is None:
            bounds = torch.tensor([-self.x_min, self.x_max], dtype=torch.float64)
            if distributed_initialized():
                dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
            if not torch.isfinite(bounds).all():
                raise RuntimeError("line search saw no calibration samples")
            self.global_min, self.global_max = -bounds[0].item(), bounds[1].item()
            self._thresholds = candidate_thresholds(self.global_min, self.global_max,
                                                    self.candidates)
            self._sse = torch.zeros(len(self._thresholds), dtype=torch.float64)
        return self._thresholds

    def accumulate(self, x: Tensor, op: LinearOp, weight: Tensor, qweight: Tensor) -> None:
        """Pass 2: add ``x``'s per-candidate output SSE."""
        thresholds = self.thresholds()
        assert self._sse is not None
        self._sse += output_sse(x, thresholds, self.bits, op, weight, qweight, self.signed)

    def result(self) -> tuple[float, Tensor, Tensor]:
        """All-reduce the SSE and return ``(threshold, thresholds, sse)``."""
        thresholds = self.thresholds()
        assert self._sse is not None
        sse = self._sse.clone()
        if distributed_initialized():
            dist.all_reduce(sse, op=dist.ReduceOp.SUM)
        return float(thresholds[int(torch.argmin(sse))]), thresholds, sse


def _parameter_scaling(act_quant_proxy: nn.Module) -> ParameterScaling:
    for module in act_quant_proxy.modules():
        if isinstance(module, ParameterScaling):
            return module
    raise TypeError(
        f"{type(act_quant_proxy).__name__} has no ParameterScaling: not a ResQ activation quantizer"
    )


def scaling_threshold(scaling: ParameterScaling) -> Tensor:
    """The threshold a ``ParameterScaling`` applies, through its restriction (``2 ** value`` in
    the log domain of :class:`~resq_brevitas.quant.quantizers.ResQActQuant`, the value itself
    for a plain float restriction), with autograd."""
    return scaling.restrict_clamp_scaling(scaling.value)


def act_threshold(act_quant_proxy: nn.Module) -> float:
    """The range threshold ``max(r_max, -r_min)`` currently held by a ResQ activation quantizer."""
    with torch.no_grad():
        return scaling_threshold(_parameter_scaling(act_quant_proxy)).abs().max().item()


def set_act_threshold(act_quant_proxy: nn.Module, threshold: float) -> None:
    """Store a threshold in a ResQ activation quantizer (Brevitas glue for eq. 8's result), in
    the quantizer's own parametrisation (``log2`` for the log domain)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    scaling = _parameter_scaling(act_quant_proxy)
    restrict = scaling.restrict_clamp_scaling.restrict_value_impl
    with torch.no_grad():
        value = torch.tensor(float(threshold), dtype=scaling.value.dtype)
        scaling.value.copy_(restrict.restrict_init_tensor(value).expand_as(scaling.value))


def copy_act_threshold(source_proxy: nn.Module, target_proxy: nn.Module) -> None:
    """Copy one ResQ activation quantizer's range into another, parameter for parameter (no
    round trip through a float threshold: ``2 ** log2(t)`` is not always ``t``, so a copy made
    that way would not quantize exactly as its source)."""
    source, target = _parameter_scaling(source_proxy), _parameter_scaling(target_proxy)
    with torch.no_grad():
        target.value.copy_(source.value.detach().to(target.value).expand_as(target.value))
