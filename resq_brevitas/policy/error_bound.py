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

Each equation is one function: :func:`error_maps_eq10`, :func:`select_eq11`. The glue that a
ResQ layer's temporal state calls is :func:`apply_error_bound_policy`; its cost is
:func:`policy_bops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from resq_brevitas.config import ErrorBoundPolicy

__all__ = [
    "ErrorBoundPolicy",
    "error_maps_eq10",
    "aggregate_errors",
    "select_eq11",
    "expand_units",
    "mix_pool",
    "apply_error_bound_policy",
    "policy_bops",
]


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
        # square-sum-sqrt: several times faster than linalg.vector_norm over a strided dim
        maps = [(delta - q).square().sum(dim=channel_dim).sqrt() for q in quantized]
        return torch.stack(maps) * weight_norm


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


def mix_pool(quantized: Sequence[Tensor], index: Tensor, channel_dim: int = 1) -> Tensor:
    """The residual each pixel sends: ``q_{Pi_p}(delta_p)`` (pool outputs selected per pixel).

    Args:
        quantized: ``q_i(delta)`` of each pool quantizer (``[R, C, *S]`` or ``[R, *S, C]``).
        index: ``[R, *S]`` pool index per pixel.
        channel_dim: 1 (convs) or -1 (``Linear``).

    Returns:
        The mixed quantized residual (differentiable w.r.t. the pool outputs).
    """
    mask_dim = 1 if channel_dim >= 0 else index.dim()
    index = index.unsqueeze(mask_dim)
    out = quantized[0]
    for i in range(1, len(quantized)):
        out = torch.where(index == i, quantized[i], out)
    return out


def apply_error_bound_policy(delta: Tensor, quantized: Sequence[Tensor],
                             weight_norm: Tensor | float, policy: ErrorBoundPolicy,
                             channel_dim: int = 1) -> tuple[Tensor, Tensor, int]:
    """Run eq. 10-11 on a residual and mix the pool outputs.

    Args:
        delta: The residual (after any truncation).
        quantized: ``q_i(delta)`` of each pool quantizer, ascending bits.
        weight_norm: ``||q(w)||_F``.
        policy: ``tau``, granularity and block size.
        channel_dim: 1 (convs) or -1 (``Linear``).

    Returns:
        ``(q_mix, index, units)``: the mixed quantized residual, the per-pixel pool index
        ``[R, *S]`` and the number of decision units per row (for :func:`policy_bops`).
    """
    errors = error_maps_eq10(delta, quantized, weight_norm, channel_dim)
    unit_errors = aggregate_errors(errors, policy.granularity, policy.k)
    unit_index = select_eq11(unit_errors, policy.tau)
    index = expand_units(unit_index, errors.shape[2:], policy.granularity, policy.k)
    units = unit_index[0].numel() if unit_index.dim() > 1 else 1
    return mix_pool(quantized, index, channel_dim), index, units


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
