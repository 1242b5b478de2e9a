"""The export's parity check: the written graphs against PyTorch, per runtime level.

:func:`resq_brevitas.export` calls :func:`check_export` after writing (``check=True``): the
keyframe graph runs on the example frame and the residual graph on the next frame (the example
shifted by one pixel along its last dim, a frame that differs from the keyframe so the residual
path computes something), each compared with the PyTorch step modules on every output (model
output leaves and state). QCDQ graphs are run in onnxruntime at each optimisation level, QONNX
graphs with qonnx's ``execute_onnx``. The result goes to ``manifest.parity``; a level whose
output SQNR against PyTorch falls below :data:`MIN_FAITHFUL_SQNR_DB` is listed as not faithful
and reported with a warning (onnxruntime's QDQ transformations quantize biases and fuse
integer kernels: ~35 dB on the demo model at ``basic``, ~17 dB lost on timm's LeViT and
EfficientViT at ``all``; :class:`~resq_brevitas.deploy.OnnxStream` defaults to
``"faithful"``, which turns them off).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from resq_brevitas.deploy.manifest import Manifest
from resq_brevitas.deploy.outputs import flatten_output
from resq_brevitas.deploy.runtime import (
    BACKEND_OF_FORMAT,
    DEFAULT_OPTIMIZATION,
    OPTIMIZATIONS,
    OnnxStream,
)

__all__ = ["MIN_FAITHFUL_SQNR_DB", "check_export", "check_graphs", "next_frame", "sqnr_db"]

#: A level is faithful when every output agrees with PyTorch to at least this SQNR. Rounding
#: differences (a QuantizeLinear tie rounded the other way, an LSB now and then) stay far above
#: it: 40 dB is a 1 % RMS error, 4x finer than the error of a uniform 6-bit quantizer (~38 dB).
MIN_FAITHFUL_SQNR_DB = 40.0


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (ref - value)^2)``; ``inf`` when equal."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(value, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def next_frame(frame: Tensor) -> Tensor:
    """The check's residual frame: ``frame`` shifted by one pixel along its last dim."""
    return torch.roll(frame, 1, dims=-1)


def _flat(outputs: tuple[Any, ...]) -> list[np.ndarray]:
    leaves, _ = flatten_output(outputs[0])
    return [t.detach().cpu().numpy() for t in (*leaves, *outputs[1:])]


def _compare(expected: list[np.ndarray], got: list[np.ndarray], names: list[str]
             ) -> dict[str, Any]:
    worst = min(((sqnr_db(e, g), n) for e, g, n in zip(expected, got, names)),
                key=lambda item: item[0])
    diff = max(float(np.abs(e - g).max(initial=0.0)) for e, g in zip(expected, got))
    return {"min_sqnr_db": None if math.isinf(worst[0]) else round(worst[0], 2),
            "worst_output": worst[1], "max_abs_diff": diff, "exact": diff == 0.0}


def check_export(out_dir: Path, manifest: Manifest, keyframe: nn.Module,
                 residual: nn.Module | None, frame: Tensor) -> dict[str, Any]:
    """Run the written graphs on the example frame (and a residual frame) against PyTorch.

    Args:
        out_dir: The export folder.
        manifest: Its manifest.
        keyframe: The PyTorch keyframe step module that was exported.
        residual: The residual step module, or ``None``.
        frame: The example frame.

    Returns:
        ``manifest.parity``: ``{"frames", "min_faithful_sqnr_db", "levels": {level: {
        "min_sqnr_db" (``None``: equal), "worst_output", "max_abs_diff", "exact",
        "faithful"}}, "unfaithful": [...]}``; the levels are ``"faithful"``, ``"disable"``
        ... ``"all"`` for onnxruntime, ``"qonnx"`` for ``execute_onnx``.
    """
    with torch.no_grad():
        key_out = keyframe(frame)
        expected = {"keyframe": _flat(key_out)}
        feeds = {"keyframe": {manifest.input.name: frame.cpu().numpy()}}
        if residual is not None:
            second = next_frame(frame)
            expected["residual"] = _flat(residual(second, *key_out[1:]))
            feeds["residual"] = {manifest.input.name: second.cpu().numpy(),
                                 **dict(zip(manifest.state_names,
                                            expected["keyframe"][-len(manifest.state):]
                                            if manifest.state else []))}
    cases = {kind: (expected[kind], feeds[kind]) for kind in expected}
    return {
        "frames": "keyframe graph on example_frame; residual graph on example_frame shifted by "
                  "one pixel along the last dim, from the keyframe's state",
        **check_graphs(out_dir, manifest, cases),
    }


def check_graphs(out_dir: Path, manifest: Manifest,
                 cases: dict[str, tuple[list[np.ndarray], dict[str, np.ndarray]]]
                 ) -> dict[str, Any]:
    """Run graphs of an export on given inputs and compare with what PyTorch computed.

    Args:
        out_dir: The export folder.
        manifest: Its manifest.
        cases: ``graph kind -> (expected outputs in the manifest's order, feeds)``.

    Returns:
        ``{"min_faithful_sqnr_db", "levels": {level: {...}}, "unfaithful": [...]}`` as in
        :func:`check_export`; every level runs every case, the worst case is reported.
    """
    backend = BACKEND_OF_FORMAT[manifest.format]
    levels = OPTIMIZATIONS if backend == "onnxruntime" else ("qonnx",)
    results: dict[str, Any] = {}
    for level in levels:
        options = {"optimization": level} if backend == "onnxruntime" else {}
        stream = OnnxStream(out_dir, backend=backend, **options)
        parts = []
        for kind, (want, feed) in cases.items():
            names = manifest.io(kind).outputs
            got = stream.run_graph(kind, feed)
            parts.append(_compare(want, got, [f"{kind}:{n}" for n in names]))
        worst = min(parts, key=lambda p: math.inf if p["min_sqnr_db"] is None
                    else p["min_sqnr_db"])
        entry = {**worst, "max_abs_diff": max(p["max_abs_diff"] for p in parts),
                 "exact": all(p["exact"] for p in parts)}
        entry["faithful"] = (entry["min_sqnr_db"] is None
                             or entry["min_sqnr_db"] >= MIN_FAITHFUL_SQNR_DB)
        results[level] = entry
    unfaithful = [level for level, entry in results.items() if not entry["faithful"]]
    if unfaithful:
        default = DEFAULT_OPTIMIZATION if backend == "onnxruntime" else "qonnx"
        detail = ", ".join(f"{level!r}: {results[level]['min_sqnr_db']} dB at "
                           f"{results[level]['worst_output']}" for level in unfaithful)
        where = ("including OnnxStream's default" if default in unfaithful
                 else f"OnnxStream's default {default!r} is faithful")
        warnings.warn(
            f"the exported graphs in {out_dir} disagree with PyTorch on the example frame at "
            f"{detail} (below {MIN_FAITHFUL_SQNR_DB} dB output SQNR; {where}); see "
            "manifest.parity",
            stacklevel=4,
        )
    return {
        "min_faithful_sqnr_db": MIN_FAITHFUL_SQNR_DB,
        "levels": results,
        "unfaithful": unfaithful,
    }
