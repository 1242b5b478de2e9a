"""``train_qat``: quantization-aware training of a ResQ model through time.

The paper's section 5: QAT starts from the PTQ ranges (:func:`resq_brevitas.calibrate`) and
propagates gradients through eq. 1's rounding with the straight-through estimator (Brevitas's
fake quantizers); the activation thresholds are learnt with the weights (LSQ-style, with their
own learning rate), in the log domain so that they stay positive.

One call covers the common case, label-free distillation of the float model::

    resq.calibrate(qm, clips)
    history = resq.train_qat(qm, clips, steps=200, lr=1e-4)

and the pieces are reusable on their own (a loop of your own, another method's training):
:func:`build_optimizer` (weight and quantizer groups), :func:`cosine_schedule`,
:class:`FloatTeacher`, :func:`distillation_loss`, :func:`clip_stream` (a
``DistributedSampler``-style endless split of the clips over ranks), :func:`average_gradients`
and :func:`qat_step` (one optimisation step over a clip, in chunks of frames when asked).

Under ``torch.distributed`` (``torchrun --nproc_per_node N``, gloo or nccl) every rank trains on
its share of the clips, gradients are averaged across ranks after each backward (one flattened
all-reduce) and the parameters start from rank 0's, so every rank holds the same model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from resq_brevitas.calibrate import _as_batched_clip
from resq_brevitas.checks import check_choice
from resq_brevitas.quant.control import quantization_disabled
from resq_brevitas.quant.line_search import distributed_initialized
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "FloatTeacher",
    "QATHistory",
    "average_gradients",
    "broadcast_parameters",
    "build_optimizer",
    "clip_stream",
    "cosine_schedule",
    "distillation_loss",
    "qat_step",
    "train_qat",
]

#: ``loss_fn(outputs, batch) -> scalar``: ``outputs`` as ``qm(video)`` returns them
#: (``[B, T, ...]``), ``batch`` the item of ``clips`` (a clip or a ``(clip, labels)`` pair).
LossFn = Callable[[Any, Any], Tensor]
#: ``checkpoint(step, qm, history)``: called every ``checkpoint_every`` steps and at the end.
CheckpointFn = Callable[[int, ResQModel, "QATHistory"], None]


@dataclass
class QATHistory:
    """What :func:`train_qat` did, one entry per step.

    Attributes:
        loss: The step's loss (this rank's; under torch.distributed each rank has its own clips).
        lr: The weight learning rate used at the step.
        scale_lr: The quantizer learning rate used at the step.
        grad_norm: The total gradient norm before clipping.
        seconds: Wall time of the step.
    """

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    scale_lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps taken."""
        return len(self.loss)


