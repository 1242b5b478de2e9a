"""Deployment: ONNX export of the keyframe and residual step graphs, plus a manifest.

:func:`export` writes two graphs with explicit state (design card, section 5) and a manifest::

    out_dir/keyframe.onnx    keyframe(frame) -> (output, *state)
    out_dir/residual.onnx    residual(frame, *state) -> (output, *state_out)
    out_dir/manifest.json    scheme, period, reference mode, tensor names/shapes, how to drive it

Formats and exporters (both chosen to work with torch 2.13 and brevitas 0.13):

* ``"qonnx"``: QONNX graphs with ``Quant`` nodes (what FINN consumes) at the keyframe bits in
  ``keyframe.onnx`` and at the residual bits in ``residual.onnx``, cleaned with qonnx
  (shape inference, constant folding, unique names; graph input/output names are kept), then
  rewritten so that FINN's builder takes them (:mod:`resq_brevitas.deploy.finn`, exact): outputs
  that alias an input or another output are left out and listed in the manifest (the runtime
  re-creates them), post-ReLU quantizers become unsigned with one bit less at the same scale,
  and state taps get private copies of nodes FINN's conversions delete. ``manifest.finn`` says
  what FINN can map only to floating-point layers (the float state arithmetic).
* ``"qcdq"``: ``QuantizeLinear -> Clip -> DequantizeLinear`` graphs that run in onnxruntime
  (bit widths up to 8; weights stored as integers with a ``DequantizeLinear``).

Both use the TorchScript-based ``torch.onnx.export`` (``dynamo=False``) driven by Brevitas's own
export managers (``QONNXManager`` / ``StdQCDQONNXManager``): Brevitas's quant ops define their
ONNX form as TorchScript symbolics, which the dynamo exporter does not use, and the dynamo managers
of brevitas 0.13 refuse QCDQ weights without a Q node. The managers' own ``export`` entry point is
not used because it requires ``onnxoptimizer``; the few passes it runs are done with qonnx/onnx
here. The plugin's quantizers are Brevitas injectors with stock proxies, so Brevitas's stock
handlers apply; 0-bit residual quantizers (which output zeros) are not exported as quantizers:
:class:`~resq_brevitas.nn.residual.ZeroResidual` sends nothing, so the layer's residual op is
skipped and ``z_ref`` passes through. Export runs on a deep copy of the model, so handlers and
export flags never touch ``qm``, and Brevitas is not patched. (The qonnx cleanup runs inside
:func:`resq_brevitas.deploy.runtime.qonnx_ir_compat`, which lowers ``onnx.IR_VERSION`` for the
duration of the cleanup only.)

The graphs are built by :func:`resq_brevitas.deploy.steps.step_modules`: torch.fx step graphs when
``qm.model`` is traceable (symbolically, or with the example frame's shapes), otherwise eager step
modules with the same semantics. Shapes are static (those of
``example_frame``); all batch rows of one call share the keyframe phase. Both reference modes
and RRM truncation are exported; Dynamic-ResQ pools (a per-pixel choice at run time) and refresh
policies (host-side keyframe decisions) are not.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.checks import check_frame
from resq_brevitas.deploy.manifest import GraphIO, Manifest, TensorEntry
from resq_brevitas.deploy.steps import _check_model as _check_steps
from resq_brevitas.deploy.steps import step_modules
from resq_brevitas.temporal.model import ResQModel

__all__ = ["FORMATS", "FRAME_NAME", "OPSET", "OUTPUT_NAME", "STATE_OUT_SUFFIX", "export"]

#: Formats :func:`export` writes.
FORMATS = ("qonnx", "qcdq")
#: ONNX opset of the standard domain.
OPSET = 13
FRAME_NAME = "frame"
OUTPUT_NAME = "output"
#: Suffix of the residual graph's state outputs (ONNX names are unique per graph).
STATE_OUT_SUFFIX = "_out"


def check_exportable(qm: Any) -> None:
    """Raise unless ``qm`` is a calibrated ResQ model without residual pools."""
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    if not qm.calibrated:
        raise ValueError(
            "qm must be calibrated before export (call resq.calibrate(qm, clips)); got an "
            "uncalibrated model whose activation ranges are placeholders"
        )
    _check_steps(qm)


def check_example_frame(qm: ResQModel, frame: Any) -> None:
    """The example frame: a finite ``[B, C, ...]`` tensor that fits the calibrated model."""
    check_frame(frame, "example_frame", qm.input_spec)


def _check_format(format: Any, allowed: Sequence[str], name: str = "format") -> str:
    if not isinstance(format, str):
        raise TypeError(f"{name} must be a str, one of {tuple(allowed)}, got "
                        f"{type(format).__name__} {format!r}")
    if format not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {format!r}")
    return format


def _check_qcdq_bits(qm: ResQModel) -> None:
    schemes = [qm.scheme, *(o.scheme for o in qm.config.overrides)]
    for path, precision in [item for s in schemes
                            for item in (("keyframe", s.keyframe), ("residual", s.residual))]:
        if precision is None or precision.is_float:
            continue
        if 0 in (precision.act_bits or ()):
            raise ValueError(
                f"format='qcdq' cannot express a 0-bit quantizer (Brevitas's QCDQ handlers reject "
                f"it); the {path} precision of scheme {qm.notation} is {precision}: use "
                "format='qonnx'"
            )
        bits = [precision.weight_bits, *(b for b in precision.act_bits or () if b)]
        if max(bits) > 8:
            raise ValueError(
                f"format='qcdq' supports bit widths up to 8 (ONNX QuantizeLinear is 8-bit); the "
                f"{path} precision of scheme {qm.notation} is {precision}: use format='qonnx'"
            )


def _managers(format: str) -> tuple[type, dict[str, Any]]:
    if format == "qonnx":
        from brevitas.export.onnx.qonnx.function import DOMAIN_STRING, DOMAIN_VERSION
        from brevitas.export.onnx.qonnx.manager import QONNXManager

        return QONNXManager, {"custom_opsets": {DOMAIN_STRING: DOMAIN_VERSION}}
    from brevitas.export.onnx.standard.qcdq.manager import StdQCDQONNXManager

    return StdQCDQONNXManager, {}


def _onnx_export(format: str, module: nn.Module, args: tuple[Tensor, ...], path: Path,
                 input_names: list[str], output_names: list[str]) -> None:
    """Run ``torch.onnx.export`` (TorchScript) with Brevitas's export handlers attached.

    ``module`` is a private deep copy: handlers and export flags stay on it.
    """
    from brevitas.export.manager import (
        ExportContext,
        _override_act_caching_mode,
        _restore_act_caching_mode,
    )

    manager, kwargs = _managers(format)
    module.eval()
    with torch.no_grad(), ExportContext(manager), warnings.catch_warnings():
        # Tracer and legacy-exporter warnings are expected on this path and say nothing to users.
        warnings.simplefilter("ignore")
        module.apply(manager.set_export_handler)
        manager._cache_inp_out(module, *args)
        manager.set_export_mode(module, enabled=True)
        module.apply(lambda m: _override_act_caching_mode(m, enabled=False))
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=OPSET,
                input_names=input_names, output_names=output_names,
                keep_initializers_as_inputs=False, do_constant_folding=True, **kwargs,
            )
        finally:
            module.apply(_restore_act_caching_mode)
            manager.set_export_mode(module, enabled=False)


def _cleanup_qonnx(path: Path) -> None:
    """qonnx cleanup that keeps graph input/output names (FINN's usual first step)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import (
        GiveUniqueNodeNames,
        GiveUniqueParameterTensors,
        RemoveStaticGraphInputs,
        RemoveUnusedTensors,
    )
    from qonnx.transformation.infer_shapes import InferShapes

    from resq_brevitas.deploy.runtime import qonnx_ir_compat

    model = ModelWrapper(str(path))
    with qonnx_ir_compat(model.model):
        for transform in (InferShapes(), GiveUniqueParameterTensors(),
                          FoldConstants(exclude_op_types=["Quant", "BipolarQuant"]),
                          RemoveUnusedTensors(), RemoveStaticGraphInputs(),
                          GiveUniqueNodeNames(), InferShapes()):
            model = model.transform(transform)
    model.save(str(path))


