"""Configuration: the scheme notation, :class:`ResQConfig` and calibration settings.

The notation follows the ResQ paper: ``"W8A8->W4A4"`` reads "keyframes at 8-bit weights and
activations, residual frames at 4-bit weights and activations". A single precision (``"W4A4"``)
is frame quantization: every frame is a keyframe. ``fp32`` means no quantizer. A pool of
activation bit widths (``"W8A8->W8A{0,4,8}"``) is the Dynamic-ResQ notation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "MAX_BITS",
    "Precision",
    "Scheme",
    "LineSearch",
    "ErrorBoundPolicy",
    "FixedPeriodRefresh",
    "ErrorBudgetRefresh",
    "SceneCutRefresh",
    "RefreshPolicy",
    "ResQConfig",
    "validate_bits",
]

#: Largest supported integer bit width.
MAX_BITS = 16
#: Bit width that BOPs are counted at for an unquantized (fp32) operand.
FP32_BITS = 32

_PREC_RE = re.compile(r"^W(\d+)A(?:(\d+)|\{\s*(\d+(?:\s*,\s*\d+)*)\s*\})$", re.IGNORECASE)


def validate_bits(bits: Any, name: str, allow_zero: bool = True) -> int:
    """Check one integer bit width.

    Args:
        bits: The value to check.
        name: Argument name used in the error message.
        allow_zero: Whether 0 (a quantizer that returns zeros) is allowed.

    Returns:
        The bit width as an ``int``.

    Raises:
        TypeError: If ``bits`` is not an integer.
        ValueError: If ``bits`` is outside ``2..16`` (or 0 when allowed).
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int bit width, got {type(bits).__name__} {bits!r}")
    if (bits == 0 and allow_zero) or 2 <= bits <= MAX_BITS:
        return bits
    allowed = f"{'0 or ' if allow_zero else ''}2..{MAX_BITS}"
    raise ValueError(f"{name} must be {allowed}, got {bits}")


@dataclass(frozen=True)
class Precision:
    """Bit widths of one path (keyframe or residual).

    Attributes:
        weight_bits: Weight bit width, or ``None`` for fp32 weights.
        act_bits: Activation bit widths; one entry for a static quantizer, several (sorted
            ascending) for a Dynamic-ResQ pool. ``None`` for fp32 activations.
    """

    weight_bits: int | None
    act_bits: tuple[int, ...] | None

    def __post_init__(self) -> None:
        if (self.weight_bits is None) != (self.act_bits is None):
            raise ValueError(
                "Precision: weight_bits and act_bits must both be None (fp32) or both be set, "
                f"got weight_bits={self.weight_bits!r}, act_bits={self.act_bits!r}"
            )
        if self.weight_bits is None:
            return
        validate_bits(self.weight_bits, "weight_bits", allow_zero=False)
        if not isinstance(self.act_bits, tuple) or not self.act_bits:
            raise ValueError(f"act_bits must be a non-empty tuple, got {self.act_bits!r}")
        for b in self.act_bits:
            validate_bits(b, "act_bits")
        if list(self.act_bits) != sorted(set(self.act_bits)):
            raise ValueError(
                f"act_bits must be strictly increasing without repeats, got {self.act_bits}"
            )
        if len(self.act_bits) == 1 and self.act_bits[0] == 0:
            # A static 0-bit path is allowed only on residuals; checked by Scheme.
            pass

    @property
    def is_float(self) -> bool:
        """Whether this path is unquantized."""
        return self.weight_bits is None

    @property
    def is_pool(self) -> bool:
        """Whether this path has a pool of activation quantizers (Dynamic-ResQ)."""
        return self.act_bits is not None and len(self.act_bits) > 1

    @property
    def bops_weight_bits(self) -> int:
        """Weight bits used for BOPs (32 for fp32)."""
        return FP32_BITS if self.weight_bits is None else self.weight_bits

    @property
    def bops_act_bits(self) -> int:
        """Activation bits used for BOPs of a static path (32 for fp32)."""
        if self.act_bits is None:
            return FP32_BITS
        if self.is_pool:
            raise ValueError("a pool has no single activation bit width; the policy chooses")
        return self.act_bits[0]

    @classmethod
    def parse(cls, text: str) -> Precision:
        """Parse ``fp32``, ``W<b>A<b>`` or ``W<b>A{b1,b2,...}``.

        Raises:
            ValueError: On any other string.
        """
        if not isinstance(text, str):
            raise TypeError(f"precision must be a str, got {type(text).__name__} {text!r}")
        token = text.strip()
        if token.lower() == "fp32":
            return cls(None, None)
        match = _PREC_RE.match(token)
        if match is None:
            raise ValueError(
                f"precision must look like 'fp32', 'W8A8' or 'W8A{{0,4,8}}', got {text!r}"
            )
        weight_bits = int(match.group(1))
        if match.group(2) is not None:
            act_bits: tuple[int, ...] = (int(match.group(2)),)
        else:
            act_bits = tuple(int(b) for b in match.group(3).split(","))
        return cls(weight_bits, act_bits)

    def __str__(self) -> str:
        if self.is_float:
            return "fp32"
        assert self.act_bits is not None
        if self.is_pool:
            return f"W{self.weight_bits}A{{{','.join(str(b) for b in self.act_bits)}}}"
        return f"W{self.weight_bits}A{self.act_bits[0]}"


