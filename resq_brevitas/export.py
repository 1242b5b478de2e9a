"""Deployment: ONNX export of the keyframe and residual step graphs, plus a manifest.

:func:`export` writes two graphs with explicit state (design card, section 5) and a manifest::

    out_dir/keyframe.onnx    keyframe(frame) -> (output, *state)
    out_dir/residual.onnx    residual(frame, *state) -> (output, *state_out)
    out_dir/manifest.json    scheme, period, reference mode, tensor names/shapes, how to drive it

Formats and exporters (both chosen to work with torch 2.13 and brevitas 0.13):

* ``"qonnx"``: QONNX graphs with ``Quant`` nodes (what FINN consumes) at the keyframe bits in
  ``keyframe.onnx`` and at the residual bits in ``residual.onnx``, cleaned with qonnx
  (shape inference, constant folding, unique names; graph input/output names are kept).
* ``"qcdq"``: ``QuantizeLinear -> Clip -> DequantizeLinear`` graphs that run in onnxruntime
  (bit widths up to 8; weights stored as integers with a ``DequantizeLinear``).

Both use the TorchScript-based ``torch.onnx.export`` (``dynamo=False``) driven by Brevitas's own
export managers (``QONNXManager`` / ``StdQCDQONNXManager``): Brevitas's quant ops define their
ONNX form as TorchScript symbolics, which the dynamo exporter does not use, and the dynamo managers
of brevitas 0.13 refuse QCDQ weights without a Q node. The managers' own ``export`` entry point is
not used because it requires ``onnxoptimizer``; the few passes it runs are done with qonnx/onnx
here. The plugin's quantizers are Brevitas injectors with stock proxies, so Brevitas's stock
handlers apply; 0-bit residual quantizers (which output zeros) are not exported as quantizers:
:func:`resq_brevitas.temporal.step.residual_step` skips those layers and passes ``z_ref``
through. Export runs on a deep copy of the model, so handlers and export flags never touch
``qm``, and Brevitas is not patched. (The qonnx cleanup runs inside
:func:`resq_brevitas.runtime.qonnx_ir_compat`, which lowers ``onnx.IR_VERSION`` for the duration
of the cleanup only.)

The graphs are built from :func:`resq_brevitas.fx.step_graphs` when ``qm.model`` is traceable by
torch.fx (symbolically, or with the example frame's shapes), otherwise from eager step modules
with the same semantics (see :func:`step_modules`). Shapes are static (those of
``example_frame``); all batch rows of one call share the keyframe phase. Both reference modes
and RRM truncation are exported; Dynamic-ResQ pools (a per-pixel choice at run time) and refresh
policies (host-side keyframe decisions) are not.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.fx import (
    StepGraphs,
    quant_tensors_disabled,
    state_specs,
    step_graphs,
    unroll,
)
from resq_brevitas.nn.layers import ResQLayerMixin
from resq_brevitas.temporal.model import ResQModel
from resq_brevitas.temporal.step import (  # noqa: F401  (re-exported: old import paths)
    ResidualMode,
    keyframe_step,
    residual_step,
    truncate_residual,
)

__all__ = [
    "FORMATS",
    "MANIFEST_NAME",
    "OPSET",
    "export",
    "export_artifacts",
    "export_unrolled",
    "quant_tensors_disabled",
    "step_modules",
]

#: Formats :func:`export` writes.
FORMATS = ("qonnx", "qcdq")
#: Formats :func:`export_artifacts` writes (``"fx"``: the unrolled float clip for QAT).
ARTIFACT_FORMATS = ("qonnx", "qcdq", "fx")
#: ONNX opset of the standard domain.
OPSET = 13
MANIFEST_NAME = "manifest.json"
FRAME_NAME = "frame"
OUTPUT_NAME = "output"
#: Suffix of the residual graph's state outputs (ONNX names are unique per graph).
STATE_OUT_SUFFIX = "_out"
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------------------------
# step modules
# --------------------------------------------------------------------------------------------
class _KeyframeSlot:
    """Temporal slot of the eager keyframe step: :func:`keyframe_step`, recording the state."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.state: dict[str, tuple[Tensor, Tensor]] = {}

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        name = self.names[id(layer)]
        if name in self.state:
            raise RuntimeError(f"ResQ layer {name!r} was called twice in one frame")
        # Private copies: the model may write into x or z later (ReLU(inplace=True)).
        z, x_ref, z_ref = keyframe_step(layer, x, private=True, **kwargs)
        self.state[name] = (x_ref, z_ref)
        return z


