"""Configuration: the scheme notation, :class:`ResQConfig` and the policy settings.

Everything here is typed, frozen, serialisable data (:meth:`ResQConfig.to_dict` /
:meth:`ResQConfig.from_dict`); behaviour lives elsewhere. A policy or refresh setting names the
class that implements it in its ``implementation`` attribute (``"package.module:Class"``), and
:func:`resq_brevitas.policy.build_policy` / :func:`resq_brevitas.policy.build_refresh` map a
setting to that class: there is no registry, so a new policy is its settings class, its
implementation and its tests, in any package.

The notation follows the ResQ paper: ``"W8A8->W4A4"`` reads "keyframes at 8-bit weights and
activations, residual frames at 4-bit weights and activations". A single precision (``"W4A4"``)
is frame quantization: every frame is a keyframe. ``fp32`` means no quantizer. A pool of
activation bit widths (``"W8A8->W8A{0,4,8}"``) is the Dynamic-ResQ notation.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol

from resq_brevitas.checks import check_bool, check_choice, check_int, check_period, check_real

__all__ = [
    "CONFIG_VERSION",
    "MAX_BITS",
    "POLICY_INPUTS",
    "READABLE_CONFIG_VERSIONS",
    "ErrorBoundPolicy",
    "ErrorBudgetRefresh",
    "FixedPeriodRefresh",
    "FrameAction",
    "LayerOverride",
    "LearnedFramePolicy",
    "LineSearch",
    "PolicySettings",
    "Precision",
    "RefreshSettings",
    "ResQConfig",
    "Scheme",
    "check_residual_weights",
    "SceneCutRefresh",
    "load_object",
    "upgrade_config_data",
    "validate_bits",
]

#: Version of the :meth:`ResQConfig.to_dict` layout (2: ``LearnedFramePolicy.inputs``, whose
#: default is not what version 1 meant by its absence; 1: the first).
CONFIG_VERSION = 2
#: Versions :meth:`ResQConfig.from_dict` reads (older ones through :func:`upgrade_config_data`).
READABLE_CONFIG_VERSIONS = (1, 2)
#: Largest supported integer bit width.
MAX_BITS = 16
#: Bit width that BOPs are counted at for an unquantized (fp32) operand.
FP32_BITS = 32

WeightGranularity = Literal["tensor", "channel"]
ReferenceKind = Literal["keyframe", "previous"]
Signedness = Literal["signed", "auto"]
PolicyGranularity = Literal["pixel", "region", "frame"]
Execution = Literal["dense", "sparse"]
ResidualWeights = Literal["separate", "truncated"]
_GRANULARITIES = ("tensor", "channel")
_REFERENCES = ("keyframe", "previous")
_SIGNEDNESS = ("signed", "auto")
_POLICY_GRANULARITIES = ("pixel", "region", "frame")
_EXECUTIONS = ("dense", "sparse")
_RESIDUAL_WEIGHTS = ("separate", "truncated")
#: What a learned frame policy may be shown (:attr:`LearnedFramePolicy.inputs`); the first two
#: are images (the feature extractor's channels), the last a scalar fed to the LSTM.
POLICY_INPUTS = ("frame", "difference", "mean_abs_difference")
_POLICY_IMAGE_INPUTS = ("frame", "difference")

# Bit widths are written without leading zeros ("W08A8" is refused, "W8A{0,4,8}" is fine).
_BITS = r"(?:0|[1-9]\d*)"
_PREC_RE = re.compile(rf"^W({_BITS})A(?:({_BITS})|\{{\s*({_BITS}(?:\s*,\s*{_BITS})*)\s*\}})$",
                      re.IGNORECASE)


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


def check_residual_weights(residual_weights: Any, keyframe: Precision,
                           residual: Precision | None, where: str = "") -> None:
    """Check the ``residual_weights`` option against one keyframe/residual pair.

    ``"truncated"`` (VideoIQ any-precision weights) takes the residual weight from the keyframe's
    integer, so both must be quantized and the residual's bits may not exceed the keyframe's.

    Raises:
        ValueError: An unknown option, or a pair ``"truncated"`` cannot serve.
    """
    check_choice(residual_weights, "residual_weights", _RESIDUAL_WEIGHTS)
    if residual_weights != "truncated" or residual is None:
        return
    key_bits, res_bits = keyframe.weight_bits, residual.weight_bits
    if key_bits is None or res_bits is None or res_bits > key_bits:
        raise ValueError(
            f"residual_weights='truncated' takes the residual weight from the keyframe's integer "
            f"weight: both must be quantized and residual weight bits <= keyframe weight bits; "
            f"got {keyframe}->{residual}{where}"
        )


def _check_policy_inputs(inputs: Any) -> tuple[str, ...]:
    """:attr:`LearnedFramePolicy.inputs` as a tuple of distinct known names, at least one image.

    Raises:
        TypeError: ``inputs`` is not a sequence of strings.
        ValueError: An unknown or repeated name, or no image input.
    """
    expected = f"a non-empty tuple of distinct names from {POLICY_INPUTS}"
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be {expected}, got {type(inputs).__name__} {inputs!r}")
    inputs = tuple(inputs)
    for i, name in enumerate(inputs):
        if not isinstance(name, str):
            raise TypeError(f"inputs[{i}] must be a str, one of {POLICY_INPUTS}, got "
                            f"{type(name).__name__} {name!r}")
        check_choice(name, f"inputs[{i}]", POLICY_INPUTS)
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"inputs must be {expected}, got {inputs!r} (a name repeated)")
    if not any(name in _POLICY_IMAGE_INPUTS for name in inputs):
        raise ValueError(f"inputs must hold at least one image input of {_POLICY_IMAGE_INPUTS} "
                         f"for the feature extractor, got {inputs!r}")
    return inputs


def upgrade_config_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """A :meth:`ResQConfig.to_dict` result of an older readable version in the current layout.

    Version 1 had no ``LearnedFramePolicy.inputs``: its policy saw the frame only, which is not
    the current default, so a version-1 ``LearnedFramePolicy`` entry gets ``inputs=["frame"]``.

    Raises:
        ValueError: A version not in :data:`READABLE_CONFIG_VERSIONS`.
    """
    data = dict(data)
    version = data.get("version")
    if version not in READABLE_CONFIG_VERSIONS:
        raise ValueError(f"data has config version {version!r}; this release reads versions "
                         f"{READABLE_CONFIG_VERSIONS}")
    policy = data.get("policy")
    if (version == 1 and isinstance(policy, Mapping)
            and policy.get("type") == _type_name(LearnedFramePolicy)):
        data["policy"] = {"inputs": ["frame"], **policy}
    data["version"] = CONFIG_VERSION
    return data


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` (the form of every ``implementation`` and ``type``).

    Raises:
        ValueError: If ``spec`` is not of that form, or the module or attribute does not exist.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {err}") from err
    target: Any = module
    try:
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return target


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


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


ActionKind = Literal["precision", "skip", "key"]
_ACTION_WORDS = ("skip", "key")


@dataclass(frozen=True)
class FrameAction:
    """One choice of a family (VideoIQ's action space ``Omega = B u {0}``, DESIGN section 4).

    Attributes:
        kind: ``"precision"`` (run the frame, or its residual, at ``precision``), ``"skip"``
            (reuse the last output: zero cost; VideoIQ's 0 bits) or ``"key"`` (residual families
            only: take a keyframe now).
        precision: The static precision of a ``"precision"`` action, else ``None``.
    """

    kind: ActionKind
    precision: Precision | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ("precision", *_ACTION_WORDS))
        if (self.kind == "precision") != (self.precision is not None):
            raise ValueError(f"FrameAction: a precision is needed exactly for kind='precision', "
                             f"got kind={self.kind!r}, precision={self.precision!r}")
        precision = self.precision
        if precision is not None and (precision.is_float or precision.is_pool
                                      or precision.act_bits == (0,)):
            raise ValueError(
                "a family member must be a quantized static precision such as 'W4A4' (its "
                f"weight is a truncated view of the highest one's), got {precision}"
            )

    @classmethod
    def parse(cls, token: str) -> FrameAction:
        """``"skip"``, ``"key"`` or a static precision (``"W4A4"``)."""
        word = token.strip().lower()
        if word in _ACTION_WORDS:
            return cls(word)  # type: ignore[arg-type]
        return cls("precision", Precision.parse(token))

    def __str__(self) -> str:
        return str(self.precision) if self.precision is not None else self.kind


def _parse_family(text: str) -> tuple[FrameAction, ...]:
    """The members of ``{A,B,...}`` in the written order (the policy's action indices)."""
    body = text.strip()[1:-1]
    if "{" in body or "}" in body:
        raise ValueError(f"a family member cannot be a pool or a family, got {{{body}}}")
    tokens = [t.strip() for t in body.split(",")]
    if not body.strip() or any(not t for t in tokens):
        raise ValueError(f"a family lists its members between braces, e.g. "
                         f"'{{W8A8,W4A4,skip}}'; got {text.strip()!r}")
    actions = tuple(FrameAction.parse(t) for t in tokens)
    names = [str(a).lower() for a in actions]
    if len(set(names)) != len(names):
        raise ValueError(f"a family must not repeat a member, got {text.strip()!r}")
    if not any(a.kind == "precision" for a in actions):
        raise ValueError(f"a family needs at least one precision, got {text.strip()!r}")
    return actions


def _is_family(text: str) -> bool:
    token = text.strip()
    return token.startswith("{") and token.endswith("}")


@dataclass(frozen=True)
class Scheme:
    """Keyframe and residual precisions, or a per-frame family of choices.

    A *frame family* ``{W8A8,W4A4,W2A2,skip}`` (VideoIQ) lets a learned policy run each frame at
    one of the precisions (any-precision weights: one integer at the highest weight bits, the
    others truncated views of it) or skip it; ``keyframe`` is then the highest precision and
    ``residual`` is ``None``. A *residual family* ``W8A8->{W8A4,W4A4,skip,key}`` keeps keyframes
    at ``keyframe`` and lets the policy pick each residual frame's precision, skip it or take a
    keyframe now; ``residual`` is then its highest precision.

    Attributes:
        keyframe: Precision of keyframes (and of every frame under frame quantization).
        residual: Precision of residual frames, or ``None`` for frame quantization.
        family: The family's actions in the written order, or ``()`` for a fixed scheme.
    """

    keyframe: Precision
    residual: Precision | None = None
    family: tuple[FrameAction, ...] = ()

    def __post_init__(self) -> None:
        if self.keyframe.is_pool:
            raise ValueError(
                f"scheme: the keyframe precision cannot be a pool, got {self.keyframe}"
            )
        if self.keyframe.act_bits == (0,):
            raise ValueError("scheme: keyframe activations cannot be 0-bit")
        if self.family:
            self._check_family()

    def _check_family(self) -> None:
        precisions = [a.precision for a in self.family if a.precision is not None]
        side = "frame" if self.residual is None else "residual"
        if side == "frame" and any(a.kind == "key" for a in self.family):
            raise ValueError(f"scheme {self.notation}: 'key' needs residual frames; a frame "
                             "family makes every frame a keyframe (write 'W8A8->{...,key}')")
        if self.keyframe.is_float:
            raise ValueError(f"scheme {self.notation}: a family needs quantized keyframe weights "
                             "(its members truncate them)")
        top = max(precisions, key=lambda p: (p.weight_bits, p.act_bits))
        expected = top if side == "frame" else self.keyframe
        assert expected.weight_bits is not None and self.keyframe.weight_bits is not None
        if side == "frame" and self.keyframe != top:
            raise ValueError(f"scheme: a frame family's keyframe precision is its highest "
                             f"member {top}, got {self.keyframe}")
        if side == "residual" and self.residual != top:
            raise ValueError(f"scheme: a residual family's residual precision is its highest "
                             f"member {top}, got {self.residual}")
        for p in precisions:
            assert p.weight_bits is not None
            if p.weight_bits > self.keyframe.weight_bits:
                raise ValueError(
                    f"scheme {self.notation}: member {p} has more weight bits than the "
                    f"{self.keyframe.weight_bits} it is truncated from"
                )

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``PREC``, ``PREC->PREC``, ``{A,...}`` or ``PREC->{A,...}``.

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
                f"scheme must be 'PREC' or 'PREC->PREC' (e.g. 'W8A8->W4A4'), or a family "
                f"'{{A,B,...}}' or 'PREC->{{A,B,...}}', got {text!r}"
            )
        try:
            if len(parts) == 2 and _is_family(parts[0]):
                raise ValueError("a family can be the whole scheme or its residual side only")
            if _is_family(parts[-1]):
                family = _parse_family(parts[-1])
                top = max((a.precision for a in family if a.precision is not None),
                          key=lambda p: (p.weight_bits, p.act_bits))
                if len(parts) == 1:
                    return cls(top, None, family)
                return cls(Precision.parse(parts[0]), top, family)
            precisions = [Precision.parse(p) for p in parts]
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheme {text!r} is invalid: {err}") from None
        return cls(precisions[0], precisions[1] if len(precisions) == 2 else None)

    @property
    def is_family(self) -> bool:
        """Whether a learned policy picks an action per frame (a family scheme)."""
        return bool(self.family)

    @property
    def family_side(self) -> str | None:
        """``"frame"`` (``{...}``), ``"residual"`` (``PREC->{...}``) or ``None``."""
        if not self.family:
            return None
        return "frame" if self.residual is None else "residual"

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
        """The paper's notation, e.g. ``W8A8->W4A{0,4,8}`` or ``W8A8->{W4A4,skip,key}``."""
        if self.family:
            members = "{" + ",".join(str(a) for a in self.family) + "}"
            return members if self.residual is None else f"{self.keyframe}->{members}"
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
        check_int(self.candidates, "candidates", minimum=2)
        check_int(self.samples, "samples", minimum=1)


@dataclass(frozen=True)
class ErrorBoundPolicy:
    """Dynamic-ResQ policy settings (eq. 9-11); implemented by
    :class:`resq_brevitas.policy.error_bound.ErrorBoundSelector`.

    For every residual "pixel" (spatial position; a token or sample for ``Linear`` layers) the
    policy estimates each pool quantizer's output error with eq. 10 and picks the lowest bit width
    whose next step up would reduce it by less than ``tau`` (eq. 11).

    The operating point is set in one of two ways:

    - ``target_bops``: the BOPs to spend, as a share of what W8A8 frame quantization of the same
      layers costs (``64 * MACs`` per frame; the ``x W8A8`` column of the recipe's table).
      :func:`resq_brevitas.calibrate` solves ``tau`` for it on the calibration clips (the mean
      BOPs per frame, the policy's own work included) and the model keeps the solved ``tau`` in
      its ``state_dict``. E.g. ``ErrorBoundPolicy(target_bops=0.5)``: half of W8A8's BOPs.
    - ``tau`` (when ``target_bops`` is ``None``): eq. 11's threshold itself, in the units of the
      eq. 10 error ``||delta_p - q(delta_p)||_2 * ||q(w)||_F``, which depend on the model's
      activations and weights: the paper's ``3e-4`` is its setting for HRNet, not a portable
      value. Calibration measures the operating point it gives and warns when (almost) every
      residual pixel gets 0 bits.

    Attributes:
        tau: Threshold of eq. 11 (>= 0). ``0`` keeps the highest bits wherever a step up does not
            increase the error; a huge value selects the lowest bits everywhere. Not used when
            ``target_bops`` is set.
        granularity: ``"pixel"`` (one decision per spatial position), ``"region"`` (``k x k``
            blocks of the last two spatial dims, errors summed) or ``"frame"`` (one decision per
            batch row, errors summed over all positions).
        k: Block size of the ``region`` granularity (ignored otherwise).
        target_bops: Mean BOPs per frame as a share of W8A8 frame quantization's (> 0), or
            ``None`` to use ``tau``. Shares the scheme cannot reach (below its keyframes' and the
            policy's cost, above every residual at the highest bits) are clamped with a warning.
    """

    implementation: ClassVar[str] = "resq_brevitas.policy.error_bound:ErrorBoundSelector"

    tau: float = 3e-4
    granularity: PolicyGranularity = "pixel"
    k: int = 4
    target_bops: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", check_real(self.tau, "tau"))
        check_choice(self.granularity, "granularity", _POLICY_GRANULARITIES)
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k must be an int block size, got {type(self.k).__name__} {self.k!r}")
        check_int(self.k, "k", minimum=1)
        if self.target_bops is not None:
            object.__setattr__(self, "target_bops",
                               check_real(self.target_bops, "target_bops", strict=True))

    def __repr__(self) -> str:
        # tau plays no part when target_bops is set: leave it out rather than show the default
        point = (f"tau={self.tau!r}" if self.target_bops is None
                 else f"target_bops={self.target_bops!r}")
        return f"ErrorBoundPolicy({point}, granularity={self.granularity!r}, k={self.k!r})"


@dataclass(frozen=True)
class LearnedFramePolicy:
    """VideoIQ's learned per-frame policy (eq. 3-6) for a family scheme; implemented by
    :class:`resq_brevitas.policy.learned.FramePolicyNetwork` (an ``nn.Module`` the
    :class:`~resq_brevitas.ResQModel` owns as ``qm.frame_policy``: its parameters are in the
    model's ``state_dict``).

    A feature extractor (``len(channels)`` 3x3 stride-2 convs with ReLU on the frame average-
    pooled to ``input_size``, then a global average) feeds an LSTM cell (eq. 3) whose hidden
    state a linear head maps to a distribution over the family's actions (eq. 4). Training
    samples Gumbel-Softmax with straight-through hard samples (eq. 5-6) at the temperature of
    :class:`~resq_brevitas.policy.learned.AnnealedTemperature`; inference takes the argmax.

    ``inputs`` says what the policy is shown of each frame (all at ``input_size``, after the
    average pooling):

    - ``"frame"``: the downsampled frame (the paper's input);
    - ``"difference"``: the downsampled frame minus the stream's previous downsampled frame
      (``in_channels`` more channels for the feature extractor). A frozen frame gives exactly
      0, a scene cut a large difference, so both events are visible in the frame itself rather
      than only through the LSTM's memory. The previous downsampled frame is per-stream state
      next to the LSTM's ``(h, c)``; on a stream's first frame it is zeros (as ``(h, c)`` are),
      so the difference there is the frame itself, as from a black frame;
    - ``"mean_abs_difference"``: the mean of ``|difference|`` over channels and positions, one
      scalar fed to the LSTM next to the pooled features (needs the same state).

    Measured on the segmentation demo (``benchmarks/RESULTS.md`` section 13, one run each, 50-150
    policy steps): with the frame among the inputs (``("frame",)`` on earlier checkpoints, the
    default ``("frame", "difference")`` and all three on the current one) the policy collapsed
    to one action for every frame after the first (all skip, all W8A4 or all key, depending on
    ``w1``); only ``("difference", "mean_abs_difference")`` skipped the frozen frames and keyed
    at the cut (4/4 event clips), by learning "skip unless the scene changes", which also skips
    nearly every frame of ordinary moving clips (0.08x W8A8's BOPs, far below static ResQ's
    quality).
    The default ``("frame", "difference")`` is kept as the general-purpose choice; the
    measurements do not show it is better than ``("frame",)``. A config saved with version 1 of
    :meth:`ResQConfig.to_dict` (before this field) reads back as ``("frame",)``.

    Attributes:
        in_channels: Channels of the frames ``[B, C, H, W]``.
        inputs: What the policy sees (see above): distinct names from
            ``("frame", "difference", "mean_abs_difference")``, at least one of the first two
            (the images the feature extractor convolves), in the order given.
        input_size: Side of the downsampled frame the policy sees (the paper: 84 px).
        channels: Output channels of the feature extractor's convs.
        hidden: LSTM hidden units (the paper: 512).
        temperature: Gumbel-Softmax temperature of training samples (eq. 6); the policy
            trainer anneals it from 5 towards 0.
        seed: Seed of the initial parameters (two models built alike are equal).
    """

    implementation: ClassVar[str] = "resq_brevitas.policy.learned:FramePolicyNetwork"
    #: A per-frame policy: it needs a family scheme (``{...}`` or ``PREC->{...}``).
    per_frame: ClassVar[bool] = True

    in_channels: int = 3
    inputs: tuple[str, ...] = ("frame", "difference")
    input_size: int = 16
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 32
    temperature: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.in_channels, "in_channels", minimum=1)
        object.__setattr__(self, "inputs", _check_policy_inputs(self.inputs))
        check_int(self.input_size, "input_size", minimum=1)
        if (isinstance(self.channels, (str, bytes)) or not isinstance(self.channels, Sequence)
                or not self.channels):
            raise TypeError(f"channels must be a non-empty tuple of ints, got {self.channels!r}")
        for i, c in enumerate(self.channels):
            check_int(c, f"channels[{i}]", minimum=1)
        object.__setattr__(self, "channels", tuple(self.channels))
        check_int(self.hidden, "hidden", minimum=1)
        object.__setattr__(self, "temperature",
                           check_real(self.temperature, "temperature", strict=True))
        check_int(self.seed, "seed", minimum=0)

    @property
    def feature_channels(self) -> int:
        """Input channels of the feature extractor: ``in_channels`` per image input."""
        return self.in_channels * sum(name in _POLICY_IMAGE_INPUTS for name in self.inputs)

    @property
    def scalar_inputs(self) -> int:
        """Scalars fed to the LSTM next to the pooled features."""
        return sum(name not in _POLICY_IMAGE_INPUTS for name in self.inputs)

    @property
    def keeps_previous_frame(self) -> bool:
        """Whether the policy's per-stream state holds the previous downsampled frame."""
        return any(name != "frame" for name in self.inputs)


