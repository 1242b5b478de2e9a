"""FINN (finn-plus) takes both exported step graphs, after the FINN rewrites, through its builder.

A FINN user's flow on a small calibrated ResQ model (three convolutions with ReLUs,
``W8A8->W4A4``, ``T = 4``): ``resq.export(format="qonnx")``, :func:`prepare_for_finn` on both
graphs, then finn-plus's own builder steps ``step_qonnx_to_finn`` ... ``step_specialize_layers``
(see ``finn_harness.py``). After every step FINN can still execute in Python the graph is run with
``execute_onnx`` and compared with PyTorch; at the end both graphs are one dataflow partition,
and the host loop (keyframe graph, then residual graphs fed with the carried state, aliased state
re-created from the alias map) reproduces the PyTorch stream with the FINN graphs.

Skipped unless finn-plus is installed (see FINN_NOTES.md: ``--no-deps`` plus the pure-Python
packages it imports).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("finn")
pytest.importorskip("finn.builder")

from resq_brevitas.deploy.finn import restore_aliases  # noqa: E402
from resq_brevitas.deploy.onnx_export import export  # noqa: E402
from resq_brevitas.deploy.steps import step_modules  # noqa: E402
from tests.deploy import finn_harness as fh  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FRAMES = 2 * fh.PERIOD
# Parity after each builder step: float rounding only (FINN reorders the float scale/bias ops).
ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def qm():
    return fh.build_three_conv_model()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return fh.make_clip(FRAMES, seed=99)


def export_for_finn(qm, video, out) -> dict:
    """The qonnx export (which applies prepare_for_finn) and, per graph, what the manifest says
    about it."""
    manifest = export(qm, video[:, 0], out, format="qonnx")
    graphs = {}
    for kind in ("keyframe", "residual"):
        io = getattr(manifest, kind)
        path = out / f"{kind}.onnx"
        graphs[kind] = {"path": path, "model": onnx.load(str(path)),
                        "report": {**manifest.finn[kind], "aliases": io.aliases},
                        "outputs": io.outputs}
    return {"dir": out, "manifest": manifest, **graphs}


def onnx_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from qonnx.core.modelwrapper import ModelWrapper

    wrapper = ModelWrapper(model)
    return dict(zip([o.name for o in model.graph.output],
                    fh.execute(wrapper, fh.feeds_in_order(wrapper, feeds))))


def pytorch_reference(qm, video, exported: dict) -> dict:
    """PyTorch step outputs by name: keyframe on frame 0; residual on frame 1 with the state
    the prepared keyframe graph returns (its aliased outputs re-created from the alias map)."""
    steps = step_modules(qm, video[:, 0])
    key = exported["keyframe"]
    frame0 = {"frame": video[:, 0].numpy()}
    state = restore_aliases(key["report"]["aliases"], frame0, onnx_run(key["model"], frame0))
    res_feeds = {"frame": video[:, 1].numpy(), **state}
    names = exported["manifest"].keyframe.outputs[1:]
    with torch.no_grad():
        key_out = steps.keyframe(video[:, 0])
        res_out = steps.residual(video[:, 1], *[torch.from_numpy(state[n]) for n in names])
        model_out = qm.model(video[:, 0]).numpy()
    return {
        "keyframe": (frame0, dict(zip(key["outputs"], (t.numpy() for t in key_out)))),
        "residual": (res_feeds, dict(zip(exported["residual"]["outputs"],
                                         (t.numpy() for t in res_out)))),
        "model_on_keyframe": model_out,
    }


def build(kind: str, exported: dict, reference: dict, finn_steps, output_dir) -> fh.BuilderRun:
    """finn-plus's builder steps on one prepared graph, parity with PyTorch after each."""
    graph = exported[kind]
    feeds, expected = reference[kind]
    model = graph["model"]
    return fh.run_builder_steps(
        graph["path"], [feeds[i.name] for i in model.graph.input],
        [expected[o.name] for o in model.graph.output], output_dir, finn_steps,
        atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def exported(qm, video, tmp_path_factory) -> dict:
    return export_for_finn(qm, video, tmp_path_factory.mktemp("qonnx"))


@pytest.fixture(scope="module")
def finn_steps(tmp_path_factory):
    with fh.finn_session(tmp_path_factory.mktemp("finn_build_dir")) as steps:
        yield steps


@pytest.fixture(scope="module")
def reference(qm, video, exported) -> dict:
    return pytorch_reference(qm, video, exported)


@pytest.fixture(scope="module")
def keyframe_run(exported, reference, finn_steps, tmp_path_factory) -> fh.BuilderRun:
    return build("keyframe", exported, reference, finn_steps, tmp_path_factory.mktemp("finn"))


@pytest.fixture(scope="module")
def residual_run(exported, reference, finn_steps, tmp_path_factory) -> fh.BuilderRun:
    return build("residual", exported, reference, finn_steps, tmp_path_factory.mktemp("finn"))


def fp32_elementwise(model) -> dict[str, int]:
    """``{op_type: count}`` of the HW elementwise layers with a FLOAT32 input or output."""
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    counts: dict[str, int] = {}
    for node in model.graph.node:
        if not node.op_type.startswith("Elementwise"):
            continue
        inst = getCustomOp(node)
        types = [inst.get_input_datatype(i) for i in range(len(node.input))]
        if DataType["FLOAT32"] in (*types, inst.get_output_datatype()):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def activation_quants(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "Quant" and n.input[0] not in inits for n in model.graph.node)


def check_run(run: fh.BuilderRun, report: dict, outside: set[str], quants: int) -> None:
    """What both graphs share: parity at every executable step, one partition, the HW layers."""
    assert [r.step for r in run.results] == list(fh.BUILDER_STEPS)
    for result in run.results:
        if result.step in fh.EXECUTABLE_STEPS:
            assert result.max_abs_diff is not None and len(result.max_abs_diff) == len(
                report["outputs"])
    assert run.step("step_create_dataflow_partition").partitions == 1
    parent = run.step("step_create_dataflow_partition").executed_model
    assert {n.op_type for n in parent.graph.node} - {"StreamingDataflowPartition"} == outside
    hw = run.step("step_convert_to_hw").model
    counts = fh.op_types(hw)
    # conv3x3 -> padding + sliding window + MVAU, conv1x1 -> MVAU; one Thresholding per
    # activation quantizer.
    assert counts["MVAU"] == 3 and counts["ConvolutionInputGenerator"] == 2
    assert counts["FMPadding"] == 2 and counts["Thresholding"] == quants
    # The FP32 elementwise layers are exactly those the report announces.
    assert fp32_elementwise(hw) == report["fp32_elementwise_layers"]
    specialized = run.step("step_specialize_layers").model
    assert all(n.op_type.endswith(("_hls", "_rtl")) or n.op_type == "Shuffle"
               for n in specialized.graph.node), fh.op_types(specialized)


def test_keyframe_graph_goes_through_finn_builder_steps(keyframe_run, exported, reference):
    report = exported["keyframe"]["report"]
    assert report["aliases"] == {"conv1.x_ref": "frame", "conv3.z_ref": "output"}
    assert len(report["unsigned_quants"]) == 2
    # The NCHW -> NHWC transpose of the frame stays on the host.
    check_run(keyframe_run, report, outside={"Transpose"},
              quants=activation_quants(exported["keyframe"]["model"]))
    # The graph's model output is the model itself run on a keyframe.
    feeds, expected = reference["keyframe"]
    np.testing.assert_allclose(expected["output"], reference["model_on_keyframe"], rtol=0,
                               atol=1e-6)
    # The state taps (x_ref of conv2 and conv3) are real values, not FINN's silent zeros.
    parent = keyframe_run.step("step_create_dataflow_partition").executed_model
    got = dict(zip(report["outputs"], fh.execute(parent, [feeds["frame"]])))
    for tap in ("conv2.x_ref", "conv3.x_ref"):
        assert np.abs(got[tap]).max() > 0.1
    assert fh.op_types(keyframe_run.step("step_convert_to_hw").model)["DuplicateStreams"] == 2


def test_residual_graph_goes_through_finn_builder_steps(residual_run, exported):
    report = exported["residual"]["report"]
    assert report["outputs"] == ["output"]  # keyframe mode: every state output is an alias
    check_run(residual_run, report, outside=set(),
              quants=activation_quants(exported["residual"]["model"]))


def test_host_loop_on_finn_graphs_reproduces_the_stream(qm, video, exported, keyframe_run,
                                                        residual_run):
    """Keyframe every PERIOD frames, residual graphs in between, state carried by the host."""
    runs = {"keyframe": keyframe_run, "residual": residual_run}
    parents = {k: r.step("step_create_dataflow_partition").executed_model
               for k, r in runs.items()}
    state_names = exported["manifest"].state_names
    state: dict[str, np.ndarray] = {}
    outputs = []
    for t in range(FRAMES):
        kind = "keyframe" if t % fh.PERIOD == 0 else "residual"
        feeds = {"frame": video[:, t].numpy(), **state}
        report = exported[kind]["report"]
        parent = parents[kind]
        graph_inputs = [i.name for i in exported[kind]["model"].graph.input]
        got = dict(zip(report["outputs"], fh.execute(parent, [feeds[n] for n in graph_inputs])))
        got = restore_aliases(report["aliases"], feeds, got)
        outputs.append(got["output"])
        suffix = "" if kind == "keyframe" else "_out"
        state = {n: got[n + suffix] for n in state_names}
    with torch.no_grad():
        expected = qm(video).numpy()
    out = np.stack(outputs, axis=1)
    head = dict(qm.resq_layers())["conv3"]
    with torch.no_grad():
        view = head.residual.view
        step = float(view.input_quant.scale() * view.quant_weight().scale.max())
    assert np.abs(out - expected).max() <= step, np.abs(out - expected).max()
    assert np.median(np.abs(out - expected)) < 1e-5


def test_previous_reference_mode_residual_graph_goes_through_finn(video, finn_steps, tmp_path):
    """RRM's advancing reference (no truncation): real state outputs, and q(delta) read by both
    the conv and the state update x_ref + q(delta), which needs a private Quant for the conv."""
    qm = fh.build_three_conv_model(reference="previous")
    exported = export_for_finn(qm, video, tmp_path / "qonnx")
    report = exported["residual"]["report"]
    assert report["aliases"] == {"conv3.z_ref_out": "output"}  # the last z_t is the output
    assert len(report["state_tap_twins"]) == 3 and report["unmapped_ops"] == []
    run = build("residual", exported, pytorch_reference(qm, video, exported), finn_steps,
                tmp_path / "finn")
    # Each layer's q(delta) is thresholded twice: for the MVAU and for the state update.
    assert activation_quants(exported["residual"]["model"]) == 6
    check_run(run, report, outside=set(), quants=6)


def test_graphs_without_the_rewrites_fail_in_finn(exported, finn_steps, tmp_path):
    """The three failures of a plain export (why prepare_for_finn exists)."""
    from qonnx.core.modelwrapper import ModelWrapper

    from resq_brevitas.deploy.finn import drop_alias_outputs, unsigned_post_relu_quants
    from resq_brevitas.deploy.runtime import qonnx_ir_compat

    cfg = fh.build_config(tmp_path)
    qm = fh.build_three_conv_model()
    export(qm, fh.make_clip(1, seed=99)[:, 0], tmp_path / "raw", format="qonnx", finn=False)
    raw = {k: onnx.load(str(tmp_path / "raw" / f"{k}.onnx")) for k in ("keyframe", "residual")}

    def to_finn(model: onnx.ModelProto):
        with qonnx_ir_compat(model):
            return finn_steps.step_qonnx_to_finn(ModelWrapper(model), cfg)

    with pytest.raises(ValueError, match="unsigned and non-narrow Quant nodes for Relu"):
        to_finn(raw["keyframe"])
    with pytest.raises(AssertionError, match="Whole graph is one node"):
        to_finn(raw["residual"])
    # Aliases dropped and quantizers unsigned, but the state taps not isolated: FINN deletes the
    # ReLU that feeds both the next quantizer and the x_ref output, which then reads zeros.
    model, _ = unsigned_post_relu_quants(drop_alias_outputs(raw["keyframe"])[0])
    frame = fh.make_clip(1, seed=5)[:, 0].numpy()
    got = dict(zip([o.name for o in model.graph.output], fh.execute(to_finn(model), [frame])))
    assert not np.any(got["conv2.x_ref"]) and not np.any(got["conv3.x_ref"])