class _ResidualSlot:
    """Temporal slot of the eager residual step: :func:`residual_step` on the given state.

    Same semantics as :func:`resq_brevitas.fx.step_graphs` (both call
    :mod:`resq_brevitas.temporal.step`).
    """

    def __init__(self, names: dict[int, str], refs: dict[str, tuple[Tensor, Tensor]],
                 mode: ResidualMode) -> None:
        self.names = names
        self.refs = refs
        self.mode = mode
        self.next_refs: dict[str, tuple[Tensor, Tensor]] = {}

    def forward(self, layer: ResQLayerMixin, x: Tensor, **kwargs: Any) -> Tensor:
        name = self.names[id(layer)]
        x_ref, z_ref = self.refs[name]
        res = residual_step(layer, x, x_ref, z_ref, self.mode, private=True, **kwargs)
        self.next_refs[name] = (res.x_ref, res.z_ref)
        return res.z


@contextmanager
def _slots(layers: dict[str, ResQLayerMixin], slot: Any) -> Iterator[None]:
    previous = {name: layer.temporal_slot for name, layer in layers.items()}
    for layer in layers.values():
        layer.temporal_slot = slot
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.temporal_slot = previous[name]


class _EagerStep(nn.Module):
    def __init__(self, model: nn.Module, layers: list[str], all_layers: dict[str, nn.Module]
                 ) -> None:
        super().__init__()
        self.model = model
        self.layer_names = list(layers)
        self._layers = all_layers  # a plain dict: the layers are registered under ``model``

    def _names(self) -> dict[int, str]:
        return {id(layer): name for name, layer in self._layers.items()}


class EagerKeyframeStep(_EagerStep):
    """``keyframe(x) -> (y, *state)`` for models torch.fx cannot trace (eager, same semantics)."""

    def forward(self, x: Tensor) -> tuple[Any, ...]:
        slot = _KeyframeSlot(self._names())
        with _slots(self._layers, slot):
            y = self.model(x)
        missing = [name for name in self.layer_names if name not in slot.state]
        if missing:
            raise RuntimeError(f"these ResQ layers were not called on this frame: {missing}")
        return (y, *[t for name in self.layer_names for t in slot.state[name]])


class EagerResidualStep(_EagerStep):
    """``residual(x, *state) -> (y, *state)`` for models torch.fx cannot trace."""

    def __init__(self, model: nn.Module, layers: list[str], all_layers: dict[str, nn.Module],
                 mode: ResidualMode) -> None:
        super().__init__(model, layers, all_layers)
        self.mode = mode

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Any, ...]:
        if len(state) != 2 * len(self.layer_names):
            raise ValueError(
                f"residual step expects {2 * len(self.layer_names)} state tensors, got "
                f"{len(state)}"
            )
        refs = {name: (state[2 * i], state[2 * i + 1])
                for i, name in enumerate(self.layer_names)}
        slot = _ResidualSlot(self._names(), refs, self.mode)
        with _slots(self._layers, slot):
            y = self.model(x)
        return (y, *[t for name in self.layer_names for t in slot.next_refs[name]])


