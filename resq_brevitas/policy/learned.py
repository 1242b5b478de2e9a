"""VideoIQ's learned per-frame policy network (eq. 3-6) and its loss terms (eq. 10-13).

:class:`FramePolicyNetwork` is the ``nn.Module`` behind :class:`resq_brevitas.LearnedFramePolicy`
settings: a small feature extractor on a downsampled frame, an LSTM cell over time (eq. 3) and a
linear head to a distribution over the family's actions (eq. 4); :class:`PolicyInputs` builds
what the feature extractor and the LSTM see of each frame (the frame, its difference to the
stream's previous frame, the mean absolute difference). In training it samples
Gumbel-Softmax (eq. 5-6) with a straight-through hard one-hot; in eval it takes the argmax.
:class:`AnnealedTemperature` is the temperature schedule (5 annealed towards 0, as the paper
does); :func:`efficiency_loss_eq10`, :func:`balance_loss_eq11`, :func:`entropy_loss_eq12` and
:func:`policy_loss_eq13` are the loss terms, one equation each.

The network is deliberately small (the paper's MobileNetV2 + 512-unit LSTM would cost more than
the demo backbones): its own cost, :meth:`FramePolicyNetwork.bops`, is counted in BOPs like the
backbone's and reported in ``last_cost.per_frame_policy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resq_brevitas.config import FP32_BITS, FrameAction

__all__ = [
    "AnnealedTemperature",
    "FramePolicyNetwork",
    "PolicyInputs",
    "PolicyState",
    "balance_loss_eq11",
    "efficiency_loss_eq10",
    "entropy_loss_eq12",
    "gumbel_softmax_eq6",
    "policy_loss_eq13",
]

#: A stream's policy state: the LSTM's ``(h, c)``, then the previous downsampled frame when the
#: inputs need it (``(h, c, previous)``). Zeros are a fresh stream in every entry.
PolicyState = tuple[Tensor, ...]


# Each input from (downsampled frame, difference to the previous one); module-level functions,
# not lambdas, so a model holding them pickles.
def _frame_input(small: Tensor, difference: Tensor) -> Tensor:
    return small


def _difference_input(small: Tensor, difference: Tensor) -> Tensor:
    return difference


def _mean_abs_difference_input(small: Tensor, difference: Tensor) -> Tensor:
    return difference.abs().mean(dim=(1, 2, 3)).unsqueeze(1)


#: Image inputs (``-> [B, C, s, s]``) and scalar inputs to the LSTM (``-> [B, 1]``) by the names
#: of ``LearnedFramePolicy.inputs``.
_IMAGE_INPUTS: MappingProxyType[str, Callable[[Tensor, Tensor], Tensor]] = MappingProxyType({
    "frame": _frame_input, "difference": _difference_input})
_SCALAR_INPUTS: MappingProxyType[str, Callable[[Tensor, Tensor], Tensor]] = MappingProxyType({
    "mean_abs_difference": _mean_abs_difference_input})


def gumbel_softmax_eq6(logits: Tensor, temperature: float, hard: bool = True,
                       generator: torch.Generator | None = None) -> Tensor:
    """VideoIQ eq. 5-6: Gumbel-Softmax over the last dim, straight-through hard by default.

    ``p(j) = softmax((log pi(j) + G(j)) / tau)`` with ``G = -log(-log U)``, ``U ~ Unif(0, 1)``;
    the hard sample is ``one_hot(argmax(log pi + G))`` (eq. 5) in the forward pass with the
    gradient of ``p`` (straight-through).

    Args:
        logits: ``[..., |Omega|]`` unnormalised ``log pi`` (a constant shift does not matter).
        temperature: ``tau > 0``.
        hard: Return the straight-through one-hot (True) or the soft ``p``.
        generator: Optional generator for the uniform noise.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    exponential = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)  # -log U > 0
    gumbel = -torch.log(exponential)
    scores = F.log_softmax(logits, -1) + gumbel
    soft = F.softmax(scores / temperature, -1)
    if not hard:
        return soft
    one_hot = F.one_hot(scores.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


@dataclass(frozen=True)
class AnnealedTemperature:
    """Gumbel-Softmax temperature, annealed exponentially from ``start`` to ``end`` over
    ``steps`` (VideoIQ: "tau = 5 as the initial value and gradually anneal it down to 0"; a
    strictly positive ``end`` stands for 0, where eq. 6 is undefined).

    Attributes:
        start: Initial temperature (5).
        end: Final temperature (> 0, reached at ``steps`` and kept after).
        steps: Training steps of the anneal.
    """

    start: float = 5.0
    end: float = 0.05
    steps: int = 1000

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0 and self.end <= self.start):
            raise ValueError(f"temperatures must satisfy 0 < end <= start, got start="
                             f"{self.start}, end={self.end}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        """The temperature at training step ``step`` (0-based)."""
        fraction = min(max(step, 0), self.steps) / self.steps
        return self.start * (self.end / self.start) ** fraction


def efficiency_loss_eq10(samples: Tensor, action_costs: Tensor) -> Tensor:
    """VideoIQ eq. 10: ``L_e = sum_i FLOP(a_i)``, the cost of the chosen actions summed over the
    ``T`` frames (mean over clips), differentiable through the straight-through samples.

    Args:
        samples: ``[B, T, |Omega|]`` (hard) samples.
        action_costs: ``[|Omega|]`` cost of each action (e.g. BOPs per frame relative to the
            highest precision; skip costs 0).
    """
    return (samples * action_costs.to(samples)).sum(-1).sum(-1).mean()


def balance_loss_eq11(samples: Tensor) -> Tensor:
    """VideoIQ eq. 11, balanced policy usage: ``sum_k (E[1/T sum_i 1(a_i = k)] - 1/|Omega|)^2``.

    The paper prints the deviation without a square, which sums to 0 for any policy (usages sum
    to 1); the square is what makes it a penalty on unbalanced usage.

    Args:
        samples: ``[B, T, |Omega|]`` (hard) samples.
    """
    usage = samples.mean(dim=(0, 1))
    return ((usage - 1.0 / samples.shape[-1]) ** 2).sum()


def entropy_loss_eq12(logits: Tensor) -> Tensor:
    """VideoIQ eq. 12: ``L_d = sum_i H(pi_i)``, the entropy of each frame's distribution summed
    over the ``T`` frames (mean over clips).

    Args:
        logits: ``[B, T, |Omega|]``.
    """
    log_p = F.log_softmax(logits, -1)
    return -(log_p.exp() * log_p).sum(-1).sum(-1).mean()


def policy_loss_eq13(task_loss: Tensor, efficiency: Tensor, balance: Tensor, entropy: Tensor,
                     w_efficiency: float, w_balance: float, w_entropy: float) -> Tensor:
    """VideoIQ eq. 13: ``L_g = L_ce + L_kd + w1 L_e + w2 L_b + w3 L_d`` (``task_loss`` is
    ``L_ce + L_kd``, or the distillation term alone without labels)."""
    return task_loss + w_efficiency * efficiency + w_balance * balance + w_entropy * entropy


class PolicyInputs:
    """What the policy sees of one frame, from ``LearnedFramePolicy.inputs`` (chosen once).

    Every input is computed from the frame downsampled to ``input_size`` and its difference to
    the stream's previous downsampled frame (zeros before a stream's first frame, so the
    difference there is the frame itself). Image inputs are concatenated on the channel dim in
    the order of ``inputs`` (the feature extractor's input); scalar inputs likewise (fed to the
    LSTM next to the pooled features).

    Args:
        settings: A :class:`resq_brevitas.LearnedFramePolicy` (its ``inputs`` validated there).
    """

    def __init__(self, settings: Any) -> None:
        names = settings.inputs
        self.images = [_IMAGE_INPUTS[n] for n in names if n in _IMAGE_INPUTS]
        self.scalars = [_SCALAR_INPUTS[n] for n in names if n in _SCALAR_INPUTS]
        #: Whether the state carries the previous downsampled frame.
        self.keeps_previous = bool(settings.keeps_previous_frame)

    def __call__(self, small: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(image [B, k C, s, s], scalars [B, m] or None)`` of a downsampled frame.

        Args:
            small: The downsampled frame ``[B, C, s, s]``.
            previous: The stream's previous downsampled frame (``None``: a fresh stream, zeros).
        """
        difference = small - previous if previous is not None else small
        image = torch.cat([f(small, difference) for f in self.images], 1)
        scalars = (torch.cat([f(small, difference) for f in self.scalars], 1)
                   if self.scalars else None)
        return image, scalars