def build_optimizer(qm: ResQModel, lr: float, scale_lr: float | None = None, *,
                    weight_decay: float = 0.0, optimizer: str = "adam",
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimiser with two groups: ``"weights"`` (:meth:`ResQModel.weight_parameters`) and
    ``"quantizers"`` (:meth:`ResQModel.quantizer_parameters`, the log-domain activation
    thresholds, without weight decay).

    Args:
        qm: The model.
        lr: Weight learning rate.
        scale_lr: Quantizer learning rate (default ``lr``).
        weight_decay: On the weights only.
        optimizer: ``"adam"`` (Adam / AdamW with weight decay) or ``"sgd"``.
        momentum: SGD momentum.

    Returns:
        The optimiser; its groups carry a ``"name"`` key.
    """
    check_choice(optimizer, "optimizer", ("adam", "sgd"))
    for name, value in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    groups = [
        {"name": "weights", "params": list(qm.weight_parameters()), "lr": lr,
         "weight_decay": weight_decay},
        {"name": "quantizers", "params": list(qm.quantizer_parameters()),
         "lr": lr if scale_lr is None else scale_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr) if weight_decay else torch.optim.Adam(groups, lr=lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0,
                    final: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to ``final`` times each group's
    learning rate at step ``steps``."""
    if warmup < 0 or warmup >= max(steps, 1):
        raise ValueError(f"warmup must be in [0, steps={steps}), got {warmup}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FloatTeacher(nn.Module):
    """The float model a ResQ model was converted from, frozen: a copy of ``qm.model`` run frame
    by frame with every quantizer disabled (BatchNorm folded, as in ``qm``), so it equals the
    float model while ``qm`` still holds the weights ``convert`` copied (before any training).

    Called on a clip ``[B, T, C, ...]``, it returns outputs ``[B, T, ...]`` like ``qm``.
    """

    def __init__(self, qm: ResQModel) -> None:
        super().__init__()
        self.model = copy.deepcopy(qm.model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    def forward(self, video: Tensor) -> Any:
        batch, frames = video.shape[:2]
        with torch.no_grad(), quantization_disabled(self.model):
            out = self.model(video.flatten(0, 1))
        return tree_map(lambda leaf: leaf.unflatten(0, (batch, frames)), out)


def distillation_loss(student: Any, teacher: Any, kind: str = "mse", *,
                      temperature: float = 1.0, class_dim: int = 2) -> Tensor:
    """The distillation loss between two outputs (tensors or the same tuple/dict of tensors),
    summed over the output tensors.

    Args:
        student: The model's outputs.
        teacher: The teacher's outputs (no gradient).
        kind: ``"mse"`` (mean squared error of each tensor) or ``"kl"`` (for logits:
            ``KL(softmax(t/T) || softmax(s/T)) * T^2`` along ``class_dim``, mean over the
            other positions).
        temperature: ``T`` of ``"kl"``.
        class_dim: The class dimension of ``"kl"`` (2 for ``[B, T, classes, ...]``).
    """
    check_choice(kind, "distill", ("mse", "kl"))
    s_leaves, s_spec = tree_flatten(student)
    t_leaves, t_spec = tree_flatten(teacher)
    if s_spec != t_spec:
        raise ValueError(f"teacher outputs must have the student's structure {s_spec}, got "
                         f"{t_spec}")
    total = s_leaves[0].new_zeros(())
    for s, t in zip(s_leaves, t_leaves):
        if s.shape != t.shape:
            raise ValueError(f"teacher output shape {tuple(t.shape)} != student output shape "
                             f"{tuple(s.shape)}")
        t = t.detach()
        if kind == "mse":
            total = total + F.mse_loss(s, t)
        else:
            log_p = F.log_softmax(s / temperature, dim=class_dim)
            log_q = F.log_softmax(t / temperature, dim=class_dim)
            kl = (log_q.exp() * (log_q - log_p)).sum(class_dim)
            total = total + kl.mean() * temperature**2
    return total


def clip_stream(clips: Any, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[Any]:
    """Clips forever, epoch after epoch, split over ranks like ``DistributedSampler``.

    Each epoch draws one permutation (the same on every rank: seeded by ``seed + epoch``), pads
    it by wrapping so that every rank gets as many clips, and gives rank ``r`` the entries
    ``r, r + world, ...``. A sized, indexable ``clips`` (list, Dataset) is needed for
    ``world > 1`` or ``shuffle``; any re-iterable works otherwise.
    """
    sized = isinstance(clips, Sequence) or (hasattr(clips, "__len__")
                                            and hasattr(clips, "__getitem__"))
    if not sized:
        if world > 1:
            raise TypeError("clips must be a sized, indexable collection (list, Dataset) to be "
                            f"split over {world} ranks, got {type(clips).__name__}")
        while True:
            empty = True
            for clip in clips:
                empty = False
                yield clip
            if empty:
                raise ValueError("clips must contain at least one clip, got none")
    count = len(clips)
    if count == 0:
        raise ValueError("clips must contain at least one clip, got none")
    epoch = 0
    while True:
        if shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        else:
            order = torch.arange(count)
        per_rank = -(-count // world)
        order = order.repeat(-(-per_rank * world // count))[:per_rank * world]
        for index in order[rank::world].tolist():
            yield clips[index]
        epoch += 1


def broadcast_parameters(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (no-op outside torch.distributed)."""
    if not distributed_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in one flattened all-reduce (no-op
    outside torch.distributed). A parameter without a gradient on some rank counts as zeros
    there (a Dynamic-ResQ pool quantizer no pixel of this rank's clip chose)."""
    if not distributed_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _chunks(video: Tensor, frames: int | None) -> list[Tensor]:
    if frames is None or frames >= video.shape[1]:
        return [video]
    return list(video.split(frames, dim=1))


def qat_step(qm: ResQModel, video: Tensor, optimizer: torch.optim.Optimizer,
             loss_of: Callable[[Any, slice], Tensor], *, max_grad_norm: float | None = 1.0,
             chunk_frames: int | None = None) -> tuple[float, float]:
    """One optimisation step over a clip: forward through time, backward, gradient averaging
    across ranks, clipping, optimiser step.

    With ``chunk_frames``, the clip runs in chunks of that many frames (truncated
    backpropagation through time, for RRM's frame-by-frame ``previous`` reference on long
    clips): the first chunk is a fresh clip (:meth:`ResQModel.forward`), each later one
    continues the stream (:meth:`ResQModel.step_clip` with ``keep_graph=True``); each chunk is
    backpropagated before the next runs (its graph freed), so memory is that of one chunk;
    gradients sum over the chunks, each weighted by its share of the frames.

    Args:
        qm: The model, in training mode.
        video: ``[B, T, C, ...]``.
        optimizer: From :func:`build_optimizer` (or any optimiser over ``qm``'s parameters).
        loss_of: ``loss_of(outputs, frames)``: the loss of the outputs of the frames
            ``frames`` (a slice of the clip's time axis).
        max_grad_norm: Clip the total gradient norm to this (``None``: no clipping).
        chunk_frames: Frames per chunk (``None``: the whole clip at once).

    Returns:
        ``(loss, grad_norm)``: the clip's loss (frame-weighted over chunks) and the gradient
        norm before clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    total, start = 0.0, 0
    frames = video.shape[1]
    for index, chunk in enumerate(_chunks(video, chunk_frames)):
        span = slice(start, start + chunk.shape[1])
        out = qm(chunk) if index == 0 else qm.step_clip(chunk, keep_graph=True)
        loss = loss_of(out, span) * (chunk.shape[1] / frames)
        loss.backward()
        total += float(loss.detach())
        start = span.stop
    params = [p for group in optimizer.param_groups for p in group["params"]]
    average_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])
                                    ) if grads else torch.zeros(())
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return total, float(norm)


def _slice_outputs(outputs: Any, span: slice) -> Any:
    return tree_map(lambda leaf: leaf[:, span], outputs)


def train_qat(qm: ResQModel, clips: Iterable[Any], *, steps: int, lr: float = 1e-4,
              scale_lr: float | None = None, teacher: Callable[[Tensor], Any] | None = None,
              loss_fn: LossFn | None = None, distill: str = "mse", temperature: float = 1.0,
              class_dim: int = 2, weight_decay: float = 0.0, optimizer: str = "adam",
              max_grad_norm: float | None = 1.0, warmup: int = 0, final_lr: float = 0.0,
              phase: str = "random", chunk_frames: int | None = None, shuffle: bool = True,
              seed: int = 0, checkpoint: CheckpointFn | None = None,
              checkpoint_every: int | None = None, progress: bool = True) -> QATHistory:
    """Quantization-aware training of ``qm`` in place, through time (the paper's section 5).

    Without ``loss_fn`` it distils a teacher on the same clips, needing no labels: by default
    :class:`FloatTeacher` (the float model ``convert`` started from: a frozen float copy of
    ``qm``'s weights when the call starts, so call it on a freshly calibrated model).
    Dynamic-ResQ pools train too (each pool quantizer learns from the pixels that chose it);
    RRM's ``previous`` reference runs frame by frame, so long clips are best trained with
    ``chunk_frames`` (truncated backpropagation through time, see :func:`qat_step`).

    Under ``torch.distributed`` each rank takes its share of the clips (:func:`clip_stream`),
    starts from rank 0's parameters and averages gradients each step; every rank ends with the
    same model. The progress bar and ``checkpoint`` run on rank 0 only.

    Args:
        qm: A calibrated model (it trains in place; its mode and ``training_phase`` are
            restored afterwards, its state reset).
        clips: A collection of clips ``[T, C, H, W]`` / ``[B, T, C, ...]`` or ``(clip, labels)``
            pairs; sized and indexable (list, Dataset) for shuffling or several ranks. Clips
            are reused, epoch after epoch, until ``steps`` steps were taken.
        steps: Optimisation steps (one clip each).
        lr: Learning rate of the weights.
        scale_lr: Learning rate of the quantizer thresholds (default ``lr``).
        teacher: ``teacher(video) -> outputs`` shaped like ``qm(video)`` (a ResQModel, a
            :class:`FloatTeacher`, any callable); default :class:`FloatTeacher` of ``qm``.
        loss_fn: ``loss_fn(outputs, batch)``: your own loss (then no teacher is used; combine
            a teacher inside it if you want both).
        distill: ``"mse"`` on the outputs or ``"kl"`` for logits (:func:`distillation_loss`).
        temperature: KL temperature.
        class_dim: KL class dimension of the outputs (2: ``[B, T, classes, ...]``).
        weight_decay: On the weights (not on the quantizer thresholds).
        optimizer: ``"adam"`` or ``"sgd"``.
        max_grad_norm: Gradient clipping (``None``: off).
        warmup: Linear warm-up steps before the cosine decay.
        final_lr: The cosine schedule's end, as a fraction of the learning rates.
        phase: ``qm.training_phase`` while training: ``"random"`` (each clip row gets a random
            keyframe phase, so every residual position trains) or ``"zero"``.
        chunk_frames: Train each clip in chunks of this many frames (truncated BPTT); a
            ``loss_fn`` then sees each chunk's outputs and the batch cut to its frames
            (every tensor of rank >= 2 along dim 1: labels must be ``[B, T, ...]``).
        shuffle: Shuffle the clips each epoch (seeded by ``seed``).
        seed: Seeds the clip order and the random keyframe phases.
        checkpoint: ``checkpoint(step, qm, history)`` every ``checkpoint_every`` steps and
            after the last one.
        checkpoint_every: Steps between checkpoints (default: only at the end).
        progress: A tqdm bar with the running loss.

    Returns:
        The :class:`QATHistory`.

    Raises:
        TypeError: ``qm`` is not a ResQModel, or a malformed argument.
        ValueError: A bad number, or ``loss_fn`` and ``teacher`` both given.
    """
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if loss_fn is not None and teacher is not None:
        raise ValueError("pass loss_fn or teacher, not both (a loss_fn can call a teacher)")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, batch), got {loss_fn!r}")
    if teacher is not None and not callable(teacher):
        raise TypeError(f"teacher must be callable(video), got {teacher!r}")
    check_choice(distill, "distill", ("mse", "kl"))
    check_choice(phase, "phase", ("zero", "random"))
    if chunk_frames is not None and (not isinstance(chunk_frames, int) or chunk_frames < 1):
        raise ValueError(f"chunk_frames must be an int >= 1 or None, got {chunk_frames!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be an int >= 1 or None, got "
                         f"{checkpoint_every!r}")
    distributed = distributed_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if loss_fn is None and teacher is None:
        teacher = FloatTeacher(qm)
    optimiser = build_optimizer(qm, lr, scale_lr, weight_decay=weight_decay,
                                optimizer=optimizer)
    scheduler = cosine_schedule(optimiser, steps, warmup, final_lr)
    history = QATHistory()
    stream = clip_stream(clips, shuffle=shuffle, seed=seed, rank=rank, world=world)
    was_training, old_phase = qm.training, qm.training_phase
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 7919 * rank)  # keyframe phases: reproducible, own per rank
    broadcast_parameters(qm)
    qm.train()
    qm.training_phase = phase
    bar = tqdm(total=steps, desc="QAT", disable=not progress or rank != 0, leave=False)
    running = None
    try:
        for step in range(steps):
            batch = next(stream)
            video = _as_batched_clip(qm, batch, step)
            if teacher is not None:
                target = teacher(video)

                def loss_of(out: Any, span: slice, target: Any = target) -> Tensor:
                    return distillation_loss(out, _slice_outputs(target, span), distill,
                                             temperature=temperature, class_dim=class_dim)
            else:
                assert loss_fn is not None

                def loss_of(out: Any, span: slice, batch: Any = batch, video: Tensor = video
                            ) -> Tensor:
                    if span.start == 0 and span.stop == video.shape[1]:
                        return loss_fn(out, batch)
                    if isinstance(batch, Tensor):
                        return loss_fn(out, video[:, span])
                    return loss_fn(out, _slice_batch(batch, span))
            started = time.perf_counter()
            loss, norm = qat_step(qm, video, optimiser, loss_of, max_grad_norm=max_grad_norm,
                                  chunk_frames=chunk_frames)
            history.loss.append(loss)
            history.lr.append(optimiser.param_groups[0]["lr"])
            history.scale_lr.append(optimiser.param_groups[-1]["lr"])
            history.grad_norm.append(norm)
            scheduler.step()
            history.seconds.append(time.perf_counter() - started)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}")
            done = step + 1
            if checkpoint is not None and rank == 0 and (
                    done == steps or (checkpoint_every is not None
                                      and done % checkpoint_every == 0)):
                checkpoint(done, qm, history)
    finally:
        bar.close()
        qm.train(was_training)
        qm.training_phase = old_phase
        qm.reset()
        torch.random.set_rng_state(generator_state)
    return history


def _slice_batch(batch: Any, span: slice) -> Any:
    """A ``(clip, labels...)`` batch cut to the frames ``span``: every tensor of rank >= 2 along
    dim 1 (batched clips ``[B, T, ...]`` and per-frame labels ``[B, T, ...]``)."""
    if isinstance(batch, Tensor):
        return batch[:, span] if batch.dim() > 1 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_batch(item, span) for item in batch)
    return batch