@dataclass(frozen=True)
class FixedPeriodRefresh:
    """Keyframes every ``period`` frames only (the default; the same as ``refresh=()``)."""

    implementation: ClassVar[str | None] = None


@dataclass(frozen=True)
class ErrorBudgetRefresh:
    """RRM's accumulated-error control (RRM eq. 7-8), per stream; implemented by
    :class:`resq_brevitas.policy.refresh.ErrorBudgetTrigger`.

    Each stream accumulates the l2 norm of the residual entries truncated by ``threshold`` at every
    ResQ layer since its last keyframe (RRM eq. 7). A polynomial without constant term,
    ``H(e) = sum_k c_k e^k`` (RRM eq. 8), maps that sum to a predicted relative output error;
    when the prediction exceeds ``budget`` the stream's next frame is a keyframe.

    Attributes:
        budget: Largest tolerated predicted relative output error (> 0), e.g. ``0.05``.
        degree: Degree of the polynomial fitted by :func:`resq_brevitas.calibrate` (RRM: 4).
        coefficients: ``(c_1, ..., c_d)``; ``None`` to fit them on the calibration clips.
    """

    implementation: ClassVar[str] = "resq_brevitas.policy.refresh:ErrorBudgetTrigger"
    #: Residual frames must truncate something for this policy to see any energy.
    needs_threshold: ClassVar[bool] = True

    budget: float = 0.05
    degree: int = 4
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", check_real(self.budget, "budget", strict=True))
        check_int(self.degree, "degree", minimum=1, maximum=8)
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not isinstance(
                    self.coefficients, Sequence) or not self.coefficients:
                raise TypeError(
                    "coefficients must be a non-empty sequence of numbers (c_1, ..., c_d) or "
                    f"None, got {self.coefficients!r}"
                )
            coeffs = tuple(
                check_real(c, f"coefficients[{i}]", minimum=-float("inf"))
                for i, c in enumerate(self.coefficients)
            )
            object.__setattr__(self, "coefficients", coeffs)


