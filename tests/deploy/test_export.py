"""ONNX export of the keyframe/residual step graphs: QCDQ in onnxruntime, QONNX in qonnx."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.deploy import (
    OnnxStream,
    export,
    export_artifacts,
    qonnx_ir_compat,
)
from resq_brevitas.deploy.steps import step_graphs
from tests.helpers import make_clip

PERIOD = 4
FRAMES = 12
# Distinct keyframe/residual weight/activation bits, so each Quant node's width is attributable.
SCHEME = "W8A7->W5A4"


class StreamNet(nn.Module):
    """Conv, depthwise conv, transposed conv, Linear (SE gate), a residual add and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.stem(x)))
        a = a + self.dw(a)
        gate = torch.sigmoid(self.fc(a.mean((2, 3))))
        a = a * gate[:, :, None, None]
        u = torch.relu(self.up(torch.relu(self.down(a))))
        return self.head(torch.cat([u, a], dim=1))


class CheckedNet(StreamNet):
    """The same network with a check on values: control flow torch.fx cannot trace at all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite")
        if x.shape[-1] % 2:
            raise ValueError("x must have an even width")
        return super().forward(x)


def clip_of(frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    """The clips of this module: 8x8 frames drifting by 0.15 a frame."""
    return make_clip(batch=batch, frames=frames, size=8, seed=seed, drift=0.15)


def build(net_class: type[nn.Module] = StreamNet, scheme: str = SCHEME,
          **config: object) -> resq.ResQModel:
    torch.manual_seed(0)
    net = net_class().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    qm = resq.convert(net, resq.ResQConfig(scheme=scheme, period=PERIOD, **config))
    resq.calibrate(qm, [clip_of(PERIOD, seed=s, batch=2) for s in range(3)], progress=False)
    return qm.eval()  # deployment semantics: BatchNorm (unfolded in CheckedNet) uses running stats


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def qm() -> resq.ResQModel:
    return build()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return clip_of(FRAMES, seed=99)


@pytest.fixture(scope="module")
def reference(qm: resq.ResQModel, video: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return qm(video).numpy()


@pytest.fixture(scope="module")
def qonnx_dir(qm: resq.ResQModel, video: torch.Tensor, tmp_path_factory):
    path = tmp_path_factory.mktemp("qonnx")
    export(qm, video[:, 0], path, format="qonnx")
    return path


def output_step(qm: resq.ResQModel, path: str = "keyframe") -> float:
    """One quantization step of the output: the head's input scale times its weight scale.

    The head's accumulator counts in units of ``s_a * s_w``; keyframe scales are the finer ones.
    """
    head = dict(qm.resq_layers())["head"]
    layer = head if path == "keyframe" else head.residual.view
    with torch.no_grad():
        return float(layer.input_quant.scale() * layer.quant_weight().scale.max())


def assert_stream_matches(out: np.ndarray, reference: np.ndarray, step: float) -> None:
    assert out.shape == reference.shape
    diff = np.abs(out - reference)
    assert diff.max() <= step, f"max abs diff {diff.max():.3g} > one output step {step:.3g}"
    rel = diff.max(axis=(0, 2, 3, 4)) / np.abs(reference).max(axis=(0, 2, 3, 4))
    # "Typically < 1e-4 relative": most frames, keyframes and residual frames alike.
    assert np.median(rel) < 1e-4, f"per-frame relative diffs {rel}"


def test_qcdq_stream_in_onnxruntime_matches_pytorch(qm, video, reference, tmp_path):
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    # The default ("faithful") runs the graph as exported: it must reproduce PyTorch to float
    # rounding.
    assert_stream_matches(OnnxStream(tmp_path).run(video), reference,
                          output_step(qm))
    # onnxruntime's default fuses Q/DQ around convs into integer kernels; their requantization
    # may round an intermediate value differently, bounded here by one residual output step.
    stream = OnnxStream(tmp_path, optimization="all")
    out = stream.run(video)
    assert np.abs(out - reference).max() <= output_step(qm, "residual")
    ops = {n.op_type for f in ("keyframe", "residual")
           for n in onnx.load(str(tmp_path / f"{f}.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Clip"} <= ops
    assert manifest.graph_source == "torch.fx"
    # The keyframe schedule of the host loop: frames 0, 4, 8 ran the keyframe graph.
    stream.reset()
    kinds = []
    for t in range(FRAMES):
        kinds.append(stream.next_is_keyframe)
        stream.step(video[:, t])
    assert [t for t, k in enumerate(kinds) if k] == [0, 4, 8]


def quant_bits(path) -> dict[str, set[int]]:
    """Bit widths of a QONNX graph's Quant nodes, split by what they quantize."""
    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(path))
    bits: dict[str, set[int]] = {"weight": set(), "act": set()}
    for node in model.graph.node:
        if node.op_type != "Quant":
            continue
        width = int(np.asarray(model.get_initializer(node.input[3])).item())
        kind = "weight" if model.get_initializer(node.input[0]) is not None else "act"
        signed = next((a.i for a in node.attribute if a.name == "signed"), 1)
        # The FINN rewrite stores a post-ReLU b-bit signed quantizer as an unsigned (b-1)-bit
        # one at the same scale: count it at the b bits it was calibrated and costed at.
        bits[kind].add(width if signed else width + 1)
    return bits


