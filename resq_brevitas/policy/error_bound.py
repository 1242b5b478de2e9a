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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resq_brevitas.config import ErrorBoundPolicy

__all__ = [
    "error_maps_eq10",
    "aggregate_errors",
    "select_eq11",
    "expand_units",
    "ErrorBoundSelector",
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


class ErrorBoundSelector(nn.Module):
    """The error-bound precision policy (eq. 9-11) of Dynamic-ResQ pool layers.

    Implements :class:`resq_brevitas.nn.residual.PrecisionPolicy` for the settings
    :class:`~resq_brevitas.config.ErrorBoundPolicy`: per decision unit, the cheapest pool
    quantizer whose next step up would reduce the eq. 10 error by less than ``tau``.

    Args:
        settings: ``tau``, granularity and block size.
    """

    def __init__(self, settings: ErrorBoundPolicy) -> None:
        super().__init__()
        if not isinstance(settings, ErrorBoundPolicy):
            raise TypeError(f"settings must be an ErrorBoundPolicy, got {type(settings).__name__}")
        self.settings = settings

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
        """
        settings = self.settings
        errors = error_maps_eq10(delta, quantized, weight_norm, channel_dim)
        unit_errors = aggregate_errors(errors, settings.granularity, settings.k)
        unit_index = select_eq11(unit_errors, settings.tau)
        index = expand_units(unit_index, errors.shape[2:], settings.granularity, settings.k)
        units = unit_index[0].numel() if unit_index.dim() > 1 else 1
        return index, units

    def cost(self, pool_size: int, channels: int, positions: int, units: int,
             act_bits: int) -> int:
        """The policy's BOPs on one residual row (:func:`policy_bops`)."""
        return policy_bops(pool_size, channels, positions, units, act_bits)

    def extra_repr(self) -> str:
        return repr(self.settings)


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
