"""What policies plug into, and the one function that maps settings to their implementation.

Two kinds of policy, each a protocol an object implements (no base class to inherit, no
registry):

- a precision policy picks residual bit widths (:class:`resq_brevitas.nn.residual.
  PrecisionPolicy`: ``select`` and ``cost``), e.g. :class:`~resq_brevitas.policy.error_bound.
  ErrorBoundSelector`;
- a refresh trigger forces keyframes (:class:`RefreshTrigger`): ``before_frame`` (from the
  stream's state), ``at_first_layer`` (from the first ResQ layer's input and reference), and an
  optional ``fit`` on calibration frames.

Settings are frozen dataclasses in :mod:`resq_brevitas.config` (or the user's own module) whose
class attribute ``implementation`` names the implementing class as ``"package.module:Class"``;
:func:`build_policy` and :func:`build_refresh` import it and build it from the settings. A new
policy therefore touches no file of this package.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from resq_brevitas.config import load_object
from resq_brevitas.nn.residual import PrecisionPolicy

__all__ = ["PrecisionPolicy", "RefreshTrigger", "StreamStatus", "build_policy", "build_refresh"]


class StreamStatus(NamedTuple):
    """What a refresh trigger may read before a frame, per stream (batch row).

    Attributes:
        phase: Long ``[B]``: frames since each stream's last keyframe, including it (0: none).
        scheduled: Bool ``[B]``: rows the fixed schedule makes keyframes now.
        energy: Float64 ``[B]``: truncated energy accumulated since the last keyframe (RRM eq. 7),
            or ``None`` before the first frame.
    """

    phase: Tensor
    scheduled: Tensor
    energy: Tensor | None


@runtime_checkable
class RefreshTrigger(Protocol):
    """A refresh policy's behaviour. Implement ``before_frame`` and/or ``at_first_layer``.

    ``before_frame(stream: StreamStatus) -> Tensor | None`` returns bool ``[B]`` rows to refresh
    (or ``None``); ``at_first_layer(x, x_ref) -> Tensor`` returns bool ``[R]`` over the residual
    rows it is shown; ``fit(qm, frames, samples, progress)`` with a ``needs_fit`` property is
    called by calibration. Triggers are ``nn.Module``s owned by the model, so fitted state goes
    into its ``state_dict``.
    """


def build_policy(settings: Any) -> PrecisionPolicy:
    """The precision policy that ``settings`` names (``type(settings).implementation``).

    Raises:
        TypeError: If the settings name no implementation or it lacks ``select``/``cost``.
    """
    policy = _build(settings, "policy")
    if not isinstance(policy, PrecisionPolicy):
        raise TypeError(
            f"{type(policy).__name__} (the implementation of {type(settings).__name__}) must "
            "define select(delta, quantized, weight_norm, channel_dim) and cost(...)"
        )
    return policy


def build_refresh(settings: Any) -> Any | None:
    """The refresh trigger that ``settings`` names, or ``None`` (fixed period: no trigger).

    Raises:
        TypeError: If the implementation has neither ``before_frame`` nor ``at_first_layer``.
    """
    if getattr(type(settings), "implementation", None) is None:
        return None
    trigger = _build(settings, "refresh")
    if not (hasattr(trigger, "before_frame") or hasattr(trigger, "at_first_layer")):
        raise TypeError(
            f"{type(trigger).__name__} (the implementation of {type(settings).__name__}) must "
            "define before_frame(stream) and/or at_first_layer(x, x_ref)"
        )
    return trigger


def _build(settings: Any, what: str) -> Any:
    spec = getattr(type(settings), "implementation", None)
    if not isinstance(spec, str):
        raise TypeError(
            f"{what} settings must name their implementation in a class attribute "
            f"'implementation' ('package.module:Class'), got {type(settings).__name__}"
        )
    return load_object(spec)(settings)
