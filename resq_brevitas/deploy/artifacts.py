"""The recipe's ``--export``: every deployment artifact of a model, one folder per format."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor, nn

from resq_brevitas.deploy.onnx_export import (
    _check_format,
    _check_qcdq_bits,
    check_example_frame,
    check_exportable,
    export,
)
from resq_brevitas.deploy.unroll import export_unrolled
from resq_brevitas.temporal.model import ResQModel

__all__ = ["ARTIFACT_FORMATS", "export_artifacts"]

#: Formats :func:`export_artifacts` writes (``"fx"``: the unrolled float clip for QAT).
ARTIFACT_FORMATS = ("qonnx", "qcdq", "fx")


def export_artifacts(qm: ResQModel, float_model: nn.Module | None, example_frame: Tensor,
                     out_dir: str | os.PathLike[str], formats: Iterable[str]
                     ) -> dict[str, Path]:
    """Write deployment artifacts, one subdirectory per format (the recipe's ``--export``).

    ``qonnx`` and ``qcdq`` go through :func:`export` (from ``qm``); ``fx`` writes the QAT-ready
    unrolled clip of ``float_model`` (:func:`export_unrolled`) with ``qm``'s period.

    Args:
        qm: A calibrated ResQ model.
        float_model: The float model ``qm`` was converted from (needed for ``fx`` only).
        example_frame: One frame ``[B, C, ...]``.
        out_dir: Parent directory; ``out_dir/<format>/`` is written for each format.
        formats: Any of ``"qonnx"``, ``"qcdq"``, ``"fx"``.

    Returns:
        ``{format: directory}``.

    Raises:
        TypeError, ValueError: On bad arguments (checked for all formats before writing).
    """
    if isinstance(formats, str):
        formats = [formats]
    formats = list(formats)
    if not formats:
        raise ValueError(f"formats must name at least one of {ARTIFACT_FORMATS}, got []")
    for fmt in formats:
        _check_format(fmt, ARTIFACT_FORMATS, name="formats item")
    check_exportable(qm)
    if "fx" in formats and getattr(qm, "frame_policy", None) is not None:
        raise ValueError(
            f"formats item 'fx' cannot express a learned frame policy (scheme {qm.notation}): "
            "the unrolled clip has one fixed precision per call site; use 'qcdq' or 'qonnx', "
            "which export the policy and one graph per action"
        )
    check_example_frame(qm, example_frame)
    if "qcdq" in formats:
        _check_qcdq_bits(qm)
    if "fx" in formats and not isinstance(float_model, nn.Module):
        raise TypeError(
            "float_model must be the float torch.nn.Module for format 'fx', got "
            f"{type(float_model).__name__}"
        )
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(formats):
        target = Path(out_dir) / fmt
        if fmt == "fx":
            assert float_model is not None
            export_unrolled(float_model, qm.config, example_frame, target)
        else:
            export(qm, example_frame, target, format=fmt)
        written[fmt] = target
    return written
