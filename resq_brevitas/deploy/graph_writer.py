"""Writing ONNX step graphs: Brevitas's export handlers around the TorchScript exporter, the
opset search, the qonnx cleanup and FINN rewrite, the manifest's tensor entries.

Shared by :func:`resq_brevitas.deploy.export` (keyframe/residual graphs) and
:func:`resq_brevitas.deploy.policy_export.export_family` (the policy and one graph per action);
see :mod:`resq_brevitas.deploy.onnx_export` for the formats and exporters.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resq_brevitas.deploy.manifest import TensorEntry

__all__ = [
    "FRAME_NAME",
    "MAX_OPSET",
    "MIN_OPSET",
    "OPSET",
    "STATE_OUT_SUFFIX",
    "ExportableMultiheadAttention",
    "check_onnx",
    "cleanup_qonnx",
    "export_graphs",
    "exportable_attention",
    "managers",
    "needed_opset",
    "onnx_export_module",
    "prepare_graph_for_finn",
    "tensor_entry",
]

#: The lowest ONNX opset of the standard domain, and the first one :func:`resq_brevitas.export`
#: tries: per-channel ``QuantizeLinear``/``DequantizeLinear`` (Brevitas's QCDQ weights) need 13.
MIN_OPSET = 13
#: Kept for callers of earlier releases: the first opset tried (:data:`MIN_OPSET`).
OPSET = MIN_OPSET
#: The highest opset :func:`resq_brevitas.export` uses: the newest the TorchScript
#: ``torch.onnx.export`` of torch 2.13 writes (onnxruntime 1.32 and qonnx's node-by-node
#: execution run up to 23; ``tests/deploy/test_export_graphs.py`` runs an export at this opset in
#: both).
MAX_OPSET = 20
FRAME_NAME = "frame"
#: Suffix of the residual graph's state outputs (ONNX names are unique per graph).
STATE_OUT_SUFFIX = "_out"


def managers(format: str) -> tuple[type, dict[str, Any]]:
    """The Brevitas export manager of ``format`` and the extra ``torch.onnx.export`` options."""
    if format == "qonnx":
        from brevitas.export.onnx.qonnx.function import DOMAIN_STRING, DOMAIN_VERSION
        from brevitas.export.onnx.qonnx.manager import QONNXManager

        return QONNXManager, {"custom_opsets": {DOMAIN_STRING: DOMAIN_VERSION}}
    from brevitas.export.onnx.standard.qcdq.manager import StdQCDQONNXManager

    return StdQCDQONNXManager, {}


def onnx_export_module(format: str, module: nn.Module, args: tuple[Tensor, ...], path: Path,
                       input_names: list[str], output_names: list[str], opset: int) -> None:
    """Run ``torch.onnx.export`` (TorchScript) with Brevitas's export handlers attached.

    ``module`` is a private deep copy: handlers and export flags stay on it.
    """
    from brevitas.export.manager import (
        ExportContext,
        _override_act_caching_mode,
        _restore_act_caching_mode,
    )

    manager, kwargs = managers(format)
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
                module, args, str(path), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names,
                keep_initializers_as_inputs=False, do_constant_folding=True, **kwargs,
            )
        finally:
            module.apply(_restore_act_caching_mode)
            manager.set_export_mode(module, enabled=False)


_ADDED_IN = re.compile(r"added in version (\d+)")


def needed_opset(err: BaseException, opset: int) -> int | None:
    """The opset an export error asks for, or ``None`` if it is not about the opset.

    torch's ``UnsupportedOperatorError`` says "Support for this operator was added in version
    N" when a newer opset has the operator.
    """
    from torch.onnx.errors import UnsupportedOperatorError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UnsupportedOperatorError):
            match = _ADDED_IN.search(str(seen))
            return int(match.group(1)) if match and int(match.group(1)) > opset else None
        seen = seen.__cause__ or seen.__context__
    return None


def export_graphs(format: str, jobs: list[tuple[nn.Module, tuple[Tensor, ...], Path,
                                                 list[str], list[str]]],
                   opset: int | None) -> int:
    """Export every graph of ``jobs`` at one opset; returns it.

    With ``opset=None`` the lowest opset from :data:`MIN_OPSET` that every graph needs: an
    operator torch exports only from a newer opset (``scaled_dot_product_attention``: 14,
    ``grid_sampler``: 16) moves all graphs to that opset, up to :data:`MAX_OPSET`.

    Raises:
        ValueError: An operator that has no ONNX form at the opset asked for, or at any opset
            up to :data:`MAX_OPSET` (the message names it).
    """
    current = opset if opset is not None else MIN_OPSET
    while True:
        try:
            for job in jobs:
                onnx_export_module(format, *job, current)
            return current
        except Exception as err:
            needed = needed_opset(err, current)
            if needed is None:
                from torch.onnx.errors import UnsupportedOperatorError

                if isinstance(err, UnsupportedOperatorError):
                    raise ValueError(f"the model cannot be exported: {str(err).splitlines()[0]}"
                                     ) from err
                raise
            if opset is not None or needed > MAX_OPSET:
                why = (f"opset={opset} was asked for" if opset is not None
                       else f"export writes opsets up to {MAX_OPSET}")
                raise ValueError(
                    f"the model needs ONNX opset {needed} ({str(err).splitlines()[0]}); {why}"
                ) from err
            current = needed


def cleanup_qonnx(path: Path) -> None:
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


def prepare_graph_for_finn(path: Path) -> dict[str, Any]:
    """Rewrite a cleaned QONNX graph so FINN's builder takes it (exact); its report."""
    import onnx

    from resq_brevitas.deploy.finn import prepare_for_finn

    model, report = prepare_for_finn(onnx.load(str(path)))
    onnx.save(model, str(path))
    return report


def check_onnx(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)


def tensor_entry(name: str, tensor: Tensor, layer: str | None = None,
                  kind: str | None = None) -> TensorEntry:
    return TensorEntry(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), layer,
                       kind)


class ExportableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that never takes its fused fast path (for export only).

    Under ``no_grad`` in eval mode, ``nn.MultiheadAttention.forward`` calls
    ``torch._native_multi_head_attention``, which has no ONNX form. One of the fast path's
    documented conditions is that autograd is off or no argument requires grad; this forward
    runs the stock one with grad enabled (thread-local, scoped to the call) on parameters that
    require grad, so torch takes its own exportable path (``F.multi_head_attention_forward``)
    with the same arguments and semantics. Only private export copies get this class
    (:func:`exportable_attention`); ``torch.backends.mha``'s global switch is not touched.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.enable_grad():
            return super().forward(*args, **kwargs)


def exportable_attention(module: nn.Module) -> list[str]:
    """Make every ``nn.MultiheadAttention`` in a private export copy take the exportable path.

    Returns the names of the modules changed (for the manifest).
    """
    changed = []
    for name, child in module.named_modules():
        if type(child) is nn.MultiheadAttention:
            child.__class__ = ExportableMultiheadAttention
            for param in child.parameters():  # the private copy only: the fast path's test
                param.requires_grad_(True)
            changed.append(name)
    return changed
