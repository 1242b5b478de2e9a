"""The per-layer keyframe and residual step: the one place where eq. 4-5 is written down.

A ResQ layer processes a frame either as a *keyframe* (eq. 4-5, keyframe path)::

    z_k = q_Phi_a(x_k) * q_Phi_w(w) + b          reference (x_ref, z_ref) <- (x_k, z_k)

or as a *residual frame* against its reference ``(x_ref, z_ref)``::

    delta = x_t - x_ref
    delta <- 0 where |delta| <= eps               RRM truncation (RRM section 3.4), optional
    z_t   = q_Theta_a(delta) * q_Theta_w(w) + z_ref   no bias on the residual path

followed by the reference update of :class:`ResidualMode`:

- ``reference="keyframe"`` (ResQ): ``(x_ref, z_ref)`` is kept;
- ``reference="previous"`` (RRM / sigma-delta) with error feedback:
  ``x_ref <- x_ref + q(delta)``, ``z_ref <- z_t``, so what the residual path failed to send
  (quantization error, truncated entries) is part of the next frame's residual; without it
  (RRM's Algorithm 1, an ablation): ``x_ref <- x_t``, ``z_ref <- z_t``.

A 0-bit residual activation quantizer (an active one) sends nothing: the layer's residual op is
skipped and ``z_t = z_ref``. That is the same value (the residual path has no bias), costs
nothing at run time, and keeps Brevitas's zero quantizer (which has no ONNX form) out of exported
graphs. Under :func:`resq_brevitas.quantization_disabled` the residual runs in floating point.

Every user of these semantics calls the functions here: the runtime
(:class:`resq_brevitas.temporal.LayerState`, per batch row, with costs and calibration), the
eager export step modules (:mod:`resq_brevitas.export`) and the FX step graphs
(:mod:`resq_brevitas.fx`, through the leaf modules :class:`KeyframeStep` and
:class:`ResidualStep`). The functions are pure: they return the new reference instead of storing
it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from resq_brevitas.quant.quantizers import ZeroTensorQuant

__all__ = [
    "ResidualMode",
    "StepResult",
    "KeyframeStep",
    "ResidualStep",
    "keyframe_step",
    "residual_step",
    "residual_is_zero",
    "split_residual",
    "truncate_residual",
]

#: Dynamic-ResQ hook: maps the (truncated) residual to its quantized form, e.g. a per-pixel mix
#: of pool quantizers chosen by the error-bound policy (eq. 9-11).
Quantize = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ResidualMode:
    """How the residual step computes each layer (from the ResQ model's configuration).

    Attributes:
        reference: ``"keyframe"`` (the reference is kept) or ``"previous"`` (RRM / sigma-delta:
            ``x_ref <- x_ref + q(delta)`` with error feedback, else ``x_ref <- x_t``;
            ``z_ref <- z_t``).
        error_feedback: The ``previous`` mode's update rule (see above).
        threshold: RRM truncation ``eps``: residual entries with ``|delta| <= eps`` become 0.
        zero: The scheme's residual activations are 0-bit: every residual contribution is zero
            (:func:`residual_step` skips such layers whenever their 0-bit quantizer is active).
    """

    reference: str = "keyframe"
    error_feedback: bool = True
    threshold: float = 0.0
    zero: bool = False

    @classmethod
    def of(cls, qm: Any) -> ResidualMode:
        """The mode of a ResQ model.

        Raises:
            ValueError: For a pool of residual bit widths (Dynamic-ResQ): its per-pixel choice
                is not part of the step graphs.
        """
        residual = qm.scheme.residual
        if residual is not None and residual.is_pool:
            raise ValueError(
                f"step graphs need a static residual precision; scheme {qm.scheme} has a pool "
                "whose bit width the Dynamic-ResQ policy picks per pixel at run time"
            )
        return cls(
            reference=qm.config.reference,
            error_feedback=bool(getattr(qm, "error_feedback", True)),
            threshold=float(getattr(qm.config, "threshold", 0.0) or 0.0),
            zero=residual is not None and residual.act_bits == (0,),
        )

    @property
    def advances(self) -> bool:
        """Whether the reference moves every frame (``reference="previous"``)."""
        return self.reference == "previous"

    @property
    def needs_quantized_residual(self) -> bool:
        """Whether the update needs ``q(delta)`` itself (``previous`` with error feedback)."""
        return self.reference == "previous" and self.error_feedback


class StepResult(NamedTuple):
    """Result of :func:`residual_step`.

    Attributes:
        z: The layer output ``z_t``.
        x_ref: The next input reference.
        z_ref: The next output reference.
        delta: The residual after truncation (what the residual quantizer receives).
        qdelta: ``q(delta)`` when it was computed (error feedback, a ``quantize`` hook), else
            ``None``.
        truncated: The truncated entries ``u`` of RRM eq. 7 (zeros elsewhere), or ``None``
            without truncation.
    """

    z: Tensor
    x_ref: Tensor
    z_ref: Tensor
    delta: Tensor
    qdelta: Tensor | None
    truncated: Tensor | None


def split_residual(delta: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """RRM truncation (RRM section 3.4), both parts.

    Returns:
        ``(kept, truncated)``: ``delta`` with entries ``|delta| <= threshold`` set to 0, and those
        entries alone (zeros elsewhere; RRM eq. 7 accumulates its l2 norm).
    """
    small = delta.abs() <= threshold
    return delta.masked_fill(small, 0.0), delta.masked_fill(~small, 0.0)


def truncate_residual(delta: Tensor, threshold: float) -> Tensor:
    """RRM truncation: entries with ``|delta| <= threshold`` become 0 (the rest pass)."""
    return delta.masked_fill(delta.abs() <= threshold, 0.0)


def residual_is_zero(layer: nn.Module) -> bool:
    """Whether ``layer``'s static residual activation quantizer is 0-bit and active.

    Such a quantizer outputs zeros, so (no bias on the residual path) the residual contributes
    nothing. ``False`` for pool layers and under :func:`resq_brevitas.quantization_disabled`.
    """
    residual = getattr(layer, "residual", None)
    if residual is None or getattr(layer, "residual_pool", None) is not None:
        return False
    quant = getattr(residual, "input_quant", None)
    if quant is None or not getattr(quant, "is_quant_enabled", False):
        return False
    return any(isinstance(m, ZeroTensorQuant) for m in quant.modules())


def keyframe_step(layer: Any, x: Tensor, *, private: bool = False, **kwargs: Any
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The keyframe path, ``z_k = q_Phi_a(x_k) * q_Phi_w(w) + b`` (eq. 4-5), and its reference.

    Args:
        layer: A ResQ layer.
        x: The layer input ``x_k``.
        private: Return private copies of the reference (the model may later modify ``x`` or
            the output in place, e.g. ``ReLU(inplace=True)``).
        **kwargs: Extra options of the layer's forward (e.g. ``output_size``).

    Returns:
        ``(z, x_ref, z_ref)``; without ``private``, ``x_ref is x`` and ``z_ref is z``.
    """
    z = layer.keyframe_forward(x, **kwargs)
    if private:
        return z, x.clone(), z.clone()
    return z, x, z


def residual_step(layer: Any, x: Tensor, x_ref: Tensor, z_ref: Tensor, mode: ResidualMode, *,
                  quantize: Quantize | None = None, qweight: Tensor | None = None,
                  private: bool = False, **kwargs: Any) -> StepResult:
    """A residual frame, ``z_t = q_Theta_a(x_t - x_ref) * q_Theta_w(w) + z_ref`` (eq. 4-5).

    Steps: the residual ``delta = x - x_ref``; RRM truncation (RRM section 3.4) when
    ``mode.threshold > 0``; quantization and the layer's bias-free residual op; ``+ z_ref``; the
    reference update of ``mode`` (error feedback ``x_ref + q(delta)``, see the module docstring).
    A layer whose active residual quantizer is 0-bit (:func:`residual_is_zero`) skips the op:
    ``z = z_ref``.

    Args:
        layer: A ResQ layer with a residual path.
        x: The layer input ``x_t``.
        x_ref: The input reference.
        z_ref: The output reference.
        mode: Reference mode, error feedback and truncation threshold.
        quantize: Optional hook replacing the layer's static residual quantizer (Dynamic-ResQ:
            the error-bound policy's per-pixel pool mix, eq. 9-11); its output is applied with
            :meth:`ResQLayerMixin.residual_apply`.
        qweight: ``q_Theta_w(w)`` if already computed (used with ``quantize``).
        private: Return references that are not the output tensor nor an input the model may
            modify in place (clones), as the step graphs need.
        **kwargs: Extra options of the layer's forward.

    Returns:
        A :class:`StepResult`; in the ``keyframe`` reference mode ``x_ref``/``z_ref`` are the
        given tensors themselves.
    """
    delta = x - x_ref
    truncated = None
    if mode.threshold > 0:
        delta, truncated = split_residual(delta, mode.threshold)
    qdelta = None
    if quantize is not None:
        qdelta = quantize(delta)
        z = layer.residual_apply(qdelta, qweight, **kwargs) + z_ref
    elif residual_is_zero(layer):
        # q(delta) = 0 and there is no bias: nothing to compute. Clone: z_ref is a state
        # tensor too, and the model may modify the output in place.
        z = z_ref.clone() if private else z_ref
    elif mode.needs_quantized_residual:
        qdelta = layer.residual_quantize(delta)
        z = layer.residual_apply(qdelta, **kwargs) + z_ref
    else:
        z = layer.residual_forward(delta, **kwargs) + z_ref
    if not mode.advances:
        return StepResult(z, x_ref, z_ref, delta, qdelta, truncated)
    if not mode.error_feedback:
        new_x_ref = x
    elif qdelta is None:
        new_x_ref = x_ref  # a zero residual adds nothing
    else:
        new_x_ref = x_ref + qdelta
    new_z_ref = z
    if private:
        new_x_ref, new_z_ref = new_x_ref.clone(), new_z_ref.clone()
    return StepResult(z, new_x_ref, new_z_ref, delta, qdelta, truncated)


class KeyframeStep(nn.Module):
    """:func:`keyframe_step` of one ResQ layer as a module: ``x -> (z, x_ref, z_ref)``.

    The keyframe step graph calls one per ResQ layer; :class:`resq_brevitas.fx.ResQTracer` keeps
    it as a leaf.

    Args:
        layer: The ResQ layer (registered as the child ``layer``, shared, not copied).
        private: See :func:`keyframe_step`.
    """

    def __init__(self, layer: nn.Module, private: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.private = private

    def forward(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        return keyframe_step(self.layer, x, private=self.private, **kwargs)


class ResidualStep(nn.Module):
    """:func:`residual_step` of one ResQ layer as a module:
    ``(x, x_ref, z_ref) -> (z, x_ref', z_ref')``.

    The residual step graph calls one per ResQ layer; :class:`resq_brevitas.fx.ResQTracer` keeps
    it as a leaf.

    Args:
        layer: The ResQ layer (registered as the child ``layer``, shared, not copied).
        mode: The residual mode.
        private: See :func:`residual_step`.
    """

    def __init__(self, layer: nn.Module, mode: ResidualMode, private: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.mode = mode
        self.private = private

    def forward(self, x: Tensor, x_ref: Tensor, z_ref: Tensor, **kwargs: Any
                ) -> tuple[Tensor, Tensor, Tensor]:
        res = residual_step(self.layer, x, x_ref, z_ref, self.mode, private=self.private,
                            **kwargs)
        return res.z, res.x_ref, res.z_ref
