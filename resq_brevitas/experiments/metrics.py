"""Task and fidelity metrics: segmentation mIoU and signal-to-quantization-noise ratio."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "miou", "sqnr_db"]


def _check_labels(pred: Tensor, target: Tensor, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    for name, value in (("pred", pred), ("target", target)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a Tensor, got {type(value).__name__}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class labels, got dtype {value.dtype}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    for name, value in (("pred", pred), ("target", target)):
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}), got range "
                f"[{int(value.min())}, {int(value.max())}]"
            )


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Accumulate a confusion matrix over all elements.

    Args:
        pred: Predicted integer labels, any shape.
        target: Ground-truth integer labels, same shape as ``pred``.
        num_classes: Number of classes ``C``; labels must lie in ``[0, C)``.

    Returns:
        ``[C, C]`` int64 tensor; entry ``[i, j]`` counts elements with target ``i`` and
        prediction ``j``.

    Raises:
        ValueError: On mismatched shapes, non-integer dtypes or out-of-range labels.
    """
    _check_labels(pred, target, num_classes)
    flat = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.bincount(flat.cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean intersection-over-union from the accumulated confusion matrix.

    IoU of class ``c`` is ``TP / (TP + FP + FN)`` over all elements; the mean is taken over
    the classes present in ``target`` or ``pred`` (classes absent from both are ignored
    rather than counted as perfect or as zero).

    Args:
        pred: Predicted integer labels, any shape.
        target: Ground-truth integer labels, same shape as ``pred``.
        num_classes: Number of classes.

    Returns:
        mIoU in ``[0, 1]``; ``nan`` if the inputs are empty.

    Raises:
        ValueError: On mismatched shapes, non-integer dtypes or out-of-range labels.
    """
    cm = confusion_matrix(pred, target, num_classes).double()
    tp = cm.diag()
    union = cm.sum(dim=0) + cm.sum(dim=1) - tp
    present = union > 0
    if not bool(present.any()):
        return math.nan
    return float((tp[present] / union[present]).mean())


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB.

    ``10 * log10(sum(reference**2) / sum((reference - test)**2))``, computed in float64.

    Args:
        reference: Reference (e.g. float model) tensor.
        test: Approximation (e.g. quantized model output), same shape.

    Returns:
        SQNR in dB; ``inf`` when the tensors are equal, ``-inf`` for a zero reference with
        non-zero error.

    Raises:
        ValueError: If the arguments are not tensors of the same shape.
    """
    for name, value in (("reference", reference), ("test", test)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a Tensor, got {type(value).__name__}")
    if reference.shape != test.shape:
        raise ValueError(
            f"reference and test must have the same shape, got reference "
            f"{tuple(reference.shape)} and test {tuple(test.shape)}"
        )
    ref = reference.detach().double()
    noise = float((ref - test.detach().double()).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
