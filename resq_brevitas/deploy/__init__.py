"""Deployment along the export pipeline: tracer, step modules, ONNX/QONNX export, manifest,
runtime, and unrolled clips for FX-graph-mode QAT.

- :mod:`~resq_brevitas.deploy.tracer`: :class:`ResQTracer` (ResQ layers as fx leaves);
- :mod:`~resq_brevitas.deploy.steps`: :func:`step_modules` (keyframe/residual step modules with
  explicit state, torch.fx or eager), :func:`export_program` (torch.export);
- :mod:`~resq_brevitas.deploy.onnx_export`: :func:`export` (QONNX / QCDQ graphs + manifest);
- :mod:`~resq_brevitas.deploy.policy_export`: family schemes with a learned frame policy (the
  policy graph and one step graph per action, which :func:`export` writes for them);
- :mod:`~resq_brevitas.deploy.manifest`: :class:`Manifest` (written and read by the same code);
- :mod:`~resq_brevitas.deploy.outputs`: dict/tuple/list model outputs as flat graph outputs;
- :mod:`~resq_brevitas.deploy.runtime`: :class:`OnnxStream` (the host loop over the graphs) and
  :class:`PolicyOnnxStream` (the policy, then the chosen action's graph, each frame;
  ``OnnxStream(out_dir)`` opens one for such an export);
- :mod:`~resq_brevitas.deploy.parity`: the export's check of the graphs against PyTorch;
- :mod:`~resq_brevitas.deploy.unroll`: :func:`unroll` (a float clip for ``prepare_qat_fx``).

onnx, onnxruntime and qonnx are imported only when a function needs them.
"""

from resq_brevitas.deploy.artifacts import ARTIFACT_FORMATS, export_artifacts
from resq_brevitas.deploy.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ActionEntry,
    Manifest,
    PolicyEntry,
)
from resq_brevitas.deploy.onnx_export import FORMATS, MAX_OPSET, MIN_OPSET, export
from resq_brevitas.deploy.outputs import flatten_output, rebuild_output
from resq_brevitas.deploy.parity import MIN_FAITHFUL_SQNR_DB
from resq_brevitas.deploy.policy_export import PolicyStep, freeze_truncated_weights
from resq_brevitas.deploy.runtime import (
    DEFAULT_OPTIMIZATION,
    OnnxStream,
    PolicyOnnxStream,
    qonnx_ir_compat,
)
from resq_brevitas.deploy.step_modules import (
    FamilyFrameStep,
    KeyframeStep,
    ResidualStep,
    StateSpec,
    StepGraphs,
)
from resq_brevitas.deploy.steps import (
    export_program,
    quant_tensors_disabled,
    step_graphs,
    step_modules,
)
from resq_brevitas.deploy.tracer import ResQTracer, symbolic_trace, trace_graph
from resq_brevitas.deploy.unroll import RESIDUAL_PREFIX, export_unrolled, unroll

__all__ = [
    "ARTIFACT_FORMATS",
    "DEFAULT_OPTIMIZATION",
    "FORMATS",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MAX_OPSET",
    "MIN_FAITHFUL_SQNR_DB",
    "MIN_OPSET",
    "RESIDUAL_PREFIX",
    "ActionEntry",
    "FamilyFrameStep",
    "KeyframeStep",
    "Manifest",
    "OnnxStream",
    "PolicyEntry",
    "PolicyOnnxStream",
    "PolicyStep",
    "ResQTracer",
    "ResidualStep",
    "StateSpec",
    "StepGraphs",
    "export",
    "export_artifacts",
    "export_program",
    "export_unrolled",
    "flatten_output",
    "freeze_truncated_weights",
    "qonnx_ir_compat",
    "quant_tensors_disabled",
    "rebuild_output",
    "step_graphs",
    "step_modules",
    "symbolic_trace",
    "trace_graph",
    "unroll",
]