def step_modules(qm: ResQModel, example_frame: Tensor | None = None) -> StepGraphs:
    """The keyframe/residual step modules of ``qm``, from torch.fx when possible.

    When ``qm.model`` is traceable by torch.fx (symbolically, or with the shapes of
    ``example_frame`` when ``forward`` checks shapes) this is
    :func:`resq_brevitas.fx.step_graphs` (GraphModules whose ResQ layers are leaves). Otherwise
    (Python control flow on tensor *values*) it returns eager modules with the same inputs,
    outputs and state order, which ``torch.onnx.export`` and ``torch.export`` can still trace for
    a fixed frame shape; they need ``example_frame`` to find which layers are called. Both share
    ``qm``'s layers.

    Args:
        qm: A ResQ model.
        example_frame: ``[B, C, ...]``; needed only for models a plain symbolic trace fails on.

    Returns:
        A :class:`~resq_brevitas.fx.StepGraphs`.
    """
    mode = ResidualMode.of(qm)
    try:
        return step_graphs(qm, example_frame)
    except RuntimeError as err:
        if example_frame is None:
            raise RuntimeError(
                f"{err}; pass example_frame to build eager step modules instead"
            ) from err
    layers = dict(qm.resq_layers())
    slot = _KeyframeSlot({id(layer): name for name, layer in layers.items()})
    try:
        with torch.no_grad(), _slots(layers, slot):
            qm.model(example_frame)
    except Exception as err:  # the user's model rejected the frame
        raise ValueError(
            f"example_frame of shape {tuple(example_frame.shape)} does not run through the "
            f"model: {err}"
        ) from err
    called = [name for name in layers if name in slot.state]
    keyframe = EagerKeyframeStep(qm.model, called, layers)
    residual = None
    if qm.scheme.residual is not None:
        residual = EagerResidualStep(qm.model, called, layers, mode)
    return StepGraphs(keyframe=keyframe, residual=residual, state=state_specs(called),
                      layers=called)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_model(qm: Any) -> None:
    if not isinstance(qm, ResQModel):
        raise TypeError(f"qm must be a ResQModel (from resq.convert), got {type(qm).__name__}")
    if not qm.calibrated:
        raise ValueError(
            "qm must be calibrated before export (call resq.calibrate(qm, clips)); got an "
            "uncalibrated model whose activation ranges are placeholders"
        )
    ResidualMode.of(qm)  # raises for pools of residual bit widths


def _check_frame(qm: ResQModel, frame: Any) -> None:
    if not isinstance(frame, Tensor):
        raise TypeError(
            f"example_frame must be a torch.Tensor [B, C, ...], got {type(frame).__name__}"
        )
    if not frame.is_floating_point():
        raise TypeError(f"example_frame must be a floating-point tensor, got dtype {frame.dtype}")
    if frame.dim() < 2 or frame.shape[0] == 0:
        raise ValueError(
            f"example_frame must be [B, C, ...] with B >= 1, got shape {tuple(frame.shape)}"
        )
    if qm.input_spec is not None:
        rank, channels = qm.input_spec
        if frame.dim() != rank or frame.shape[1] != channels:
            raise ValueError(
                f"example_frame must have rank {rank} and {channels} channels (dim 1) like the "
                f"calibration frames, got shape {tuple(frame.shape)}"
            )
    if not bool(torch.isfinite(frame).all()):
        raise ValueError("example_frame contains NaN or Inf values")


def _check_format(format: Any, allowed: Sequence[str], name: str = "format") -> str:
    if not isinstance(format, str):
        raise TypeError(f"{name} must be a str, one of {tuple(allowed)}, got "
                        f"{type(format).__name__} {format!r}")
    if format not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {format!r}")
    return format


