"""Run finn-plus's own builder steps on an ONNX graph, checking it numerically after each step.

This is test-side glue only (it installs nothing and patches nothing in the library):

* :func:`finn_session` points ``FINN_BUILD_DIR`` at a temporary directory, calls
  ``finn.util.settings.initialize_dummy_settings()`` (what FINN asks of code that runs its
  transformations outside ``run_finn.py``), and imports ``finn.builder.build_dataflow_steps``.
  That module does ``from finn.xsi import SimEngine`` at import time, which looks for Vivado's
  simulator; only RTL simulation uses it, so while no XSI is installed the session binds that one
  name on ``finn.xsi`` to a stub that refuses to be instantiated. Environment variables, the
  settings object and the stub are restored or removed when the session ends.
* :func:`build_three_conv_model` builds the small calibrated ResQ model the FINN tests use
  (three convolutions with ReLUs, ``W8A8->W4A4``, ``T = 4``).
* :func:`run_builder_steps` runs ``step_qonnx_to_finn``, ``step_tidy_up``, ``step_streamline``,
  ``step_convert_to_hw``, ``step_create_dataflow_partition`` and ``step_specialize_layers`` one
  after the other, and after each step that FINN can still execute in Python (all but the
  last, whose HLS/RTL layers need cppsim/rtlsim) runs the graph with
  ``qonnx.core.onnx_exec.execute_onnx`` on the given feeds and compares every output with the
  expected values. After ``step_create_dataflow_partition`` the executed graph is the parent
  model (``StreamingDataflowPartition`` plus what stays outside it), as FINN's own verification
  does.

FINN renames graph inputs and outputs (``global_in``, ``global_out_1``, ...), so feeds and
outputs are matched by position. Tensors are compared in their original layout; where FINN has
moved a graph boundary to NHWC the harness says so instead of guessing a permutation.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The builder steps under test, in the order FINN's default flow runs them.
BUILDER_STEPS = (
    "step_qonnx_to_finn",
    "step_tidy_up",
    "step_streamline",
    "step_convert_to_hw",
    "step_create_dataflow_partition",
    "step_specialize_layers",
)
#: Steps after which the graph still runs in Python (HLS/RTL layers need C++ or RTL simulation).
EXECUTABLE_STEPS = BUILDER_STEPS[:-1]
#: FINN's default FPGA board for the config (only ``step_specialize_layers`` reads the part).
DEFAULT_BOARD = "Pynq-Z1"


class _SimEngineStub:
    """Stands in for ``finn.xsi.SimEngine`` while Vivado's XSI is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "finn.xsi.SimEngine is a test stub: RTL simulation needs Vivado's XSI, which is not "
            "installed here"
        )


@contextlib.contextmanager
def finn_session(build_dir: str | os.PathLike[str]) -> Iterator[Any]:
    """Import finn-plus's builder steps with dummy settings and a private build directory.

    Args:
        build_dir: Directory for ``FINN_BUILD_DIR`` (created if missing).

    Yields:
        The ``finn.builder.build_dataflow_steps`` module.
    """
    import finn.util.settings as finn_settings
    import finn.xsi as xsi

    Path(build_dir).mkdir(parents=True, exist_ok=True)
    saved_env = dict(os.environ)
    saved_settings = finn_settings._SETTINGS
    stubbed = "SimEngine" not in vars(xsi)
    os.environ["FINN_BUILD_DIR"] = str(Path(build_dir).resolve())
    try:
        finn_settings.initialize_dummy_settings()
        if stubbed:
            xsi.SimEngine = _SimEngineStub  # the one name the builder imports at import time
        import finn.builder.build_dataflow_steps as steps

        yield steps
    finally:
        finn_settings._SETTINGS = saved_settings
        if stubbed and vars(xsi).get("SimEngine") is _SimEngineStub:
            del xsi.SimEngine
        os.environ.clear()
        os.environ.update(saved_env)


def build_config(output_dir: str | os.PathLike[str], board: str = DEFAULT_BOARD) -> Any:
    """A minimal ``DataflowBuildConfig`` for running single builder steps.

    Args:
        output_dir: Where FINN writes intermediate models and reports.
        board: FPGA board (resolves the part ``step_specialize_layers`` needs).
    """
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    return DataflowBuildConfig(output_dir=str(output_dir), synth_clk_period_ns=10.0,
                               board=board, generate_outputs=[], verify_steps=[])


@dataclass
class StepResult:
    """What one builder step produced."""

    step: str
    seconds: float
    op_types: dict[str, int]
    max_abs_diff: list[float] | None = None  # per output, None where not executed
    partitions: int | None = None
    model: Any = None  # the ModelWrapper returned by the step
    executed_model: Any = None  # the ModelWrapper executed for parity (parent after partition)