def _prepare_for_finn(path: Path) -> dict[str, Any]:
    """Rewrite a cleaned QONNX graph so FINN's builder takes it (exact); its report."""
    import onnx

    from resq_brevitas.deploy.finn import prepare_for_finn

    model, report = prepare_for_finn(onnx.load(str(path)))
    onnx.save(model, str(path))
    return report


def _check_onnx(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)


def _tensor_entry(name: str, tensor: Tensor, layer: str | None = None,
                  kind: str | None = None) -> TensorEntry:
    return TensorEntry(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), layer,
                       kind)


def _recipe(period: int, has_residual: bool, n_state: int) -> list[str]:
    if not has_residual:
        return [
            "Every frame is a keyframe (frame quantization): for each frame run "
            f"keyframe.onnx with {{'{FRAME_NAME}': frame}} and read '{OUTPUT_NAME}'.",
        ]
    return [
        "Keep a frame counter t (starting at 0) and the state list S in the host program.",
        f"If t % {period} == 0: outputs = keyframe.onnx.run({{'{FRAME_NAME}': frame}}).",
        f"Otherwise: outputs = residual.onnx.run({{'{FRAME_NAME}': frame, "
        "state[i].name: S[i] for each i}).",
        f"y = outputs[0] ('{OUTPUT_NAME}'); S = outputs[1:] ({n_state} tensors, in the order of "
        "'state'; the residual graph returns the next references in the 'previous' reference "
        "mode and its inputs unchanged in the 'keyframe' mode); t += 1.",
        "Start a new stream by resetting t to 0. All batch rows of a call share the phase.",
        "resq_brevitas.deploy.OnnxStream(out_dir) does exactly this with onnxruntime.",
    ]


