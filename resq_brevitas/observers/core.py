"""The line-search range setter (eq. 8) as observer logic, written once for every framework.

:class:`LineSearchRangeMixin` holds everything the torch.ao and torchao pt2e observers share; the
subclasses in :mod:`.ao` and :mod:`.pt2e` only bind it to each framework's observer base class.
The search itself is the core's :class:`~resq_brevitas.quant.line_search.StreamingLineSearch`
(``candidate_thresholds`` + ``output_sse`` + ``quantize_eq1``): eq. 8 lives in one place.

How an observer fits eq. 8:

* Candidates are ``|S_i|`` with ``S = linspace(min X, max X, r)`` (zeros dropped) and the
  objective is ``sum ||op(X, w) - op(q(X), q(w))||_F^2``. Without a consumer ``op`` is the
  identity (``w = q(w) = 1``): the input error. The output-aware pass
  (:func:`resq_brevitas.observers.attach_output_consumers`) hands each observer the conv/linear
  layers that read its output, and the objective becomes their output error, summed.
* The bit width comes from the observer's own ``quant_min``/``quant_max``
  (``2^b = quant_max - quant_min + 1``), so a 4-bit range is scored as 4-bit.
* An observer sees each sample once, so it keeps up to ``samples`` batch rows (the ``c`` of eq. 8)
  and runs both passes of the streaming search over them. Memory is bounded by ``samples``.
  Once ``samples`` rows were seen, or :meth:`LineSearchRangeMixin.freeze` is called, the search
  runs, its threshold goes into the ``threshold`` buffer, ``frozen`` is set and the kept samples
  are dropped: later forwards (every QAT step) neither observe nor search again. Before that,
  ``calculate_qparams`` runs the search on the rows kept so far and caches the result until a new
  sample arrives.
* Eq. 6's symmetric signed grid, ``s = 2 t / (2^b - 1)``, levels ``-2^(b-1) .. 2^(b-1) - 1``, is
  expressed as ``(scale, zero_point)`` with ``zero_point = quant_min + 2^(b-1)``: 0 for a signed
  range (``qint8``), ``2^(b-1)`` for an unsigned one (``quint8``, as fbgemm needs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.config import Precision, ResQConfig, Scheme
from resq_brevitas.quant.line_search import LinearOp, StreamingLineSearch

__all__ = ["Consumer", "LineSearchRangeMixin", "SiteSetting", "bits_of_range", "identity_op",
           "unrolled_sites"]


@dataclass(frozen=True)
class SiteSetting:
    """The precision of one call site of an unrolled clip, and where it comes from.

    Attributes:
        site: The call site's module name (a layer or its residual twin).
        path: ``"keyframe"`` or ``"residual"``.
        precision: Its precision.
    """

    site: str
    path: str
    precision: Precision


def unrolled_sites(unrolled: Any, scheme: str | Scheme | ResQConfig
                   ) -> tuple[list[SiteSetting], dict[str, Any]]:
    """Every call site of an unrolled clip with its precision, for the torch.ao and pt2e bindings.

    Args:
        unrolled: A GraphModule from :func:`resq_brevitas.deploy.unroll`.
        scheme: A notation or Scheme (every layer alike), or a :class:`~resq_brevitas.ResQConfig`
            (per-layer overrides, and its weight granularity and line-search settings).

    Returns:
        The sites, and the defaults the config implies (``weight_granularity``, ``candidates``,
        ``samples``; empty for a bare scheme).

    Raises:
        TypeError: If ``unrolled`` does not come from ``unroll``.
    """
    if not hasattr(unrolled, "residual_sites") or not hasattr(unrolled, "keyframe_sites"):
        raise TypeError(
            "unrolled must be a GraphModule from resq_brevitas.deploy.unroll, got "
            f"{type(unrolled).__name__}"
        )
    if isinstance(scheme, ResQConfig):
        config = scheme
        scheme_of = config.scheme_of
        defaults: dict[str, Any] = {"weight_granularity": config.weight_granularity,
                                    "candidates": config.calibration.candidates,
                                    "samples": config.calibration.samples}
    else:
        parsed = Scheme.parse(scheme)
        scheme_of = lambda name: parsed  # noqa: E731  (one scheme for every layer)
        defaults = {}
    sites = [SiteSetting(site, "keyframe", scheme_of(site).keyframe)
             for site in unrolled.keyframe_sites]
    for layer, twin in unrolled.residual_sites.items():
        layer_scheme = scheme_of(layer)
        residual = layer_scheme.residual if layer_scheme.residual is not None else (
            layer_scheme.keyframe)
        sites.append(SiteSetting(twin, "residual", residual))
    return sites, defaults


def identity_op(x: Tensor, weight: Tensor) -> Tensor:
    """``x * w`` with a scalar ``w = 1``: eq. 8 with the identity as layer (input error)."""
    return x * weight


@dataclass
class Consumer:
    """A layer that reads an observed activation: what eq. 8's output error is computed with.

    Attributes:
        name: Readable name (node or module name), for reports.
        op: The layer's linear op without bias, ``op(x, w)``.
        weights: Returns ``(w, q(w))`` when the search runs (weights may change during QAT;
            BN-folded for fused conv-BN modules).
    """

    name: str
    op: LinearOp
    weights: Callable[[], tuple[Tensor, Tensor]]


def bits_of_range(quant_min: int, quant_max: int) -> int:
    """``b`` such that ``quant_max - quant_min + 1 == 2^b``.

    Raises:
        ValueError: If the range does not hold a power of two levels (eq. 1 needs one).
    """
    levels = int(quant_max) - int(quant_min) + 1
    bits = int(round(math.log2(levels))) if levels > 0 else 0
    if levels < 4 or 2**bits != levels:
        raise ValueError(
            "quant_min/quant_max must span 2^b levels with b >= 2 (eq. 1's signed grid), got "
            f"quant_min={quant_min}, quant_max={quant_max} ({levels} levels)"
        )
    return bits


#: Activation qschemes eq. 8 supports (one range per tensor).
PER_TENSOR_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)


class LineSearchRangeMixin:
    """Eq. 8 range setting for an observer ``nn.Module`` with ``quant_min``/``quant_max``.

    Goes first in the bases of an observer class (torch.ao's or torchao's
    ``UniformQuantizationObserverBase``), which sets ``default_dtype``: ``__init__`` (arguments
    as :class:`resq_brevitas.observers.LineSearchObserver`), ``forward``, ``calculate_qparams``
    and ``extra_repr`` come from here.
    """

    quant_min: int
    quant_max: int
    threshold: Tensor
    frozen: Tensor

    #: ``dtype`` when none is given (each binding's backend has its own).
    default_dtype: torch.dtype

    def __init__(self, dtype: torch.dtype | None = None,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None,
                 eps: float = torch.finfo(torch.float32).eps, is_dynamic: bool = False,
                 candidates: int = 20, samples: int = 64, **kwargs: Any) -> None:
        if qscheme not in PER_TENSOR_QSCHEMES:
            raise ValueError(
                f"qscheme must be per-tensor {PER_TENSOR_QSCHEMES} for eq. 8, got {qscheme}"
            )
        if is_dynamic:
            raise ValueError("is_dynamic must be False: eq. 8 is a calibration-time search")
        super().__init__(dtype=self.default_dtype if dtype is None else dtype, qscheme=qscheme,
                         reduce_range=reduce_range, quant_min=quant_min, quant_max=quant_max,
                         factory_kwargs=factory_kwargs, eps=eps, is_dynamic=is_dynamic, **kwargs)
        self._init_line_search(candidates, samples)

    def forward(self, x_orig: Tensor) -> Tensor:
        """Keep samples for the search (nothing once frozen); returns the input unchanged."""
        self.observe(x_orig)
        return x_orig

    @torch.jit.ignore
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the eq. 8 range (eq. 6 grid)."""
        return self.line_search_qparams()

    def extra_repr(self) -> str:
        return self.line_search_repr()

    def _init_line_search(self, candidates: int, samples: int) -> None:
        for name, value, low in (("candidates", candidates, 2), ("samples", samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.bits = bits_of_range(self.quant_min, self.quant_max)
        self.candidates = candidates
        self.samples = samples
        # Buffers: the chosen range survives state_dict, deepcopy and convert.
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("frozen", torch.tensor(False))
        self._kept: list[Tensor] = []
        self._rows = 0
        self._consumers: list[Consumer] = []
        self._cached: float | None = None

    # ------------------------------------------------------------------ observing
    @property
    def rows_seen(self) -> int:
        """Batch rows kept for the search (at most ``samples``)."""
        return self._rows

    def observe(self, x: Tensor) -> None:
        """Keep up to ``samples`` batch rows of ``x``; search and freeze once enough were seen."""
        if bool(self.frozen) or x.numel() == 0:
            return
        x = x.detach()
        if x.dim() == 0:
            x = x.reshape(1)
        take = min(x.shape[0], self.samples - self._rows)
        self._kept.append(x[:take].clone())
        self._rows += take
        self._cached = None
        if self._rows >= self.samples:
            self.freeze()

    def set_consumers(self, consumers: list[Consumer]) -> None:
        """Score candidates by the output error of ``consumers`` (eq. 8) instead of input error.

        Raises:
            RuntimeError: If the range is already frozen (the samples are gone).
        """
        if bool(self.frozen):
            raise RuntimeError("set_consumers called on a frozen observer; call reset_range first")
        self._consumers = list(consumers)
        self._cached = None

    @property
    def consumers(self) -> list[Consumer]:
        """The layers whose output error is the objective (empty: input error)."""
        return list(self._consumers)

    # ------------------------------------------------------------------ searching
    def search(self) -> tuple[float, Tensor, Tensor]:
        """Run eq. 8 over the kept rows: ``(threshold, candidates, sse)``.

        Raises:
            RuntimeError: If no sample was observed.
        """
        if not self._kept:
            raise RuntimeError(f"{type(self).__name__} has observed no sample")
        kept = self._kept
        if len(kept) > 1 and all(x.shape[1:] == kept[0].shape[1:] for x in kept):
            kept = [torch.cat(kept)]  # one batched op per candidate instead of one per chunk
        search = StreamingLineSearch(self.bits, self.candidates)
        for x in kept:
            search.observe_range(x)
        ones = torch.ones((), dtype=kept[0].dtype, device=kept[0].device)
        objectives = ([(c.op, *c.weights()) for c in self._consumers]
                      or [(identity_op, ones, ones)])
        for x in kept:
            for op, weight, qweight in objectives:
                search.accumulate(x, op, weight.detach(), qweight.detach())
        return search.result()

    def freeze(self) -> None:
        """Run the search now (if not done), store its threshold and stop observing."""
        if bool(self.frozen):
            return
        if not self._kept:
            raise RuntimeError(f"{type(self).__name__} cannot freeze: it observed no sample")
        threshold = self._cached if self._cached is not None else self.search()[0]
        with torch.no_grad():
            self.threshold.fill_(threshold)
            self.frozen.fill_(True)
        self._kept = []
        self._cached = None

    def reset_range(self) -> None:
        """Forget samples and the chosen range (observe again from scratch)."""
        with torch.no_grad():
            self.threshold.zero_()
            self.frozen.fill_(False)
        self._kept = []
        self._rows = 0
        self._cached = None

    def current_threshold(self) -> float | None:
        """The frozen threshold, else a cached search over the rows so far, else ``None``."""
        if bool(self.frozen):
            return float(self.threshold)
        if not self._kept:
            return None
        if self._cached is None:
            self._cached = self.search()[0]
        return self._cached

    def line_search_qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of eq. 6 for the current threshold (shape ``[1]`` each).

        Before any sample: scale 1 (like torch.ao observers).
        """
        device = self.threshold.device
        zero_point = torch.tensor([int(self.quant_min) + 2 ** (self.bits - 1)],
                                  dtype=torch.int64, device=device)
        threshold = self.current_threshold()
        if threshold is None:
            return torch.ones(1, device=device), zero_point
        scale = torch.tensor([2.0 * threshold / (2**self.bits - 1)], dtype=torch.float32,
                             device=device)
        return scale, zero_point

    def line_search_repr(self) -> str:
        """Readable state for ``extra_repr``."""
        state = f"threshold={float(self.threshold):.6g}" if bool(self.frozen) else (
            f"rows={self._rows}/{self.samples}")
        objective = (f"output error of {[c.name for c in self._consumers]}" if self._consumers
                     else "input error")
        return (f"bits={self.bits}, candidates={self.candidates}, {state}, "
                f"objective={objective}")