@dataclass(frozen=True)
class Scheme:
    """Keyframe and residual precisions.

    Attributes:
        keyframe: Precision of keyframes (and of every frame under frame quantization).
        residual: Precision of residual frames, or ``None`` for frame quantization.
    """

    keyframe: Precision
    residual: Precision | None = None

    def __post_init__(self) -> None:
        if self.keyframe.is_pool:
            raise ValueError(
                f"scheme: the keyframe precision cannot be a pool, got {self.keyframe}"
            )
        if self.keyframe.act_bits == (0,):
            raise ValueError("scheme: keyframe activations cannot be 0-bit")

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``PREC`` or ``PREC->PREC``.

        Raises:
            TypeError: If ``text`` is not a str or Scheme.
            ValueError: If the notation is malformed.
        """
        if isinstance(text, Scheme):
            return text
        if not isinstance(text, str):
            raise TypeError(f"scheme must be a str or Scheme, got {type(text).__name__} {text!r}")
        parts = [p for p in re.split(r"->|→", text)]
        if len(parts) > 2 or any(not p.strip() for p in parts):
            raise ValueError(
                f"scheme must be 'PREC' or 'PREC->PREC' (e.g. 'W8A8->W4A4'), got {text!r}"
            )
        try:
            precisions = [Precision.parse(p) for p in parts]
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheme {text!r} is invalid: {err}") from None
        return cls(precisions[0], precisions[1] if len(precisions) == 2 else None)

    @property
    def is_frame_quantization(self) -> bool:
        """Whether every frame is a keyframe (no residual path)."""
        return self.residual is None

    @property
    def is_dynamic(self) -> bool:
        """Whether the residual path has a pool of activation quantizers."""
        return self.residual is not None and self.residual.is_pool

    @property
    def notation(self) -> str:
        """The paper's notation, e.g. ``W8A8->W4A{0,4,8}``."""
        if self.residual is None:
            return str(self.keyframe)
        return f"{self.keyframe}->{self.residual}"

    def __str__(self) -> str:
        return self.notation


