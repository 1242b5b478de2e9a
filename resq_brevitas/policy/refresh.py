"""Refresh policies: when a stream gets a new keyframe.

- Fixed period (the default, ``refresh=None`` or :class:`FixedPeriodRefresh`): every ``period``
  frames.
- :class:`ErrorBudgetRefresh`, RRM's accumulated-error control: each stream accumulates the l2
  norm of the residual entries truncated by the RRM threshold (RRM eq. 7,
  :func:`truncated_energy_eq7`); a polynomial without constant term, fitted on calibration clips
  (:func:`fit_error_polynomial`), maps the sum to a predicted relative output error (RRM eq. 8,
  :func:`predict_error_eq8`); a keyframe is forced on the stream's next frame when the prediction
  exceeds the budget.
- :class:`SceneCutRefresh`: at the first ResQ layer a frame reaches, a residual row whose energy
  exceeds a fraction of its frame's energy is run as a keyframe (:func:`scene_cut_rows`).

With an adaptive refresh, ``period`` is the longest run between keyframes. The state these
policies need (per-stream accumulators, the fitted coefficients) lives in the
:class:`~resq_brevitas.temporal.ResQModel`, never in the (shared, frozen) configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.config import ErrorBudgetRefresh, FixedPeriodRefresh, SceneCutRefresh

__all__ = [
    "ErrorBudgetRefresh",
    "FixedPeriodRefresh",
    "SceneCutRefresh",
    "truncated_energy_eq7",
    "predict_error_eq8",
    "fit_error_polynomial",
    "scene_cut_rows",
    "output_rows",
    "relative_output_error",
]


def truncated_energy_eq7(truncated: Tensor) -> Tensor:
    """One layer's term of RRM eq. 7, ``l2(u_{t,j})``, per batch row.

    RRM eq. 7 accumulates ``e_t = sum_t sum_j l2(u_{t,j})`` over frames ``t`` since the last
    precise inference and linear layers ``j``, where ``u_{t,j}`` holds the entries the threshold
    truncated; the sums are kept per stream by the model.

    Args:
        truncated: ``u_{t,j}`` ``[R, ...]`` (zeros where nothing was truncated).

    Returns:
        ``[R]`` float64 l2 norms.
    """
    return torch.linalg.vector_norm(truncated.detach().flatten(1).double(), dim=1)


def predict_error_eq8(coefficients: Sequence[float], energy: Tensor) -> Tensor:
    """RRM eq. 8, ``e_c = H(e_t; mu)``, with ``H(e) = sum_{k>=1} c_k e^k`` (no constant term).

    The constant term is dropped so that a stream without truncation (``e_t = 0``, e.g. a static
    scene) is predicted error-free and never refreshed by this policy.

    Args:
        coefficients: ``(c_1, ..., c_d)``.
        energy: Accumulated truncated energy ``e_t`` per stream.

    Returns:
        Predicted relative output error per stream (float64).
    """
    energy = energy.double()
    out = torch.zeros_like(energy)
    for c in reversed(tuple(coefficients)):  # Horner: ((c_d e + c_{d-1}) e + ...) e
        out = (out + float(c)) * energy
    return out


def fit_error_polynomial(energy: Tensor, error: Tensor, degree: int = 4) -> tuple[float, ...]:
    """Least-squares fit of RRM eq. 8's polynomial (without constant term) to ``(e_t, e_c)``
    pairs.

    Energies are scaled to ``[0, 1]`` for conditioning; the returned coefficients are for the
    unscaled energy.

    Args:
        energy: Accumulated truncated energies ``e_t`` (1-D).
        error: Measured relative output errors (1-D, same length).
        degree: Polynomial degree (RRM uses 4).

    Returns:
        ``(c_1, ..., c_degree)``; all zeros if no pair has a positive energy.

    Raises:
        ValueError: On mismatched or empty inputs.
    """
    energy = energy.detach().double().flatten()
    error = error.detach().double().flatten()
    if energy.numel() == 0 or energy.shape != error.shape:
        raise ValueError(
            f"energy and error must be non-empty and of equal length, got {energy.numel()} and "
            f"{error.numel()}"
        )
    scale = float(energy.max())
    if not scale > 0:
        return (0.0,) * degree
    x = energy / scale
    design = torch.stack([x**k for k in range(1, degree + 1)], dim=1)
    solution = torch.linalg.lstsq(design, error.unsqueeze(1), driver="gelsd").solution[:, 0]
    return tuple(float(a) / scale**k for k, a in enumerate(solution.tolist(), start=1))


def scene_cut_rows(delta: Tensor, x: Tensor, fraction: float) -> Tensor:
    """Rows whose residual energy exceeds ``fraction`` of their frame's energy.

    Args:
        delta: ``x - x_ref`` ``[R, ...]``.
        x: The frame's input to the layer ``[R, ...]``.
        fraction: Share of ``||x||^2`` that ``||delta||^2`` may reach.

    Returns:
        Bool ``[R]``: ``||delta||^2 > fraction * ||x||^2``.
    """
    with torch.no_grad():
        residual = delta.detach().flatten(1).double().pow(2).sum(1)
        frame = x.detach().flatten(1).double().pow(2).sum(1)
        return residual > fraction * frame


def output_rows(out: Any) -> Tensor:
    """All tensor leaves of a model output (tensor, tuple/list, dict), flattened per batch row."""
    leaves: list[Tensor] = []

    def visit(item: Any) -> None:
        if isinstance(item, Tensor):
            leaves.append(item.detach().flatten(1).double())
        elif isinstance(item, Mapping):
            for value in item.values():
                visit(value)
        elif isinstance(item, (tuple, list)):
            for value in item:
                visit(value)

    visit(out)
    if not leaves:
        raise TypeError(f"model output holds no tensor: {type(out).__name__}")
    return torch.cat(leaves, dim=1)


def relative_output_error(out: Any, reference: Any) -> Tensor:
    """Per-row ``||out - reference|| / ||reference||`` over all output tensors (float64)."""
    a, b = output_rows(out), output_rows(reference)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
