"""recipes/apply_resq.py as a user meets it: real .mp4 files, the user's own module from the
current folder, options checked before any work (one-line errors, exit status 2), strict JSON
and the same units in the table, CSV and JSON."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resq_brevitas.experiments.video_io import write_video
from tests.helpers import relative_bops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "apply_resq.py"
pytestmark = pytest.mark.usefixtures("single_thread")


def _recipe():
    spec = importlib.util.spec_from_file_location("apply_resq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], cwd: Path, pythonpath: list[Path] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter, as a user runs it (this worktree's package first)."""
    path = os.pathsep.join(str(p) for p in [*(pythonpath or []), ROOT])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def labelled_clips() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A loader factory for --clips: (clip, labels) pairs."""
    from resq_brevitas.demo.synthetic import make_clip

    return [make_clip(100 + i, frames=4, size=16) for i in range(2)]


# ------------------------------------------------------------------ options checked up front


@pytest.mark.parametrize("option,value,says", [
    ("--eval-clips", "0", "must be an integer >= 1, got '0'"),
    ("--frames", "0", "must be an integer >= 2"),
    ("--frames", "1", "a keyframe and a residual frame"),
    ("--candidates", "0", "must be an integer >= 2, got '0'"),
    ("--calib-samples", "0", "must be an integer >= 1"),
    ("--calib-clips", "x", "must be an integer >= 1, got 'x'"),
    ("--period", "0", "must be an integer >= 1"),
    ("--region-k", "0", "must be an integer >= 1"),
    ("--size", "64x", "must be HxW"),
    ("--tau", "-1", "must be a finite number >= 0"),
    ("--target-bops", "0", "must be a finite number > 0"),
    ("--clips", "{tmp}/missing", "folder '{tmp}/missing' does not exist"),
    ("--clips", "{tmp}/empty", "folder '{tmp}/empty' contains no .mp4 files"),
    ("--checkpoint", "{tmp}/missing.pt", "file '{tmp}/missing.pt' does not exist"),
    ("--model", "mynet.build", "expected 'package.module:factory'"),
])
def test_bad_options_exit_2_with_one_line_naming_the_option(tmp_path, option, value,
                                                           says) -> None:
    (tmp_path / "empty").mkdir()
    value, says = value.format(tmp=tmp_path), says.format(tmp=tmp_path)
    result = _run([option, value, "--out", str(tmp_path / "out")], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and says in lines[0], result.stderr
    assert result.stdout == "" and not (tmp_path / "out").exists()  # nothing was started


def test_a_corrupt_mp4_is_a_one_line_error(tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video" * 50)
    result = _run(["--clips", str(videos), "--model", "tests.helpers:make_all_layers_net",
                   "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--clips:" in lines[0], result.stderr
    assert "broken.mp4 is not a readable video" in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_without_the_extra_fails_before_evaluating(tmp_path) -> None:
    # onnx is installed here: a stub that fails to import stands for its absence
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "onnx.py").write_text("raise ImportError('No module named onnx (test stub)')\n")
    result = _run(["--export", "qcdq", "--out", str(tmp_path / "out")], cwd=tmp_path,
                  pythonpath=[stubs], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--export:" in lines[0], result.stderr
    assert "needs onnx" in lines[0] and "pip install 'resq-brevitas[export]'" in lines[0]
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_missing_modules_imports_each_name(tmp_path, monkeypatch) -> None:
    (tmp_path / "resq_test_broken_extra.py").write_text("raise ImportError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe()
    names = ["json", "resq_test_broken_extra", "resq_test_absent_extra", "json"]
    assert recipe.missing_modules(names) == ["resq_test_broken_extra", "resq_test_absent_extra"]


@pytest.mark.parametrize("argv,option,says", [
    (["--model", "resq_no_such_module:build"], "--model", "cannot import module"),
    (["--scheme", "W8A8->"], "--scheme", "scheme must be 'PREC' or 'PREC->PREC'"),
    (["--scheme", "W4A4", "--tau", "1"], "--tau", "needs a pool scheme"),
    (["--clips", "tests.recipes.test_apply_resq:labelled_clips", "--calib-clips", "2"],
     "--calib-clips", "2 leaves none of the 2 clips to evaluate"),
    (["--clips", "tests.recipes.test_apply_resq:labelled_clips", "--size", "32"], "--size",
     "a loader factory returns clips at its own size"),
    (["--policy", "--clips", "tests.recipes.test_apply_resq:labelled_clips"], "--policy",
     "use it without --model and --clips"),
])
def test_options_checked_before_the_work(capsys, argv, option, says) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main([*argv, "--frames", "4", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1
    assert f"{option}: " in err.err and says in err.err


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--checkpoint: {checkpoint} does not load into DemoSegNet" in err


def test_help_shows_defaults_and_the_examples() -> None:
    text = _recipe().build_parser().format_help()
    assert "calibration frames c (default: 64)" in text
    assert "python recipes/apply_resq.py --model mynet:build" in text  # the docstring's usage
    assert "(default: None)" not in text


# ------------------------------------------------------------------ runs and their outputs


MYNET = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def loader():
    from resq_brevitas.demo.synthetic import make_clip

    return [make_clip(300 + i, frames=4, size=16) for i in range(4)]
'''


def test_user_module_from_the_current_folder_and_outputs_in_one_set_of_units(tmp_path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET)
    result = _run(["--model", "mynet:build", "--clips", "mynet:loader", "--scheme", "W4A4",
                   "--scheme", "W8A8->W4A4", "--period", "2", "--frames", "4",
                   "--calib-samples", "8", "--candidates", "3", "--no-progress", "--out", "out"],
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    records = _strict_json((out / "results.json").read_text())
    assert [(r["method"], r["scheme"]) for r in records] == [
        ("float", "fp32"), ("frame", "W4A4"), ("resq", "W8A8->W4A4")]
    assert records[0]["sqnr_db"] is None and records[0]["miou_float_pct"] == 100.0
    assert all(0.0 <= r["miou_gt_pct"] <= 100.0 for r in records)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for record, row in zip(records, rows):
        for key, value in record.items():
            assert row[key] == ("" if value is None else str(value)), key
    stdout = result.stdout
    # the split is announced, and --no-progress still reports every row as it finishes
    assert "calibration: clips 1-2 of 4" in stdout and "disjoint from calibration" in stdout
    assert "[1/3] float fp32" in stdout and "[3/3] resq W8A8->W4A4 T=2" in stdout
    table = stdout[stdout.index("method "):].splitlines()
    header = table[0]
    assert "mIoU GT %" in header and "BOPs/frame" in header
    for record, line in zip(records, table[2:5]):
        cells = line.split()
        assert cells[3] == f"{record['miou_gt_pct']:.2f}"  # the table's percent is the JSON's
        assert cells[4] == f"{record['miou_float_pct']:.2f}"


def test_recipe_on_mp4_folder_keeps_aspect_and_splits(tmp_path, capsys) -> None:
    from resq_brevitas.demo.synthetic import make_clip

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):  # 16x24 videos (H x W) of 8 frames: 4 clips of 4 frames
        write_video(videos / f"clip{i}.mp4", make_clip(i, frames=8, size=24)[0][:, :, 4:20])
    out = tmp_path / "out"
    _recipe().main([
        "--model", "tests.helpers:make_all_layers_net", "--clips", str(videos),
        "--scheme", "W8A8->W4A4", "--scheme", "W4A4", "--period", "2",
        "--calib-samples", "8", "--candidates", "4", "--frames", "4", "--size", "16",
        "--out", str(out), "--no-progress",
    ])
    stdout = capsys.readouterr().out
    assert "16x24 -> 16x16 (scaled to 16x24, centre-cropped)" in stdout
    assert "calibration: clips 1-2 of 4 (8 frames for c=8); evaluation: clips 3-4" in stdout
    records = _strict_json((out / "results.json").read_text())
    assert [(r["scheme"], r["period"]) for r in records] == [
        ("fp32", 1), ("W8A8->W4A4", 2), ("W4A4", 1)]
    assert records[1]["rel_bops"] == pytest.approx(relative_bops("W8A8->W4A4", 2))
    assert records[2]["rel_bops"] == pytest.approx(relative_bops("W4A4"))
    assert all(r["miou_gt_pct"] is None for r in records)  # videos carry no labels
    assert all(0.0 <= r["miou_float_pct"] <= 100.0 for r in records)  # ... and need none
    assert records[1]["sqnr_db"] > records[2]["sqnr_db"]
    assert (out / "results.csv").read_text().count("\n") == 4
    assert (out / "accuracy_vs_bops.png").stat().st_size > 1000


def test_recipe_with_loader_factory_labels_and_a_bops_target(tmp_path) -> None:
    _recipe().main([
        "--model", "resq_brevitas.demo.model:DemoSegNet", "--clips",
        "tests.recipes.test_apply_resq:labelled_clips", "--scheme", "W8A8",
        "--scheme", "W8A8->W8A{0,4,8}", "--target-bops", "0.6", "--period", "2",
        "--calib-samples", "4", "--candidates", "3", "--frames", "4", "--out", str(tmp_path),
        "--no-progress",
    ])
    records = _strict_json((tmp_path / "results.json").read_text())
    assert 0.0 <= records[1]["miou_gt_pct"] <= 100.0
    assert records[1]["rel_bops"] == pytest.approx(1.0)
    dynamic = records[2]
    assert dynamic["method"] == "dynamic" and dynamic["target_bops"] == 0.6
    assert dynamic["tau"] is not None and (tmp_path / "dynamic_bit_maps.png").is_file()


def test_recipe_export_writes_step_graphs_and_unrolled_clip(tmp_path) -> None:
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


# ------------------------------------------------------------------ the demo's summary and rows


def _rows(*specs):
    from resq_brevitas.experiments.evaluation import EvalRow

    return [EvalRow(method, scheme, period, miou / 100, miou / 100, 20.0, rel * 1e9, rel)
            for method, scheme, period, miou, rel in specs]


def test_summary_names_the_cheapest_scheme_as_accurate_as_w8a8() -> None:
    recipe = _recipe()
    rows = _rows(("frame", "W8A8", 1, 90.0, 1.0), ("frame", "W6A6", 1, 89.5, 0.5625),
                 ("frame", "W4A4", 1, 40.0, 0.25), ("resq", "W8A8->W4A4", 4, 89.2, 0.4375),
                 ("resq", "W8A8->W4A4", 2, 89.9, 0.625))
    line = recipe.summary_line(rows)
    # not the best mIoU per BOP ratio (W4A4: 160 per unit), not the most accurate (W8A8)
    assert "ResQ W8A8->W4A4 T=4" in line and "0.44x" in line
    assert "W6A6 at 0.56x" in line
    assert recipe.summary_line(list(reversed(rows))) == line  # order does not matter
    line = recipe.summary_line(_rows(("frame", "W8A8", 1, 90.0, 1.0),
                                     ("frame", "W6A6", 1, 85.0, 0.5625),
                                     ("resq", "W8A8->W4A4", 4, 89.5, 0.4375)))
    assert "ResQ W8A8->W4A4 T=4" in line
    assert "no frame-quantization scheme cheaper than W8A8 stays within 1 point" in line
    # nothing cheaper within 1 point: W8A8 itself
    line = recipe.summary_line(_rows(("frame", "W8A8", 1, 90.0, 1.0),
                                     ("frame", "W6A6", 1, 88.9, 0.5625)))
    assert line.startswith("Best accuracy per BOP on this model: W8A8 frame quantization")


def test_demo_variant_rows_are_auto_signedness_and_8_bit_end_layers() -> None:
    from resq_brevitas.demo.model import DemoSegNet

    recipe = _recipe()
    model = DemoSegNet()
    args = recipe.check_options(recipe.build_parser(), [])
    variants = recipe.variant_configs(args, model)
    assert recipe.end_layers(model) == ("stem.0", "head")
    assert {tag for tag, _ in variants} == {"auto", "8b-ends"}
    for tag, config in variants:
        if tag == "auto":
            assert config.act_signedness == "auto" and not config.overrides
        else:
            assert config.act_signedness == "signed"
            (override,) = config.overrides
            assert override.matches("stem.0") and override.matches("head")
            assert not override.matches("down1.0")
    with_scheme = recipe.check_options(recipe.build_parser(), ["--scheme", "W8A8"])
    assert recipe.variant_configs(with_scheme, model) == []