@dataclass(frozen=True)
class SceneCutRefresh:
    """Scene-cut guard: force a keyframe for a stream when, at the first ResQ layer of the frame,
    ``||x - x_ref||^2 > fraction * ||x||^2``; implemented by
    :class:`resq_brevitas.policy.refresh.SceneCutTrigger`.

    Attributes:
        fraction: Share of the frame's energy the residual energy may reach (> 0).
    """

    implementation: ClassVar[str] = "resq_brevitas.policy.refresh:SceneCutTrigger"

    fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", check_real(self.fraction, "fraction", strict=True))


class PolicySettings(Protocol):
    """Settings of a precision policy: a frozen dataclass naming its implementation."""

    implementation: ClassVar[str]


class RefreshSettings(Protocol):
    """Settings of a refresh policy (``implementation`` is ``None`` for the fixed period)."""

    implementation: ClassVar[str | None]


def _is_setting(value: Any) -> bool:
    """A policy or refresh setting: a dataclass instance naming its implementation."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and hasattr(type(value), "implementation"))


@dataclass(frozen=True)
class LayerOverride:
    """A per-layer precision: the layers whose qualified names match ``layers`` use ``scheme``.

    Typical uses: keep the first and last layers at 8 bits
    (``LayerOverride(("stem.*", "head"), "W8A8->W8A8")``), run one layer as frame quantization
    (``"W8A8"``: every frame a keyframe for that layer), or keep it in floating point (``"fp32"``,
    counted at 32 bits in BOPs). The first matching override wins.

    Attributes:
        layers: ``fnmatch`` patterns of qualified module names (one string or a tuple).
        scheme: The layer's scheme, in the notation of :class:`Scheme`.
    """

    layers: tuple[str, ...]
    scheme: Scheme

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, str) else self.layers
        if (not isinstance(layers, (tuple, list)) or not layers
                or not all(isinstance(p, str) and p for p in layers)):
            raise TypeError(
                f"layers must be a name pattern or a non-empty tuple of them, got {self.layers!r}"
            )
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "scheme", Scheme.parse(self.scheme))

    def matches(self, name: str) -> bool:
        """Whether the qualified module name ``name`` matches one of the patterns."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.layers)


