"""Apply ResQ to a video model: convert, calibrate, evaluate against frame quantization.

With no arguments it runs the embedded demo: a small segmentation network (trained by
``recipes/train_demo.py`` on procedurally generated video, checkpoint shipped in the package) is
quantized with frame quantization (W8A8, W6A6, W5A5, W4A4) and with ResQ (W8A8->W4A4 and
W8A8->W8A4 at T=2 and T=4), and a table of mIoU (against ground truth and against the float
model), output SQNR and BOPs is printed; ``<out>/accuracy_vs_bops.png``, ``results.json`` and
``results.csv`` are written.

Your own pipeline::

    python recipes/apply_resq.py --model mypkg.models:build --checkpoint model.pt \\
        --clips videos/ --scheme "W8A8->W4A4" --scheme W4A4 --period 2 4 --out out/

``--clips`` is a folder of .mp4 files (decoded with PyAV) or ``pkg.module:loader_factory``, a
callable returning clips ``[T, C, H, W]`` or ``(clip, labels [T, H, W])`` pairs.

Dynamic-ResQ: a pool scheme with one or more ``--tau`` adds one row per ``tau`` and period, and
writes the paper's Fig. 6 (per-pixel bits per layer, for the middle ``tau``) to
``<out>/dynamic_bit_maps.png``::

    python recipes/apply_resq.py --scheme "W8A8->W8A4" --scheme "W8A8->W8A{0,4,8}" \\
        --tau 1e-3 1e-2 1e-1 --period 4 --out out/
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from resq_brevitas.config import ErrorBoundPolicy, LineSearch, ResQConfig, Scheme, load_object
from resq_brevitas.experiments.analysis import run_analysis
from resq_brevitas.experiments.evaluation import compare_configs, compare_schemes, format_table

DEMO_FRAME_SCHEMES = ["W8A8", "W6A6", "W5A5", "W4A4"]
DEMO_RESQ_SCHEMES = ["W8A8->W4A4", "W8A8->W8A4"]
DEMO_PERIODS = [2, 4]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="float model factory 'pkg.module:factory' (default: the demo)")
    p.add_argument("--checkpoint", type=Path, help="state_dict to load into the model")
    p.add_argument("--clips", help="folder of .mp4 files, or 'pkg.module:loader_factory'")
    p.add_argument("--scheme", action="append",
                   help="scheme to evaluate (repeatable), e.g. 'W8A8->W4A4' or 'W4A4'")
    p.add_argument("--period", type=int, nargs="+", help="keyframe period(s) T for ResQ schemes")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration frames c")
    p.add_argument("--candidates", type=int, default=20, help="line-search points r")
    p.add_argument("--eval-clips", type=int, default=6, help="demo: evaluation clips")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="frame size for decoded videos/demo")
    p.add_argument("--out", type=Path, default=Path("resq_out"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--export", nargs="+", choices=("qonnx", "qcdq", "fx"),
                   help="also write deployment artifacts of the first ResQ scheme (or the first "
                        "scheme) to <out>/export/<format>: QONNX / QCDQ keyframe+residual step "
                        "graphs with manifest.json, or the QAT-ready unrolled FX clip")
    p.add_argument("--tau", type=float, nargs="+",
                   help="Dynamic-ResQ tau value(s) for pool schemes like 'W8A8->W8A{0,4,8}' "
                        "(default 3e-4, the paper's)")
    p.add_argument("--granularity", choices=("pixel", "region", "frame"), default="pixel",
                   help="Dynamic-ResQ policy granularity")
    p.add_argument("--region-k", type=int, default=4, help="block size of --granularity region")
    p.add_argument("--analyze", metavar="SCHEME", nargs="?", const="W8A8", type=Scheme.parse,
                   help="also analyse SCHEME (default W8A8; T = the first --period) per layer: "
                        "sensitivities, ranges, Fig. 2 -> <out>/analysis.{json,csv,png}")
    args = p.parse_args(argv)
    if args.period is not None and any(t < 1 for t in args.period):
        p.error(f"--period must be >= 1, got {args.period}")
    if args.calib_samples < 1:
        p.error(f"--calib-samples must be >= 1, got {args.calib_samples}")
    for text in args.scheme or []:
        try:
            Scheme.parse(text)
        except ValueError as err:
            p.error(str(err))
    if args.tau is not None:
        if any(not t >= 0 for t in args.tau):
            p.error(f"--tau must be >= 0, got {args.tau}")
        if not any(Scheme.parse(t).is_dynamic for t in args.scheme or []):
            p.error("--tau needs a pool scheme, e.g. --scheme 'W8A8->W8A{0,4,8}'")
    if args.region_k < 1:
        p.error(f"--region-k must be >= 1, got {args.region_k}")
    return args


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model is None:
        from resq_brevitas.demo.model import DemoSegNet, load_demo_model

        if args.checkpoint is None:
            return load_demo_model()
        model = DemoSegNet()
    else:
        factory = load_object(args.model)
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"--model factory must return an nn.Module, got {type(model).__name__}")
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def _split_items(items: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    clips, labels = [], []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            clips.append(item[0])
            labels.append(item[1])
        else:
            clips.append(item)
    return clips, (labels if len(labels) == len(clips) else None)


def load_clips(args: argparse.Namespace) -> tuple[list, list, list | None, int | None]:
    """Return ``(calib_clips, eval_clips, eval_labels, num_classes)``."""
    if args.clips is None:
        from resq_brevitas.demo.clips import demo_clips
        from resq_brevitas.demo.model import NUM_CLASSES

        calib, eval_clips, labels = demo_clips(args.calib_samples, args.eval_clips, args.frames,
                                               args.size)
        return calib, eval_clips, labels, NUM_CLASSES
    folder = Path(args.clips)
    if folder.is_dir():
        from resq_brevitas.experiments.video_io import video_folder_clips

        clips = video_folder_clips(folder, frames_per_clip=args.frames, size=args.size)
        return clips, clips, None, None
    items = list(load_object(args.clips)())
    clips, labels = _split_items(items)
    num_classes = None
    if labels is not None:
        num_classes = int(max(lab.max().item() for lab in labels)) + 1
    return clips, clips, labels, num_classes


def configs_from_args(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.scheme is None:
        periods = args.period or DEMO_PERIODS
        return ([(s, 1) for s in DEMO_FRAME_SCHEMES]
                + [(s, t) for s in DEMO_RESQ_SCHEMES for t in periods])
    configs = []
    for text in args.scheme:
        scheme = Scheme.parse(text)
        if scheme.is_dynamic:
            continue  # see dynamic_configs_from_args
        if scheme.is_frame_quantization:
            configs.append((text, 1))
        else:
            configs.extend((text, t) for t in (args.period or [4]))
    return configs


def dynamic_configs_from_args(args: argparse.Namespace) -> list[ResQConfig]:
    """One Dynamic-ResQ config per pool scheme, period and ``tau``."""
    calibration = LineSearch(candidates=args.candidates, samples=args.calib_samples)
    configs = []
    for text in args.scheme or []:
        if not Scheme.parse(text).is_dynamic:
            continue
        for period in args.period or [4]:
            for tau in args.tau or [3e-4]:
                policy = ErrorBoundPolicy(tau=tau, granularity=args.granularity, k=args.region_k)
                configs.append(ResQConfig(scheme=text, period=period, policy=policy,
                                          calibration=calibration))
    return configs


def figure_config(configs: list[ResQConfig]) -> ResQConfig:
    """The Dynamic-ResQ config drawn in Fig. 6: the first one with the middle tau."""
    taus = sorted({c.policy.tau for c in configs})
    return next(c for c in configs if c.policy.tau == taus[len(taus) // 2])


def write_bit_map_figure(maps: dict, clip: torch.Tensor, config: ResQConfig,
                         out: Path) -> list[Path]:
    try:
        from resq_brevitas.experiments.figures import plot_bit_maps

        title = (f"Dynamic-ResQ {config.scheme} T={config.period} tau={config.policy.tau:g}: "
                 "bits per pixel")
        return [plot_bit_maps(maps, out / "dynamic_bit_maps.png", video=clip, title=title)]
    except (ImportError, ValueError) as err:
        print(f"(no bit-map figure: {err})")
        return []


def write_outputs(rows: list, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    data = [r.as_dict() for r in rows]
    (out / "results.json").write_text(json.dumps(data, indent=2, allow_nan=True))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    written += [out / "results.json", out / "results.csv"]
    try:
        from resq_brevitas.experiments.figures import plot_accuracy_vs_bops

        written.append(plot_accuracy_vs_bops(rows, out / "accuracy_vs_bops.png"))
    except ImportError as err:
        print(f"(no plot: {err})")
    return written


def export_first_scheme(model: torch.nn.Module, configs: list[tuple[str, int]], calib: list,
                        example_clip: torch.Tensor, args: argparse.Namespace) -> list[Path]:
    """Calibrate the first ResQ config (else the first config) again and export it."""
    from resq_brevitas.calibrate import calibrate
    from resq_brevitas.convert import convert
    from resq_brevitas.deploy import export_artifacts
    from resq_brevitas.experiments.evaluation import clip_batches

    if not configs:
        raise SystemExit("--export needs a static scheme (e.g. --scheme 'W8A8->W4A4')")
    resq_configs = [c for c in configs if not Scheme.parse(c[0]).is_frame_quantization]
    scheme, period = (resq_configs or configs)[0]
    config = ResQConfig(scheme=scheme, period=period,
                        calibration=LineSearch(candidates=args.candidates,
                                               samples=args.calib_samples))
    qm = calibrate(convert(model, config), clip_batches(calib), progress=not args.no_progress)
    written = export_artifacts(qm, model, example_clip[:1], args.out / "export", args.export)
    print(f"exported {scheme} (T={period}): " + ", ".join(f"{k} -> {v}" for k, v in
                                                          written.items()))
    return list(written.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model(args)
    calib, eval_clips, labels, num_classes = load_clips(args)
    configs = configs_from_args(args)
    print(f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params); "
          f"{len(eval_clips)} evaluation clips of {eval_clips[0].shape[0]} frames "
          f"{tuple(eval_clips[0].shape[1:])}; calibration c={args.calib_samples}, "
          f"r={args.candidates}")
    rows = compare_schemes(
        model, configs, calib, eval_clips, labels, num_classes,
        calibration=LineSearch(candidates=args.candidates, samples=args.calib_samples),
        progress=not args.no_progress,
    )
    dynamic = dynamic_configs_from_args(args)
    maps: dict = {}
    if dynamic:
        pick = figure_config(dynamic)

        def keep_bit_maps(config: ResQConfig, qm: Any) -> None:
            if config is pick:
                with torch.no_grad():
                    qm(eval_clips[0].unsqueeze(0))
                maps.update(qm.last_bit_maps)

        rows += compare_configs(model, dynamic, calib, eval_clips, labels, num_classes,
                                progress=not args.no_progress, include_float=False,
                                on_model=keep_bit_maps)
    print()
    print(format_table(rows))
    written = write_outputs(rows, args.out)
    if maps:
        written += write_bit_map_figure(maps, eval_clips[0], pick, args.out)
    if args.export:
        written += export_first_scheme(model, configs, calib, eval_clips[0], args)
    if args.analyze:
        written += run_analysis(model, args.analyze, args.period, calib, eval_clips, args.out,
                                LineSearch(candidates=args.candidates,
                                           samples=args.calib_samples),
                                progress=not args.no_progress)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