def test_qonnx_graphs_run_in_qonnx_and_carry_scheme_bits(qm, video, reference, qonnx_dir):
    tmp_path = qonnx_dir
    out = OnnxStream(tmp_path, backend="qonnx").run(video)
    assert_stream_matches(out, reference, output_step(qm))
    scheme = qm.scheme
    assert quant_bits(tmp_path / "keyframe.onnx") == {
        "weight": {scheme.keyframe.weight_bits}, "act": set(scheme.keyframe.act_bits)}
    assert quant_bits(tmp_path / "residual.onnx") == {
        "weight": {scheme.residual.weight_bits}, "act": set(scheme.residual.act_bits)}
    # Every ResQ layer is quantized in both graphs: one weight and one input Quant per layer.
    model = onnx.load(str(tmp_path / "residual.onnx"))
    assert sum(n.op_type == "Quant" for n in model.graph.node) == 2 * len(list(qm.resq_layers()))


def test_qonnx_graph_passes_qonnx_cleanup_and_shape_inference(qm, video, qonnx_dir):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    model = ModelWrapper(str(qonnx_dir / "keyframe.onnx"))
    with qonnx_ir_compat(model.model):
        cleaned = cleanup_model(model)
        result = execute_onnx(cleaned, {cleaned.graph.input[0].name: video[:, 0].numpy()})
    with torch.no_grad():
        expected = qm.model(video[:, 0]).numpy()
    first = cleaned.graph.output[0].name
    assert np.abs(result[first] - expected).max() <= output_step(qm)
    assert all(cleaned.get_tensor_shape(o.name) for o in cleaned.graph.output)


def test_manifest_names_state_in_graph_order(qm, video, tmp_path):
    import onnxruntime as ort

    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest.to_dict()
    layers = [name for name, _ in qm.resq_layers()]
    state = [s.name for s in manifest.state]
    assert state == [f"{n}.{k}" for n in layers for k in ("x_ref", "z_ref")]
    assert manifest.scheme == SCHEME and manifest.period == PERIOD
    assert manifest.reference == "keyframe" and manifest.how_to_drive
    assert resq.ResQConfig.from_dict(manifest.config) == qm.config
    key = ort.InferenceSession(str(tmp_path / "keyframe.onnx"))
    res = ort.InferenceSession(str(tmp_path / "residual.onnx"))
    assert [o.name for o in key.get_outputs()] == ["output", *state]
    assert [i.name for i in res.get_inputs()] == ["frame", *state]
    assert len(res.get_outputs()) == 1 + len(state)
    for entry, tensor in zip(manifest.state, res.get_inputs()[1:]):
        assert list(tensor.shape) == entry.shape
    # The exported state equals the PyTorch step graph's state, tensor by tensor.
    steps = step_graphs(qm)
    with torch.no_grad():
        expected = steps.keyframe(video[:, 0])
    got = key.run(None, {"frame": video[:, 0].numpy()})
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e.numpy(), atol=output_step(qm))


def test_model_torch_fx_cannot_trace_exports_through_eager_steps(video, tmp_path):
    qm = build(CheckedNet)
    with pytest.raises(ValueError, match=r"example_frame of shape \(1, 3, 8, 7\).*even width"):
        export(qm, torch.randn(1, 3, 8, 7), tmp_path / "odd")
    assert not (tmp_path / "odd").exists()
    with pytest.raises(RuntimeError, match="torch.fx"):
        step_graphs(qm, video[:, 0])
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert manifest.graph_source == "eager"
    with torch.no_grad():
        reference = qm(video).numpy()
    out = OnnxStream(tmp_path).run(video)
    assert_stream_matches(out, reference, output_step(qm))