@dataclass
class BuilderRun:
    """All steps of one graph."""

    results: list[StepResult] = field(default_factory=list)

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``."""
        for result in self.results:
            if result.step == name:
                return result
        raise KeyError(name)


def op_types(model: Any) -> dict[str, int]:
    """``{op_type: count}`` of a graph's nodes."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def execute(model: Any, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` with ``execute_onnx``, feeding and reading graph inputs/outputs by position.

    Args:
        model: A qonnx ``ModelWrapper``.
        feeds: One array per graph input, in graph order.

    Returns:
        One array per graph output, in graph order.
    """
    from qonnx.core.onnx_exec import execute_onnx

    from resq_brevitas.deploy.runtime import qonnx_ir_compat

    names = [i.name for i in model.graph.input]
    if len(names) != len(feeds):
        raise ValueError(f"graph has inputs {names}, got {len(feeds)} feeds")
    with qonnx_ir_compat(model.model):
        result = execute_onnx(model, dict(zip(names, feeds)))
    return [result[o.name] for o in model.graph.output]


def compare(got: Sequence[np.ndarray], expected: Sequence[np.ndarray], atol: float, rtol: float,
            step: str, names: Sequence[str]) -> list[float]:
    """Check outputs against expected values; returns the max abs difference of each.

    Args:
        got: The graph's outputs, in graph order.
        expected: The reference outputs, in the same order.
        atol: Absolute tolerance.
        rtol: Relative tolerance (times the largest magnitude of each expected output).
        step: The builder step just run (for messages).
        names: Output names (for messages).

    Raises:
        AssertionError: On a count or shape mismatch, or a difference beyond the tolerance.
    """
    assert len(got) == len(expected), (
        f"after {step}: {len(got)} outputs, expected {len(expected)} ({list(names)})")
    diffs = []
    for name, g, e in zip(names, got, expected):
        g = np.asarray(g, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        assert g.shape == e.shape, (
            f"after {step}: output {name!r} has shape {g.shape}, expected {e.shape} (FINN may "
            "have moved the graph boundary to another layout)")
        diff = float(np.abs(g - e).max()) if g.size else 0.0
        bound = atol + rtol * float(np.abs(e).max()) if e.size else atol
        assert diff <= bound, (
            f"after {step}: output {name!r} differs from the reference by {diff:.3g} "
            f"(> {bound:.3g}); all zeros: {not np.any(g)}")
        diffs.append(diff)
    return diffs


def run_builder_steps(model_path: str | os.PathLike[str], feeds: Sequence[np.ndarray],
                      expected: Sequence[np.ndarray], output_dir: str | os.PathLike[str],
                      steps_module: Any, atol: float = 1e-4, rtol: float = 1e-5,
                      steps: Sequence[str] = BUILDER_STEPS,
                      names: Sequence[str] | None = None) -> BuilderRun:
    """Run finn-plus builder steps on a model file, checking parity after each executable step.

    Args:
        model_path: ONNX file (QONNX dialect) to start from.
        feeds: One array per graph input, in graph order.
        expected: One array per graph output, in graph order (the PyTorch reference).
        output_dir: FINN's ``output_dir`` for this graph.
        steps_module: The module :func:`finn_session` yields.
        atol: Absolute tolerance of the parity checks.
        rtol: Relative tolerance (times the largest magnitude of each expected output).
        steps: The step names to run, in order.
        names: Output names for messages (default: the graph's own).

    Returns:
        A :class:`BuilderRun` with one :class:`StepResult` per step.

    Raises:
        AssertionError: If a parity check fails (the message names the step and output).
    """
    from qonnx.core.modelwrapper import ModelWrapper

    from resq_brevitas.deploy.runtime import qonnx_ir_compat

    model = ModelWrapper(str(model_path))
    names = list(names or [o.name for o in model.graph.output])
    cfg = build_config(output_dir)
    run = BuilderRun()
    for name in steps:
        step_fn = getattr(steps_module, name)
        start = time.perf_counter()
        with qonnx_ir_compat(model.model):
            model = step_fn(model, cfg)
        seconds = time.perf_counter() - start
        result = StepResult(step=name, seconds=seconds, op_types=op_types(model), model=model)
        executed = model
        if name == "step_create_dataflow_partition":
            parent = Path(cfg.get_intermediate_models_directory()) / "dataflow_parent.onnx"
            executed = ModelWrapper(str(parent))
            result.partitions = sum(
                n.op_type == "StreamingDataflowPartition" for n in executed.graph.node)
        if name in EXECUTABLE_STEPS:
            got = execute(executed, feeds)
            result.max_abs_diff = compare(got, expected, atol, rtol, name, names)
            result.executed_model = executed
        run.results.append(result)
    return run


def feeds_in_order(model: Any, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays of ``values`` in the order of ``model``'s graph inputs."""
    return [values[i.name] for i in model.graph.input]


# --------------------------------------------------------------------------------------------
# the small network of the FINN tests
# --------------------------------------------------------------------------------------------
SCHEME = "W8A8->W4A4"
PERIOD = 4


def make_clip(frames: int, seed: int, batch: int = 1, size: int = 8) -> Any:
    """The FINN tests' clips: ``size x size`` frames drifting by 0.15 a frame."""
    from tests.helpers import make_clip as helpers_clip

    return helpers_clip(batch=batch, frames=frames, size=size, seed=seed, drift=0.15)


def three_conv_net() -> Any:
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1 (3 -> 8 -> 8 -> 4 channels), eval mode."""
    import torch
    from torch import nn

    class ThreeConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv3 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))

    torch.manual_seed(0)
    return ThreeConvNet().eval()


def build_three_conv_model(**config: Any) -> Any:
    """The calibrated ResQ model of :func:`three_conv_net` (``W8A8->W4A4``, ``T = 4``)."""
    import resq_brevitas as resq

    qm = resq.convert(three_conv_net(), resq.ResQConfig(scheme=SCHEME, period=PERIOD, **config))
    clips = [make_clip(PERIOD, seed=s, batch=2) for s in range(2)]
    resq.calibrate(qm, clips, samples=8, candidates=8, progress=False)
    return qm.eval()