class FramePolicyNetwork(nn.Module):
    """The policy ``g``: features of a downsampled frame -> LSTM (eq. 3) -> head (eq. 4).

    Args:
        settings: A :class:`resq_brevitas.LearnedFramePolicy`.
        actions: The family's actions (the head's outputs, in this order).
    """

    def __init__(self, settings: Any, actions: tuple[FrameAction, ...] = ()) -> None:
        super().__init__()
        if not actions:
            raise ValueError("FramePolicyNetwork needs the family's actions, got none")
        self.settings = settings
        self.actions = tuple(actions)
        # A deterministic init from the settings' seed; the CPU RNG is forked, so the caller's
        # random stream is untouched.
        self.inputs = PolicyInputs(settings)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(settings.seed)
            layers: list[nn.Module] = []
            channels = settings.feature_channels
            for out in settings.channels:
                layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU()]
                channels = out
            self.features = nn.Sequential(*layers)
            self.lstm = nn.LSTMCell(channels + settings.scalar_inputs, settings.hidden)
            self.head = nn.Linear(settings.hidden, len(self.actions))
        self.temperature = float(settings.temperature)
        #: An action every row takes whatever the frame (:meth:`forced`), else ``None``.
        self.forced_action: int | None = None

    @property
    def num_actions(self) -> int:
        """``|Omega|``."""
        return len(self.actions)

    def downsample(self, frame: Tensor) -> Tensor:
        """The frame average-pooled to ``input_size x input_size`` (the policy's input)."""
        if frame.dim() != 4 or frame.shape[1] != self.settings.in_channels:
            raise ValueError(
                f"the frame policy takes frames [B, {self.settings.in_channels}, H, W], got "
                f"shape {tuple(frame.shape)}"
            )
        return F.adaptive_avg_pool2d(frame, self.settings.input_size)

    def forward(self, frame: Tensor, state: PolicyState | None = None
                ) -> tuple[Tensor, PolicyState]:
        """Eq. 3-4 for one frame of every stream.

        Args:
            frame: ``[B, C, H, W]``.
            state: The stream state of :data:`PolicyState` (``None``: a fresh stream; zeros in
                every entry are one too).

        Returns:
            ``(logits [B, |Omega|], state)``; ``softmax(logits)`` is eq. 4's ``pi``.
        """
        small = self.downsample(frame)
        lstm_state = None if state is None else (state[0], state[1])
        previous = state[2] if state is not None and self.inputs.keeps_previous else None
        image, scalars = self.inputs(small, previous)
        feat = self.features(image).mean(dim=(2, 3))
        if scalars is not None:
            feat = torch.cat([feat, scalars], 1)
        h, c = self.lstm(feat, lstm_state)
        return self.head(h), ((h, c, small) if self.inputs.keeps_previous else (h, c))

    def initial_state(self, frame: Tensor) -> PolicyState:
        """The state of fresh streams for frames like ``frame`` ``[B, C, H, W]``: zeros (what
        ``forward(frame, None)`` assumes), e.g. the explicit state inputs of an export."""
        hidden = frame.new_zeros(frame.shape[0], self.settings.hidden)
        size = self.settings.input_size
        previous = (frame.new_zeros(frame.shape[0], self.settings.in_channels, size, size),)
        return (hidden, hidden.clone(), *(previous if self.inputs.keeps_previous else ()))

    def sample(self, logits: Tensor, allowed: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """One-hot actions ``[B, |Omega|]``: straight-through Gumbel-Softmax (eq. 5-6) in
        training, the argmax of ``pi`` in eval.

        Args:
            logits: ``[B, |Omega|]``.
            allowed: Bool ``[B, |Omega|]``: actions each row may take (e.g. no ``skip`` before
                a stream's first output); ``None``: all.
            generator: Optional generator for the Gumbel noise.
        """
        if self.forced_action is not None:
            forced = F.one_hot(torch.full(logits.shape[:-1], self.forced_action,
                                          device=logits.device), logits.shape[-1])
            return forced.to(logits.dtype)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -1e9)
        if self.training:
            return gumbel_softmax_eq6(logits, self.temperature, hard=True, generator=generator)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    @contextmanager
    def forced(self, action: int) -> Iterator[None]:
        """Within the block every row takes ``action`` (a constant one-hot: no gradient to the
        policy), e.g. to run one precision of the family for eq. 9's joint training; a stream's
        first frame may still not skip (the executor runs the highest member instead).

        Raises:
            ValueError: ``action`` is not an index of the family.
        """
        if isinstance(action, bool) or not isinstance(action, int) or not (
                0 <= action < self.num_actions):
            raise ValueError(f"action must be an index into the {self.num_actions} actions, "
                             f"got {action!r}")
        previous, self.forced_action = self.forced_action, action
        try:
            yield
        finally:
            self.forced_action = previous

    def macs(self, frame_shape: tuple[int, ...]) -> int:
        """MACs of one frame of one stream: the convs (``out elements * C_in * 9``, the first
        one's ``C_in`` being ``in_channels`` per image input), the LSTM cell
        (``4 * hidden * (features + scalar inputs + hidden)``) and the head
        (``hidden * |Omega|``); the downsampling, the difference and the other element-wise work
        are not counted, as for the backbone."""
        size = self.settings.input_size
        total, channels = 0, self.settings.feature_channels
        for out in self.settings.channels:
            size = math.floor((size + 2 - 3) / 2) + 1
            total += size * size * out * channels * 9
            channels = out
        hidden = self.settings.hidden
        lstm_inputs = channels + self.settings.scalar_inputs
        return total + 4 * hidden * (lstm_inputs + hidden) + hidden * self.num_actions

    def bops(self, frame_shape: tuple[int, ...]) -> int:
        """BOPs of one frame of one stream: :meth:`macs` at fp32 (``32 * 32`` per MAC)."""
        return self.macs(frame_shape) * FP32_BITS * FP32_BITS

    def extra_repr(self) -> str:
        return (f"inputs={self.settings.inputs}, "
                f"actions=[{', '.join(str(a) for a in self.actions)}]")
