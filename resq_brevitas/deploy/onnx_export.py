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

A model with a family scheme and a learned frame policy (``{W8A8,W4A4,W2A2,skip}``,
``W8A8->{W8A4,W4A4,skip,key}``) is written by :func:`resq_brevitas.deploy.policy_export.
export_family` instead: the policy network as ``policy.onnx`` and one step graph per action
(``manifest.actions``, ``manifest.policy``; ``OnnxStream`` runs the policy, then the chosen
graph). Truncated any-precision weights (family members, ``residual_weights="truncated"``) are
stored as float copies in the graphs that use them: their mean offset puts them off the integer
grid that QCDQ and QONNX weights need.

The graphs are built by :func:`resq_brevitas.deploy.steps.step_modules`: torch.fx step graphs when
``qm.model`` is traceable (symbolically, or with the example frame's shapes), otherwise eager step
modules with the same semantics. Shapes are static (those of
``example_frame``); all batch rows of one call share the keyframe phase. Both reference modes
and RRM truncation are exported; Dynamic-ResQ pools (a per-pixel choice at run time) and refresh
policies (host-side keyframe decisions) are not.

What real architectures hold: a model output that is a dict/tuple/list becomes one graph output
per leaf (:mod:`resq_brevitas.deploy.outputs`; ``output`` above stands for them). The opset is
the lowest from :data:`MIN_OPSET` that the graphs need (torch's ``UnsupportedOperatorError``
names the opset that adds an operator; the export is retried there, up to :data:`MAX_OPSET`),
or the one asked for; torch's exporter prints the TorchScript graph of a failed attempt to
stdout (its ONNX log), which is noise here. ``nn.MultiheadAttention`` left in float takes
torch's exportable path in the private copy (:class:`ExportableMultiheadAttention`). After
writing, the graphs are checked against PyTorch on the example frame
(:mod:`resq_brevitas.deploy.parity`).
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resq_brevitas.checks import check_frame
from resq_brevitas.deploy.graph_writer import (
    FRAME_NAME,
    MAX_OPSET,
    MIN_OPSET,
    OPSET,
    STATE_OUT_SUFFIX,
    check_onnx,
    cleanup_qonnx,
    export_graphs,
    exportable_attention,
    prepare_graph_for_finn,
    tensor_entry,
)
from resq_brevitas.deploy.manifest import GraphIO, Manifest
from resq_brevitas.deploy.outputs import OUTPUT_NAME, FlatOutputs, flatten_output, leaf_names
from resq_brevitas.deploy.policy_export import export_family, freeze_truncated_weights
from resq_brevitas.deploy.steps import _check_model as _check_steps
from resq_brevitas.deploy.steps import step_modules
from resq_brevitas.temporal.model import ResQModel

__all__ = [
    "FORMATS",
    "FRAME_NAME",
    "MAX_OPSET",
    "MIN_OPSET",
    "OPSET",
    "OUTPUT_NAME",
    "STATE_OUT_SUFFIX",
    "export",
]

#: Formats :func:`export` writes.
FORMATS = ("qonnx", "qcdq")


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
    # A family's members each get a graph of their own: every one must fit QCDQ.
    members = [(f"family member {a}", a.precision) for s in schemes for a in s.family
               if a.precision is not None]
    for path, precision in [*(item for s in schemes
                              for item in (("keyframe", s.keyframe), ("residual", s.residual))),
                            *members]:
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




def _check_opset(opset: Any) -> int | None:
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}] or None, got "
                        f"{type(opset).__name__} {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (QCDQ weights need "
                         f"{MIN_OPSET}; torch's TorchScript exporter writes up to {MAX_OPSET}), "
                         f"got {opset}")
    return opset



