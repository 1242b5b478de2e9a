"""The per-layer keyframe and residual step: the one place where eq. 4-5 is written down.

A ResQ layer processes a frame either as a *keyframe* (eq. 4-5, keyframe path)::

    z_k = q_Phi_a(x_k) * q_Phi_w(w) + b          reference (x_ref, z_ref) <- (x_k, z_k)

or as a *residual frame* against its reference ``(x_ref, z_ref)`` (:func:`residual_step`)::

    delta = x_t - x_ref
    delta <- 0 where |delta| <= eps               RRM truncation (RRM section 3.4), optional
    z_t   = q_Theta_a(delta) * q_Theta_w(w) + z_ref   no bias on the residual path

followed by the reference update of the mode's :class:`ReferenceRule`:

- :class:`KeepReference` (``reference="keyframe"``, ResQ): ``(x_ref, z_ref)`` is kept;
- :class:`AdvanceReference` (``reference="previous"``, RRM / sigma-delta) with error feedback:
  ``x_ref <- x_ref + q(delta)``, ``z_ref <- z_t``, so what the residual path failed to send
  (quantization error, truncated entries) is part of the next frame's residual; without it
  (RRM's Algorithm 1, an ablation): ``x_ref <- x_t``, ``z_ref <- z_t``.

How the residual is quantized and applied is the layer's residual path
(:mod:`resq_brevitas.nn.residual`: static, 0-bit, or a Dynamic-ResQ pool); a path that sends
nothing (0 bits) skips the op, ``z_t = z_ref``. Every user of these semantics calls the functions
here: the runtime (:class:`resq_brevitas.temporal.state.LayerState`), the export step modules and
the unrolled QAT clip (:mod:`resq_brevitas.deploy`), the latter by tracing them with torch.fx. The
functions are pure: they return the new reference instead of storing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from resq_brevitas.nn.residual import Sent

__all__ = [
    "AdvanceReference",
    "KeepReference",
    "Reference",
    "ReferenceRule",
    "ResidualMode",
    "StepResult",
    "keyframe_step",
    "residual_step",
    "split_residual",
]


class Reference(NamedTuple):
    """A layer's reference: input ``x_ref`` and output ``z_ref``."""

    x: Tensor
    z: Tensor


class ReferenceRule(Protocol):
    """How the reference moves after a residual frame."""

    advances: bool

    def advance(self, ref: Reference, x: Tensor, q: Tensor | None, z: Tensor) -> Reference:
        """The next reference, from the old one, the input, what was sent and the output."""


@dataclass(frozen=True)
class KeepReference:
    """ResQ (``reference="keyframe"``): residuals are taken against the keyframe until the next."""

    advances: bool = field(default=False, init=False)

    def advance(self, ref: Reference, x: Tensor, q: Tensor | None, z: Tensor) -> Reference:
        return ref


@dataclass(frozen=True)
class AdvanceReference:
    """RRM / sigma-delta (``reference="previous"``): the reference moves every frame.

    Attributes:
        error_feedback: ``x_ref <- x_ref + q(delta)`` (what was sent) when True; ``x_ref <- x_t``
            (RRM's Algorithm 1, whose truncation error accumulates) when False.
    """

    error_feedback: bool = True
    advances: bool = field(default=True, init=False)

    def advance(self, ref: Reference, x: Tensor, q: Tensor | None, z: Tensor) -> Reference:
        if not self.error_feedback:
            return Reference(x, z)
        return Reference(ref.x if q is None else ref.x + q, z)


