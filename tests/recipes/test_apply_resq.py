"""recipes/apply_resq.py on a user model with real .mp4 clips decoded by PyAV."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from resq_brevitas.experiments.video_io import write_video
from tests.helpers import relative_bops

ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    spec = importlib.util.spec_from_file_location("apply_resq", ROOT / "recipes" / "apply_resq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def labelled_clips() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A loader factory for --clips: (clip, labels) pairs."""
    from resq_brevitas.demo.synthetic import make_clip

    return [make_clip(100 + i, frames=4, size=16) for i in range(2)]


def test_recipe_on_mp4_folder_and_user_model(tmp_path: Path) -> None:
    from resq_brevitas.demo.synthetic import make_clip

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"clip{i}.mp4", make_clip(i, frames=8, size=16)[0])
    out = tmp_path / "out"
    recipe = _recipe()
    recipe.main([
        "--model", "tests.helpers:make_all_layers_net", "--clips", str(videos),
        "--scheme", "W8A8->W4A4", "--scheme", "W4A4", "--period", "2",
        "--calib-samples", "8", "--candidates", "4", "--frames", "4", "--size", "16",
        "--out", str(out), "--no-progress",
    ])
    rows = json.loads((out / "results.json").read_text())
    assert [(r["scheme"], r["period"]) for r in rows] == [
        ("fp32", 1), ("W8A8->W4A4", 2), ("W4A4", 1)]
    assert rows[1]["rel_bops"] == pytest.approx(relative_bops("W8A8->W4A4", 2))
    assert rows[2]["rel_bops"] == pytest.approx(relative_bops("W4A4"))
    assert all(math.isnan(r["miou_gt"]) for r in rows)  # videos carry no labels
    assert rows[1]["sqnr_db"] > rows[2]["sqnr_db"]
    assert (out / "results.csv").read_text().count("\n") == 4
    assert (out / "accuracy_vs_bops.png").stat().st_size > 1000


def test_recipe_with_loader_factory_labels(tmp_path: Path) -> None:
    recipe = _recipe()
    recipe.main([
        "--model", "resq_brevitas.demo.model:DemoSegNet", "--clips",
        "tests.recipes.test_apply_resq:labelled_clips", "--scheme", "W8A8", "--calib-samples", "2",
        "--candidates", "3", "--frames", "4", "--out", str(tmp_path), "--no-progress",
    ])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= rows[1]["miou_gt"] <= 1.0
    assert rows[1]["rel_bops"] == pytest.approx(1.0)


def test_recipe_rejects_bad_arguments(capsys) -> None:
    recipe = _recipe()
    for argv in (["--scheme", "W8A8->"], ["--period", "0"], ["--calib-samples", "0"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(argv)
    assert "scheme" in capsys.readouterr().err


def test_recipe_export_writes_step_graphs_and_unrolled_clip(tmp_path: Path) -> None:
    recipe = _recipe()
    recipe.main([
        "--model", "resq_brevitas.demo.model:DemoSegNet", "--clips",
        "tests.recipes.test_apply_resq:labelled_clips", "--scheme", "W8A8->W4A4", "--period", "2",
        "--calib-samples", "4", "--candidates", "3", "--frames", "4", "--out", str(tmp_path),
        "--no-progress", "--export", "qcdq", "fx",
    ])
    manifest = json.loads((tmp_path / "export" / "qcdq" / "manifest.json").read_text())
    assert manifest["period"] == 2
    for graph in ("keyframe.onnx", "residual.onnx"):
        assert (tmp_path / "export" / "qcdq" / graph).stat().st_size > 0
    assert any((tmp_path / "export" / "fx").iterdir())