def test_previous_reference_mode_exports_advancing_state(video, tmp_path):
    import onnxruntime as ort

    qm = build(reference="previous", threshold=0.02)
    manifest = export(qm, video[:, 0], tmp_path, format="qcdq")
    assert manifest.reference == "previous" and manifest.threshold == 0.02
    with torch.no_grad():
        reference = qm(video).numpy()
    out = OnnxStream(tmp_path).run(video)
    assert_stream_matches(out, reference, output_step(qm))
    # The residual graph returns the next references (x_ref + q(delta), z_t), not its inputs.
    key = ort.InferenceSession(str(tmp_path / "keyframe.onnx"))
    res = ort.InferenceSession(str(tmp_path / "residual.onnx"))
    state = key.run(None, {"frame": video[:, 0].numpy()})[1:]
    names = [i.name for i in res.get_inputs()]
    advanced = res.run(None, {"frame": video[:, 1].numpy(), **dict(zip(names[1:], state))})[1:]
    assert all(not np.array_equal(a, b) for a, b in zip(advanced, state))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "residual.onnx")).graph.node}
    assert {"Abs", "LessOrEqual", "Where"} <= ops  # RRM truncation is part of the graph


def test_eager_steps_follow_previous_reference_mode(video):
    from resq_brevitas.deploy.steps import EagerResidualStep, step_modules

    qm = build(CheckedNet, reference="previous", threshold=0.02)
    steps = step_modules(qm, video[:, 0])
    assert isinstance(steps.residual, EagerResidualStep)
    outputs, state = [], []
    with torch.no_grad():
        for t in range(FRAMES):
            step = steps.keyframe if t % PERIOD == 0 else steps.residual
            y, *state = step(video[:, t], *([] if t % PERIOD == 0 else state))
            outputs.append(y)
        torch.testing.assert_close(torch.stack(outputs, 1), qm(video), rtol=1e-6, atol=1e-6)


def test_bad_input_is_rejected_and_nothing_is_written(qm, video, tmp_path):
    target = tmp_path / "out"
    with torch.no_grad():
        before = qm(video)
    qm.reset()
    uncalibrated = resq.convert(StreamNet().eval(), resq.ResQConfig(scheme=SCHEME, period=4))
    with pytest.raises(ValueError, match="calibrated"):
        export(uncalibrated, video[:, 0], target)
    with pytest.raises(ValueError, match=r"example_frame.*3 channels.*\(1, 4, 8, 8\)"):
        export(qm, torch.randn(1, 4, 8, 8), target)
    with pytest.raises(ValueError, match="rank 4"):
        export(qm, torch.randn(3, 8, 8), target)
    with pytest.raises(TypeError, match="example_frame must be a torch.Tensor"):
        export(qm, video[:, 0].numpy(), target)
    with pytest.raises(ValueError, match=r"format must be one of \('qonnx', 'qcdq'\), got 'tfl"):
        export(qm, video[:, 0], target, format="tflite")
    with pytest.raises(TypeError, match="qm must be a ResQModel"):
        export(qm.model, video[:, 0], target)
    with pytest.raises(ValueError, match=r"formats item must be one of .*got 'onnx'"):
        export_artifacts(qm, None, video[:, 0], target, ["qcdq", "onnx"])
    with pytest.raises(TypeError, match="float_model"):
        export_artifacts(qm, None, video[:, 0], target, ["fx"])
    zero_bit = resq.convert(StreamNet().eval(), resq.ResQConfig(scheme="W8A8->W4A0", period=4))
    resq.calibrate(zero_bit, [video[0]], samples=4, candidates=3, progress=False)
    with pytest.raises(ValueError, match="0-bit.*qonnx"):
        export(zero_bit, video[:, 0], target, format="qcdq")
    assert not target.exists()
    # The model is untouched: no stream started, same outputs as before the failed calls.
    assert qm.calibrated and not qm.in_stream
    with torch.no_grad():
        torch.testing.assert_close(qm(video), before, rtol=0, atol=0)


def test_qcdq_refuses_more_than_8_bits(tmp_path):
    qm = resq.convert(StreamNet().eval(), resq.ResQConfig(scheme="W12A12->W4A4", period=4))
    qm.calibrated = True  # only the format check is under test; no range is exported
    with pytest.raises(ValueError, match="up to 8.*W12A12.*qonnx"):
        export(qm, torch.randn(1, 3, 8, 8), tmp_path / "x", format="qcdq")
    assert not (tmp_path / "x").exists()


