"""The sparse residual executor: equal to the dense op, tiles that follow the receptive field,
nothing computed for a static input, executors chosen once and reported."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resq_brevitas as resq
from resq_brevitas import with_execution
from resq_brevitas.nn import ResQConv2d, ResQConvTranspose2d, ResQLinear
from resq_brevitas.nn.executors import (
    DenseOp,
    SparseTileOp,
    build_contribution_op,
    reset_tile_counters,
    tiles_of,
)
from resq_brevitas.nn.residual import value_of
from resq_brevitas.nn.sparse import (
    active_tiles,
    conv_geometry,
    plan_axes,
    sparse_conv_contribution,
    sparse_linear_contribution,
    sparse_quantize,
    sparse_quantize_rows,
)
from tests.helpers import make_all_layers_net, make_clip
from tests.nn.test_layers import CASES, QUANT, _ids

pytestmark = pytest.mark.usefixtures("single_thread")

CONV_CASES = [c for c in CASES if c[0] is not ResQLinear]
LINEAR_CASES = [c for c in CASES if c[0] is ResQLinear]
DENSITIES = [0.0, 0.05, 0.3, 1.0]


def sparse_input(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """Random values on a random share ``density`` of the pixels (all channels of a pixel), plus
    a few lone non-zero entries, so that both whole pixels and single channels are exercised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    pixels = torch.rand((shape[0], 1, *shape[2:]), generator=g) < density
    lone = torch.rand(shape, generator=g) < density / 10
    return x * (pixels | lone)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("box_slack", [0.0, float("inf")], ids=["tiles", "boxes"])
@pytest.mark.parametrize("tile", [None, 3])
@pytest.mark.parametrize("cls,kwargs,shape", CONV_CASES, ids=[_ids(c) for c in CONV_CASES])
def test_sparse_conv_equals_the_layers_dense_op(cls, kwargs, shape, tile, box_slack,
                                                density) -> None:
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT)
    q = sparse_input(shape, density, seed=1)
    weight = layer.residual.quant_weight().detach()
    result = sparse_conv_contribution(q, weight, conv_geometry(layer), tile,
                                      box_slack=box_slack)
    expected = layer.residual.view.inner_forward_impl(q, weight, None)
    torch.testing.assert_close(result.out, expected, rtol=1e-5, atol=1e-6)
    assert 0 <= result.computed <= result.total
    if density == 1.0:
        assert result.computed == result.total


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("cls,kwargs,shape", LINEAR_CASES, ids=[_ids(c) for c in LINEAR_CASES])
def test_sparse_linear_computes_only_tokens_with_a_feature(cls, kwargs, shape, density) -> None:
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(shape, generator=g) * (torch.rand((*shape[:-1], 1), generator=g) < density)
    weight = layer.residual.quant_weight().detach()
    result = sparse_linear_contribution(q, weight)
    torch.testing.assert_close(result.out, F.linear(q, weight), rtol=1e-5, atol=1e-6)
    assert result.computed == int((q != 0).any(-1).sum())
    assert result.total == q[..., 0].numel()