def split_residual(delta: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """RRM truncation (RRM section 3.4), both parts.

    Returns:
        ``(kept, truncated)``: ``delta`` with entries ``|delta| <= threshold`` set to 0, and those
        entries alone (zeros elsewhere; RRM eq. 7 accumulates its l2 norm).
    """
    small = delta.abs() <= threshold
    return delta.masked_fill(small, 0.0), delta.masked_fill(~small, 0.0)


@dataclass(frozen=True)
class ResidualMode:
    """How residual frames move the reference and what they truncate (from the config).

    Attributes:
        rule: :class:`KeepReference` or :class:`AdvanceReference`.
        threshold: RRM truncation ``eps``: residual entries with ``|delta| <= eps`` become 0.
    """

    rule: KeepReference | AdvanceReference = field(default_factory=KeepReference)
    threshold: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> ResidualMode:
        """The mode of a :class:`~resq_brevitas.ResQConfig`."""
        rule: KeepReference | AdvanceReference = (
            AdvanceReference(config.error_feedback) if config.reference == "previous"
            else KeepReference())
        return cls(rule, float(config.threshold))

    @property
    def advances(self) -> bool:
        """Whether the reference moves every frame (``reference="previous"``)."""
        return self.rule.advances

    def truncate(self, delta: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(kept, truncated)`` of :func:`split_residual` (``(delta, None)`` if ``eps = 0``)."""
        if self.threshold <= 0:
            return delta, None
        return split_residual(delta, self.threshold)


class StepResult(NamedTuple):
    """Result of :func:`residual_step`.

    Attributes:
        z: The layer output ``z_t``.
        ref: The next reference.
        delta: The residual after truncation (what the residual quantizer receives).
        sent: What the residual path sent (:class:`~resq_brevitas.nn.residual.Sent`).
        truncated: The truncated entries ``u`` of RRM eq. 7 (zeros elsewhere), or ``None``.
    """

    z: Tensor
    ref: Reference
    delta: Tensor
    sent: Sent
    truncated: Tensor | None


class ResidualOp(Protocol):
    """The residual path a step runs: :class:`~resq_brevitas.nn.residual.ResidualPath`."""

    def quantize(self, delta: Tensor) -> Sent:
        """``q_Theta_a(delta)``."""

    def contribution(self, sent: Sent, **kwargs: Any) -> Tensor:
        """``q(delta) * q_Theta_w(w)``, no bias."""


def keyframe_step(layer: Any, x: Tensor, *, private: bool = False, **kwargs: Any
                  ) -> tuple[Tensor, Reference]:
    """The keyframe path, ``z_k = q_Phi_a(x_k) * q_Phi_w(w) + b`` (eq. 4-5), and its reference.

    Args:
        layer: A ResQ layer.
        x: The layer input ``x_k``.
        private: Return a private copy of the reference (the model may later modify ``x`` or the
            output in place, e.g. ``ReLU(inplace=True)``).
        **kwargs: Extra options of the layer's forward (e.g. ``output_size``).

    Returns:
        ``(z, reference)``; without ``private`` the reference is ``(x, z)`` themselves.
    """
    z = layer.keyframe_forward(x, **kwargs)
    return z, (Reference(x.clone(), z.clone()) if private else Reference(x, z))


def _against(a: Tensor, b: Tensor, groups: int | None, op: Any) -> Tensor:
    """``op(a, b)`` row by row, or with ``groups``: each row of ``b`` against the next
    ``groups`` rows of ``a`` (a broadcast instead of a gathered copy of ``b``)."""
    if groups is None:
        return op(a, b)
    return op(a.unflatten(0, (-1, groups)), b.unsqueeze(1)).flatten(0, 1)


def residual_step(path: ResidualOp, x: Tensor, ref: Reference, mode: ResidualMode, *,
                  private: bool = False, groups: int | None = None, **kwargs: Any) -> StepResult:
    """A residual frame, ``z_t = q_Theta_a(x_t - x_ref) * q_Theta_w(w) + z_ref`` (eq. 4-5).

    Args:
        path: The layer's residual path (``layer.residual``).
        x: The layer input ``x_t``.
        ref: The reference ``(x_ref, z_ref)``.
        mode: Reference rule and truncation threshold.
        private: Return references that are neither the output tensor nor an input the model may
            modify in place (clones), as the step graphs need.
        groups: ``ref`` holds one row per ``groups`` consecutive rows of ``x`` (a time-batched
            clip: each keyframe and its residual frames); ``None``: one row per row.
        **kwargs: Extra options of the layer's forward.

    Returns:
        A :class:`StepResult`; with :class:`KeepReference` its ``ref`` is ``ref`` itself.
    """
    delta = _against(x, ref.x, groups, torch.sub)      # eq. 4: the residual against the reference
    delta, truncated = mode.truncate(delta)            # RRM section 3.4 (eps = 0: nothing)
    sent = path.quantize(delta)                        # q_Theta_a(delta): static, pool or 0 bits
    if sent.q is None:                                 # nothing sent, no bias: z_t = z_ref
        z = (ref.z.repeat_interleave(groups, 0) if groups is not None
             else ref.z.clone() if private else ref.z)
    else:                                              # eq. 5: q(delta) * q_Theta_w(w) + z_ref
        z = _against(path.contribution(sent, **kwargs), ref.z, groups, torch.add)
    new_ref = mode.rule.advance(ref, x, sent.q, z)
    if private and mode.advances:
        new_ref = Reference(new_ref.x.clone(), new_ref.z.clone())
    return StepResult(z, new_ref, delta, sent, truncated)