def test_onnx_stream_rejects_bad_frames_and_directories(qm, video, tmp_path):
    export(qm, video[:, 0], tmp_path, format="qcdq")
    stream = OnnxStream(tmp_path)
    stream.step(video[:, 0])
    with pytest.raises(ValueError, match=r"exported shape \(1, 3, 8, 8\), got \(2, 3, 8, 8\)"):
        stream.step(torch.randn(2, 3, 8, 8))
    assert stream.t == 1 and len(stream.state) == 2 * len(list(qm.resq_layers()))
    with pytest.raises(TypeError, match="floating-point"):
        stream.step(np.zeros((1, 3, 8, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        OnnxStream(tmp_path, backend="tensorrt")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        OnnxStream(tmp_path / "missing")


def test_export_artifacts_writes_fx_clip(qm, video, tmp_path):
    float_model = StreamNet().eval()
    written = export_artifacts(qm, float_model, video[:, 0], tmp_path, ["fx"])
    assert written == {"fx": tmp_path / "fx"}
    manifest = json.loads((tmp_path / "fx" / "manifest.json").read_text())
    unrolled = torch.load(tmp_path / "fx" / manifest["files"]["graph_module"], weights_only=False)
    clip = video[:, :PERIOD]
    with torch.no_grad():
        dense = torch.stack([float_model(clip[:, t]) for t in range(PERIOD)], 1)
        torch.testing.assert_close(unrolled(clip), dense, atol=1e-5, rtol=1e-5)
    assert manifest["extra"]["residual_sites"] == dict(unrolled.residual_sites)


@pytest.mark.parametrize("format,backend", [("qcdq", "onnxruntime"), ("qonnx", "qonnx")])
def test_unsigned_keyframe_quantizers_export_and_stream(format, backend, video, tmp_path):
    qm = build(act_signedness="auto")
    assert qm.unsigned_inputs  # the ReLU outputs feeding dw, fc, down, up and head
    export(qm, video[:, 0], tmp_path, format=format)
    with torch.no_grad():
        reference = qm(video).numpy()
    out = OnnxStream(tmp_path, backend=backend).run(video)
    assert_stream_matches(out, reference, output_step(qm))


class MobileBlockNet(nn.Module):
    """A MobileNetV3-style block: expand, depthwise, squeeze-excite with hard-sigmoid,
    hard-swish, project, and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.hardswish(self.bn(self.stem(x)))
        h = nn.functional.hardswish(self.dw(nn.functional.hardswish(self.expand(a))))
        s = h.mean((2, 3), keepdim=True)
        h = h * nn.functional.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(s))))
        return self.head(a + self.project(h))


class ResBlockNet(nn.Module):
    """A ResNet basic block with a strided projection shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.stem(x)))
        h = self.conv2(torch.relu(self.conv1(a)))
        return self.head(torch.relu(h + self.shortcut(a)))


@pytest.mark.parametrize("net_class", [StreamNet, MobileBlockNet, ResBlockNet])
def test_qcdq_at_onnxruntime_default_optimisation_agrees_as_sqnr(net_class, video, tmp_path):
    """onnxruntime's default level fuses QDQ around convs into integer kernels that round
    differently; that noise must stay far below the quantization noise itself (>= 10 dB)."""
    from resq_brevitas.experiments.metrics import sqnr_db

    qm = build(net_class)
    torch.manual_seed(0)
    float_net = net_class().eval()
    with torch.no_grad():
        float_net.bn.running_mean.uniform_(-0.3, 0.3)
        float_net.bn.running_var.uniform_(0.5, 2.0)
        reference = qm(video)
        dense = torch.stack([float_net(video[:, t]) for t in range(video.shape[1])], 1)
    export(qm, video[:, 0], tmp_path, format="qcdq")
    fused = torch.from_numpy(OnnxStream(tmp_path, optimization="all").run(video))
    quantization = sqnr_db(dense, reference)
    assert sqnr_db(reference, fused) >= quantization + 10.0, (quantization,
                                                              sqnr_db(reference, fused))
def test_sparse_execution_exports_the_dense_graphs(qm, video, reference, tmp_path):
    """Export runs the dense op whatever the runtime executor: the same ONNX graphs, and the
    stream reproduces the dense model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-fallback report
        sparse = resq.with_execution(qm, "sparse")
    export(qm, video[:, 0], tmp_path / "dense", format="qcdq")
    export(sparse, video[:, 0], tmp_path / "sparse", format="qcdq")
    for name in ("keyframe", "residual"):
        graphs = [onnx.load(str(tmp_path / kind / f"{name}.onnx")).graph
                  for kind in ("dense", "sparse")]
        assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    out = OnnxStream(tmp_path / "sparse").run(video)
    assert_stream_matches(out, reference, output_step(qm))
    with torch.no_grad():
        assert_stream_matches(sparse(video).numpy(), reference, output_step(qm))