def random_conv(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]] | None:
    """A random Conv1d/2d/3d or ConvTranspose1d/2d/3d and an input shape (``None`` if torch
    refuses the combination)."""
    rank = rng.choice([1, 2, 3])
    groups = rng.choice([1, 2])
    cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    k = tuple(rng.randint(1, 5) for _ in range(rank))
    s = tuple(rng.randint(1, 3) for _ in range(rank))
    d = tuple(rng.randint(1, 2) for _ in range(rank))
    size = tuple(rng.randint(1, 12) for _ in range(rank))
    try:
        if rng.random() < 0.4:
            p = tuple(rng.randint(0, d[i] * (k[i] - 1)) for i in range(rank))
            extra = tuple(rng.randint(0, max(s[i], d[i]) - 1) for i in range(rank))
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[rank - 1]
            layer = cls(cin, cout, k, s, p, extra, groups, False, d)
        else:
            p = rng.choice(["same", "valid", tuple(rng.randint(0, 3) for _ in range(rank))])
            s = (1,) * rank if p == "same" else s
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
            layer = cls(cin, cout, k, s, p, d, groups, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # padding="same" with even kernels
            layer(torch.zeros(2, cin, *size))
    except RuntimeError:  # an output smaller than 1, or output_padding too large
        return None
    return layer, (2, cin, *size)


def test_random_geometries_equal_torch() -> None:
    """Stride, padding (ints, "same", "valid"), dilation, groups, output padding, 1-3 spatial
    dims, transposed or not, tiles of 1..9 and the automatic tile: torch's own op decides."""
    rng = random.Random(0)
    checked = 0
    while checked < 120:
        drawn = random_conv(rng)
        if drawn is None:
            continue
        layer, shape = drawn
        q = sparse_input(shape, rng.choice(DENSITIES), seed=checked)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            expected = layer(q)
        tile = rng.choice([None, 1, 2, 5, 9])
        for box_slack in (0.0, float("inf")):
            result = sparse_conv_contribution(q, layer.weight.detach(), conv_geometry(layer), tile,
                                              box_slack=box_slack)
            torch.testing.assert_close(result.out, expected, rtol=1e-5, atol=1e-6,
                                       msg=f"{layer} on {shape}, tile {tile}")
        checked += 1


def test_brevitas_strided_same_padding_equals_the_layer() -> None:
    layer = ResQConv2d(3, 4, 3, stride=2, padding="same", **QUANT)
    assert layer.is_same_padded_strided
    q = sparse_input((1, 3, 9, 10), 0.2, seed=3)
    weight = layer.residual.quant_weight().detach()
    result = sparse_conv_contribution(q, weight, conv_geometry(layer), 2)
    torch.testing.assert_close(result.out, layer.residual.view.inner_forward_impl(q, weight, None))


@pytest.mark.parametrize("cls,kwargs,shape", CONV_CASES, ids=[_ids(c) for c in CONV_CASES])
def test_an_all_zero_residual_computes_no_tile_and_no_weight(cls, kwargs, shape) -> None:
    layer = cls(**kwargs, **QUANT)
    calls = []

    def weight() -> torch.Tensor:
        calls.append(1)
        return layer.residual.quant_weight()

    result = sparse_conv_contribution(torch.zeros(shape), weight, conv_geometry(layer))
    assert result.computed == 0 and result.total > 0
    assert not calls  # nothing computed: the quantized weight is not even needed
    expected = layer.residual.view.inner_forward_impl(torch.zeros(shape),
                                                      layer.residual.quant_weight(), None)
    assert result.out.shape == expected.shape and not result.out.any()


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 3, 3, padding=1),
    nn.Conv2d(2, 3, 5, padding=2),
    nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1),
], ids=["conv3x3", "conv5x5", "convT4s2"])
def test_active_tiles_are_the_tiles_a_pixel_reaches(layer) -> None:
    """One non-zero input pixel: the active tiles are exactly the output tiles that the dense op
    with a positive weight changes (no tile missing, none too many)."""
    torch.manual_seed(0)
    geometry = conv_geometry(layer)
    size, tile = (13, 11), 4
    plans = plan_axes(geometry, size, (tile, tile))
    weight = layer.weight.detach().abs() + 0.1
    for y, x in [(0, 0), (6, 5), (12, 10), (3, 8)]:
        q = torch.zeros(1, 2, *size)
        q[0, 1, y, x] = 1.0
        active = active_tiles(F.pad(q, [plans[1].pad_before, plans[1].pad_after,
                                          plans[0].pad_before, plans[0].pad_after]), plans)
        out = (F.conv_transpose2d(q, weight, None, layer.stride, layer.padding)
               if geometry.transposed else F.conv2d(q, weight, None, 1, layer.padding))
        grid = [p.tiles * p.tile for p in plans]
        reached = F.pad(out, [0, grid[1] - out.shape[3], 0, grid[0] - out.shape[2]])
        reached = reached.abs().sum(1).view(1, plans[0].tiles, plans[0].tile, plans[1].tiles,
                                            plans[1].tile).amax((2, 4)) > 0
        assert torch.equal(active, reached), (y, x)


