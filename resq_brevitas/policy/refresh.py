"""Refresh policies: when a stream gets a new keyframe.

- Fixed period (the default, ``refresh=None`` or :class:`FixedPeriodRefresh`): every ``period``
  frames.
- :class:`ErrorBudgetRefresh`, RRM's accumulated-error control: each stream accumulates the l2
  norm of the residual entries truncated by the RRM threshold (RRM eq. 7,
  :func:`truncated_energy_rrm_eq7`); a polynomial without constant term, fitted on calibration
  clips (:func:`fit_error_polynomial`), maps the sum to a predicted relative output error (RRM
  eq. 8, :func:`predict_error_rrm_eq8`); a keyframe is forced on the stream's next frame when the
  prediction exceeds the budget.
- :class:`SceneCutRefresh`: at the first ResQ layer a frame reaches, a residual row whose energy
  exceeds a fraction of its frame's energy is run as a keyframe (:func:`scene_cut_rows`).

With an adaptive refresh, ``period`` is the longest run between keyframes. The settings are
frozen data (:mod:`resq_brevitas.config`); the triggers here are the per-model objects that carry
the behaviour and the state it needs (the fitted coefficients; the per-stream energy accumulator
is the model's stream state, :class:`~resq_brevitas.policy.base.StreamStatus`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from resq_brevitas.config import ErrorBudgetRefresh, SceneCutRefresh
from resq_brevitas.policy.base import StreamStatus
from resq_brevitas.quant.line_search import distributed_initialized

__all__ = [
    "ErrorBudgetTrigger",
    "SceneCutTrigger",
    "truncated_energy_rrm_eq7",
    "predict_error_rrm_eq8",
    "fit_error_polynomial",
    "nonnegative_least_squares",
    "scene_cut_rows",
    "output_rows",
    "relative_output_error",
]


def truncated_energy_rrm_eq7(truncated: Tensor) -> Tensor:
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


def predict_error_rrm_eq8(coefficients: Sequence[float], energy: Tensor) -> Tensor:
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


def nonnegative_least_squares(design: Tensor, target: Tensor, iterations: int = 200) -> Tensor:
    """``argmin_{c >= 0} ||design @ c - target||`` (Lawson-Hanson active set, float64).

    Args:
        design: ``[n, k]``.
        target: ``[n]``.
        iterations: Bound on the outer loop (k + 1 steps suffice in exact arithmetic).

    Returns:
        ``c`` ``[k]``, every entry >= 0.
    """
    k = design.shape[1]
    coef = torch.zeros(k, dtype=torch.float64)
    passive = torch.zeros(k, dtype=torch.bool)
    for _ in range(iterations):
        gradient = design.T @ (target - design @ coef)
        candidates = ~passive & (gradient > 1e-12 * max(1.0, float(gradient.abs().max())))
        if not bool(candidates.any()):
            break
        passive[torch.where(candidates, gradient, torch.full_like(gradient, -math.inf))
                .argmax()] = True
        while True:
            trial = torch.zeros(k, dtype=torch.float64)
            idx = passive.nonzero().squeeze(1)
            trial[idx] = torch.linalg.lstsq(design[:, idx], target.unsqueeze(1)).solution[:, 0]
            if bool((trial[idx] > 0).all()):
                coef = trial
                break
            # Step back to the boundary and drop the coefficients that reached zero.
            negative = passive & (trial <= 0)
            alpha = float((coef[negative] / (coef[negative] - trial[negative])).min())
            coef = coef + alpha * (trial - coef)
            passive &= coef > 1e-15
            coef[~passive] = 0.0
    return coef


def fit_error_polynomial(energy: Tensor, error: Tensor, degree: int = 4) -> tuple[float, ...]:
    """Fit RRM eq. 8's polynomial (without constant term) to ``(e_t, e_c)`` pairs, with
    non-negative coefficients.

    RRM eq. 8 fits a free polynomial; free coefficients of degree 4 extrapolate wildly (a
    negative leading term predicts a falling error on long streams, so the budget never fires).
    Non-negative coefficients make ``H`` monotone non-decreasing for ``e >= 0``: beyond the
    calibrated energies the prediction keeps growing, as the accumulated error does. Energies are
    scaled to ``[0, 1]`` for conditioning; the returned coefficients are for the unscaled energy.

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
    solution = nonnegative_least_squares(design, error)
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


