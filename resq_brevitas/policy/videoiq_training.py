"""VideoIQ's two training stages for a family-scheme :class:`~resq_brevitas.ResQModel`.

1. :func:`train_any_precision` (eq. 9): the backbone is trained jointly on every precision of
   the family, the losses of all precisions summed each step, with distillation from the float
   model (eq. 8) and an optional user loss for labels (eq. 7). Truncated weights pass a
   straight-through gradient into the one shared float weight; each member's activation range
   (its own Brevitas ``ParameterScaling``) is learned, like the paper's per-bit-width clip.
2. :func:`train_policy` (eq. 13): the backbone frozen, the policy network is trained with
   straight-through Gumbel-Softmax samples at an annealed temperature
   (:class:`~resq_brevitas.policy.learned.AnnealedTemperature`) on
   ``L_kd (+ user loss) + w1 L_e + w2 L_b + w3 L_d``.

Both take clips ``[B, T, C, H, W]`` and a float ``teacher`` run frame by frame, and return their
history (one dict per step). They work on the model object alone (no import of the temporal
package): ``qm(video)`` runs the clip through the model's per-frame action executor. They do not
build on :func:`resq_brevitas.train_qat` yet (it was written in parallel); the paper's separate
BatchNorm per precision is not reproduced (BatchNorm is folded before conversion).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from resq_brevitas.policy.learned import (
    AnnealedTemperature,
    balance_loss_eq11,
    efficiency_loss_eq10,
    entropy_loss_eq12,
    policy_loss_eq13,
)

__all__ = [
    "any_precision_loss_eq9",
    "distillation_loss_eq8",
    "teacher_outputs",
    "train_any_precision",
    "train_policy",
]

#: ``loss_fn(student [B, T, ...], clip index) -> Tensor``: a user loss (labels), added to eq. 8.
LossFn = Callable[[Tensor, int], Tensor]


def distillation_loss_eq8(student: Tensor, teacher: Tensor, class_dim: int = 2) -> Tensor:
    """VideoIQ eq. 8: ``KL(y_t || y_A)`` between the softmaxes over ``class_dim`` (mean over
    every other position: frames, pixels, clips)."""
    log_student = F.log_softmax(student, class_dim)
    log_teacher = F.log_softmax(teacher, class_dim)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(class_dim)
    return kl.mean()


def teacher_outputs(teacher: nn.Module, video: Tensor) -> Tensor:
    """The float model's outputs ``[B, T, ...]`` of a clip, frame by frame (no gradient)."""
    with torch.no_grad():
        out = teacher(video.flatten(0, 1))
    if not isinstance(out, Tensor):
        raise TypeError(f"teacher must return a Tensor, got {type(out).__name__}")
    return out.unflatten(0, video.shape[:2])


def _precision_actions(qm: Any) -> list[int]:
    return [i for i, a in enumerate(qm.config.scheme.family) if a.kind == "precision"]


def _check_family_model(qm: Any) -> None:
    if getattr(qm, "frame_policy", None) is None:
        raise TypeError("qm must be a ResQModel converted with a family scheme and a "
                        f"LearnedFramePolicy, got {type(qm).__name__}")


def any_precision_loss_eq9(qm: Any, video: Tensor, teacher: Tensor,
                           loss_fn: Callable[[Tensor], Tensor] | None = None,
                           class_dim: int = 2) -> Tensor:
    """VideoIQ eq. 9: the sum over the family's precisions ``b`` of ``L_kd(V | b^T)`` (plus
    ``loss_fn``, e.g. eq. 7's cross-entropy), each precision run on every frame.

    Args:
        qm: A family-scheme ResQModel.
        video: ``[B, T, C, H, W]``.
        teacher: The float model's outputs of ``video`` (:func:`teacher_outputs`).
        loss_fn: Optional extra loss of the student's outputs.
        class_dim: The class dim of the outputs ``[B, T, C, ...]``.
    """
    _check_family_model(qm)
    total = video.new_zeros(())
    for action in _precision_actions(qm):
        with qm.frame_policy.forced(action):
            out = qm(video)
        total = total + distillation_loss_eq8(out, teacher, class_dim)
        if loss_fn is not None:
            total = total + loss_fn(out)
    return total


def _cycle(clips: Sequence[Tensor], steps: int) -> Iterable[tuple[int, Tensor]]:
    if not clips:
        raise ValueError("clips must hold at least one clip [B, T, C, H, W], got none")
    for step in range(steps):
        yield step, clips[step % len(clips)]


