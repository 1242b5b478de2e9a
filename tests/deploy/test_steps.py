"""torch.fx: the ResQ tracer, keyframe/residual step graphs and unrolled clips for QAT."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import fx, nn

import resq_brevitas as resq
from resq_brevitas.deploy import (
    RESIDUAL_PREFIX,
    KeyframeStep,
    ResidualStep,
    export_program,
    quant_tensors_disabled,
    step_graphs,
    symbolic_trace,
    unroll,
)
from resq_brevitas.deploy.steps import KEYFRAME_STEP_PREFIX, RESIDUAL_STEP_PREFIX
from resq_brevitas.nn import ZeroResidual
from tests.helpers import make_clip

PERIOD = 4


class FxNet(nn.Module):
    """Conv + BN + in-place ReLU, depthwise conv with a residual add, Linear gate, transposed
    conv and a concat."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=inplace)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn(self.stem(x)))
        a = a + self.dw(a)
        a = a * torch.sigmoid(self.fc(a.mean((2, 3))))[:, :, None, None]
        u = nn.functional.avg_pool2d(torch.relu(self.up(a)), 2)
        return self.head(torch.cat([u, a], dim=1))


class ShapeCheckedNet(FxNet):
    """A shape check in ``forward`` (like the demo model): plain symbolic tracing fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 4:
            raise ValueError(f"x must be [B, C, H, W] with W % 4 == 0, got {tuple(x.shape)}")
        return super().forward(x)


def make_net(inplace: bool = False, net_class: type[FxNet] = FxNet) -> FxNet:
    torch.manual_seed(0)
    net = net_class(inplace).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def clip_of(frames: int, seed: int, batch: int = 2) -> torch.Tensor:
    """The clips of this module: 8x8 frames drifting by 0.15 a frame."""
    return make_clip(batch=batch, frames=frames, size=8, seed=seed, drift=0.15)


def make_qm(scheme: str = "W8A8->W4A4", inplace: bool = False,
            net_class: type[FxNet] = FxNet, **config: object) -> resq.ResQModel:
    """A calibrated ResQ model of an FxNet."""
    net = make_net(inplace, net_class)
    qm = resq.convert(net, resq.ResQConfig(scheme=scheme, period=PERIOD, **config))
    resq.calibrate(qm, [clip_of(PERIOD, seed=s) for s in range(2)], progress=False)
    return qm.eval()


def run_steps(steps, video: torch.Tensor, period: int) -> torch.Tensor:
    """The host loop: keyframe graph every ``period`` frames, state carried in between."""
    outputs, state = [], []
    with torch.no_grad():
        for t in range(video.shape[1]):
            if t % period == 0 or steps.residual is None:
                y, *state = steps.keyframe(video[:, t])
            else:
                y, *state = steps.residual(video[:, t], *state)
            outputs.append(y)
    return torch.stack(outputs, 1)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def qm() -> resq.ResQModel:
    return make_qm()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return clip_of(12, seed=7)


def test_tracer_keeps_resq_layers_as_call_module_leaves(qm):
    gm = symbolic_trace(qm.model)
    layers = {name for name, _ in qm.resq_layers()}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert layers <= set(called)
    # Nothing inside a ResQ layer (quantizers, the residual view, weights) leaks into the graph.
    inner = [n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")
             and any(str(n.target).startswith(f"{name}.") for name in layers)]
    assert inner == []
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(gm(x), qm.model(x))


@pytest.mark.parametrize("scheme,config,feedback", [
    ("W8A8->W4A4", {}, True),
    ("W8A8", {}, True),
    ("W8A8->W6A0", {}, True),
    ("W8A8->W4A4", {"reference": "previous", "threshold": 0.05}, True),
    ("W8A8->W4A4", {"reference": "previous"}, False),
    ("W8A8->W6A0", {"reference": "previous"}, True),
])
def test_step_graphs_reproduce_resq_model(scheme, config, feedback, video):
    qm = make_qm(scheme, error_feedback=feedback, **config)
    steps = step_graphs(qm)
    with torch.no_grad():
        expected = qm(video)
    torch.testing.assert_close(run_steps(steps, video, qm.period), expected, rtol=1e-6, atol=1e-6)
    n_layers = len(list(qm.resq_layers()))
    assert [s.name for s in steps.state] == [
        f"{name}.{kind}" for name, _ in qm.resq_layers() for kind in ("x_ref", "z_ref")]
    assert (steps.residual is None) == (scheme == "W8A8")
    if steps.residual is not None:
        placeholders = [n for n in steps.residual.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == 1 + 2 * n_layers
        # One ResidualStep leaf per ResQ layer; the arithmetic lives in temporal/step.py.
        layers = dict(qm.resq_layers())
        calls = [n.target for n in steps.residual.graph.nodes if n.op == "call_module"
                 and (n.target in layers or n.target.startswith(RESIDUAL_STEP_PREFIX))]
        assert sorted(calls) == sorted(f"{RESIDUAL_STEP_PREFIX}.{name}" for name in layers)
        mode = qm.mode
        for name, layer in layers.items():
            step = steps.residual.get_submodule(f"{RESIDUAL_STEP_PREFIX}.{name}")
            assert isinstance(step, ResidualStep) and step.layer is layer and step.mode == mode
            assert isinstance(layer.residual, ZeroResidual) == scheme.endswith("A0")
        assert (mode.threshold > 0) == bool(config.get("threshold"))
        # A 0-bit residual contributes nothing: the layers' residual ops do not run at all
        # (their residual weights are never quantized).
        called = []
        hooks = [layer.residual.view.weight_quant.register_forward_hook(
            lambda m, i, o: called.append(m)) for layer in layers.values()]
        try:
            with torch.no_grad():
                y, *state = steps.keyframe(video[:, 0])
                steps.residual(video[:, 1], *state)
        finally:
            for hook in hooks:
                hook.remove()
        assert len(called) == (0 if scheme.endswith("A0") else n_layers)


def test_step_graphs_retrace_with_layers_as_leaves(qm, video):
    steps = step_graphs(qm)
    frame = video[:, 0]
    with torch.no_grad():
        y, *state = steps.keyframe(frame)
        y_res, *state_out = steps.residual(video[:, 1], *state)
    key = symbolic_trace(steps.keyframe)
    res = symbolic_trace(steps.residual)
    layers = dict(qm.resq_layers())
    # Each ResQ layer is a call_module leaf of the keyframe graph (inside its KeyframeStep), and
    # of the residual graph (inside its ResidualStep); retracing keeps the steps as leaves.
    for graph_module, prefix, kind in ((key, KEYFRAME_STEP_PREFIX, KeyframeStep),
                                       (res, RESIDUAL_STEP_PREFIX, ResidualStep)):
        calls = [n.target for n in graph_module.graph.nodes if n.op == "call_module"
                 and (n.target.split(".")[0] in layers or n.target.startswith(prefix))]
        assert sorted(calls) == sorted(f"{prefix}.{name}" for name in layers)
        for name, layer in layers.items():
            step = graph_module.get_submodule(f"{prefix}.{name}")
            assert isinstance(step, kind) and step.layer is layer
    # The residual arithmetic (x_t - x_ref, + z_ref) is not spelled out in the graph: only the
    # model's own adds remain.
    def arithmetic(graph_module: fx.GraphModule) -> list[str]:
        return [n.target.__name__ for n in graph_module.graph.nodes if n.op == "call_function"
                and n.target in (operator.sub, operator.add)]

    assert arithmetic(res) == arithmetic(symbolic_trace(qm.model)) == ["add"]
    with torch.no_grad():
        torch.testing.assert_close(key(frame)[0], y)
        torch.testing.assert_close(res(video[:, 1], *state)[0], y_res)
    for before, after in zip(state, state_out):
        assert after is before  # keyframe reference mode: the state passes through


def test_step_graphs_export_with_torch_export(qm, video):
    steps = step_graphs(qm)
    frame = video[:, 0]
    with torch.no_grad():
        y, *state = steps.keyframe(frame)
        y_res = steps.residual(video[:, 1], *state)[0]
    key_program = export_program(steps.keyframe, (frame,))
    with quant_tensors_disabled(steps.residual):
        res_program = torch.export.export(steps.residual, (video[:, 1], *state))
    with torch.no_grad():
        torch.testing.assert_close(key_program.module()(frame)[0], y)
        torch.testing.assert_close(res_program.module()(video[:, 1], *state)[0], y_res)
    # The switch is restored: the proxies build QuantTensors again outside the block.
    assert not any(getattr(m, "skip_create_quant_tensor", False) for m in qm.modules())


def test_step_graphs_protect_state_from_in_place_ops(video):
    qm = make_qm(inplace=True)
    float_net = make_net(inplace=False)
    steps = step_graphs(qm)
    for graph_module in (steps.keyframe, steps.residual):
        leaves = [m for m in graph_module.modules() if isinstance(m, (KeyframeStep, ResidualStep))]
        assert leaves and all(m.private for m in leaves)  # they return private state copies
    # Without quantizers the keyframe/residual decomposition must equal the float model.
    with resq.quantization_disabled(qm):
        streamed = run_steps(steps, video, PERIOD)
    with torch.no_grad():
        dense = torch.stack([float_net(video[:, t]) for t in range(video.shape[1])], 1)
    torch.testing.assert_close(streamed, dense, rtol=1e-5, atol=1e-5)


def test_shape_checks_trace_with_the_example_shape(video):
    qm = make_qm(net_class=ShapeCheckedNet)
    with pytest.raises(RuntimeError, match="could not be traced by torch.fx"):
        step_graphs(qm)
    steps = step_graphs(qm, video[:, 0])
    assert isinstance(steps.keyframe, fx.GraphModule)
    with torch.no_grad():
        expected = qm(video)
    torch.testing.assert_close(run_steps(steps, video, PERIOD), expected, rtol=1e-6, atol=1e-6)
    net = make_net(net_class=ShapeCheckedNet)
    clip = video[:, :PERIOD]
    unrolled = unroll(net, PERIOD, clip)
    with torch.no_grad():
        dense = torch.stack([net(clip[:, t]) for t in range(PERIOD)], 1)
        torch.testing.assert_close(unrolled(clip), dense, rtol=1e-5, atol=1e-5)


def test_step_graphs_reject_non_resq_model_and_pools():
    with pytest.raises(TypeError, match="qm must be a ResQModel"):
        step_graphs(make_net())
    pool = resq.convert(make_net(), resq.ResQConfig(
        scheme="W8A8->W8A{0,4,8}", period=PERIOD, policy=resq.ErrorBoundPolicy(tau=1e-3)))
    with pytest.raises(ValueError, match=r"static residual precision.*W8A\{0,4,8\}"):
        step_graphs(pool)


def test_unrolled_float_clip_equals_dense_frames():
    net = make_net(inplace=True)
    clip = clip_of(PERIOD, seed=3)
    unrolled = unroll(net, PERIOD, clip)
    with torch.no_grad():
        dense = torch.stack([net(clip[:, t]) for t in range(PERIOD)], 1)
        torch.testing.assert_close(unrolled(clip), dense, rtol=1e-5, atol=1e-5)
    layers = ["stem", "dw", "fc", "up", "head"]
    assert list(unrolled.keyframe_sites) == layers
    assert unrolled.residual_sites == {n: f"{RESIDUAL_PREFIX}.{n}" for n in layers}
    calls = [n.target for n in unrolled.graph.nodes if n.op == "call_module"]
    for name, twin in unrolled.residual_sites.items():
        assert calls.count(name) == 1 and calls.count(twin) == PERIOD - 1
        twin_module = unrolled.get_submodule(twin)
        assert twin_module.weight is unrolled.get_submodule(name).weight
        assert twin_module.bias is None
    # The float model is not modified (BN still there, ReLU still in place).
    assert isinstance(net.bn, nn.BatchNorm2d) and net.act.inplace


def test_prepare_qat_fx_gives_keyframe_and_residual_sites_their_bits():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from resq_brevitas.observers import unrolled_qconfig_mapping

    clip = clip_of(PERIOD, seed=4)
    unrolled = unroll(make_net(), PERIOD, clip)
    mapping = unrolled_qconfig_mapping(unrolled, "W8A8->W4A4", samples=4, candidates=8)
    prepared = prepare_qat_fx(unrolled.train(), mapping, (clip,))
    modules = dict(prepared.named_modules(remove_duplicate=False))

    def bits(fake_quant: nn.Module) -> int:
        return int(fake_quant.quant_max - fake_quant.quant_min + 1).bit_length() - 1

    seen = {"key": set(), "res": set()}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target.split(".")[0] == "activation_post_process":
            continue
        module = modules[node.target]
        if not hasattr(module, "weight_fake_quant"):
            continue
        kind = "res" if node.target.startswith(RESIDUAL_PREFIX) else "key"
        act = modules[node.args[0].target]
        seen[kind].add((bits(act), bits(module.weight_fake_quant)))
    assert seen == {"key": {(8, 8)}, "res": {(4, 4)}}
    assert prepared.stem.weight is prepared.get_submodule(f"{RESIDUAL_PREFIX}.stem").weight
    with torch.no_grad():
        assert prepared(clip).shape == (2, PERIOD, 5, 8, 8)


def test_unroll_rejects_bad_input():
    net = make_net()
    clip = clip_of(PERIOD, seed=0)
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        unroll(net, 0, clip)
    with pytest.raises(TypeError, match="period must be an int"):
        unroll(net, 2.0, clip)
    with pytest.raises(ValueError, match=r"T = period = 3, got shape \(2, 4, 3, 8, 8\)"):
        unroll(net, 3, clip)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unroll(lambda x: x, PERIOD, clip)
    with pytest.raises(ValueError, match="no supported layer"):
        unroll(nn.Sequential(nn.ReLU()), PERIOD, clip)


def test_sparse_execution_gives_the_same_step_graphs(qm, video):
    """The executor sits inside the leaf steps: a sparse model's fx step graphs are the dense
    model's, run (eagerly, sparse) to the same outputs, and torch.export traces the dense op."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-fallback report
        sparse = resq.with_execution(qm, "sparse")
    dense_steps, sparse_steps = step_graphs(qm), step_graphs(sparse)
    for kind in ("keyframe", "residual"):
        targets = [(n.op, str(n.target)) for n in getattr(sparse_steps, kind).graph.nodes]
        assert targets == [(n.op, str(n.target)) for n in getattr(dense_steps, kind).graph.nodes]
    torch.testing.assert_close(run_steps(sparse_steps, video, PERIOD),
                               run_steps(dense_steps, video, PERIOD))
    frame = video[:, 0]
    with torch.no_grad():
        state = sparse_steps.keyframe(frame)[1:]
        y_res = dense_steps.residual(video[:, 1], *state)[0]
    with quant_tensors_disabled(sparse_steps.residual):
        program = torch.export.export(sparse_steps.residual, (video[:, 1], *state))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(video[:, 1], *state)[0], y_res)