def brevitas_quantizer(bits: int = 4, threshold: float = 1.0):
    layer = ResQConv2d(3, 4, 3, padding=1, keyframe="W8A8", residual=f"W8A{bits}")
    from resq_brevitas.quant.line_search import set_act_threshold

    set_act_threshold(layer.residual.view.input_quant, threshold)
    return layer.residual


@pytest.mark.parametrize("box_slack", [0.0, float("inf")], ids=["tiles", "boxes"])
def test_sparse_quantize_equals_the_quantizer_and_skips_the_zero_band(box_slack) -> None:
    path = brevitas_quantizer(bits=4, threshold=1.0)
    quant = path.view.input_quant
    step = float(quant.scale().detach())
    band = path.zero_band()
    # Half a step rounds to 0 (round half to even), anything above to +-1: the band is just
    # below s / 2, and it is what the quantizer itself maps to 0.
    assert 0.499 * step < band < 0.5 * step
    assert not value_of(quant(torch.tensor([band, -band]))).any()
    assert value_of(quant(torch.tensor([0.5001 * step]))).item() == step
    g = torch.Generator().manual_seed(0)
    delta = torch.zeros(2, 3, 20, 18)
    delta[:, :, :8, :8] = (torch.rand(2, 3, 8, 8, generator=g) - 0.5) * 1.4 * step  # near s / 2
    delta[:, :, 12:, 4:] = (torch.rand(2, 3, 8, 14, generator=g) - 0.5) * 0.9 * step  # in band
    delta[1, 2, 19, 17] = 3 * step  # in the border strip (18 and 20 are not multiples of 8)
    result = sparse_quantize(lambda t: value_of(quant(t)), delta, 8, zero_band=band,
                             box_slack=box_slack)
    assert torch.equal(result.out, value_of(quant(delta)))
    assert result.computed < result.total  # the in-band tiles were skipped


def test_sparse_quantize_rows_equals_the_quantizer() -> None:
    path = brevitas_quantizer(bits=4, threshold=2.0)
    quant = path.view.input_quant
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(3, 5, 6, generator=g) * (torch.rand(3, 5, 1, generator=g) < 0.4)
    result = sparse_quantize_rows(lambda t: value_of(quant(t)), delta, path.zero_band())
    assert torch.equal(result.out, value_of(quant(delta)))
    assert result.computed == int((delta.abs() > path.zero_band()).any(-1).sum())


@pytest.mark.parametrize("cls,kwargs,shape", CASES, ids=[_ids(c) for c in CASES])
def test_the_sparse_executor_in_a_layer_equals_the_dense_one(cls, kwargs, shape) -> None:
    """Quantizer, padded buffer and op together, through the layer's residual path."""
    torch.manual_seed(0)
    layer = cls(**kwargs, **QUANT).eval()
    delta = 3 * sparse_input(shape, 0.2, seed=4)
    with torch.no_grad():
        dense = layer.residual_forward(delta)
        op, reason = build_contribution_op(layer, "sparse", min_intensity=0, min_elements=0)
        assert reason is None and isinstance(op, SparseTileOp)
        layer.residual.op = op
        sparse = layer.residual_forward(delta)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    assert op.counter.calls == 1 and op.quant_counter.calls == 1


def test_execution_dense_is_the_default_and_unchanged() -> None:
    qm = resq.convert(make_all_layers_net(), resq.ResQConfig("W8A8->W4A4"))
    assert qm.dense_fallback_layers == ()
    torch.manual_seed(0)
    for _, layer in qm.resq_layers():
        assert isinstance(layer.residual.op, DenseOp)
    layer = dict(qm.resq_layers())["grouped"]
    delta = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        sent = layer.residual.quantize(delta)
        # Byte for byte the Brevitas layer's own op on the quantized residual.
        assert torch.equal(layer.residual.contribution(sent),
                           layer.residual.view.inner_forward_impl(
                               sent.q, layer.residual.quant_weight(), None))