def _check_qcdq_bits(qm: ResQModel) -> None:
    for path, precision in (("keyframe", qm.scheme.keyframe), ("residual", qm.scheme.residual)):
        if precision is None or precision.is_float:
            continue
        if 0 in (precision.act_bits or ()):
            raise ValueError(
                f"format='qcdq' cannot express a 0-bit quantizer (Brevitas's QCDQ handlers reject "
                f"it); the {path} precision of scheme {qm.scheme} is {precision}: use "
                "format='qonnx'"
            )
        bits = [precision.weight_bits, *(b for b in precision.act_bits or () if b)]
        if max(bits) > 8:
            raise ValueError(
                f"format='qcdq' supports bit widths up to 8 (ONNX QuantizeLinear is 8-bit); the "
                f"{path} precision of scheme {qm.scheme} is {precision}: use format='qonnx'"
            )


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------
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

    from resq_brevitas.runtime import qonnx_ir_compat

    model = ModelWrapper(str(path))
    with qonnx_ir_compat(model.model):
        for transform in (InferShapes(), GiveUniqueParameterTensors(),
                          FoldConstants(exclude_op_types=["Quant", "BipolarQuant"]),
                          RemoveUnusedTensors(), RemoveStaticGraphInputs(),
                          GiveUniqueNodeNames(), InferShapes()):
            model = model.transform(transform)
    model.save(str(path))


def _check_onnx(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)


def _tensor_entry(name: str, tensor: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace(
        "torch.", "")}


def _refresh_policies(qm: ResQModel) -> list[str]:
    refresh = getattr(qm.config, "refresh", None)
    if refresh is None:
        return []
    policies = refresh if isinstance(refresh, (tuple, list)) else (refresh,)
    return [repr(p) for p in policies]


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
        "resq_brevitas.runtime.OnnxStream(out_dir) does exactly this with onnxruntime.",
    ]


def export(qm: ResQModel, example_frame: Tensor, out_dir: str | os.PathLike[str],
           format: str = "qcdq") -> dict[str, Any]:
    """Export a calibrated ResQ model as keyframe/residual ONNX graphs plus ``manifest.json``.

    Args:
        qm: A calibrated :class:`~resq_brevitas.ResQModel` (not modified).
        example_frame: One frame ``[B, C, ...]``; fixes the graphs' static shapes.
        out_dir: Directory to write ``keyframe.onnx``, ``residual.onnx`` (absent under frame
            quantization) and ``manifest.json``; created if missing.
        format: ``"qonnx"`` (``Quant`` nodes, for FINN) or ``"qcdq"`` (QuantizeLinear / Clip /
            DequantizeLinear, for onnxruntime; bits <= 8).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        TypeError: If ``qm`` is not a ResQModel, or ``example_frame``/``format`` has a wrong type.
        ValueError: If ``qm`` is not calibrated, ``example_frame`` does not fit the model,
            ``format`` is unknown, or ``qcdq`` is asked for bit widths above 8.
    """
    _check_model(qm)
    format = _check_format(format, FORMATS)
    _check_frame(qm, example_frame)
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
            res_out = res(frame, *key_out[1:]) if res is not None else None
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
    out.mkdir(parents=True, exist_ok=True)
    files = {"keyframe": "keyframe.onnx"}
    _onnx_export(format, key, (frame,), out / files["keyframe"], [FRAME_NAME],
                 [OUTPUT_NAME, *names])
    if res is not None:
        files["residual"] = "residual.onnx"
        _onnx_export(format, res, (frame, *key_out[1:]), out / files["residual"],
                     [FRAME_NAME, *names], [OUTPUT_NAME, *(n + STATE_OUT_SUFFIX for n in names)])
    for path in files.values():
        if format == "qonnx":
            _cleanup_qonnx(out / path)
        else:
            _check_onnx(out / path)

    scheme = qm.scheme
    mode = ResidualMode.of(qm)
    refresh = _refresh_policies(qm)
    if refresh:
        warnings.warn(
            f"refresh policies {refresh} decide keyframes from run-time statistics in the host "
            "program; the exported graphs and OnnxStream use the fixed period only",
            stacklevel=2,
        )
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": format,
        "exporter": "torch.onnx.export(dynamo=False) + Brevitas "
                    + ("QONNXManager handlers, qonnx cleanup" if format == "qonnx"
                       else "StdQCDQONNXManager handlers"),
        "opset": OPSET,
        "scheme": scheme.notation,
        "keyframe_precision": str(scheme.keyframe),
        "residual_precision": str(scheme.residual) if scheme.residual is not None else None,
        "period": qm.period,
        "reference": qm.config.reference,
        "error_feedback": mode.error_feedback if mode.reference == "previous" else None,
        "threshold": mode.threshold,
        "refresh_not_exported": refresh,
        "graph_source": "torch.fx" if isinstance(key, torch.fx.GraphModule) else "eager",
        "files": files,
        "input": _tensor_entry(FRAME_NAME, frame),
        "output": _tensor_entry(OUTPUT_NAME, key_out[0]),
        "state": [{**_tensor_entry(spec.name, t), "layer": spec.layer, "kind": spec.kind}
                  for spec, t in zip(steps.state, key_out[1:])],
        "keyframe": {"inputs": [FRAME_NAME], "outputs": [OUTPUT_NAME, *names]},
        "residual": ({"inputs": [FRAME_NAME, *names],
                      "outputs": [OUTPUT_NAME, *(n + STATE_OUT_SUFFIX for n in names)]}
                     if res_out is not None else None),
        "how_to_drive": _recipe(qm.period, res is not None, len(names)),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------------------------
