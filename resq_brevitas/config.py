"""Configuration: the scheme notation, :class:`ResQConfig` and calibration settings.

The notation follows the ResQ paper: ``"W8A8->W4A4"`` reads "keyframes at 8-bit weights and
activations, residual frames at 4-bit weights and activations". A single precision (``"W4A4"``)
is frame quantization: every frame is a keyframe. ``fp32`` means no quantizer. A pool of
activation bit widths (``"W8A8->W8A{0,4,8}"``) is the Dynamic-ResQ notation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_BITS",
    "Precision",
    "Scheme",
    "LineSearch",
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


_REFERENCES = ("keyframe", "previous")
_GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class ResQConfig:
    """Everything :func:`resq_brevitas.convert` needs.

    Attributes:
        scheme: ``"W8A8->W4A4"``-style notation or a :class:`Scheme`.
        period: Keyframe period ``T`` (>= 1). Ignored (treated as 1) for frame quantization.
        weight_granularity: ``"tensor"`` or ``"channel"`` (per output channel) weight scales.
        reference: ``"keyframe"`` (ResQ) or ``"previous"`` (RRM / sigma-delta).
        policy: Dynamic residual precision policy, or ``None`` for static ResQ.
        calibration: Activation range setter settings.
        fold_bn: Fold BatchNorm into the preceding conv where the graph allows it.
        strict: Raise on unsupported weight layers instead of warning.
    """

    scheme: str | Scheme = "W8A8->W4A4"
    period: int = 4
    weight_granularity: str = "tensor"
    reference: str = "keyframe"
    policy: Any = None
    calibration: LineSearch = field(default_factory=LineSearch)
    fold_bn: bool = True
    strict: bool = False

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
        if self.reference == "previous":
            raise NotImplementedError(
                "reference='previous' (RRM / sigma-delta) is not implemented yet; "
                "use reference='keyframe'"
            )
        if not isinstance(self.calibration, LineSearch):
            raise TypeError(
                "calibration must be a resq_brevitas.LineSearch, "
                f"got {type(self.calibration).__name__}"
            )
        if self.scheme.is_dynamic and self.policy is None:
            raise ValueError(
                f"scheme {self.scheme} has a pool of residual bit widths and needs a policy "
                "(e.g. ErrorBoundPolicy); got policy=None"
            )
        if self.policy is not None:
            raise NotImplementedError(
                "dynamic residual policies are not implemented yet; use policy=None"
            )

    @property
    def effective_period(self) -> int:
        """The keyframe period actually used (1 under frame quantization)."""
        return 1 if self.scheme.is_frame_quantization else self.period