def test_sparse_execution_reports_the_layers_whose_op_stays_dense() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 32, 3, padding=1))
    with pytest.warns(UserWarning, match="run their residual op dense") as record:
        qm = resq.convert(net, resq.ResQConfig("W8A8->W4A4", execution="sparse"))
    fallbacks = dict(item.split(" ", 1) for item in qm.dense_fallback_layers)
    assert set(fallbacks) == {"2", "4"}
    assert "padding_mode must be 'zeros'" in fallbacks["2"]
    assert "9 MACs per input element < min_intensity 16" in fallbacks["4"]
    assert "2 (" in str(record[0].message) and "4 (" in str(record[0].message)
    layers = dict(qm.resq_layers())
    assert isinstance(layers["2"].residual.op, DenseOp)
    assert isinstance(layers["4"].residual.op, SparseTileOp)  # quantization stays sparse
    assert not layers["4"].residual.op.sparse_op
    assert isinstance(layers["0"].residual.op, SparseTileOp) and layers["0"].residual.op.sparse_op


def test_with_execution_copies_and_validates() -> None:
    qm = resq.convert(make_all_layers_net(), resq.ResQConfig("W8A8->W4A4"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = with_execution(qm, "sparse", tile=4, dense_above=1.0)
    assert sparse.config.execution == "sparse" and qm.config.execution == "dense"
    assert all(isinstance(layer.residual.op, DenseOp) for _, layer in qm.resq_layers())
    op = dict(sparse.resq_layers())["stem"].residual.op
    assert op.tile == (4, 4) and op.dense_above == 1.0
    with pytest.raises(ValueError, match="execution must be one of"):
        with_execution(qm, "fast")
    with pytest.raises(ValueError, match=r"options \['tile'\] apply to execution='sparse' only"):
        with_execution(qm, "dense", tile=4)
    with pytest.raises(ValueError, match="dense_above must be a number in"):
        with_execution(qm, "sparse", dense_above=1.5)
    with pytest.raises(ValueError, match="tile must be an int >= 0"):
        with_execution(qm, "sparse", tile=(4, -1))
    with pytest.raises(TypeError, match="qm must be a resq_brevitas.ResQModel"):
        with_execution(make_all_layers_net(), "sparse")


def partly_static(clip: torch.Tensor) -> torch.Tensor:
    """``clip`` whose left three quarters stay as in frame 0: residuals are zero there."""
    out = clip.clone()
    width = clip.shape[-1]
    out[..., : 3 * width // 4] = clip[:, :1, ..., : 3 * width // 4]
    return out


def run_both(config: resq.ResQConfig, clip: torch.Tensor):
    net = make_all_layers_net()
    dense = resq.convert(net, config)
    resq.calibrate(dense, [make_clip(batch=2, frames=6, seed=5)], progress=False)
    dense.measure_density = True  # the densities are compared below (static ResQ: off by default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = with_execution(dense, "sparse", min_elements=0)  # tile even these small inputs
    with torch.no_grad():
        return dense, dense(clip), sparse, sparse(clip)


CONFIGS = {
    "static": resq.ResQConfig("W8A8->W4A4", period=4),
    "dynamic": resq.ResQConfig("W8A8->W8A{0,4,8}", period=4,
                               policy=resq.ErrorBoundPolicy(tau=0.3)),
    "rrm": resq.ResQConfig("W8A8->W8A8", period=8, reference="previous", threshold=0.05),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sparse_model_equals_dense_model(name) -> None:
    clip = partly_static(make_clip(batch=2, frames=8, seed=6))
    dense, y_dense, sparse, y_sparse = run_both(CONFIGS[name], clip)
    for key in y_dense:
        torch.testing.assert_close(y_sparse[key], y_dense[key], rtol=1e-4, atol=1e-5)
    # The executor changes how, not what: costs and densities are the dense model's (up to
    # the rare residual entry that float summation order moves across a rounding boundary).
    assert sparse.last_cost.mean_bops == pytest.approx(dense.last_cost.mean_bops, rel=1e-3)
    density = sparse.last_cost.density
    assert density == pytest.approx(dense.last_cost.density, abs=1e-3)
    assert min(density.values()) < 0.9  # the clip is sparse enough to skip tiles
    tiles = tiles_of(sparse.resq_layers())
    assert 0 < tiles.computed < tiles.total  # the static part was skipped, the rest was not
    if name == "dynamic":  # 0-bit pixels and sent pixels both occur
        bits = torch.cat([b.flatten() for b in sparse.last_bit_maps.values()])
        assert (bits == 0).any() and (bits > 0).any()
    if name == "rrm":  # entries were truncated, and the reference kept advancing
        assert bool((sparse.truncated_energy > 0).all())


def test_a_static_clip_computes_no_tile() -> None:
    clip = make_clip(batch=2, frames=6, seed=7)[:, :1].expand(-1, 6, -1, -1, -1).contiguous()
    dense, y_dense, sparse, y_sparse = run_both(CONFIGS["static"], clip)
    for key in y_dense:
        torch.testing.assert_close(y_sparse[key], y_dense[key], rtol=1e-5, atol=1e-6)
    ops = [layer.residual.op for _, layer in sparse.resq_layers()]
    assert all(op.quant_counter.calls > 0 and op.quant_counter.computed == 0 for op in ops)
    tiles = tiles_of(sparse.resq_layers())
    assert tiles.calls > 0 and tiles.total > 0 and tiles.computed == 0
    reset_tile_counters(sparse.resq_layers())
    assert tiles_of(sparse.resq_layers()).calls == 0
    assert all(op.quant_counter.calls == 0 for op in ops)


class ResidualOf(nn.Module):
    """A layer's residual path as a module (to trace it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return self.layer.residual_forward(delta)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_autograd_and_tracing_run_the_dense_op() -> None:
    layer = ResQConvTranspose2d(4, 6, 4, stride=2, padding=1, **QUANT)
    op, _ = build_contribution_op(layer, "sparse")
    layer.residual.op = op
    delta = sparse_input((1, 4, 6, 6), 0.3, seed=8).requires_grad_()
    layer.residual_forward(delta).square().sum().backward()
    assert op.counter.calls == 0  # gradients: the dense op ran
    grad_sparse = (delta.grad.clone(), layer.weight.grad.clone())
    delta.grad, layer.weight.grad = None, None
    layer.residual.op = DenseOp()
    layer.residual_forward(delta).square().sum().backward()
    assert torch.equal(delta.grad, grad_sparse[0]) and torch.equal(layer.weight.grad,
                                                                   grad_sparse[1])
    # TorchScript tracing (Brevitas's own export path; its transposed convs do not trace).
    layer = ResQConv2d(4, 6, 3, padding=1, **QUANT).requires_grad_(False)
    op, _ = build_contribution_op(layer, "sparse")
    layer.residual.op = op
    delta = sparse_input((1, 4, 6, 6), 0.3, seed=8)
    with torch.no_grad():
        traced = torch.jit.trace(ResidualOf(layer), (delta,), check_trace=False)
    assert op.counter.calls == 0
    other = sparse_input((1, 4, 6, 6), 0.5, seed=9)
    with torch.no_grad():
        # The traced graph is the dense op: it holds for another input's sparsity pattern.
        torch.testing.assert_close(traced(other), layer.residual_forward(other))
    assert op.counter.calls == 1  # the eager call ran sparse


def test_small_inputs_are_one_tile_skipped_when_zero() -> None:
    layer = ResQConv2d(4, 8, 3, padding=1, **QUANT).eval()
    op, _ = build_contribution_op(layer, "sparse", min_elements=10_000)
    layer.residual.op = op
    weights = []
    quant_weight = layer.residual.quant_weight
    layer.residual.quant_weight = lambda: weights.append(1) or quant_weight()
    small = torch.zeros(1, 4, 16, 16)  # 1024 elements
    with torch.no_grad():
        assert not layer.residual_forward(small).any()
        assert (op.quant_counter.computed, op.quant_counter.total) == (0, 1)
        assert op.counter.computed == 0 and not weights  # nothing computed, no weight
        small[0, 2, 5, 7] = 1.0
        torch.testing.assert_close(layer.residual_forward(small),
                                   layer.residual.view.inner_forward_impl(
                                       layer.residual.view.input_quant(small).value,
                                       quant_weight(), None))
    assert (op.quant_counter.computed, op.quant_counter.total) == (1, 2)
    # the second call ran dense: every output tile, half of the two calls' tiles
    assert op.counter.total == 2 * op.counter.computed > 0 and weights
