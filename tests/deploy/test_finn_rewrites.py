"""The FINN rewrites of the QONNX step graphs are exact (checked with qonnx's execute_onnx).

These need qonnx only, not FINN; ``test_finn.py`` runs FINN's builder on the rewritten graphs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from resq_brevitas.deploy.finn import (
    drop_alias_outputs,
    float_dequantized,
    float_elementwise_ops,
    isolate_state_taps,
    prepare_for_finn,
    restore_aliases,
    unsigned_post_relu_quants,
)
from resq_brevitas.deploy.onnx_export import export
from resq_brevitas.deploy.runtime import qonnx_ir_compat
from tests.deploy.finn_harness import PERIOD, build_three_conv_model, make_clip

pytestmark = pytest.mark.usefixtures("single_thread")
QONNX_DOMAIN = "qonnx.custom_op.general"


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
        full: bool = False) -> dict[str, np.ndarray]:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    wrapper = ModelWrapper(model)
    with qonnx_ir_compat(model):
        if not wrapper.check_all_tensor_shapes_specified():  # the hand-built graphs
            wrapper = wrapper.transform(InferShapes())
        return execute_onnx(wrapper, feeds, return_full_exec_context=full)


@pytest.fixture(scope="module")
def qm():
    return build_three_conv_model()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return make_clip(PERIOD, seed=99)


@pytest.fixture(scope="module")
def graphs(qm, video, tmp_path_factory) -> dict[str, onnx.ModelProto]:
    path = tmp_path_factory.mktemp("qonnx")
    export(qm, video[:, 0], path, format="qonnx", finn=False)
    return {kind: onnx.load(str(path / f"{kind}.onnx")) for kind in ("keyframe", "residual")}


@pytest.fixture(scope="module")
def feeds(graphs, video) -> dict[str, dict[str, np.ndarray]]:
    """Keyframe feeds (frame 0) and residual feeds (frame 1 plus the keyframe graph's state)."""
    key = {"frame": video[:, 0].numpy()}
    state = run(graphs["keyframe"], key)
    res = {"frame": video[:, 1].numpy(),
           **{i.name: state[i.name] for i in graphs["residual"].graph.input[1:]}}
    return {"keyframe": key, "residual": res}


def frames(seed: int, n: int = 4) -> list[np.ndarray]:
    """Frames of very different magnitudes (the largest ones drive every quantizer to clamp)."""
    g = np.random.default_rng(seed)
    return [(g.standard_normal((1, 3, 8, 8)) * scale).astype(np.float32)
            for scale in (0.1, 1.0, 3.0, 100.0)[:n]]


def quant_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "Quant"}


def attr(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_unsigned_rewrite_is_bit_exact_on_the_keyframe_graph(graphs):
    signed = graphs["keyframe"]
    rewritten, names = unsigned_post_relu_quants(signed)
    producers = {o: n for n in signed.graph.node for o in n.output}
    post_relu = [n.name for n in signed.graph.node if n.op_type == "Quant"
                 and producers.get(n.input[0]) is not None
                 and producers[n.input[0]].op_type == "Relu"]
    assert names == post_relu and len(names) == 2  # conv2's and conv3's input quantizers
    before, after = quant_nodes(signed), quant_nodes(rewritten)
    for name in names:
        assert attr(before[name], "signed") == 1 and attr(after[name], "signed") == 0
        assert attr(after[name], "narrow") == 0
        assert initializer(rewritten, after[name].input[3]) == initializer(
            signed, before[name].input[3]) - 1
        assert after[name].input[1:3] == before[name].input[1:3]  # same scale and zero point
    # The frame quantizer (its input can be negative) and the weight quantizers keep their sign.
    assert all(attr(after[n], "signed") == 1 for n in after if n not in names)
    for frame in frames(0):
        a = run(signed, {"frame": frame}, full=True)
        b = run(rewritten, {"frame": frame}, full=True)
        for name in [*(before[n].output[0] for n in names), *(o.name for o in signed.graph.output)]:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert signed.SerializeToString() == graphs["keyframe"].SerializeToString()  # not modified


def relu_quant_graph(bits: float, narrow: int, zero_point: float = 0.0, pre: str = "Relu"
                     ) -> onnx.ModelProto:
    """x -> pre -> Quant(signed, scale 0.25) -> y, a hand-built QONNX graph."""
    shape = [1, 64]
    nodes = [helper.make_node(pre, ["x"], ["a"], name="pre") if pre != "none"
             else helper.make_node("Identity", ["x"], ["a"], name="pre"),
             helper.make_node("Quant", ["a", "s", "z", "b"], ["y"], name="q", domain=QONNX_DOMAIN,
                              signed=1, narrow=narrow, rounding_mode="ROUND")]
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), n)
             for n, v in (("s", 0.25), ("z", zero_point), ("b", bits))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                   helper.make_opsetid(QONNX_DOMAIN, 1)],
                             ir_version=7)