@dataclass(frozen=True)
class LineSearch:
    """Output-aware line-search calibration (eq. 8).

    Attributes:
        candidates: Number of grid points ``r`` in ``linspace(min X, max X, r)``.
        samples: Number of calibration frames ``c`` (per batch row, counted across clips).
    """

    candidates: int = 20
    samples: int = 64

    def __post_init__(self) -> None:
        for name in ("candidates", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2, got {self.candidates}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


def _check_real(value: Any, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number ``>= minimum`` (``> minimum`` when ``strict``), as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value > minimum if strict else value >= minimum
    if not math.isfinite(value) or not low_ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


_POLICY_GRANULARITIES = ("pixel", "region", "frame")


@dataclass(frozen=True)
class ErrorBoundPolicy:
    """Dynamic-ResQ policy settings (eq. 9-11); the math lives in :mod:`resq_brevitas.policy`.

    For every residual "pixel" (spatial position; a token or sample for ``Linear`` layers) the
    policy estimates each pool quantizer's output error with eq. 10 and picks the lowest bit width
    whose next step up would reduce it by less than ``tau`` (eq. 11).

    Attributes:
        tau: Threshold of eq. 11 (>= 0). ``0`` keeps the highest bits wherever a step up does not
            increase the error; a huge value selects the lowest bits everywhere. The paper uses
            ``3e-4`` on HRNet; the scale depends on the model's activations and weights.
        granularity: ``"pixel"`` (one decision per spatial position), ``"region"`` (``k x k``
            blocks of the last two spatial dims, errors summed) or ``"frame"`` (one decision per
            batch row, errors summed over all positions).
        k: Block size of the ``region`` granularity (ignored otherwise).
    """

    tau: float = 3e-4
    granularity: str = "pixel"
    k: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_real(self.tau, "tau"))
        if self.granularity not in _POLICY_GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {_POLICY_GRANULARITIES}, got {self.granularity!r}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k must be an int block size, got {type(self.k).__name__} {self.k!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class FixedPeriodRefresh:
    """Keyframes every ``period`` frames only (the default; same as ``refresh=None``)."""


@dataclass(frozen=True)
class ErrorBudgetRefresh:
    """RRM's accumulated-error control (RRM eq. 7-8), per stream.

    Each stream accumulates the l2 norm of the residual entries truncated by ``threshold`` at every
    ResQ layer since its last keyframe (RRM eq. 7). A polynomial without constant term,
    ``H(e) = sum_k c_k e^k`` (RRM eq. 8), maps that sum to a predicted relative output error;
    when the prediction exceeds ``budget`` the stream's next frame is a keyframe.

    Attributes:
        budget: Largest tolerated predicted relative output error (> 0), e.g. ``0.05``.
        degree: Degree of the polynomial fitted by :func:`resq_brevitas.calibrate` (RRM: 4).
        coefficients: ``(c_1, ..., c_d)``; ``None`` to fit them on the calibration clips.
    """

    budget: float = 0.05
    degree: int = 4
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", _check_real(self.budget, "budget", strict=True))
        if isinstance(self.degree, bool) or not isinstance(self.degree, int):
            raise TypeError(
                f"degree must be an int, got {type(self.degree).__name__} {self.degree!r}"
            )
        if not 1 <= self.degree <= 8:
            raise ValueError(f"degree must be 1..8, got {self.degree}")
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not isinstance(
                    self.coefficients, Sequence) or not self.coefficients:
                raise TypeError(
                    "coefficients must be a non-empty sequence of numbers (c_1, ..., c_d) or "
                    f"None, got {self.coefficients!r}"
                )
            coeffs = tuple(
                _check_real(c, f"coefficients[{i}]", minimum=-math.inf)
                for i, c in enumerate(self.coefficients)
            )
            object.__setattr__(self, "coefficients", coeffs)


@dataclass(frozen=True)
class SceneCutRefresh:
    """Scene-cut guard: force a keyframe for a stream when, at the first ResQ layer of the frame,
    ``||x - x_ref||^2 > fraction * ||x||^2``.

    Attributes:
        fraction: Share of the frame's energy the residual energy may reach (> 0).
    """

    fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", _check_real(self.fraction, "fraction", strict=True))


#: Any refresh policy accepted by :class:`ResQConfig`.
RefreshPolicy = Union[FixedPeriodRefresh, ErrorBudgetRefresh, SceneCutRefresh]
_REFRESH_TYPES = (FixedPeriodRefresh, ErrorBudgetRefresh, SceneCutRefresh)

_REFERENCES = ("keyframe", "previous")
_GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class ResQConfig:
    """Everything :func:`resq_brevitas.convert` needs.

    Attributes:
        scheme: ``"W8A8->W4A4"``-style notation or a :class:`Scheme`.
        period: Keyframe period ``T`` (>= 1). Ignored (treated as 1) for frame quantization. With
            an adaptive ``refresh`` it is the longest run between keyframes.
        weight_granularity: ``"tensor"`` or ``"channel"`` (per output channel) weight scales.
        reference: ``"keyframe"`` (ResQ: residuals against the keyframe) or ``"previous"`` (RRM /
            sigma-delta: the reference advances every frame, ``x_ref <- x_ref + q(delta)``).
        policy: :class:`ErrorBoundPolicy` for a pool scheme (``W8A8->W8A{0,4,8}``), else ``None``.
        calibration: Activation range setter settings.
        fold_bn: Fold BatchNorm into the preceding conv where the graph allows it.
        strict: Raise on unsupported weight layers instead of warning.
        threshold: RRM truncation ``eps`` (>= 0): residual entries with ``|delta| <= eps`` are
            zeroed before quantization (``0``: nothing is truncated).
        refresh: ``None`` (fixed period), a refresh policy (:class:`ErrorBudgetRefresh`,
            :class:`SceneCutRefresh`, :class:`FixedPeriodRefresh`) or a tuple of them (a keyframe
            is forced when any fires).
    """

    scheme: str | Scheme = "W8A8->W4A4"
    period: int = 4
    weight_granularity: str = "tensor"
    reference: str = "keyframe"
    policy: Any = None
    calibration: LineSearch = field(default_factory=LineSearch)
    fold_bn: bool = True
    strict: bool = False
    threshold: float = 0.0
    refresh: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme.parse(self.scheme))
        if isinstance(self.period, bool) or not isinstance(self.period, int):
            raise TypeError(
                f"period must be an int, got {type(self.period).__name__} {self.period!r}"
            )
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")
        if self.weight_granularity not in _GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {_GRANULARITIES}, "
                f"got {self.weight_granularity!r}"
            )
        if self.reference not in _REFERENCES:
            raise ValueError(f"reference must be one of {_REFERENCES}, got {self.reference!r}")
        if not isinstance(self.calibration, LineSearch):
            raise TypeError(
                "calibration must be a resq_brevitas.LineSearch, "
                f"got {type(self.calibration).__name__}"
            )
        self._check_policy()
        object.__setattr__(self, "threshold", _check_real(self.threshold, "threshold"))
        if self.threshold > 0 and self.scheme.is_frame_quantization:
            raise ValueError(
                f"threshold truncates residuals, but scheme {self.scheme} has no residual path; "
                f"got threshold={self.threshold}"
            )
        object.__setattr__(self, "refresh", self._normalized_refresh())

    def _check_policy(self) -> None:
        scheme: Scheme = self.scheme  # type: ignore[assignment]
        if self.policy is not None and not isinstance(self.policy, ErrorBoundPolicy):
            raise TypeError(
                "policy must be a resq_brevitas.ErrorBoundPolicy or None, "
                f"got {type(self.policy).__name__} {self.policy!r}"
            )
        if scheme.is_dynamic and self.policy is None:
            raise ValueError(
                f"scheme {scheme} has a pool of residual bit widths and needs a policy "
                "(e.g. ErrorBoundPolicy); got policy=None"
            )
        if self.policy is not None and not scheme.is_dynamic:
            raise ValueError(
                "policy needs a scheme with a pool of residual bit widths "
                f"(e.g. 'W8A8->W8A{{0,4,8}}'), got scheme {scheme} with policy={self.policy!r}"
            )

    def _normalized_refresh(self) -> tuple[Any, ...] | None:
        refresh = self.refresh
        if refresh is None:
            return None
        items = tuple(refresh) if isinstance(refresh, (tuple, list)) else (refresh,)
        for item in items:
            if not isinstance(item, _REFRESH_TYPES):
                raise TypeError(
                    "refresh must be None, a refresh policy (ErrorBudgetRefresh, "
                    "SceneCutRefresh, FixedPeriodRefresh) or a tuple of them, "
                    f"got {type(item).__name__} {item!r}"
                )
        kinds = [type(item) for item in items]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"refresh must not repeat a policy type, got {items!r}")
        adaptive = [item for item in items if not isinstance(item, FixedPeriodRefresh)]
        if adaptive and self.scheme.is_frame_quantization:  # type: ignore[union-attr]
            raise ValueError(
                f"refresh needs residual frames, but scheme {self.scheme} makes every frame a "
                f"keyframe; got refresh={self.refresh!r}"
            )
        if any(isinstance(item, ErrorBudgetRefresh) for item in items) and self.threshold <= 0:
            raise ValueError(
                "ErrorBudgetRefresh accumulates truncated residual energy and needs "
                f"threshold > 0, got threshold={self.threshold}"
            )
        return items

    @property
    def effective_period(self) -> int:
        """The keyframe period actually used (1 under frame quantization)."""
        return 1 if self.scheme.is_frame_quantization else self.period

    @property
    def adaptive_refresh(self) -> tuple[Any, ...]:
        """The refresh policies that can force keyframes (fixed-period entries dropped)."""
        return tuple(r for r in (self.refresh or ()) if not isinstance(r, FixedPeriodRefresh))

    def refresh_of(self, kind: type) -> Any:
        """The refresh policy of type ``kind``, or ``None``."""
        return next((r for r in (self.refresh or ()) if isinstance(r, kind)), None)