class ErrorBudgetTrigger(nn.Module):
    """RRM's accumulated-error refresh (RRM eq. 7-8) for :class:`ErrorBudgetRefresh` settings.

    Before each frame, a stream whose predicted error ``H(e_t)`` (RRM eq. 8) exceeds the budget
    is refreshed. The coefficients come from the settings or from :meth:`fit` (called by
    :func:`resq_brevitas.calibrate`) and travel in the model's ``state_dict`` (extra state).

    Args:
        settings: Budget, degree and optional coefficients.
    """

    def __init__(self, settings: ErrorBudgetRefresh) -> None:
        super().__init__()
        self.settings = settings
        #: RRM eq. 8 coefficients ``(c_1, ..., c_d)``, or ``None`` until fitted.
        self.coefficients: tuple[float, ...] | None = settings.coefficients

    @property
    def needs_fit(self) -> bool:
        """Whether calibration must fit the polynomial (no coefficients were given)."""
        return self.settings.coefficients is None

    def before_frame(self, stream: StreamStatus) -> Tensor | None:
        """Rows whose accumulated truncated energy predicts an error above the budget."""
        if self.coefficients is None:
            raise RuntimeError(
                "ErrorBudgetRefresh has no fitted polynomial: run resq.calibrate(qm, clips) "
                "or pass ErrorBudgetRefresh(coefficients=...)"
            )
        if stream.energy is None:
            return None
        return predict_error_rrm_eq8(self.coefficients, stream.energy) > self.settings.budget

    def fit(self, qm: Any, frames: Any, samples: int, progress: bool = False) -> None:
        """Fit RRM eq. 8's polynomial on calibration frames (the model's ranges must be set).

        Each frame runs through the quantized model with the fixed keyframe schedule; every
        stream contributes the pair (accumulated truncated energy since its keyframe, RRM eq. 7;
        relative error of the model output against the keyframe path on the same frame).

        Args:
            qm: The ResQ model (reset before and after).
            frames: An iterable of ``(starts_clip, frame)`` pairs.
            samples: Frames expected (for the progress bar).
            progress: Show a progress bar.
        """
        energies: list[Tensor] = []
        errors: list[Tensor] = []
        bar = tqdm(total=samples, desc="calibration refresh fit", disable=not progress,
                   leave=False)
        try:
            with torch.no_grad():
                for starts_clip, frame in frames:
                    if starts_clip:
                        qm.reset()
                    out = qm.run_frame(frame, adaptive=False)
                    energies.append(qm.truncated_energy)
                    errors.append(relative_output_error(out, qm.keyframe_output(frame)))
                    bar.update(frame.shape[0])
        finally:
            bar.close()
            qm.reset()
        energy = torch.cat(energies) if energies else torch.zeros(0, dtype=torch.float64)
        error = torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)
        distributed = distributed_initialized()
        if distributed:
            # One polynomial for all ranks, fitted on every rank's pairs (each rank fitting its
            # own would give each its own refresh decisions); every rank sees all the pairs so
            # the warning below is the same everywhere.
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (energy, error))
            energy = torch.cat([pair[0] for pair in gathered])
            error = torch.cat([pair[1] for pair in gathered])
        if not bool((energy > 0).any()):
            warnings.warn(
                "ErrorBudgetRefresh: the calibration clips truncated nothing (threshold too small "
                "or clips static); the fitted polynomial is zero and the refresh never fires",
                stacklevel=3,
            )
        if distributed:
            # Rank 0 fits and broadcasts: the same pairs fitted on two ranks differ in the last
            # bits (multi-threaded float reductions in the solve).
            shared = [fit_error_polynomial(energy, error, self.settings.degree)
                      if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            coefficients = tuple(shared[0])
        else:
            coefficients = fit_error_polynomial(energy, error, self.settings.degree)
        self.coefficients = coefficients

    def get_extra_state(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        coefficients = state.get("coefficients")
        if coefficients is not None:
            self.coefficients = tuple(float(c) for c in coefficients)

    def extra_repr(self) -> str:
        return repr(self.settings)


class SceneCutTrigger(nn.Module):
    """The scene-cut guard for :class:`SceneCutRefresh` settings, at the first ResQ layer.

    Args:
        settings: The energy fraction.
    """

    def __init__(self, settings: SceneCutRefresh) -> None:
        super().__init__()
        self.settings = settings

    def at_first_layer(self, x: Tensor, x_ref: Tensor) -> Tensor:
        """Rows (bool ``[R]``) whose residual energy exceeds the fraction of the frame's."""
        return scene_cut_rows(x - x_ref, x, self.settings.fraction)

    def extra_repr(self) -> str:
        return repr(self.settings)