def _recipe(period: int, has_residual: bool, n_state: int, outputs: list[str]) -> list[str]:
    n = len(outputs)
    if n == 1:
        read = f"y = outputs[0] ('{outputs[0]}')"
    else:
        read = (f"y = outputs[:{n}] ({outputs}; rebuild the model's output from "
                "'output_structure')")
    if not has_residual:
        return [
            "Every frame is a keyframe (frame quantization): for each frame run "
            f"keyframe.onnx with {{'{FRAME_NAME}': frame}}; {read}.",
        ]
    return [
        "Keep a frame counter t (starting at 0) and the state list S in the host program.",
        f"If t % {period} == 0: outputs = keyframe.onnx.run({{'{FRAME_NAME}': frame}}).",
        f"Otherwise: outputs = residual.onnx.run({{'{FRAME_NAME}': frame, "
        "state[i].name: S[i] for each i}).",
        f"{read}; S = outputs[{n}:] ({n_state} tensors, in the order of "
        "'state'; the residual graph returns the next references in the 'previous' reference "
        "mode and its inputs unchanged in the 'keyframe' mode); t += 1.",
        "Start a new stream by resetting t to 0. All batch rows of a call share the phase.",
        "resq_brevitas.deploy.OnnxStream(out_dir) does exactly this with onnxruntime.",
    ]