def export(qm: ResQModel, example_frame: Tensor, out_dir: str | os.PathLike[str],
           format: str = "qcdq", *, finn: bool = True) -> Manifest:
    """Export a calibrated ResQ model as keyframe/residual ONNX graphs plus ``manifest.json``.

    Args:
        qm: A calibrated :class:`~resq_brevitas.ResQModel` (not modified).
        example_frame: One frame ``[B, C, ...]``; fixes the graphs' static shapes.
        out_dir: Directory to write ``keyframe.onnx``, ``residual.onnx`` (absent under frame
            quantization) and ``manifest.json``; created if missing.
        format: ``"qonnx"`` (``Quant`` nodes, for FINN) or ``"qcdq"`` (QuantizeLinear / Clip /
            DequantizeLinear, for onnxruntime; bits <= 8).
        finn: ``format="qonnx"``: rewrite the graphs so that FINN's builder takes them (exact;
            see the module docstring). ``False`` writes Brevitas's QONNX graphs as they are.

    Returns:
        The :class:`~resq_brevitas.deploy.manifest.Manifest` (also written to
        ``out_dir/manifest.json``).

    Raises:
        TypeError: If ``qm`` is not a ResQModel, or ``example_frame``/``format`` has a wrong type.
        ValueError: If ``qm`` is not calibrated, ``example_frame`` does not fit the model,
            ``format`` is unknown, or ``qcdq`` is asked for bit widths above 8.
    """
    check_exportable(qm)
    format = _check_format(format, FORMATS)
    if not isinstance(finn, bool):
        raise TypeError(f"finn must be a bool, got {type(finn).__name__} {finn!r}")
    check_example_frame(qm, example_frame)
    if format == "qcdq":
        _check_qcdq_bits(qm)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or path, got {type(out_dir).__name__}")
    out = Path(out_dir)

    steps = step_modules(qm, example_frame)
    key = copy.deepcopy(steps.keyframe).eval()
    res = copy.deepcopy(steps.residual).eval() if steps.residual is not None else None
    frame = example_frame.detach().to(next(qm.parameters()).device)
    try:
        with torch.no_grad():
            key_out = key(frame)
            if res is not None:
                res(frame, *key_out[1:])
    except Exception as err:
        raise ValueError(
            f"example_frame of shape {tuple(frame.shape)} does not run through the model: {err}"
        ) from err
    if not isinstance(key_out[0], Tensor):
        raise ValueError(
            "export needs a model that returns one tensor per frame, got "
            f"{type(key_out[0]).__name__}"
        )

    names = [spec.name for spec in steps.state]
    out_names = [n + STATE_OUT_SUFFIX for n in names]
    out.mkdir(parents=True, exist_ok=True)
    files = {"keyframe": "keyframe.onnx"}
    _onnx_export(format, key, (frame,), out / files["keyframe"], [FRAME_NAME],
                 [OUTPUT_NAME, *names])
    if res is not None:
        files["residual"] = "residual.onnx"
        _onnx_export(format, res, (frame, *key_out[1:]), out / files["residual"],
                     [FRAME_NAME, *names], [OUTPUT_NAME, *out_names])
    reports: dict[str, Any] = {}
    for kind, path in files.items():
        if format == "qonnx":
            _cleanup_qonnx(out / path)
            if finn:
                reports[kind] = _prepare_for_finn(out / path)
        else:
            _check_onnx(out / path)

    refresh = [repr(r) for r in qm.config.adaptive_refresh]
    if refresh:
        warnings.warn(
            f"refresh policies {refresh} decide keyframes from run-time statistics in the host "
            "program; the exported graphs and OnnxStream use the fixed period only",
            stacklevel=2,
        )
    manifest = Manifest(
        format=format,
        period=qm.period,
        files=files,
        config=qm.config.to_dict(),
        scheme=qm.notation,
        input=_tensor_entry(FRAME_NAME, frame),
        output=_tensor_entry(OUTPUT_NAME, key_out[0]),
        state=[_tensor_entry(spec.name, t, spec.layer, spec.kind)
               for spec, t in zip(steps.state, key_out[1:])],
        keyframe=GraphIO([FRAME_NAME], [OUTPUT_NAME, *names],
                         reports.get("keyframe", {}).get("aliases", {})),
        residual=(GraphIO([FRAME_NAME, *names], [OUTPUT_NAME, *out_names],
                          reports.get("residual", {}).get("aliases", {}))
                  if res is not None else None),
        reference=qm.config.reference,
        threshold=qm.mode.threshold,
        opset=OPSET,
        exporter="torch.onnx.export(dynamo=False) + Brevitas "
                 + ("QONNXManager handlers, qonnx cleanup" if format == "qonnx"
                    else "StdQCDQONNXManager handlers"),
        graph_source=steps.source,
        refresh_not_exported=refresh,
        how_to_drive=_recipe(qm.period, res is not None, len(names)),
        finn={kind: {k: v for k, v in report.items() if k != "aliases"}
              for kind, report in reports.items()},
    )
    manifest.write(out)
    return manifest