@pytest.mark.parametrize("bits,narrow", [(2, 0), (3, 1), (4, 0), (8, 1)])
def test_unsigned_rewrite_is_exact_at_ties_and_clamps(bits, narrow):
    model = relu_quant_graph(bits, narrow)
    rewritten, names = unsigned_post_relu_quants(model)
    assert names == ["q"]
    # Negative inputs (zeroed by the ReLU), exact ties k + 1/2 (round half to even), values
    # just inside and far beyond the clamp.
    top = 2.0 ** (bits - 1)
    x = np.concatenate([np.linspace(-3, 0, 8), (np.arange(24) + 0.5) * 0.25,
                        [top * 0.25 - 1e-3, top * 0.25, (top - 0.5) * 0.25, 1e3, 1e9],
                        np.linspace(0, (top + 2) * 0.25, 27)]).astype(np.float32)[None]
    np.testing.assert_array_equal(run(rewritten, {"x": x})["y"], run(model, {"x": x})["y"])


@pytest.mark.parametrize("case", ["not non-negative", "1 bit", "negative zero point",
                                  "fractional zero point"])
def test_unsigned_rewrite_leaves_quantizers_it_cannot_prove(case):
    model = {
        "not non-negative": relu_quant_graph(4, 0, pre="none"),
        "1 bit": relu_quant_graph(1, 0),
        "negative zero point": relu_quant_graph(4, 0, zero_point=-2.0),
        "fractional zero point": relu_quant_graph(4, 0, zero_point=0.5),
    }[case]
    rewritten, names = unsigned_post_relu_quants(model)
    assert names == [] and rewritten.SerializeToString() == model.SerializeToString()


def test_unsigned_rewrite_follows_sign_preserving_ops():
    model = relu_quant_graph(4, 0)
    graph = model.graph
    graph.node[1].input[0] = "p"
    graph.node.insert(1, helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2]))
    graph.input[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(
        dim_value=1))
    graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 63
    graph.output[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(
        dim_value=1))
    rewritten, names = unsigned_post_relu_quants(model)
    assert names == ["q"]
    x = np.random.default_rng(1).standard_normal((1, 1, 64)).astype(np.float32) * 4
    np.testing.assert_array_equal(run(rewritten, {"x": x})["y"], run(model, {"x": x})["y"])


@pytest.mark.parametrize("kind", ["keyframe", "residual"])
def test_drop_alias_outputs_alias_map_reproduces_dropped_outputs(graphs, feeds, kind):
    model = graphs[kind]
    dropped, aliases = drop_alias_outputs(model)
    names = [o.name for o in model.graph.output]
    if kind == "keyframe":
        # x_ref of the first layer is the frame; z_ref of the last layer is the model output.
        assert aliases == {"conv1.x_ref": "frame", "conv3.z_ref": "output"}
    else:
        # The keyframe reference mode: every next state is the input state, unchanged.
        assert aliases == {n: n.removesuffix("_out") for n in names[1:]}
    assert [o.name for o in dropped.graph.output] == [n for n in names if n not in aliases]
    inputs = {i.name for i in dropped.graph.input}
    assert inputs == {i.name for i in model.graph.input}  # the host feeds the same tensors
    assert not any(n.op_type == "Identity" and n.input[0] in inputs for n in dropped.graph.node)
    json.dumps(aliases)
    for _ in range(2):
        expected = run(model, feeds[kind])
        got = restore_aliases(aliases, feeds[kind], run(dropped, feeds[kind]))
        assert sorted(got) == sorted(names)
        for name in names:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        feeds = {k: {n: v * 2 for n, v in f.items()} for k, f in feeds.items()}


def test_restore_aliases_names_what_is_missing():
    with pytest.raises(KeyError, match=r"'b' aliases 'a', which is neither"):
        restore_aliases({"b": "a"}, {"x": 1}, {"y": 2})
    assert restore_aliases({"b": "x", "c": "y"}, {"x": 1}, {"y": 2}) == {"y": 2, "b": 1, "c": 2}


