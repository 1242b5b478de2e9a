"""resq_brevitas.experiments.analysis: per-layer sensitivities, ranges, reports."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import resq_brevitas as resq
from resq_brevitas.experiments.analysis import (
    AnalysisReport,
    QuantizerSwitch,
    analyze,
    format_analysis,
    layer_quantizers,
    write_analysis,
)
from resq_brevitas.quant.line_search import set_act_threshold
from tests.helpers import TwoInputFlowNet, make_clip, make_two_input_clip

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("a", "b", "c", "head")


class TinyNet(nn.Module):
    """Four convs with ReLUs: the first sees the raw (signed) frames, the others post-ReLU ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.head(torch.relu(self.c(x)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def tiny_clips() -> list[torch.Tensor]:
    """Clips ``[B, T, C, H, W]`` (also a loader factory for the recipe test)."""
    return [make_clip(batch=2, frames=6, size=12, seed=s) for s in range(2)]


def calibrated(net: nn.Module, scheme: str = "W8A8", period: int = 3,
               **kwargs) -> resq.ResQModel:
    qm = resq.convert(net, resq.ResQConfig(scheme=scheme, period=period,
                                           calibration=resq.LineSearch(candidates=8, samples=24),
                                           **kwargs))
    return resq.calibrate(qm, tiny_clips(), progress=False)


def output_sqnr(qm: resq.ResQModel, net: nn.Module, clips: list[torch.Tensor]) -> float:
    """Output SQNR of ``qm`` against ``net`` run frame by frame, pooled over all clips."""
    signal = noise = 0.0
    with torch.no_grad():
        for clip in clips:
            ref = torch.stack([net(clip[:, t]) for t in range(clip.shape[1])], 1).double()
            out = qm(clip).double()
            signal += float(ref.pow(2).sum())
            noise += float((ref - out).pow(2).sum())
    return 10 * math.log10(signal / noise)


def only_layer(net: nn.Module, source: resq.ResQModel, layer: str, scheme: str, rest: str,
               ) -> resq.ResQModel:
    """``net`` converted with ``layer`` at ``scheme`` and every other layer at ``rest``, with the
    ranges of ``source`` (so only the switching is compared, not calibration)."""
    overrides = (resq.LayerOverride(layer, scheme), resq.LayerOverride("*", rest))
    config = resq.ResQConfig(scheme=source.config.scheme, period=source.period,
                             overrides=overrides)
    qm = resq.convert(net, config)
    mine = resq.activation_ranges(qm)
    resq.set_activation_ranges(qm, {k: v for k, v in resq.activation_ranges(source).items()
                                    if k in mine})
    return qm


@pytest.fixture(scope="module")
def net(single_thread) -> TinyNet:
    return tiny_net()


@pytest.fixture(scope="module")
def frame_model(net) -> resq.ResQModel:
    return calibrated(net, "W8A8")


@pytest.fixture(scope="module")
def frame_report(frame_model, net):
    return analyze(frame_model, tiny_clips(), net, progress=False)


@pytest.fixture(scope="module")
def resq_model(net) -> resq.ResQModel:
    return calibrated(net, "W8A8->W4A4", period=3)


@pytest.fixture(scope="module")
def resq_report(resq_model, net):
    return analyze(resq_model, tiny_clips(), net, progress=False)


# ---------------------------------------------------------------------------- switching
def test_keyframe_quantizers_are_the_layers_own_and_residual_ones_its_residual_childs(
        resq_model) -> None:
    layer = dict(resq_model.resq_layers())["b"]
    key = layer_quantizers(layer, "keyframe")
    res = layer_quantizers(layer, "residual")
    assert any(p is layer.input_quant for p in key)
    assert any(p is layer.weight_quant for p in key)
    assert any(p is layer.residual.view.input_quant for p in res)
    assert any(p is layer.residual.view.weight_quant for p in res)
    assert not {id(p) for p in key} & {id(p) for p in res}
    assert [p for p in layer_quantizers(layer, "keyframe", "act")] == [layer.input_quant]
    assert [p for p in layer_quantizers(layer, "residual", "weight")] == [
        layer.residual.view.weight_quant]


def test_switch_keeps_user_disabled_quantizers_off_and_restores_every_flag(net) -> None:
    qm = calibrated(net, "W8A8->W4A4")
    layer = dict(qm.resq_layers())["c"]
    layer.weight_quant.disable_quant = True  # the user's choice: must survive
    switch = QuantizerSwitch(qm)
    before = [p.disable_quant for p in switch.proxies]
    with switch.only([layer.weight_quant, layer.input_quant]):
        assert layer.weight_quant.disable_quant and not layer.input_quant.disable_quant
        assert sum(not p.disable_quant for p in switch.proxies) == 1
        with switch.without([layer.input_quant]):
            assert layer.input_quant.disable_quant
            assert not dict(qm.resq_layers())["a"].input_quant.disable_quant
        assert not layer.input_quant.disable_quant
    assert [p.disable_quant for p in switch.proxies] == before


def test_analysis_leaves_the_model_as_it_was(net) -> None:
    qm = calibrated(net, "W8A8->W4A4")
    dict(qm.resq_layers())["c"].weight_quant.disable_quant = True
    qm.train()
    flags = [p.disable_quant for p in QuantizerSwitch(qm).proxies]
    modes = [m.training for m in qm.modules()]
    density = qm.measure_density
    clip = tiny_clips()[0]
    with torch.no_grad():
        before = qm(clip)
    analyze(qm, tiny_clips(), net, progress=False)
    assert [p.disable_quant for p in QuantizerSwitch(qm).proxies] == flags
    assert [m.training for m in qm.modules()] == modes
    assert qm.measure_density == density
    with torch.no_grad():
        assert torch.equal(qm(clip), before)


# ---------------------------------------------------------------------------- sensitivities
def test_keyframe_only_and_all_but_match_models_converted_with_overrides(
        net, frame_model, frame_report) -> None:
    clips = tiny_clips()
    for name in ("a", "c"):
        alone = only_layer(net, frame_model, name, "W8A8", "fp32")
        without = only_layer(net, frame_model, name, "fp32", "W8A8")
        row = frame_report.layer(name)
        assert row.keyframe_only_db == pytest.approx(output_sqnr(alone, net, clips), abs=1e-3)
        assert row.all_but_db == pytest.approx(output_sqnr(without, net, clips), abs=1e-3)
        assert math.isnan(row.residual_only_db)
    assert frame_report.sqnr_db == pytest.approx(output_sqnr(frame_model, net, clips), abs=1e-3)


def test_residual_only_matches_a_model_with_only_that_residual_quantized(
        net, resq_model, resq_report) -> None:
    clips = tiny_clips()
    name = "b"
    residual_alone = only_layer(net, resq_model, name, "fp32->W4A4", "fp32->fp32")
    keyframe_alone = only_layer(net, resq_model, name, "W8A8->fp32", "fp32->fp32")
    row = resq_report.layer(name)
    assert row.residual_only_db == pytest.approx(output_sqnr(residual_alone, net, clips),
                                                 abs=1e-3)
    assert row.keyframe_only_db == pytest.approx(output_sqnr(keyframe_alone, net, clips),
                                                 abs=1e-3)
    # The two paths are different quantizers: a mix-up would make these equal.
    assert abs(row.residual_only_db - row.keyframe_only_db) > 1.0


def test_a_layer_with_a_tiny_activation_range_ranks_first(net) -> None:
    qm = calibrated(net, "W8A8")
    set_act_threshold(dict(qm.resq_layers())["b"].input_quant, 1e-3)
    report = resq.analyze(qm, tiny_clips(), net, progress=False)  # the public name
    assert report.ranked()[0].name == "b"
    assert max(report.layers, key=lambda r: r.all_but_db).name == "b"
    assert report.layer("b").frames.clipped > 0.3
    assert all(report.layer(n).frames.clipped < 0.05 for n in ("a", "c", "head"))


def test_a_weight_with_a_huge_outlier_channel_ranks_first(net) -> None:
    broken = copy.deepcopy(net)
    with torch.no_grad():
        # Channel 0 gets weights 1000x the others and a bias that keeps it below zero, so ReLU
        # zeroes it: the float function is unchanged, only the per-tensor weight scale suffers.
        broken.b.weight[0] *= 1000.0
        broken.b.bias[0] = -1e7
        for clip in tiny_clips():
            x = torch.relu(broken.a(clip.flatten(0, 1)))
            assert bool((broken.b(x)[:, 0] < 0).all())
    qm = calibrated(broken, "W8A8")
    report = analyze(qm, tiny_clips(), broken, progress=False)
    assert report.ranked()[0].name == "b"
    assert report.layer("b").weights.spread > 100
    local_weight = {r.name: r.local_db["keyframe_weight"] for r in report.layers}
    assert min(local_weight, key=local_weight.get) == "b"


def test_unsigned_alternative_is_reported_only_for_non_negative_inputs(frame_report) -> None:
    assert "keyframe_act_unsigned" not in frame_report.layer("a").local_db  # raw, signed frames
    for name in ("b", "c", "head"):
        local = frame_report.layer(name).local_db
        assert frame_report.layer(name).frames.nonnegative
        assert local["keyframe_act_unsigned"] > local["keyframe_act"]


# ---------------------------------------------------------------------------- ranges
def test_range_statistics_match_a_direct_computation(resq_model, resq_report) -> None:
    clips = tiny_clips()
    frames = torch.cat([c.transpose(0, 1).flatten(0, 1) for c in clips])
    deltas = torch.cat([clip[:, t] - clip[:, (t // 3) * 3] for clip in clips
                        for t in range(clip.shape[1]) if t % 3])
    ranges = resq.activation_ranges(resq_model)
    row = resq_report.layer("a")  # its inputs are the frames themselves
    for stats, x, key, bits in ((row.frames, frames, "a/keyframe/0", 8),
                                (row.residuals, deltas, "a/residual/0", 4)):
        threshold = ranges[key]
        assert stats.threshold == pytest.approx(threshold)
        assert stats.count == x.numel()
        assert stats.min == pytest.approx(float(x.min()))
        assert stats.max == pytest.approx(float(x.max()))
        assert stats.std == pytest.approx(float(x.double().std()), rel=1e-3)
        scale = 2 * threshold / (2 ** bits - 1)
        outside = (x / scale > 2 ** (bits - 1) - 0.5) | (x / scale < -(2 ** (bits - 1)) - 0.5)
        assert stats.clipped == pytest.approx(float(outside.double().mean()))
        resolution = 2 * stats.hist_range / len(stats.histogram)
        for q in (50.0, 99.0):
            expected = float(torch.quantile(x.abs().flatten(), q / 100))
            assert abs(stats.percentiles[f"p{q:g}"] - expected) <= resolution
        assert sum(stats.histogram) + stats.overflow == x.numel()


def test_frame_quantized_models_have_no_residual_statistics(frame_report, resq_report) -> None:
    assert all(r.residuals is None and r.frames is not None for r in frame_report.layers)
    assert all(r.residuals is not None for r in resq_report.layers)
    # Fig. 2 on these slowly drifting clips: residuals vary less than frames in every layer.
    assert all(r.residuals.variance < r.frames.variance for r in resq_report.layers)


def test_streaming_reads_clips_once_and_batching_does_not_change_results(
        resq_model, net, resq_report) -> None:
    one_shot = (clip for clip in tiny_clips())
    report = analyze(resq_model, one_shot, net, max_batch=1, progress=False)
    assert report.clips == resq_report.clips == 4
    assert report.sqnr_db == pytest.approx(resq_report.sqnr_db, abs=1e-4)
    for mine, theirs in zip(report.layers, resq_report.layers):
        assert mine.residual_only_db == pytest.approx(theirs.residual_only_db, abs=1e-4)
        assert mine.frames.histogram == theirs.frames.histogram


# ---------------------------------------------------------------------------- reports
def test_report_files_are_written_and_readable(resq_report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_analysis(resq_report, tmp_path)
    assert {p.name for p in paths} == {"analysis.json", "analysis.csv", "analysis.png",
                                       "analysis_fig2.png"}
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert AnalysisReport.from_dict(data) == resq_report  # everything survives the file
    assert [layer["name"] for layer in data["layers"]] == list(LAYERS)
    assert data["ranking"] == [r.name for r in resq_report.ranked()]
    assert data["layers"][1]["residuals"]["histogram"] == resq_report.layer("b").residuals.histogram
    with open(tmp_path / "analysis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == list(LAYERS)
    assert float(rows[2]["residual_only_db"]) == pytest.approx(resq_report.layer("c")
                                                               .residual_only_db)
    assert all((tmp_path / n).stat().st_size > 5000 for n in ("analysis.png", "analysis_fig2.png"))
    text = format_analysis(resq_report)
    assert all(name in text for name in LAYERS)
    assert f"worst 1: {resq_report.ranked()[0].name} " in text


def test_recipe_analyze_writes_the_report(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("apply_resq", ROOT / "recipes" / "apply_resq.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.main([
        "--model", "tests.experiments.test_analysis:tiny_net", "--clips",
        "tests.experiments.test_analysis:tiny_clip_list", "--scheme", "W8A8", "--period", "2",
        "--calib-samples", "24", "--candidates", "3", "--out", str(tmp_path), "--no-progress",
        "--analyze", "W8A8->W4A4",
    ])
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert (data["notation"], data["period"]) == ("W8A8->W4A4", 2)
    assert [layer["name"] for layer in data["layers"]] == list(LAYERS)


def tiny_clip_list() -> list[torch.Tensor]:
    """A loader factory for the recipe: clips ``[T, C, H, W]``."""
    return [clip for batch in tiny_clips() for clip in batch]


# ---------------------------------------------------------------------------- bad input
def test_a_two_input_model_is_analysed_on_its_tuple_clips() -> None:
    torch.manual_seed(0)
    flow = TwoInputFlowNet().eval()
    qm = resq.convert(flow, resq.ResQConfig(scheme="W8A8->W4A4", period=3))
    clips = [make_two_input_clip(1, 5, size=8, seed=s) for s in range(2)]
    resq.calibrate(qm, clips, samples=10, candidates=5, progress=False)
    report = analyze(qm, clips, float_model=flow, progress=False)
    assert report.clips == 2 and report.frames == 10
    # quantization disabled is the float model fed the right input on each branch (a swapped
    # or repeated input would give a finite SQNR)
    assert report.disabled_db == math.inf or report.disabled_db > 100
    with torch.no_grad():
        whole = torch.cat([qm(c)[0] for c in clips])
        reference = torch.cat([torch.stack([flow(c[0][:, t], c[1][:, t])[0] for t in range(5)], 1)
                               for c in clips])
    expected = 10 * math.log10(reference.square().sum() / (whole - reference).square().sum())
    assert report.sqnr_db == pytest.approx(expected, abs=1e-3)
    with pytest.raises(TypeError, match="clips\\[1\\]"):
        analyze(qm, [clips[0], clips[1][:1]], progress=False)  # one input missing


def test_bad_input_is_rejected_naming_the_argument(net, frame_model) -> None:
    clips = tiny_clips()
    with pytest.raises(TypeError, match="qm must be a ResQModel"):
        analyze(net, clips)
    with pytest.raises(ValueError, match="calibrated"):
        analyze(resq.convert(net, resq.ResQConfig(scheme="W8A8")), clips)
    with pytest.raises(TypeError, match="clips must be"):
        analyze(frame_model, clips[0])
    with pytest.raises(TypeError, match="float_model"):
        analyze(frame_model, clips, float_model=frame_model)
    with pytest.raises(ValueError, match="bins must be even"):
        analyze(frame_model, clips, bins=33)
    with pytest.raises(ValueError, match="fig2_bits"):
        analyze(frame_model, clips, fig2_bits=1)
    with pytest.raises(ValueError, match="clips\\[0\\]"):
        analyze(frame_model, [torch.zeros(3, 12)], progress=False)
    with pytest.raises(TypeError, match="layer must be a ResQ layer"):
        layer_quantizers(nn.Conv2d(1, 1, 1), "keyframe")
    with pytest.raises(ValueError, match="path must be one of"):
        layer_quantizers(dict(frame_model.resq_layers())["a"], "frames")
