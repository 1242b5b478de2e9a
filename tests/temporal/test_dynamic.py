"""Dynamic-ResQ inside ResQ models: pools, bit maps, cost, configuration errors, recipe."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.nn import DEFAULT_LAYER_MAP
from resq_brevitas.policy import policy_bops
from resq_brevitas.quant import act_threshold

SCHEME = "W8A8->W8A{0,4,8}"
SIZE = 16


class TinyConvNet(nn.Module):
    """Three convs: every layer's input pixel sees only a local neighbourhood of the frame."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


#: How far (in pixels) each layer's input reaches into the frame around a pixel.
REACH = {"a": 0, "b": 1, "head": 2}
REGION = (slice(2, 8), slice(2, 8))  # rows, cols of the moving square's bounding box


def _moving_region_clip(frames: int = 6, seed: int = 0) -> torch.Tensor:
    """``[1, T, 3, H, W]``: a static textured background and a square moving inside REGION."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(3, SIZE, SIZE, generator=g)
    square = 3 * torch.randn(3, 3, 3, generator=g)
    clip = background.repeat(frames, 1, 1, 1)
    for t in range(frames):
        top, left = 2 + t % 4, 2 + (t // 2) % 4
        clip[t, :, top:top + 3, left:left + 3] = square
    return clip.unsqueeze(0)


def _model(tau: float = 1e-9, granularity: str = "pixel", k: int = 4, period: int = 6,
           net: nn.Module | None = None, **kwargs) -> resq.ResQModel:
    torch.manual_seed(0)
    config = resq.ResQConfig(scheme=SCHEME, period=period,
                             policy=resq.ErrorBoundPolicy(tau=tau, granularity=granularity, k=k),
                             **kwargs)
    qm = resq.convert(net if net is not None else TinyConvNet().eval(), config)
    return resq.calibrate(qm, [_moving_region_clip(seed=1)[0]], samples=6, candidates=6,
                          progress=False)


def _dilated_region(reach: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    rows, cols = REGION
    mask[max(0, rows.start - reach):rows.stop + reach, max(0, cols.start - reach):cols.stop
         + reach] = True
    return mask


def test_static_clip_gets_zero_bits_and_costs_only_the_policy() -> None:
    qm = _model()
    frame = _moving_region_clip(frames=1, seed=5)
    static = frame.repeat(1, 5, 1, 1, 1)
    with torch.no_grad():
        qm(static)
    cost = qm.last_cost
    for name, bits in qm.last_bit_maps.items():
        assert bool((bits[:, 0] == 8).all()), name  # the keyframe, at keyframe bits
        assert bool((bits[:, 1:] == 0).all()), name
    # the policy's work, computed from the layer shapes: n * b^2 * (C * P + 2 * units)
    layers = dict(qm.resq_layers())
    expected = sum(policy_bops(3, layers[n].in_channels, SIZE * SIZE, SIZE * SIZE, 8)
                   for n in ("a", "b", "head"))
    for t in range(1, 5):
        assert cost.per_frame[t] == pytest.approx(expected)
        assert cost.per_frame_policy[t] == pytest.approx(expected)
    assert cost.per_frame_policy[0] == 0
    assert cost.per_frame[0] == pytest.approx(sum(m * 64 for m in cost.macs.values()))
    assert all(cost.density[n] == 0 for n in cost.density)


def test_moving_region_concentrates_high_bits() -> None:
    qm = _model()
    with torch.no_grad():
        qm(_moving_region_clip(frames=6, seed=2))
    maps = qm.last_bit_maps
    assert set(maps) == {"a", "b", "head"}
    for name, reach in REACH.items():
        bits = maps[name][0, 1:].float()  # residual frames
        inside = _dilated_region(reach)
        assert bool((bits[:, ~inside] == 0).all()), name  # nothing moved there
        assert bits[:, inside].mean() > 0, name
    # at the frame input, every pixel that differs from the keyframe (the reference) by a step
    # the 4-bit quantizer resolves gets bits
    clip = _moving_region_clip(6, 2)[0]
    step = 2 * act_threshold(dict(qm.resq_layers())["a"].residual.pool[1].act_quant) / 15
    moved = ((clip[1:] - clip[:1]).abs() > step).any(1)
    assert bool(moved.any()) and bool((maps["a"][0, 1:][moved] > 0).all())


def test_residual_cost_counts_each_pixel_at_its_bits() -> None:
    qm = _model(tau=0.05)
    with torch.no_grad():
        qm(_moving_region_clip(frames=5, seed=3))
    cost = qm.last_cost
    layers = dict(qm.resq_layers())
    used = set()
    for t in range(1, 5):
        expected = 0.0
        for name, macs in cost.macs.items():
            bits = qm.last_bit_maps[name][0, t].double()
            used |= set(bits.unique().tolist())
            # b * b_w * MACs / P summed over pixels = mean bits * b_w * MACs
            expected += float(bits.mean()) * 8 * macs
            expected += policy_bops(3, layers[name].in_channels, SIZE * SIZE, SIZE * SIZE, 8)
        assert cost.per_frame[t] == pytest.approx(expected)
    assert {0, 4} <= used or {0, 8} <= used  # a real mix, not a single precision


def test_region_and_frame_granularity_share_decisions() -> None:
    clip = _moving_region_clip(frames=4, seed=4)
    for granularity, k in (("region", 3), ("frame", 1)):
        qm = _model(granularity=granularity, k=k)
        with torch.no_grad():
            qm(clip)
        for name, bits in qm.last_bit_maps.items():
            bits = bits[0, 1:]
            if granularity == "frame":
                assert bool((bits == bits[:, :1, :1]).all()), name
                continue
            for r0 in range(0, SIZE, k):
                for c0 in range(0, SIZE, k):
                    block = bits[:, r0:r0 + k, c0:c0 + k]
                    assert bool((block == block[:, :1, :1]).all()), (name, r0, c0)


def test_quantization_disabled_equals_float_model() -> None:
    net = TinyConvNet().eval()
    qm = _model(net=net, tau=1e-3)
    clip = _moving_region_clip(frames=6, seed=6)
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
        dense = torch.stack([net(clip[:, t]) for t in range(6)], 1)
    assert ((out - dense).abs().max() / dense.abs().max()).item() <= 1e-5


def test_rows_keep_their_own_phase_and_state_dict_round_trip() -> None:
    qm = _model(tau=1e-2, period=3)
    clip = torch.cat([_moving_region_clip(6, 7), _moving_region_clip(6, 8)])
    with torch.no_grad():
        row0 = qm(clip[:1])[0]
        row1_late = qm(clip[1:, 2:])[0]
        qm.reset()
        qm.step(clip[:, 0])
        qm.step(clip[:, 1])
        qm.reset(rows=[1])  # row 1's stream restarts here
        mixed = torch.stack([qm.step(clip[:, t]) for t in range(2, 6)], 1)
        bits = qm.last_bit_maps["b"]
    torch.testing.assert_close(mixed[0], row0[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], row1_late[:4], rtol=0, atol=1e-5)
    assert bool((bits[1, 0] == 8).all())  # last step: row 1 at its keyframe (phase 3 -> key)
    fresh = resq.convert(TinyConvNet().eval(), qm.config)
    fresh.load_state_dict(qm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(clip), qm(clip), rtol=0, atol=0)


def test_policy_config_errors_name_the_argument() -> None:
    policy = resq.ErrorBoundPolicy()
    with pytest.raises(ValueError, match="policy needs a scheme with a pool"):
        resq.ResQConfig(scheme="W8A8->W4A4", policy=policy)
    with pytest.raises(ValueError, match="needs a policy"):
        resq.ResQConfig(scheme=SCHEME)
    with pytest.raises(TypeError, match="policy must be a resq_brevitas.ErrorBoundPolicy"):
        resq.ResQConfig(scheme=SCHEME, policy={"tau": 1e-3})
    with pytest.raises(ValueError, match=r"tau must be a finite number >= 0, got -1"):
        resq.ErrorBoundPolicy(tau=-1)
    with pytest.raises(TypeError, match="tau must be a real number, got str"):
        resq.ErrorBoundPolicy(tau="big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity must be one of"):
        resq.ErrorBoundPolicy(granularity="tile")
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        resq.ErrorBoundPolicy(granularity="region", k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        resq.ErrorBoundPolicy(k=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count_bops needs a static scheme"):
        resq.count_bops(TinyConvNet(), (3, 8, 8), SCHEME)


def test_recipe_adds_dynamic_rows_and_bit_map_figure(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "apply_resq.py"
    spec = importlib.util.spec_from_file_location("apply_resq_under_test", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    code = recipe.main(["--scheme", SCHEME, "--tau", "1e-3", "0.1",
                        "--period", "2", "--eval-clips", "1", "--frames", "3", "--size", "32",
                        "--calib-samples", "3", "--candidates", "4", "--out", str(tmp_path),
                        "--no-progress"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    dynamic = [r for r in rows if r["method"] == "dynamic"]
    assert sorted(r["tau"] for r in dynamic) == [1e-3, 0.1]
    assert all(r["scheme"] == SCHEME and r["policy_bops"] > 0 for r in dynamic)
    assert rows[0]["method"] == "float" and len(rows) == 3
    assert (tmp_path / "dynamic_bit_maps.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_bops.png").stat().st_size > 0


def test_layer_statistics_and_figures(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from resq_brevitas.experiments.evaluation import EvalRow, layer_statistics
    from resq_brevitas.experiments.figures import (
        plot_accuracy_vs_bops,
        plot_bit_maps,
        plot_layer_statistics,
    )

    net = TinyConvNet().eval()
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1, 3, SIZE, SIZE, generator=g)
    clip = base + 0.05 * torch.randn(5, 3, SIZE, SIZE, generator=g).cumsum(0)
    stats = layer_statistics(net, [clip], bits=4)
    assert [s.name for s in stats] == ["a", "b", "head"]
    # a temporally coherent clip: residuals vary less, and quantize with less error (Fig. 2)
    assert all(s.residual_var < s.frame_var and s.residual_qerr < s.frame_qerr for s in stats)
    assert plot_layer_statistics(stats, tmp_path / "fig2.png", bits=4).stat().st_size > 0
    maps = {"a": torch.randint(0, 3, (2, 4, SIZE, SIZE)) * 4, "fc": torch.zeros(2, 4, 5)}
    path = plot_bit_maps(maps, tmp_path / "fig6.png", video=clip[:4])
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="no 2-D"):
        plot_bit_maps({"fc": torch.zeros(2, 4, 5)}, tmp_path / "none.png")
    rows = [EvalRow("frame", "W8A8", 1, 0.9, 0.95, 30.0, 4e9),
            EvalRow("resq", "W8A8->W8A4", 4, 0.88, 0.9, 25.0, 2.5e9),
            EvalRow("dynamic", SCHEME, 4, 0.89, 0.92, 26.0, 1.5e9, tau=1e-3),
            EvalRow("dynamic", SCHEME, 4, 0.85, 0.9, 24.0, 1.0e9, tau=1e-2),
            EvalRow("rrm", "W8A8->W8A8", 16, 0.9, 0.95, 29.0, 4e9, threshold=0.01,
                    sparse_bops=2e9)]
    assert plot_accuracy_vs_bops(rows, tmp_path / "curve.png").stat().st_size > 0


def test_every_layer_type_runs_a_pool() -> None:
    """Conv1d/2d/3d, ConvTranspose2d and Linear (tokens and [B, F]) all take per-pixel bits."""
    from tests.helpers import make_all_layers_net, make_clip

    net = make_all_layers_net()
    config = resq.ResQConfig(scheme=SCHEME, period=3, policy=resq.ErrorBoundPolicy(tau=1e-2))
    qm = resq.calibrate(resq.convert(net, config), [make_clip(batch=1, frames=4)[0]],
                        samples=4, candidates=4, progress=False)
    clip = make_clip(batch=2, frames=4, seed=3)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            inputs[name] = args[0]
        return hook

    hooks = [m.register_forward_hook(keep_input(n))
             for n, m in net.named_modules() if type(m) in DEFAULT_LAYER_MAP]
    with torch.no_grad():
        net(clip[:, 0])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        qm(clip)
    for name, x in inputs.items():
        linear = isinstance(net.get_submodule(name), nn.Linear)
        spatial = tuple(x.shape[1:-1]) if linear else tuple(x.shape[2:])
        assert tuple(qm.last_bit_maps[name].shape) == (2, 4) + spatial, name
    assert any(bool((m[:, 1:] > 0).any()) for m in qm.last_bit_maps.values())
    with torch.no_grad(), resq.quantization_disabled(qm):
        out = qm(clip)
    dense = torch.stack([net(clip[:, t])["seg"] for t in range(4)], 1)
    assert ((out["seg"] - dense).abs().max() / dense.abs().max()).item() <= 1e-5
