"""Dynamic-ResQ: the error-bound policy of eq. 9-11 as pure torch.

Every residual-path layer owns a pool of activation quantizers ``Theta_a^1 .. Theta_a^n``,
ordered by bits. For a residual ``delta`` the policy estimates, per pixel, the output error each
pool quantizer would cause (eq. 10, an upper bound of eq. 9) and picks the lowest bit width whose
next step up would reduce that error by less than ``tau`` (eq. 11). A "pixel" is a spatial position
of a conv input (norm over channels), a token of a ``Linear`` input (norm over features), or the
whole sample for a ``[B, F]`` ``Linear`` input.

Granularities: ``pixel`` decides per position; ``region`` sums the errors of ``k x k`` blocks of the
last two spatial dims (``k`` along the only one for 1-D inputs) and decides per block; ``frame``
sums over all positions and decides per batch row.

Each equation is one function: :func:`error_maps_eq10`, :func:`select_eq11`. The policy object
that pool residual paths call is :class:`ErrorBoundSelector`; its cost is :func:`policy_bops`.
An operating point given as a share of BOPs (``ErrorBoundPolicy(target_bops=0.5)``) is solved for
``tau`` on the calibration clips by :func:`solve_tau`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from resq_brevitas.config import ErrorBoundPolicy

__all__ = [
    "COLLAPSE_SHARE",
    "MAX_EVALUATIONS",
    "TARGET_TOLERANCE",
    "ErrorBoundSelector",
    "OperatingPoint",
    "aggregate_errors",
    "clips_of_frames",
    "error_maps_eq10",
    "expand_units",
    "measure_operating_point",
    "policy_bops",
    "select_eq11",
    "solve_tau",
    "warn_if_collapsed",
]

#: Share of residual pixels at 0 bits from which a policy counts as collapsed (and warns).
COLLAPSE_SHARE = 0.99
#: Relative distance to ``target_bops`` at which :func:`solve_tau` stops, on calibration clips.
TARGET_TOLERANCE = 0.01
#: Most passes over the calibration clips :func:`solve_tau` makes.
MAX_EVALUATIONS = 24
#: ``b_w * b_a`` of W8A8, the reference of ``target_bops``.
W8A8_BITS = 64


def error_maps_eq10(delta: Tensor, quantized: Sequence[Tensor], weight_norm: Tensor | float,
                    channel_dim: int = 1) -> Tensor:
    """Eq. 10: ``e_i = ||delta_p - q_i(delta_p)||_2 * ||q(w)||_F`` for every pixel ``p``.

    The bound of eq. 10 replaces eq. 9's ``||(delta - q_i(delta)) * q(w)||`` (Young's
    inequality); the norm is taken over the channels at each spatial position.

    Args:
        delta: Residual ``[R, C, *S]`` (convs, ``channel_dim=1``) or ``[R, *S, C]`` (``Linear``,
            ``channel_dim=-1``).
        quantized: ``q_i(delta)`` of each pool quantizer, same shape as ``delta``, ascending bits.
        weight_norm: ``||q(w)||_F`` of the residual path's quantized weight.
        channel_dim: Dimension of ``delta`` holding channels (1 or -1).

    Returns:
        Error maps ``[n, R, *S]`` (float32, no gradient).
    """
    with torch.no_grad():
        # square-sum-sqrt: several times faster than linalg.vector_norm over a strided dim;
        # in place on the one fresh difference tensor (no gradient here)
        maps = [torch.sub(delta, q).square_().sum(dim=channel_dim).sqrt_() for q in quantized]
        return torch.stack(maps).mul_(weight_norm)


def _blocked(errors: Tensor, k: int, block_dims: int) -> Tensor:
    """Sum ``k``-blocks of the last ``block_dims`` dims (zero padding at the far edge)."""
    for offset in range(1, block_dims + 1):
        dim = errors.dim() - offset
        pad = (-errors.shape[dim]) % k
        if pad:
            shape = list(errors.shape)
            shape[dim] = pad
            errors = torch.cat([errors, errors.new_zeros(shape)], dim=dim)
        errors = errors.unflatten(dim, (-1, k)).sum(dim + 1)
    return errors


def aggregate_errors(errors: Tensor, granularity: str, k: int = 4) -> Tensor:
    """Error maps of decision units: pixels, ``k x k`` regions (errors summed) or whole frames.

    Args:
        errors: ``[n, R, *S]`` per-pixel errors of eq. 10.
        granularity: ``"pixel"``, ``"region"`` or ``"frame"``.
        k: Region block size.

    Returns:
        ``[n, R, *units]``: unchanged for ``pixel``; blocks of the last ``min(2, len(S))`` spatial
        dims for ``region``; ``[n, R]`` for ``frame``.
    """
    spatial = errors.dim() - 2
    if granularity == "pixel" or spatial == 0:
        return errors
    if granularity == "frame":
        return errors.flatten(2).sum(2)
    if granularity == "region":
        return _blocked(errors, k, min(2, spatial))
    raise ValueError(f"granularity must be 'pixel', 'region' or 'frame', got {granularity!r}")


def select_eq11(errors: Tensor, tau: float) -> Tensor:
    """Eq. 11: ``Pi = min i such that e_i - e_{i+1} < tau``, else the highest ``i``.

    Starting from the lowest precision, a unit moves to the next quantizer only while doing so
    reduces its error by at least ``tau`` (the inequality is strict, so ``tau = 0`` stops only
    where a step up would *increase* the error).

    Args:
        errors: ``[n, ...]`` errors of the ``n`` pool quantizers, ascending bits.
        tau: Threshold ``tau >= 0``.

    Returns:
        Long tensor ``[...]`` of pool indices (0-based: 0 is the lowest bit width).
    """
    n = errors.shape[0]
    index = torch.full(errors.shape[1:], n - 1, dtype=torch.long, device=errors.device)
    # From the highest i down, so the smallest i that satisfies the inequality is written last.
    for i in range(n - 2, -1, -1):
        index = torch.where(errors[i] - errors[i + 1] < tau, i, index)
    return index


def expand_units(index: Tensor, spatial_shape: Sequence[int], granularity: str,
                 k: int = 4) -> Tensor:
    """Per-unit decisions ``[R, *units]`` back to per-pixel maps ``[R, *S]``."""
    spatial_shape = tuple(spatial_shape)
    if granularity == "pixel" or not spatial_shape:
        return index
    if granularity == "frame":
        return index.view((-1,) + (1,) * len(spatial_shape)).expand(
            (index.shape[0],) + spatial_shape)
    out = index
    for offset in range(1, min(2, len(spatial_shape)) + 1):
        dim = out.dim() - offset
        out = out.repeat_interleave(k, dim=dim).narrow(dim, 0, spatial_shape[-offset])
    return out


class OperatingPoint(NamedTuple):
    """Where a precision policy operates on a set of clips.

    Attributes:
        bops_share: Mean BOPs per frame (the policy's own work included) over W8A8 frame
            quantization's BOPs of the same layers (``64 * MACs``).
        zero_share: Share of the residual pixels of pool layers that got 0 bits (NaN when no
            residual pixel ran).
    """

    bops_share: float
    zero_share: float


class ErrorBoundSelector(nn.Module):
    """The error-bound precision policy (eq. 9-11) of Dynamic-ResQ pool layers.

    Implements :class:`resq_brevitas.nn.residual.PrecisionPolicy` for the settings
    :class:`~resq_brevitas.config.ErrorBoundPolicy`: per decision unit, the cheapest pool
    quantizer whose next step up would reduce the eq. 10 error by less than ``tau``.

    :func:`resq_brevitas.calibrate` calls :meth:`fit` on the calibration clips: with
    ``target_bops`` it solves ``tau`` (:func:`solve_tau`), with a raw ``tau`` it measures the
    operating point; either way it warns when (almost) every residual pixel gets 0 bits. The
    solved ``tau`` travels in the model's ``state_dict`` (extra state).

    Args:
        settings: ``tau`` or ``target_bops``, granularity and block size.
    """

    def __init__(self, settings: ErrorBoundPolicy) -> None:
        super().__init__()
        if not isinstance(settings, ErrorBoundPolicy):
            raise TypeError(f"settings must be an ErrorBoundPolicy, got {type(settings).__name__}")
        self.settings = settings
        #: eq. 11's threshold in use: the settings' ``tau``, or the one solved for
        #: ``target_bops`` (``None`` until :meth:`fit` ran).
        self.tau: float | None = settings.tau if settings.target_bops is None else None
        #: The operating point :meth:`fit` measured on the calibration clips, if it ran.
        self.operating_point: OperatingPoint | None = None

    @property
    def needs_fit(self) -> bool:
        """Always: calibration solves ``tau`` for ``target_bops``, or checks a raw ``tau``."""
        return True

    def select(self, delta: Tensor, quantized: Sequence[Tensor], weight_norm: Tensor | float,
               channel_dim: int = 1) -> tuple[Tensor, int]:
        """Eq. 10-11 on a residual.

        Args:
            delta: The residual (after any truncation).
            quantized: ``q_i(delta)`` of each pool quantizer, ascending bits.
            weight_norm: ``||q(w)||_F``.
            channel_dim: 1 (convs) or -1 (``Linear``).

        Returns:
            ``(index, units)``: the per-pixel pool index ``[R, *S]`` and the number of decision
            units per row (for :meth:`cost`).

        Raises:
            RuntimeError: A ``target_bops`` policy that was not fitted yet.
        """
        tau = self.tau
        if tau is None:
            # Calibration's floating-point passes run before the fit; with the pool's quantizers
            # switched off every one of them returns delta itself and any choice sends delta.
            if not all(q is delta for q in quantized):
                raise RuntimeError(
                    f"{self.settings!r} has no solved tau yet: run resq.calibrate(qm, clips) on "
                    "this model (a policy swapped in with qm.with_policy is not fitted)"
                )
            tau = 0.0
        settings = self.settings
        errors = error_maps_eq10(delta, quantized, weight_norm, channel_dim)
        unit_errors = aggregate_errors(errors, settings.granularity, settings.k)
        unit_index = select_eq11(unit_errors, tau)
        index = expand_units(unit_index, errors.shape[2:], settings.granularity, settings.k)
        units = unit_index[0].numel() if unit_index.dim() > 1 else 1
        return index, units

    def cost(self, pool_size: int, channels: int, positions: int, units: int,
             act_bits: int) -> int:
        """The policy's BOPs on one residual row (:func:`policy_bops`)."""
        return policy_bops(pool_size, channels, positions, units, act_bits)

    def fit(self, qm: Any, frames: Iterable[tuple[bool, Tensor]], samples: int,
            progress: bool = False) -> None:
        """Solve ``tau`` for ``target_bops`` (or measure a raw ``tau``) on calibration frames.

        The ``c`` calibration frames are kept in memory: every candidate ``tau`` runs all of them
        through the quantized model (:func:`measure_operating_point`, about 5 to 10 passes).

        Args:
            qm: The ResQ model whose pool layers share this policy (ranges already set).
            frames: ``(starts_clip, frame [B, C, ...])`` pairs, as
                :func:`resq_brevitas.calibrate.iter_clip_frames` yields them.
            samples: Frames expected (unused: the frames are regrouped into clips first).
            progress: Show a progress bar while solving.
        """
        clips = clips_of_frames(frames)
        target = self.settings.target_bops

        def measure(tau: float) -> OperatingPoint:
            self.tau = tau
            return measure_operating_point(qm, clips)

        if target is None:
            tau, point = self.settings.tau, measure(self.settings.tau)
        else:
            tau, point = solve_tau(measure, target, progress)
        self.tau, self.operating_point = tau, point
        warn_if_collapsed(self.settings, tau, point)

    def get_extra_state(self) -> dict[str, Any]:
        return {"target_bops": self.settings.target_bops, "tau": self.tau,
                "operating_point": None if self.operating_point is None
                else tuple(self.operating_point)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Only a tau solved for this very target is taken; a raw tau comes from the settings.
        target = self.settings.target_bops
        if target is None or state.get("target_bops") != target or state.get("tau") is None:
            return
        self.tau = float(state["tau"])
        point = state.get("operating_point")
        self.operating_point = OperatingPoint(*map(float, point)) if point is not None else None

    def extra_repr(self) -> str:
        text = repr(self.settings)
        if self.settings.target_bops is not None:
            text += f", solved tau={self.tau:.4g}" if self.tau is not None else ", not fitted"
        return text


def clips_of_frames(frames: Iterable[tuple[bool, Any]]) -> list[Any]:
    """Regroup ``(starts_clip, frame [B, C, ...])`` pairs into clips ``[B, T, C, ...]``.

    A frame of a model with several inputs (a tuple or dict of tensors) gives a clip of the
    same structure, each input stacked over time.
    """
    clips: list[list[Any]] = []
    for starts_clip, frame in frames:
        if starts_clip or not clips:
            clips.append([])
        clips[-1].append(frame)
    if not clips:
        raise ValueError("frames must hold at least one frame, got none")
    return [tree_map(lambda *leaves: torch.stack(leaves, dim=1), *clip) for clip in clips]


def measure_operating_point(qm: Any, clips: Sequence[Any]) -> OperatingPoint:
    """Run each clip through ``qm`` and read its :class:`OperatingPoint` off ``last_cost``.

    BOPs are weighted by frames and batch rows; W8A8's are ``64 * MACs`` of the same layers (the
    reference of the recipe's ``x W8A8`` column). The model is reset afterwards.
    """
    spent = reference = zeros = pixels = 0.0
    try:
        with torch.no_grad():
            for clip in clips:
                qm(clip)
                cost = qm.last_cost
                first = tree_flatten(clip)[0][0]  # every input has the same [B, T]
                weight = first.shape[0] * first.shape[1]
                spent += cost.mean_bops * weight
                reference += W8A8_BITS * sum(cost.macs.values()) * weight
                residual = ~qm.last_keyframes
                for bits in qm.last_bit_maps.values():
                    chosen = bits[residual.to(bits.device)]
                    zeros += float((chosen == 0).sum())
                    pixels += chosen.numel()
    finally:
        qm.reset()
    return OperatingPoint(spent / reference if reference else math.nan,
                          zeros / pixels if pixels else math.nan)


def solve_tau(measure: Callable[[float], OperatingPoint], target: float,
              progress: bool = False) -> tuple[float, OperatingPoint]:
    """The ``tau`` whose measured BOPs share is closest to ``target``.

    The share does not increase with ``tau`` (eq. 11 picks fewer bits as ``tau`` grows). From
    ``tau = 1`` a bracket is found by steps of x16; past ``[1e-12, 1e12]`` the end ``tau = 0``
    or ``tau = inf`` is measured instead, and a target beyond every measured share is taken at
    the nearest one with a warning. The bracket then shrinks by false position on
    ``(log tau, share)``, kept inside its middle 80% so that it always shrinks, until the share is
    within :data:`TARGET_TOLERANCE` of the target (relative) or :data:`MAX_EVALUATIONS` passes
    ran.

    Args:
        measure: ``tau -> OperatingPoint`` (one pass over the calibration clips).
        target: The BOPs share to reach (> 0).
        progress: Show a progress bar of the passes.

    Returns:
        ``(tau, its operating point)``.
    """
    bar = tqdm(total=MAX_EVALUATIONS, desc="calibration target_bops", disable=not progress,
               leave=False)
    tried: list[tuple[float, OperatingPoint]] = []

    def share(tau: float) -> float:
        tried.append((tau, measure(tau)))
        bar.update(1)
        bar.set_postfix_str(f"tau={tau:.3g} share={tried[-1][1].bops_share:.3f}")
        return tried[-1][1].bops_share

    try:
        bracket = _bracket(share, target)
        if bracket is not None:
            _shrink(share, target, bracket, lambda: len(tried) < MAX_EVALUATIONS)
    finally:
        bar.close()
    shares = [point.bops_share for _, point in tried]
    if not min(shares) <= target <= max(shares):
        _warn_out_of_reach(target, min(shares), max(shares))
    # ties go to a finite tau (inside the bracket rather than at an end)
    return min(tried, key=lambda item: (abs(item[1].bops_share - target), math.isinf(item[0])))


#: ``tau`` beyond which :func:`solve_tau` measures the ends 0 and inf instead of stepping on.
_TAU_RANGE = (1e-12, 1e12)
_STEP = 16.0


def _bracket(share: Callable[[float], float], target: float
             ) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``((low, share), (high, share))`` with ``share(low) > target >= share(high)``, both taus
    finite and positive; ``None`` when the steps ran past :data:`_TAU_RANGE` and the end
    (``tau = 0`` or ``inf``) was measured instead."""
    tau, value = 1.0, share(1.0)
    if value > target:
        while tau < _TAU_RANGE[1]:
            up, up_value = tau * _STEP, share(tau * _STEP)
            if up_value <= target:
                return (tau, value), (up, up_value)
            tau, value = up, up_value
        share(math.inf)
        return None
    while tau > _TAU_RANGE[0]:
        down, down_value = tau / _STEP, share(tau / _STEP)
        if down_value > target:
            return (down, down_value), (tau, value)
        tau, value = down, down_value
    share(0.0)
    return None


def _shrink(share: Callable[[float], float], target: float,
            bracket: tuple[tuple[float, float], tuple[float, float]],
            more: Callable[[], bool]) -> None:
    """False position on ``(log tau, share)`` until the last share is within tolerance."""
    (low, s_low), (high, s_high) = bracket
    last = s_high
    while abs(last / target - 1.0) > TARGET_TOLERANCE and more():
        fraction = (s_low - target) / (s_low - s_high) if s_low != s_high else 0.5
        fraction = min(max(fraction, 0.1), 0.9)
        middle = math.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))
        last = share(middle)
        if last > target:
            low, s_low = middle, last
        else:
            high, s_high = middle, last


def _warn_out_of_reach(target: float, lowest: float, highest: float) -> None:
    warnings.warn(
        f"ErrorBoundPolicy(target_bops={target:g}) is out of reach for this model and scheme on "
        f"the calibration clips: its BOPs share runs from {lowest:.3g} (every residual pixel at "
        f"the lowest bits; keyframes and the policy's own work stay) to {highest:.3g} (at the "
        "highest bits); the nearest end is used", stacklevel=5)


def warn_if_collapsed(settings: Any, tau: float, point: OperatingPoint) -> None:
    """Warn when (almost) every residual pixel got 0 bits (:data:`COLLAPSE_SHARE`)."""
    if point.zero_share >= COLLAPSE_SHARE:
        advice = ("raise target_bops" if getattr(settings, "target_bops", None) is not None
                  else "pick the operating point in BOPs instead, e.g. "
                       "ErrorBoundPolicy(target_bops=0.5), or a smaller tau")
        warnings.warn(
            f"{settings!r} (tau={tau:g}) sends {100 * point.zero_share:.1f}% of the residual "
            "pixels to 0 bits on the calibration clips: residual frames then repeat the "
            f"keyframe's output; {advice}", stacklevel=4)


def policy_bops(pool_size: int, channels: int, positions: int, units: int,
                act_bits: int) -> int:
    """BOPs of the policy's own work on one residual row (one sample of one layer).

    ``pool_size * act_bits^2 * (channels * positions + 2 * units)``:

    - eq. 10 needs, per pixel and pool quantizer, the squared norm of ``delta - q_i(delta)`` over
      the ``channels``: ``channels`` multiply-accumulates, at the precision the residual is held in
      before the policy quantizes it, the keyframe activation precision ``act_bits`` (both
      operands), so ``act_bits^2`` BOPs each;
    - per decision unit (pixel, region or frame) and quantizer, the square root and the product
      with the constant ``||q(w)||_F`` count as 2 more operations at the same precision.

    Rounding, clamping, additions, comparisons and the weight norm (computed once per weight, not
    per frame) are not counted, as BOPs count multiplications.

    Args:
        pool_size: ``n``, the number of pool quantizers (a 0-bit one included: its error is
            ``||delta_p||``).
        channels: Channels (features) per pixel.
        positions: Pixels per row.
        units: Decision units per row (``positions`` for ``pixel``, blocks for ``region``, 1 for
            ``frame``).
        act_bits: Keyframe activation bit width (32 for fp32).

    Returns:
        The BOPs.
    """
    return pool_size * act_bits * act_bits * (channels * positions + 2 * units)
