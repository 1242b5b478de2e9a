"""The keyframe and residual step of one ResQ layer as modules, and the state layout.

:class:`KeyframeStep` and :class:`ResidualStep` wrap :func:`~resq_brevitas.temporal.step.
keyframe_step` / :func:`~resq_brevitas.temporal.step.residual_step` (the one place eq. 4-5 is
written) so that a step graph calls one module per ResQ call site; :class:`~resq_brevitas.deploy.
tracer.ResQTracer` keeps them as leaves and exporters trace through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from resq_brevitas.temporal.step import Reference, ResidualMode, keyframe_step, residual_step

__all__ = ["FamilyFrameStep", "KeyframeStep", "ResidualStep", "StateSpec", "StepGraphs",
           "member_path", "state_specs"]


class KeyframeStep(nn.Module):
    """:func:`keyframe_step` of one ResQ layer as a module: ``x -> (z, x_ref, z_ref)``.

    Args:
        layer: The ResQ layer (registered as the child ``layer``, shared, not copied).
        private: See :func:`keyframe_step`.
    """

    def __init__(self, layer: nn.Module, private: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.private = private

    def forward(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        z, ref = keyframe_step(self.layer, x, private=self.private, **kwargs)
        return z, ref.x, ref.z


class FamilyFrameStep(KeyframeStep):
    """Member ``member`` of a frame family (``{W8A8,W4A4,skip}``) at one ResQ layer as a module:
    ``x -> (z, x, z)``, ``z = q_b(x) * W_b + bias`` (:meth:`~resq_brevitas.nn.family.
    FamilyPaths.frame_forward`; the highest member is the keyframe path itself).

    A subclass of :class:`KeyframeStep`, so tracers that keep keyframe steps as leaves keep
    this one too, and the step graph keeps the keyframe graph's layout.

    Args:
        layer: The ResQ layer (with ``layer.family``; shared, not copied).
        member: The family's action index of the precision to run.
        private: Return private copies of the reference (see :func:`keyframe_step`).
    """

    def __init__(self, layer: nn.Module, member: int, private: bool = False) -> None:
        super().__init__(layer, private)
        self.member = member

    def forward(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        z = self.layer.family.frame_forward(self.layer, self.member, x, **kwargs)
        if self.private:
            return z, x.clone(), z.clone()
        return z, x, z


class ResidualStep(nn.Module):
    """:func:`residual_step` of one ResQ layer as a module:
    ``(x, x_ref, z_ref) -> (z, x_ref', z_ref')``.

    Args:
        layer: The ResQ layer (registered as the child ``layer``, shared, not copied).
        mode: The residual mode.
        private: See :func:`residual_step`.
        member: Residual families (``W8A8->{W8A4,W4A4,skip,key}``): the action index of the
            member whose residual path runs; ``None`` (default): ``layer.residual``.
    """

    def __init__(self, layer: nn.Module, mode: ResidualMode, private: bool = False,
                 member: int | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.mode = mode
        self.private = private
        self.member = member

    def forward(self, x: Tensor, x_ref: Tensor, z_ref: Tensor, **kwargs: Any
                ) -> tuple[Tensor, Tensor, Tensor]:
        res = residual_step(member_path(self.layer, self.member), x, Reference(x_ref, z_ref),
                            self.mode, private=self.private, **kwargs)
        return res.z, res.ref.x, res.ref.z


def member_path(layer: nn.Module, member: int | None) -> nn.Module:
    """The residual path of a residual family's member ``member`` at ``layer``: the layer's own
    ``residual`` for the highest member (or ``member=None``), else the member's path."""
    family = getattr(layer, "family", None)
    if member is None or family is None or member in family.own:
        return layer.residual
    return family.path(member)


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of the step graphs.

    Attributes:
        name: Tensor name used in exported graphs (``"<layer>.x_ref"`` / ``"<layer>.z_ref"``).
        layer: Qualified name of the ResQ layer inside ``qm.model``.
        kind: ``"x_ref"`` (the layer's reference input) or ``"z_ref"`` (its reference output).
    """

    name: str
    layer: str
    kind: str


@dataclass
class StepGraphs:
    """The two step modules of a ResQ model and their shared state layout.

    Attributes:
        keyframe: ``keyframe(x) -> (y, *state)``.
        residual: ``residual(x, *state) -> (y, *state)``; ``None`` under frame quantization.
        state: The state tensors, in graph order.
        layers: Names of the ResQ layers that carry state (two state tensors each).
        source: ``"torch.fx"`` (GraphModules) or ``"eager"`` (modules running the model).
    """

    keyframe: nn.Module
    residual: nn.Module | None
    state: list[StateSpec]
    layers: list[str]
    source: str = "torch.fx"


def state_specs(layers: list[str]) -> list[StateSpec]:
    """The state layout for ``layers``: ``x_ref`` then ``z_ref`` of each layer, in order."""
    specs = []
    for layer in layers:
        specs.append(StateSpec(f"{layer}.x_ref", layer, "x_ref"))
        specs.append(StateSpec(f"{layer}.z_ref", layer, "z_ref"))
    return specs