@dataclass(frozen=True)
class ResQConfig:
    """Everything :func:`resq_brevitas.convert` needs: typed, frozen and serialisable.

    Attributes:
        scheme: ``"W8A8->W4A4"``-style notation or a :class:`Scheme`.
        period: Keyframe period ``T`` (>= 1). Ignored (treated as 1) for frame quantization. With
            an adaptive ``refresh`` it is the longest run between keyframes.
        weight_granularity: ``"tensor"`` or ``"channel"`` (per output channel) weight scales.
        reference: ``"keyframe"`` (ResQ: residuals against the keyframe) or ``"previous"`` (RRM /
            sigma-delta: the reference advances every frame, ``x_ref <- x_ref + q(delta)``).
        policy: The precision policy of a pool scheme (``W8A8->W8A{0,4,8}``), e.g.
            :class:`ErrorBoundPolicy`; ``None`` for static schemes.
        calibration: Activation range setter settings.
        fold_bn: Fold BatchNorm into the preceding conv where the graph allows it.
        strict: Raise on unsupported weight layers instead of warning.
        threshold: RRM truncation ``eps`` (>= 0): residual entries with ``|delta| <= eps`` are
            zeroed before quantization (``0``: nothing is truncated).
        refresh: Refresh policies (:class:`ErrorBudgetRefresh`, :class:`SceneCutRefresh`,
            :class:`FixedPeriodRefresh`); a keyframe is forced when any fires. ``None`` or one
            policy are accepted and stored as a tuple.
        error_feedback: ``reference="previous"`` only: ``x_ref <- x_ref + q(delta)`` (True, the
            sigma-delta update) or ``x_ref <- x_t`` (False: RRM's Algorithm 1, whose error
            accumulates; an ablation).
        overrides: Per-layer schemes (:class:`LayerOverride`), first match wins.
        act_signedness: ``"signed"``: every activation quantizer is eq. 1's signed one (the
            paper's). ``"auto"``: a keyframe-path activation quantizer whose calibration input
            never goes below zero (e.g. after a ReLU) becomes unsigned, doubling its resolution
            at equal bits and BOPs; residual quantizers stay signed.
        execution: How residual frames run their layers' ops on CPU: ``"dense"`` (the whole
            residual, the default) or ``"sparse"`` (only the output tiles whose receptive field
            holds a non-zero quantized residual; :mod:`resq_brevitas.nn.executors`). Both give the
            same outputs up to float summation order; layers the sparse executor cannot run stay
            dense and are listed in ``qm.dense_fallback_layers``. Traced and exported graphs
            always use the dense op.
        residual_weights: ``"separate"`` (the default): the residual path quantizes the weight
            with its own quantizer (ResQ). ``"truncated"``: VideoIQ's any-precision weights: the
            residual weight is the keyframe's integer weight with its least significant bits
            dropped and its mean re-aligned (:mod:`resq_brevitas.quant.any_precision`), so a
            deployed model stores one integer weight for both paths. Needs quantized weights
            with residual bits <= keyframe bits on every layer with a residual path.
    """

    scheme: Scheme = "W8A8->W4A4"  # type: ignore[assignment]  # parsed in __post_init__
    period: int = 4
    weight_granularity: WeightGranularity = "tensor"
    reference: ReferenceKind = "keyframe"
    policy: PolicySettings | None = None
    calibration: LineSearch = field(default_factory=LineSearch)
    fold_bn: bool = True
    strict: bool = False
    threshold: float = 0.0
    refresh: tuple[RefreshSettings, ...] = ()
    error_feedback: bool = True
    overrides: tuple[LayerOverride, ...] = ()
    act_signedness: Signedness = "signed"
    execution: Execution = "dense"
    residual_weights: ResidualWeights = "separate"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme.parse(self.scheme))
        check_period(self.period)
        check_choice(self.weight_granularity, "weight_granularity", _GRANULARITIES)
        check_choice(self.reference, "reference", _REFERENCES)
        check_choice(self.act_signedness, "act_signedness", _SIGNEDNESS)
        check_choice(self.execution, "execution", _EXECUTIONS)
        if not isinstance(self.calibration, LineSearch):
            raise TypeError(
                "calibration must be a resq_brevitas.LineSearch, "
                f"got {type(self.calibration).__name__}"
            )
        for name in ("fold_bn", "strict", "error_feedback"):
            check_bool(getattr(self, name), name)
        object.__setattr__(self, "threshold", check_real(self.threshold, "threshold"))
        if self.threshold > 0 and self.scheme.is_frame_quantization:
            raise ValueError(
                f"threshold truncates residuals, but scheme {self.scheme} has no residual path; "
                f"got threshold={self.threshold}"
            )
        object.__setattr__(self, "overrides", self._normalized_overrides())
        check_residual_weights(self.residual_weights, self.scheme.keyframe, self.scheme.residual)
        for item in self.overrides:
            check_residual_weights(self.residual_weights, item.scheme.keyframe,
                                   item.scheme.residual, f" (override {item.layers})")
        self._check_policy()
        object.__setattr__(self, "refresh", self._normalized_refresh())
        self._check_family()

    def _normalized_overrides(self) -> tuple[LayerOverride, ...]:
        items = self.overrides
        if isinstance(items, LayerOverride):
            items = (items,)
        if not isinstance(items, (tuple, list)) or not all(
                isinstance(o, LayerOverride) for o in items):
            raise TypeError(
                f"overrides must be a tuple of resq_brevitas.LayerOverride, got {items!r}"
            )
        for item in items:
            if item.scheme.residual is not None and self.scheme.is_frame_quantization:
                raise ValueError(
                    f"override {item.layers} has residual precision {item.scheme.residual}, but "
                    f"scheme {self.scheme} makes every frame a keyframe"
                )
        return tuple(items)

    def _check_family(self) -> None:
        """A family scheme runs with a per-frame policy only, on the ResQ reference."""
        scheme = self.scheme
        if any(o.scheme.is_family for o in self.overrides) or (scheme.is_family
                                                                 and self.overrides):
            raise ValueError("per-layer overrides of family schemes are not supported; got "
                             f"scheme {scheme} with overrides {self.overrides!r}")
        per_frame = getattr(type(self.policy), "per_frame", False)
        if scheme.is_family and not per_frame:
            raise ValueError(f"scheme {scheme} is a family and needs a per-frame policy "
                             f"(resq_brevitas.LearnedFramePolicy), got policy={self.policy!r}")
        if per_frame and not scheme.is_family:
            raise ValueError(f"policy {self.policy!r} picks an action per frame and needs a family "
                             f"scheme ('{{W8A8,W4A4,skip}}' or 'W8A8->{{W4A4,skip,key}}'), got "
                             f"scheme {scheme}")
        if scheme.is_family and (self.reference != "keyframe" or self.threshold > 0
                                 or self.adaptive_refresh):
            raise ValueError(f"family scheme {scheme} runs with reference='keyframe', no "
                             f"threshold and no adaptive refresh (its 'key' action is the learned "
                             f"refresh); got reference={self.reference!r}, threshold="
                             f"{self.threshold}, refresh={self.refresh!r}")

    def _check_policy(self) -> None:
        scheme = self.scheme
        if scheme.is_family or getattr(type(self.policy), "per_frame", False):
            return
        dynamic = scheme.is_dynamic or any(o.scheme.is_dynamic for o in self.overrides)
        if self.policy is not None and not _is_setting(self.policy):
            raise TypeError(
                "policy must be a resq_brevitas.ErrorBoundPolicy (or another policy setting "
                f"naming its implementation) or None, got {type(self.policy).__name__} "
                f"{self.policy!r}"
            )
        if dynamic and self.policy is None:
            raise ValueError(
                f"scheme {scheme} has a pool of residual bit widths and needs a policy "
                "(e.g. ErrorBoundPolicy); got policy=None"
            )
        if self.policy is not None and not dynamic:
            raise ValueError(
                "policy needs a scheme with a pool of residual bit widths "
                f"(e.g. 'W8A8->W8A{{0,4,8}}'), got scheme {scheme} with policy={self.policy!r}"
            )

    def _normalized_refresh(self) -> tuple[Any, ...]:
        refresh = self.refresh
        if refresh is None:
            return ()
        items = tuple(refresh) if isinstance(refresh, (tuple, list)) else (refresh,)
        for item in items:
            if not _is_setting(item):
                raise TypeError(
                    "refresh must be None, a refresh policy (ErrorBudgetRefresh, "
                    "SceneCutRefresh, FixedPeriodRefresh) or a tuple of them, "
                    f"got {type(item).__name__} {item!r}"
                )
        kinds = [type(item) for item in items]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"refresh must not repeat a policy type, got {items!r}")
        adaptive = [item for item in items if type(item).implementation is not None]
        if adaptive and self.scheme.is_frame_quantization:
            raise ValueError(
                f"refresh needs residual frames, but scheme {self.scheme} makes every frame a "
                f"keyframe; got refresh={self.refresh!r}"
            )
        for item in adaptive:
            if getattr(type(item), "needs_threshold", False) and self.threshold <= 0:
                raise ValueError(
                    f"{type(item).__name__} accumulates truncated residual energy and needs "
                    f"threshold > 0, got threshold={self.threshold}"
                )
        return items

    # ------------------------------------------------------------------ derived values
    @property
    def effective_period(self) -> int:
        """The keyframe period actually used (1 under frame quantization)."""
        return 1 if self.scheme.is_frame_quantization else self.period

    @property
    def adaptive_refresh(self) -> tuple[Any, ...]:
        """The refresh policies that can force keyframes (fixed-period entries dropped)."""
        return tuple(r for r in self.refresh if type(r).implementation is not None)

    def scheme_of(self, name: str) -> Scheme:
        """The scheme of the layer called ``name`` (its first matching override, else global)."""
        for override in self.overrides:
            if override.matches(name):
                return override.scheme
        return self.scheme

    @property
    def notation(self) -> str:
        """The paper's notation of the scheme, with the overrides, e.g.
        ``W8A8->W4A4 [stem,head: W8A8->W8A8]``."""
        text = self.scheme.notation
        if self.overrides:
            text += " [" + "; ".join(
                f"{','.join(o.layers)}: {o.scheme.notation}" for o in self.overrides) + "]"
        return text

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with a ``version``; :meth:`from_dict` inverts it."""
        return {"version": CONFIG_VERSION, **{f.name: _encode(getattr(self, f.name))
                                              for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResQConfig:
        """Rebuild a config from :meth:`to_dict`'s output.

        Raises:
            TypeError: If ``data`` is not a mapping.
            ValueError: On a version not in :data:`READABLE_CONFIG_VERSIONS` (older readable
                ones are upgraded by :func:`upgrade_config_data`) or unknown fields.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping from ResQConfig.to_dict, got "
                            f"{type(data).__name__}")
        data = upgrade_config_data(data)
        data.pop("version")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data has unknown ResQConfig fields {unknown}")
        return cls(**{k: _decode(v) for k, v in data.items()})


def _encode(value: Any) -> Any:
    """Settings -> JSON-compatible values (dataclasses carry their ``type``)."""
    if isinstance(value, Scheme):
        return value.notation
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": _type_name(type(value)),
                **{f.name: _encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping) and "type" in value:
        cls = load_object(value["type"])
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{value['type']!r} is not a settings dataclass")
        return cls(**{k: _decode(v) for k, v in value.items() if k != "type"})
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value