# FX artifact and the recipe entry point
# --------------------------------------------------------------------------------------------
def export_unrolled(float_model: nn.Module, period: int, example_frame: Tensor,
                    out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the QAT-ready unrolled clip (:func:`resq_brevitas.fx.unroll`) of a float model.

    Files: ``unrolled.pt`` (the GraphModule, ``torch.load(..., weights_only=False)``),
    ``unrolled.py`` (its generated code, for reading) and ``manifest.json`` (period, input shape,
    keyframe and residual call sites for ``QConfigMapping.set_module_name``).

    Args:
        float_model: The float model (not modified).
        period: Keyframe period ``T``.
        example_frame: One frame ``[B, C, ...]``; the example clip repeats it ``T`` times.
        out_dir: Output directory (created if missing).

    Returns:
        The manifest.
    """
    if not isinstance(example_frame, Tensor):
        raise TypeError(
            f"example_frame must be a torch.Tensor [B, C, ...], got {type(example_frame).__name__}"
        )
    if example_frame.dim() < 2:
        raise ValueError(
            f"example_frame must be [B, C, ...], got shape {tuple(example_frame.shape)}"
        )
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    clip = example_frame.unsqueeze(1).repeat_interleave(period, dim=1)
    unrolled = unroll(float_model, period, clip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(unrolled, out / "unrolled.pt")
    (out / "unrolled.py").write_text(unrolled.code)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": "fx",
        "period": period,
        "input": {"name": "video", "shape": list(clip.shape),
                  "dtype": str(clip.dtype).replace("torch.", "")},
        "files": {"graph_module": "unrolled.pt", "code": "unrolled.py"},
        "keyframe_sites": list(unrolled.keyframe_sites),
        "residual_sites": dict(unrolled.residual_sites),
        "how_to_use": [
            "gm = torch.load('unrolled.pt', weights_only=False)  # video [B, T, C, ...] -> "
            "[B, T, ...]",
            "mapping = resq_brevitas.observers.unrolled_qconfig_mapping(gm, 'W8A8->W4A4', "
            "qat=True)",
            "prepared = torch.ao.quantization.quantize_fx.prepare_qat_fx(gm, mapping, (video,))",
            "train, then torch.ao.quantization.quantize_fx.convert_fx(prepared.eval())",
        ],
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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
    _check_model(qm)
    _check_frame(qm, example_frame)
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
            export_unrolled(float_model, qm.period, example_frame, target)
        else:
            export(qm, example_frame, target, format=fmt)
        written[fmt] = target
    return written