def export(qm: ResQModel, example_frame: Tensor, out_dir: str | os.PathLike[str],
           format: str = "qcdq", *, finn: bool = True, opset: int | None = None,
           check: bool = True) -> Manifest:
    """Export a calibrated ResQ model as keyframe/residual ONNX graphs plus ``manifest.json``.

    The model may return a tensor or a dict / tuple / list of tensors per frame: the graphs
    output every leaf (``output``, or ``output.<key>`` / ``output.<i>``), ``manifest.outputs``
    names them and ``manifest.output_structure`` says how to rebuild the output
    (:mod:`resq_brevitas.deploy.outputs`; :class:`~resq_brevitas.deploy.OnnxStream` does).
    ``nn.MultiheadAttention`` modules left in float are exported through torch's exportable
    attention path, not the fused fast path it takes under ``no_grad``.

    A family scheme with a learned frame policy writes ``policy.onnx`` and one graph per
    action instead (:mod:`resq_brevitas.deploy.policy_export`; ``manifest.actions`` lists the
    actions in the policy's order with the graph of each, ``null`` for ``skip``).

    Args:
        qm: A calibrated :class:`~resq_brevitas.ResQModel` (not modified).
        example_frame: One frame ``[B, C, ...]``; fixes the graphs' static shapes.
        out_dir: Directory to write ``keyframe.onnx``, ``residual.onnx`` (absent under frame
            quantization) and ``manifest.json`` (plus ``policy.onnx`` and the action graphs
            for a family scheme); created if missing.
        format: ``"qonnx"`` (``Quant`` nodes, for FINN) or ``"qcdq"`` (QuantizeLinear / Clip /
            DequantizeLinear, for onnxruntime; bits <= 8).
        finn: ``format="qonnx"``: rewrite the graphs so that FINN's builder takes them (exact;
            see the module docstring). ``False`` writes Brevitas's QONNX graphs as they are.
        opset: ONNX opset of the standard domain, in [:data:`MIN_OPSET`, :data:`MAX_OPSET`];
            ``None`` (default): the lowest the graphs need (13, or 14 for
            ``scaled_dot_product_attention``, 16 for ``grid_sample``, ...). Recorded in
            ``manifest.opset``.
        check: Run the written graphs on the example frame (a keyframe, then a residual frame)
            and compare with PyTorch (:mod:`resq_brevitas.deploy.parity`): the result, per
            onnxruntime optimisation level for ``qcdq``, goes to ``manifest.parity``, and a
            level that is not faithful is reported with a warning.

    Returns:
        The :class:`~resq_brevitas.deploy.manifest.Manifest` (also written to
        ``out_dir/manifest.json``).

    Raises:
        TypeError: If ``qm`` is not a ResQModel, or ``example_frame``/``format``/``opset``/
            ``finn``/``check`` has a wrong type.
        ValueError: If ``qm`` is not calibrated, ``example_frame`` does not fit the model,
            ``format`` is unknown, ``qcdq`` is asked for bit widths above 8, the output is not
            made of tensors, or an operator has no ONNX form at the opset asked for (or at
            any opset up to :data:`MAX_OPSET`). Nothing is left in a new ``out_dir``.
    """
    check_exportable(qm)
    format = _check_format(format, FORMATS)
    for flag, value in (("finn", finn), ("check", check)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
    opset = _check_opset(opset)
    check_example_frame(qm, example_frame)
    if format == "qcdq":
        _check_qcdq_bits(qm)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    frame = example_frame.detach().to(next(qm.parameters()).device)
    if qm.frame_policy is not None:
        # A family scheme: the policy graph and one graph per action (another layout, chosen
        # once here).
        return export_family(qm, frame, out, format, finn=finn, opset=opset, check=check)

    steps = step_modules(qm, example_frame)
    key = copy.deepcopy(steps.keyframe).eval()
    res = copy.deepcopy(steps.residual).eval() if steps.residual is not None else None
    # residual_weights="truncated": the residual graph stores its own float copy of the
    # truncated weights (off the integer grid; see resq_brevitas.deploy.policy_export). The
    # keyframe copy holds the (unused) residual views too, and Brevitas's handlers would try to
    # take their integer form.
    freeze_truncated_weights(key)
    truncated = freeze_truncated_weights(res) if res is not None else []
    try:
        with torch.no_grad():
            key_out = key(frame)
            if res is not None:
                res(frame, *key_out[1:])
    except Exception as err:
        raise ValueError(
            f"example_frame of shape {tuple(frame.shape)} does not run through the model: {err}"
        ) from err
    leaves, structure = flatten_output(key_out[0])
    attention = sorted({name for module in (key, res) if module is not None
                        for name in exportable_attention(module)})

    names = [spec.name for spec in steps.state]
    out_names = [n + STATE_OUT_SUFFIX for n in names]
    outputs = leaf_names(structure)
    files = {"keyframe": "keyframe.onnx"}
    jobs = [(FlatOutputs(key), (frame,), out / files["keyframe"], [FRAME_NAME],
             [*outputs, *names])]
    if res is not None:
        files["residual"] = "residual.onnx"
        jobs.append((FlatOutputs(res), (frame, *key_out[1:]), out / files["residual"],
                     [FRAME_NAME, *names], [*outputs, *out_names]))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        used_opset = export_graphs(format, jobs, opset)
        reports: dict[str, Any] = {}
        for kind, path in files.items():
            if format == "qonnx":
                cleanup_qonnx(out / path)
                if finn:
                    reports[kind] = prepare_graph_for_finn(out / path)
            else:
                check_onnx(out / path)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise

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
        input=tensor_entry(FRAME_NAME, frame),
        output=tensor_entry(outputs[0], leaves[0]),
        outputs=[tensor_entry(name, leaf) for name, leaf in zip(outputs, leaves)],
        output_structure=structure,
        state=[tensor_entry(spec.name, t, spec.layer, spec.kind)
               for spec, t in zip(steps.state, key_out[1:])],
        keyframe=GraphIO([FRAME_NAME], [*outputs, *names],
                         reports.get("keyframe", {}).get("aliases", {})),
        residual=(GraphIO([FRAME_NAME, *names], [*outputs, *out_names],
                          reports.get("residual", {}).get("aliases", {}))
                  if res is not None else None),
        reference=qm.config.reference,
        threshold=qm.mode.threshold,
        opset=used_opset,
        exporter="torch.onnx.export(dynamo=False) + Brevitas "
                 + ("QONNXManager handlers, qonnx cleanup" if format == "qonnx"
                    else "StdQCDQONNXManager handlers"),
        graph_source=steps.source,
        refresh_not_exported=refresh,
        how_to_drive=_recipe(qm.period, res is not None, len(names), outputs),
        finn={kind: {k: v for k, v in report.items() if k != "aliases"}
              for kind, report in reports.items()},
        extra={**({"attention_exportable_path": attention} if attention else {}),
               **({"truncated_weights_stored_as_float": truncated} if truncated else {})},
    )
    manifest.write(out)
    if check:
        from resq_brevitas.deploy.parity import check_export

        manifest.parity = check_export(out, manifest, key, res, frame)
        manifest.write(out)
    return manifest