def test_isolate_state_taps_gives_each_quant_a_private_relu(graphs, feeds):
    model, _ = drop_alias_outputs(graphs["keyframe"])
    isolated, twins = isolate_state_taps(model)
    assert sorted(twins) == ["conv2.x_ref", "conv3.x_ref"]  # the state taps before conv2, conv3
    producers = {o: n for n in isolated.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in isolated.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in isolated.graph.output}
    for node in isolated.graph.node:
        if node.op_type == "Quant" and node.input[0] in producers:
            relu = producers[node.input[0]]
            if relu.op_type == "Relu":  # what FINN deletes reads nothing else
                assert readers[node.input[0]] == [node] and node.input[0] not in outputs
    for tap in twins:
        assert producers[tap].op_type == "Relu" and tap in outputs
    from qonnx.core.modelwrapper import ModelWrapper

    assert ModelWrapper(isolated).check_all_tensor_shapes_specified()  # twins carry shapes
    expected = run(model, feeds["keyframe"])
    got = run(isolated, feeds["keyframe"])
    for name in outputs:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_prepare_for_finn_reports_what_stays_floating_point(graphs, feeds):
    from qonnx.core.modelwrapper import ModelWrapper

    reports = {}
    for kind, model in graphs.items():
        prepared, report = prepare_for_finn(ModelWrapper(model))
        assert isinstance(prepared, ModelWrapper)  # same type back
        assert prepared.check_all_tensor_shapes_specified()  # runs without shape inference
        assert json.loads(json.dumps(report)) == report
        reports[kind] = report
        expected = run(model, feeds[kind])
        got = restore_aliases(report["aliases"], feeds[kind], run(prepared.model, feeds[kind]))
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    key, res = reports["keyframe"], reports["residual"]
    assert key["unsigned_quants"] and not res["unsigned_quants"]  # residual quantizers: on Sub
    assert res["outputs"] == ["output"]
    # Residual graph: Sub of x_ref, Add of z_ref for each layer; the ReLUs between them are
    # float too (they read the float sum); each conv's scale stays a float Mul (no bias).
    assert [(op["op_type"], op["graph_inputs"]) for op in res["float_ops"]] == [
        ("Sub", ["frame", "conv1.x_ref"]), ("Add", ["conv1.z_ref"]), ("Relu", []),
        ("Sub", ["conv2.x_ref"]), ("Add", ["conv2.z_ref"]), ("Relu", []),
        ("Sub", ["conv3.x_ref"]), ("Add", ["conv3.z_ref"])]
    assert res["fp32_elementwise_layers"] == {"ElementwiseAdd": 3, "ElementwiseMax": 2,
                                              "ElementwiseMul": 3, "ElementwiseSub": 3}
    # Keyframe graph: the ReLUs of the x_ref taps, and the conv outputs that are state (z_ref)
    # or the model output keep their scale and bias in float.
    assert [op["graph_outputs"] for op in key["float_ops"]] == [["conv2.x_ref"],
                                                                 ["conv3.x_ref"]]
    assert [item["output"] for item in key["float_dequantized"]] == [
        "conv1.z_ref", "conv2.z_ref", "output"]
    assert key["fp32_elementwise_layers"] == {"ElementwiseAdd": 3, "ElementwiseMax": 2,
                                              "ElementwiseMul": 3}


def test_float_reports_skip_what_finn_absorbs():
    model = relu_quant_graph(4, 0)
    assert float_elementwise_ops(model) == []  # Relu -> Quant becomes one MultiThreshold
    # ... whose scale stays a float Mul only because its result is the graph output.
    assert [(d["name"], d["graph_output"], d["finn_layers"]) for d in float_dequantized(model)
            ] == [("q", True, ["ElementwiseMul"])]


def test_rewrites_reject_other_types():
    with pytest.raises(TypeError, match="onnx.ModelProto or a qonnx ModelWrapper, got str"):
        prepare_for_finn("keyframe.onnx")


@pytest.fixture(scope="module")
def rrm_residual(video, tmp_path_factory) -> onnx.ModelProto:
    """The residual graph of RRM's advancing reference with truncation (``threshold > 0``)."""
    qm = build_three_conv_model(reference="previous", threshold=0.02)
    path = tmp_path_factory.mktemp("rrm")
    export(qm, video[:, 0], path, format="qonnx", finn=False)
    return onnx.load(str(path / "residual.onnx"))


def test_quantized_delta_read_by_conv_and_state_update_gets_a_private_quant(rrm_residual,
                                                                           feeds):
    model = rrm_residual
    isolated, twins = isolate_state_taps(model)
    assert len(twins) == 3  # one q(delta) per layer, read by the conv and by x_ref + q(delta)
    producers = {o: n for n in isolated.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in isolated.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    for node in isolated.graph.node:
        if node.op_type == "Conv":
            quant = producers[node.input[0]]
            assert quant.op_type == "Quant" and readers[quant.output[0]] == ["Conv"]
    for tensor in twins:
        assert "Conv" not in readers[tensor]  # the original now feeds the state update only
    res_feeds = {**feeds["residual"]}
    expected = run(model, res_feeds)
    got = run(isolated, res_feeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_rrm_truncation_is_reported_as_unmapped(rrm_residual, graphs):
    _, report = prepare_for_finn(rrm_residual)
    assert [op["op_type"] for op in report["unmapped_ops"]] == ["Cast", "Where"] * 3
    assert all(prepare_for_finn(g)[1]["unmapped_ops"] == [] for g in graphs.values())