def _check_steps(steps: Any, lr: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")


def train_any_precision(qm: Any, clips: Sequence[Tensor], teacher: nn.Module, steps: int = 100,
                        lr: float = 1e-4, loss_fn: LossFn | None = None, class_dim: int = 2,
                        progress: bool = True) -> list[dict[str, float]]:
    """Stage 1 (eq. 9): joint training of the backbone on every precision of the family.

    Args:
        qm: A calibrated family-scheme ResQModel (trained in place; the policy is not touched).
        clips: Training clips ``[B, T, C, H, W]``, cycled.
        teacher: The float model (eval mode).
        steps: Optimizer steps.
        lr: Adam learning rate.
        loss_fn: Optional ``loss_fn(outputs, clip_index)`` for labels, per precision.
        class_dim: The class dim of the outputs ``[B, T, C, ...]`` for eq. 8.
        progress: Show a tqdm bar.

    Returns:
        One ``{"step", "loss"}`` dict per step.
    """
    _check_family_model(qm)
    _check_steps(steps, lr)
    policy_ids = {id(p) for p in qm.frame_policy.parameters()}
    params = [p for p in qm.parameters() if id(p) not in policy_ids and p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    qm.train()
    bar = tqdm(_cycle(clips, steps), total=steps, disable=not progress, desc="any-precision")
    for step, video in bar:
        index = step % len(clips)
        extra = ((lambda out, i=index: loss_fn(out, i)) if loss_fn is not None  # type: ignore
                 else None)
        loss = any_precision_loss_eq9(qm, video, teacher_outputs(teacher, video), extra,
                                      class_dim)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    qm.eval()
    return history


def train_policy(qm: Any, clips: Sequence[Tensor], teacher: nn.Module, steps: int = 100,
                 lr: float = 1e-3, schedule: AnnealedTemperature | None = None,
                 w_efficiency: float = 1.0, w_balance: float = 0.1, w_entropy: float = 0.01,
                 loss_fn: LossFn | None = None, class_dim: int = 2,
                 progress: bool = True) -> list[dict[str, float]]:
    """Stage 2 (eq. 13): train the policy network with the backbone frozen.

    Action costs for eq. 10 are the BOPs per frame of each action measured in the step
    (``qm.last_policy.action_bops``) divided by the most expensive one's, so ``w_efficiency``
    weighs "one frame at the highest precision" against the distillation loss. The paper does
    not print its ``w1, w2, w3``; the defaults here are this project's.

    Args:
        qm: A family-scheme ResQModel (its policy is trained in place; nothing else changes).
        clips: Training clips ``[B, T, C, H, W]``, cycled.
        teacher: The float model (eval mode).
        steps: Optimizer steps.
        lr: Adam learning rate.
        schedule: Gumbel-Softmax temperature per step (default: 5 annealed to 0.05 over
            ``steps``).
        w_efficiency: ``w1`` (eq. 10's weight).
        w_balance: ``w2`` (eq. 11's).
        w_entropy: ``w3`` (eq. 12's).
        loss_fn: Optional ``loss_fn(outputs, clip_index)`` for labels.
        class_dim: The class dim of the outputs for eq. 8.
        progress: Show a tqdm bar.

    Returns:
        One dict per step: ``step``, ``loss``, ``task``, ``efficiency``, ``balance``,
        ``entropy``, ``temperature`` and ``mean_bops`` (per frame, the policy's included).
    """
    _check_family_model(qm)
    _check_steps(steps, lr)
    schedule = schedule if schedule is not None else AnnealedTemperature(steps=steps)
    policy = qm.frame_policy
    frozen = [p for p in qm.parameters() if p.requires_grad
              and id(p) not in {id(q) for q in policy.parameters()}]
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    history = []
    qm.eval()  # the backbone's quantizers and layers as at inference
    policy.train()
    for p in frozen:
        p.requires_grad_(False)
    try:
        bar = tqdm(_cycle(clips, steps), total=steps, disable=not progress, desc="policy")
        for step, video in bar:
            policy.temperature = schedule(step)
            out = qm(video)
            task = distillation_loss_eq8(out, teacher_outputs(teacher, video), class_dim)
            if loss_fn is not None:
                task = task + loss_fn(out, step % len(clips))
            record = qm.last_policy
            costs = torch.nan_to_num(record.action_bops, nan=0.0)
            costs = (costs / costs.max().clamp_min(1.0)).to(out.dtype)
            efficiency = efficiency_loss_eq10(record.samples, costs)
            balance = balance_loss_eq11(record.samples)
            entropy = entropy_loss_eq12(record.logits)
            loss = policy_loss_eq13(task, efficiency, balance, entropy, w_efficiency,
                                    w_balance, w_entropy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            terms = {"loss": loss, "task": task, "efficiency": efficiency, "balance": balance,
                     "entropy": entropy}
            history.append({"step": step, **{k: float(v.detach()) for k, v in terms.items()},
                            "temperature": policy.temperature,
                            "mean_bops": qm.last_cost.mean_bops})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}",
                            bops=f"{qm.last_cost.mean_bops:.3g}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        policy.eval()
    return history
