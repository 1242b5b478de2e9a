"""Apply ResQ to a video model: convert, calibrate, evaluate against frame quantization.

With no arguments it runs the embedded demo: a small segmentation network (trained by
``recipes/train_demo.py`` on procedurally generated video, checkpoint shipped in the package) is
quantized with frame quantization (W8A8, W6A6, W5A5, W4A4) and with ResQ (W8A8->W4A4 and
W8A8->W8A4 at T=2 and T=4), the paper's signed quantizers throughout; then the same with
``act_signedness="auto"`` (rows tagged ``auto``) and with the first and last layers kept at 8
bits (``8b-ends``). A table of mIoU (against ground truth and against the float model), output
SQNR and BOPs is printed, then one line saying which scheme gives the best accuracy per BOP
(computed from the table), and ``<out>/accuracy_vs_bops.png``, ``results.json``
and ``results.csv`` are written (the same columns and units as the table: mIoU in percent, BOPs
per frame; ``null`` in the JSON and an empty CSV cell mean "does not apply").

Your own model and videos (the current folder comes first on the import path, as with
``python -m``, so ``mynet.py`` in it is found)::

    python recipes/apply_resq.py --model mynet:build --checkpoint model.pt \\
        --clips videos/ --scheme "W8A8->W4A4" --scheme W4A4 --period 2 4 --out out/

``--clips`` is a folder of .mp4 files (decoded with PyAV, ``pip install resq-brevitas[video]``)
or ``pkg.module:loader_factory``, a callable returning clips ``[T, C, H, W]`` or
``(clip, labels [T, H, W])`` pairs. Videos are brought to ``--size HxW`` (default: the model's
``input_size`` attribute if it has one, else the first video's own size) keeping their aspect
ratio (``--fit crop``: centre crop, or ``pad``). Clips are cut in sorted file order; the first
``--calib-clips`` of them calibrate (default: enough for ``--calib-samples`` frames, at most
half), the others are evaluated: calibration and evaluation never share a clip. mIoU against the
float model needs no labels (the float model's argmax is the reference).

Dynamic-ResQ: a pool scheme adds one row per operating point and period, and writes the paper's
Fig. 6 (per-pixel bits per layer) to ``<out>/dynamic_bit_maps.png``. The operating point is a
share of W8A8 frame quantization's BOPs (``--target-bops``, solved for tau on the calibration
clips; 0.5 when neither option is given) or eq. 11's raw threshold (``--tau``, whose scale
depends on the model)::

    python recipes/apply_resq.py --scheme "W8A8->W8A4" --scheme "W8A8->W8A{0,4,8}" \\
        --target-bops 0.3 0.5 0.7 --period 4 --out out/

VideoIQ's learned per-frame policy on ResQ residuals (``W8A8->{W8A4,W4A4,W2A2,skip,key}``, issue
10; the policy network is trained on the demo, about 3 extra minutes, so it is not in the default
run; the recognition demo's VideoIQ rows are ``benchmarks/bench_videoiq.py``)::

    python recipes/apply_resq.py --policy

Deployment artifacts (``pip install resq-brevitas[export]``)::

    python recipes/apply_resq.py --export qonnx qcdq fx
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

# Only the standard library is imported here: options are checked (and --help shown) before
# torch loads, and the work starts only when every option is known to be usable.

DEMO_FRAME_SCHEMES = ["W8A8", "W6A6", "W5A5", "W4A4"]
DEMO_RESQ_SCHEMES = ["W8A8->W4A4", "W8A8->W8A4"]
DEMO_PERIODS = [2, 4]
#: The demo's extra rows beside the paper-faithful ones: ``(tag, scheme, period, variant)``.
#: ``auto``: ``act_signedness="auto"`` (unsigned keyframe quantizers on non-negative inputs);
#: ``8b-ends``: the first and last layers kept at 8 bits (a ``LayerOverride``).
DEMO_VARIANTS = [
    ("auto", "W8A8", 1, "auto"), ("auto", "W6A6", 1, "auto"), ("auto", "W5A5", 1, "auto"),
    ("auto", "W4A4", 1, "auto"), ("auto", "W8A8->W4A4", 4, "auto"),
    ("8b-ends", "W8A8->W4A4", 4, "ends"), ("8b-ends", "W4A4", 1, "ends"),
]
VARIANT_LEGEND = ("auto: act_signedness=\"auto\" (unsigned keyframe quantizers where the "
                  "calibration inputs are non-negative); 8b-ends: first and last layers at 8 bits "
                  "(LayerOverride)")
#: Accuracy a cheaper scheme may lose against W8A8 and still count as "as accurate" in the
#: summary: mIoU points, or dB when there is no mIoU.
SUMMARY_TOLERANCE = 1.0
DEMO_EVAL_CLIPS = 6
#: The learned residual policy of --policy (VideoIQ's per-frame policy on ResQ residuals) and its
#: keyframe period: the schedule keys only each clip's first frame, the policy places the others.
POLICY_SCHEME = "W8A8->{W8A4,W4A4,W2A2,skip,key}"
POLICY_PERIOD = 16
#: The operating point of pool schemes when neither --tau nor --target-bops is given.
DEFAULT_TARGET_BOPS = 0.5
#: Modules each --export format imports (the deploy package itself imports onnx).
EXPORT_MODULES = {"qonnx": ("onnx", "qonnx"), "qcdq": ("onnx",), "fx": ("onnx",)}
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UsageError(Exception):
    """A bad option found after parsing (a missing file, an unreadable video, ...).

    Args:
        option: The option at fault, e.g. ``"--clips"``.
        message: What is wrong, on one line.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the usage examples' layout and shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# ----------------------------------------------------------------------------- option types


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (``why`` is added to the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}{why}, got {text!r}")
        return value
    return parse


def real_at_least(minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ``>= minimum`` (``> minimum`` when ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = value > minimum if strict else value >= minimum
        if not math.isfinite(value) or not ok:
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value
    return parse


def frame_size(text: str) -> tuple[int, int]:
    """An argparse type: ``HxW`` or ``N`` (``N x N``), each at least 8 pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    size = None if match is None else (int(match[1]), int(match[2] or match[1]))
    if size is None or min(size) < 8:
        raise argparse.ArgumentTypeError(
            f"must be HxW (e.g. 64x96) or N for NxN, each >= 8 pixels, got {text!r}")
    return size


def build_parser() -> OneLineParser:
    """The command line (``--help`` shows the defaults and the examples of the docstring)."""
    intro, _, examples = (__doc__ or "").partition("\n\n")
    p = OneLineParser(prog="apply_resq.py", description=intro, epilog=examples,
                      formatter_class=_HelpFormatter)
    p.add_argument("--model", help="float model factory 'pkg.module:factory', imported with the "
                                   "current folder first on the path (default: the demo model)")
    p.add_argument("--checkpoint", type=Path, help="state_dict file to load into the model")
    p.add_argument("--clips", help="folder of .mp4 files, or 'pkg.module:loader_factory' "
                                   "(default: the demo's procedural clips)")
    p.add_argument("--scheme", action="append",
                   help="scheme to evaluate (repeatable), e.g. 'W8A8->W4A4' or 'W4A4' "
                        "(default: the demo's eight schemes)")
    p.add_argument("--period", type=int_at_least(1), nargs="+",
                   help="keyframe period(s) T of ResQ schemes (default: 2 4 for the demo's, "
                        "4 for --scheme)")
    p.add_argument("--calib-samples", type=int_at_least(1), default=64,
                   help="calibration frames c")
    p.add_argument("--candidates", type=int_at_least(2), default=20, help="line-search points r")
    p.add_argument("--calib-clips", type=int_at_least(1),
                   help="clips that calibrate; the rest are evaluated (default: enough for "
                        "--calib-samples frames, at most half of the clips)")
    p.add_argument("--eval-clips", type=int_at_least(1),
                   help=f"most clips to evaluate (default: {DEMO_EVAL_CLIPS} for the demo, all "
                        "the others for --clips)")
    p.add_argument("--frames", type=int_at_least(2, " (a keyframe and a residual frame)"),
                   default=16, help="frames per clip")
    p.add_argument("--size", type=frame_size,
                   help="frame size HxW of decoded videos and the demo (default: the model's "
                        "input_size attribute, 64x64 for the demo, else the first video's size)")
    p.add_argument("--fit", choices=("crop", "pad", "stretch"), default="crop",
                   help="how videos reach --size: centre crop or pad (aspect kept), or stretch")
    p.add_argument("--out", type=Path, default=Path("resq_out"), help="output folder")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; one line per finished row instead")
    p.add_argument("--export", nargs="+", choices=tuple(EXPORT_MODULES),
                   help="also write deployment artifacts of the first ResQ scheme (or the first "
                        "scheme) to <out>/export/<format>: QONNX / QCDQ keyframe+residual step "
                        "graphs with manifest.json, or the QAT-ready unrolled FX clip; needs "
                        "pip install 'resq-brevitas[export]'")
    p.add_argument("--target-bops", type=real_at_least(0.0, strict=True), nargs="+",
                   help="Dynamic-ResQ operating point(s) of pool schemes like "
                        "'W8A8->W8A{0,4,8}': BOPs as a share of W8A8 frame quantization's, "
                        "tau solved on the calibration clips (default when --tau is not given: "
                        f"{DEFAULT_TARGET_BOPS})")
    p.add_argument("--tau", type=real_at_least(0.0), nargs="+",
                   help="Dynamic-ResQ eq. 11 threshold(s) tau, raw (its scale depends on the "
                        "model; the paper's 3e-4 is HRNet's)")
    p.add_argument("--granularity", choices=("pixel", "region", "frame"), default="pixel",
                   help="Dynamic-ResQ policy granularity")
    p.add_argument("--region-k", type=int_at_least(1), default=4,
                   help="block size of --granularity region")
    p.add_argument("--qat-steps", type=int_at_least(0), default=0,
                   help="after calibration, label-free QAT (distilling the float model on the "
                        "calibration clips) for this many steps: adds 'ResQ + QAT' rows "
                        "(method '<method>+qat'); works under torchrun --nproc_per_node N")
    p.add_argument("--lr", type=real_at_least(0.0, strict=True), default=1e-4,
                   help="QAT learning rate of the weights")
    p.add_argument("--scale-lr", type=real_at_least(0.0, strict=True), default=1e-2,
                   help="QAT learning rate of the activation thresholds")
    p.add_argument("--policy", action="store_true",
                   help="demo only: also the learned residual policy row (VideoIQ, issue 10), "
                        f"'{POLICY_SCHEME}' T={POLICY_PERIOD}: its policy network trained for "
                        "--policy-steps steps (label-free distillation) on demo clips with a "
                        "frozen stretch and a scene cut (about 3 minutes on one thread)")
    p.add_argument("--policy-steps", type=int_at_least(1), default=50,
                   help="policy-stage steps of --policy (one 16-frame clip per step)")
    p.add_argument("--analyze", metavar="SCHEME", nargs="?", const="W8A8",
                   help="also analyse SCHEME (default W8A8; T = the first --period) per layer: "
                        "sensitivities, ranges, Fig. 2 -> <out>/analysis.{json,csv,png}")
    return p


# ----------------------------------------------------------------------------- checks


def missing_modules(names: Sequence[str]) -> list[str]:
    """The modules of ``names`` that cannot be imported (each is imported to find out)."""
    missing = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_paths(args: argparse.Namespace) -> None:
    """Files and folders named by options exist and have the right form.

    Raises:
        UsageError: A missing checkpoint, a missing or empty clips folder, a malformed spec.
    """
    if args.model is not None and not _SPEC.match(args.model):
        raise UsageError("--model", f"expected 'package.module:factory', got {args.model!r}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError("--checkpoint", f"file {str(args.checkpoint)!r} does not exist")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError("--out", f"{str(args.out)!r} is a file, not a folder")
    if args.clips is None or is_loader_spec(args.clips):
        return
    folder = Path(args.clips)
    if not folder.exists():
        raise UsageError("--clips", f"folder {args.clips!r} does not exist (give a folder of "
                                    ".mp4 files or 'pkg.module:loader_factory')")
    if not folder.is_dir():
        raise UsageError("--clips", f"{args.clips!r} is a file; give the folder holding it")
    if not any(p.is_file() for p in folder.glob("*.mp4")):
        raise UsageError("--clips", f"folder {args.clips!r} contains no .mp4 files")


def is_loader_spec(text: str) -> bool:
    """Whether ``--clips`` names a loader factory (``pkg.module:attr``) rather than a folder."""
    return bool(_SPEC.match(text)) and not Path(text).exists()


def check_extras(args: argparse.Namespace) -> None:
    """Optional packages the options need are importable (else: the extra to install).

    Raises:
        UsageError: A missing package for --export or an .mp4 folder.
    """
    for fmt in args.export or ():
        missing = missing_modules(EXPORT_MODULES[fmt])
        if missing:
            raise UsageError("--export", f"format {fmt!r} needs {', '.join(missing)}, which "
                                         "is not installed: pip install 'resq-brevitas[export]'")
    if args.clips is not None and not is_loader_spec(args.clips) and missing_modules(["av"]):
        raise UsageError("--clips", "decoding .mp4 files needs PyAV, which is not installed: "
                                    "pip install 'resq-brevitas[video]'")


def check_schemes(args: argparse.Namespace) -> None:
    """Schemes parse, and Dynamic-ResQ options come with a pool scheme.

    Raises:
        UsageError: A malformed scheme, or --tau / --target-bops without a pool scheme.
    """
    from resq_brevitas.config import Scheme

    schemes = []
    for text in args.scheme or []:
        try:
            schemes.append(Scheme.parse(text))
        except ValueError as err:
            raise UsageError("--scheme", str(err)) from None
    if args.analyze is not None:
        try:
            Scheme.parse(args.analyze)
        except ValueError as err:
            raise UsageError("--analyze", str(err)) from None
    for option, value in (("--tau", args.tau), ("--target-bops", args.target_bops)):
        if value is not None and not any(s.is_dynamic for s in schemes):
            raise UsageError(option, "needs a pool scheme, e.g. --scheme 'W8A8->W8A{0,4,8}'")


def check_options(parser: OneLineParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check every option before any work; a bad one exits with status 2."""
    args = parser.parse_args(argv)
    try:
        check_paths(args)
        check_extras(args)
        check_schemes(args)
        if args.policy and (args.model or args.clips):
            raise UsageError("--policy", "trains on the demo's event clips: use it without "
                                         "--model and --clips")
    except UsageError as err:
        parser.error(str(err))
    return args


# ----------------------------------------------------------------------------- inputs


def load_model(args: argparse.Namespace) -> Any:
    """The float model in eval mode (the demo's, or ``--model``'s with ``--checkpoint``).

    Raises:
        UsageError: The factory cannot be imported or does not build an ``nn.Module``, or the
            checkpoint does not load into it.
    """
    import torch

    if args.model is None:
        from resq_brevitas.demo.model import DemoSegNet, load_demo_model

        if args.checkpoint is None:
            return load_demo_model()
        model = DemoSegNet()
    else:
        from resq_brevitas.config import load_object

        try:
            factory = load_object(args.model)
        except ValueError as err:
            raise UsageError("--model", str(err)) from None
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UsageError("--model", f"{args.model} must return a torch.nn.Module, got "
                                        f"{type(model).__name__}")
    if args.checkpoint is not None:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict)
                                  else state)
        except Exception as err:  # unpickling and key mismatches: report, do not trace back
            raise UsageError("--checkpoint", f"{args.checkpoint} does not load into "
                                             f"{type(model).__name__}: {err}") from None
    return model.eval()


def expected_size(model: Any, args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """The frame size to use and where it comes from (for the announcement)."""
    if args.size is not None:
        return args.size, "--size"
    declared = getattr(model, "input_size", None)
    if declared is not None:
        size = (declared, declared) if isinstance(declared, int) else tuple(declared)
        return (int(size[0]), int(size[1])), f"{type(model).__name__}.input_size"
    if args.clips is None:
        from resq_brevitas.demo.model import FRAME_SIZE

        return (FRAME_SIZE, FRAME_SIZE), "the demo model's training size"
    return None, "the first video's own size (the model declares no input_size; --size HxW)"


class Clips:
    """Calibration and evaluation clips (disjoint), labels, and what to tell the user."""

    def __init__(self, calib: list, evaluation: list, labels: list | None,
                 num_classes: int | None, notes: list[str]) -> None:
        self.calib, self.evaluation, self.labels = calib, evaluation, labels
        self.num_classes, self.notes = num_classes, notes


def load_clips(args: argparse.Namespace, model: Any) -> Clips:
    """The demo's clips, an .mp4 folder's or a loader factory's, split for calibration.

    Raises:
        UsageError: Unreadable videos, too few clips to split, a loader that fails.
    """
    if args.clips is None:
        return demo_clips(args, model)
    if is_loader_spec(args.clips):
        return loader_clips(args)
    return folder_clips(args, model)


def demo_clips(args: argparse.Namespace, model: Any) -> Clips:
    """Procedural clips: calibration and evaluation from disjoint seeds
    (:func:`resq_brevitas.demo.clips.demo_clips`), centre-cropped to a non-square size."""
    from resq_brevitas.demo.clips import CALIB_FRAMES
    from resq_brevitas.demo.clips import demo_clips as make_demo_clips
    from resq_brevitas.demo.model import NUM_CLASSES

    size, source = expected_size(model, args)
    assert size is not None
    # demo_clips makes enough calibration clips for this many frames
    frames_needed = (args.calib_clips * CALIB_FRAMES if args.calib_clips
                     else args.calib_samples)
    n_eval = args.eval_clips or DEMO_EVAL_CLIPS
    calib, evaluation, labels = make_demo_clips(frames_needed, n_eval, args.frames, max(size))
    top, left = (max(size) - size[0]) // 2, (max(size) - size[1]) // 2
    window = (slice(top, top + size[0]), slice(left, left + size[1]))

    def crop(items: list[Any]) -> list[Any]:
        return [item[(..., *window)].contiguous() for item in items]

    notes = [f"clips: the demo's procedural video at {size[0]}x{size[1]} ({source}); "
             f"calibration: {len(calib)} clips of {CALIB_FRAMES} frames, evaluation: {n_eval} "
             "other clips (disjoint seeds)"]
    return Clips(crop(calib), crop(evaluation), crop(labels), NUM_CLASSES, notes)


def folder_clips(args: argparse.Namespace, model: Any) -> Clips:
    """Clips cut from an .mp4 folder, brought to the model's size with the aspect kept."""
    from resq_brevitas.experiments.video_io import (
        probe_video,
        resize_plan,
        video_files,
        video_folder_clips,
    )

    try:
        files = video_files(args.clips)
        sources = [probe_video(f) for f in files]
        size, origin = expected_size(model, args)
        size = size or sources[0]
        clips = video_folder_clips(args.clips, frames_per_clip=args.frames, size=size,
                                   fit=args.fit)
    except ValueError as err:
        raise UsageError("--clips", str(err)) from None
    plans = sorted({resize_plan(s, size, args.fit).describe() for s in sources})
    notes = [f"videos: {len(files)} file(s) in {args.clips}, frames {'; '.join(plans)}, "
             f"size from {origin}"]
    calib, evaluation, labels = split_clips(args, clips, None, f"{args.clips}")
    return Clips(calib, evaluation, labels, None, notes + [_split_note(args, calib, evaluation,
                                                                       len(clips))])


def loader_clips(args: argparse.Namespace) -> Clips:
    """Clips (or ``(clip, labels)`` pairs) from a loader factory, split for calibration."""
    from resq_brevitas.config import load_object

    if args.size is not None:
        raise UsageError("--size", "applies to .mp4 folders and the demo; a loader factory "
                                   "returns clips at its own size")
    try:
        items = list(load_object(args.clips)())
    except ValueError as err:
        raise UsageError("--clips", str(err)) from None
    clips, labels = _split_items(items)
    calib, evaluation, eval_labels = split_clips(args, clips, labels, args.clips)
    num_classes = None
    if labels is not None:
        num_classes = int(max(lab.max().item() for lab in labels)) + 1
    notes = [f"clips: {len(clips)} from {args.clips}",
             _split_note(args, calib, evaluation, len(clips))]
    return Clips(calib, evaluation, eval_labels, num_classes, notes)


def _split_items(items: list[Any]) -> tuple[list[Any], list[Any] | None]:
    clips, labels = [], []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            clips.append(item[0])
            labels.append(item[1])
        else:
            clips.append(item)
    return clips, (labels if len(labels) == len(clips) else None)


def split_clips(args: argparse.Namespace, clips: list[Any], labels: list[Any] | None,
                where: str) -> tuple[list[Any], list[Any], list[Any] | None]:
    """The first clips calibrate, the others are evaluated (at most ``--eval-clips``).

    Raises:
        UsageError: Fewer than 2 clips, or ``--calib-clips`` leaving none to evaluate.
    """
    if len(clips) < 2:
        frames = clips[0].shape[0] if clips else 0
        raise UsageError("--clips", f"{where} gives {len(clips)} clip(s) of {frames} frames; "
                                    "calibration and evaluation need 2 disjoint clips (more "
                                    "videos, or a smaller --frames)")
    if args.calib_clips is not None and args.calib_clips >= len(clips):
        raise UsageError("--calib-clips", f"{args.calib_clips} leaves none of the "
                                          f"{len(clips)} clips to evaluate")
    frames = int(clips[0].shape[0])
    n_calib = args.calib_clips or min(max(1, math.ceil(args.calib_samples / frames)),
                                      len(clips) // 2)
    stop = n_calib + (args.eval_clips or len(clips))
    eval_labels = labels[n_calib:stop] if labels is not None else None
    return clips[:n_calib], clips[n_calib:stop], eval_labels


def _split_note(args: argparse.Namespace, calib: list[Any], evaluation: list[Any],
                total: int) -> str:
    frames = sum(int(c.shape[0]) for c in calib)
    note = (f"calibration: clips 1-{len(calib)} of {total} ({frames} frames for c="
            f"{args.calib_samples}); evaluation: clips {len(calib) + 1}-"
            f"{len(calib) + len(evaluation)} (disjoint from calibration)")
    if frames < args.calib_samples:
        note += f"; calibrating on the {frames} frames there are"
    return note


# ----------------------------------------------------------------------------- configs


def configs_from_args(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(scheme, period)`` of the static schemes to evaluate."""
    from resq_brevitas.config import Scheme

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


def operating_points(args: argparse.Namespace) -> list[Any]:
    """The Dynamic-ResQ policies to evaluate: each ``--tau``, then each ``--target-bops``."""
    from resq_brevitas.config import ErrorBoundPolicy

    common = {"granularity": args.granularity, "k": args.region_k}
    targets = args.target_bops or ([] if args.tau else [DEFAULT_TARGET_BOPS])
    return ([ErrorBoundPolicy(tau=tau, **common) for tau in args.tau or []]
            + [ErrorBoundPolicy(target_bops=target, **common) for target in targets])


def dynamic_configs_from_args(args: argparse.Namespace) -> list[Any]:
    """One Dynamic-ResQ config per pool scheme, period and operating point."""
    from resq_brevitas.config import LineSearch, ResQConfig, Scheme

    calibration = LineSearch(candidates=args.candidates, samples=args.calib_samples)
    return [ResQConfig(scheme=text, period=period, policy=policy, calibration=calibration)
            for text in args.scheme or [] if Scheme.parse(text).is_dynamic
            for period in args.period or [4]
            for policy in operating_points(args)]


def figure_config(configs: list[Any]) -> Any:
    """The Dynamic-ResQ config drawn in Fig. 6: the middle operating point of the first
    scheme and period."""
    first = [c for c in configs if (c.scheme, c.period) == (configs[0].scheme, configs[0].period)]
    return first[len(first) // 2]


def end_layers(model: Any) -> tuple[str, str]:
    """Qualified names of the model's first and last convolution / linear layers."""
    import torch

    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.Conv1d,
             torch.nn.Conv3d)
    names = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    if not names:
        raise UsageError("--model", "has no convolution or linear layer to quantize")
    return names[0], names[-1]


def variant_configs(args: argparse.Namespace, model: Any) -> list[tuple[str, Any]]:
    """The demo's extra rows (:data:`DEMO_VARIANTS`) as ``(tag, ResQConfig)``; none when
    ``--scheme`` is given."""
    from resq_brevitas.config import LayerOverride, LineSearch, ResQConfig, Scheme

    if args.scheme is not None:
        return []
    calibration = LineSearch(candidates=args.candidates, samples=args.calib_samples)
    ends = end_layers(model)
    configs = []
    for tag, scheme, period, variant in DEMO_VARIANTS:
        # 8 bits for keyframes and residuals; under frame quantization, 8-bit frames
        eight = "W8A8" if Scheme.parse(scheme).is_frame_quantization else "W8A8->W8A8"
        extra: dict[str, Any] = ({"act_signedness": "auto"} if variant == "auto"
                                 else {"overrides": (LayerOverride(ends, eight),)})
        configs.append((tag, ResQConfig(scheme=scheme, period=period, calibration=calibration,
                                        **extra)))
    return configs


def tagged(row: Any, tag: str) -> Any:
    """The row with ``tag`` after its scheme (``W8A8 auto``), so tables and JSON tell variants
    from the paper-faithful rows."""
    import dataclasses

    return dataclasses.replace(row, scheme=f"{row.scheme} {tag}")


def _accuracy(row: Any) -> tuple[float, str]:
    for key, unit in (("miou_gt", "mIoU"), ("miou_float", "mIoU vs float")):
        value = getattr(row, key)
        if not math.isnan(value):
            return 100 * value, unit
    return row.sqnr_db, "dB SQNR"


def _name(row: Any) -> str:
    kind = {"frame": "frame quantization", "resq": "ResQ", "dynamic": "Dynamic-ResQ",
            "rrm": "RRM"}.get(row.method, row.method)
    return f"{kind} {row.scheme}" + ("" if row.method == "frame" else f" T={row.period}")


def summary_line(rows: Sequence[Any], tolerance: float = SUMMARY_TOLERANCE) -> str:
    """One sentence, computed from the rows: the cheapest scheme whose accuracy is within
    ``tolerance`` of W8A8 frame quantization's (mIoU points, or dB without mIoU), and the cheapest
    frame-quantization scheme that is, for comparison."""
    quantized = [r for r in rows if r.method != "float" and not math.isnan(r.rel_bops)]
    reference = next((r for r in quantized if r.method == "frame" and r.scheme == "W8A8"), None)
    if reference is None:
        return "summary: no W8A8 frame-quantization row to compare against"
    ref_acc, unit = _accuracy(reference)
    unit_word = ("dB" if not unit.startswith("mIoU")
                 else "point" if tolerance == 1 else "points")

    def cheapest(candidates: list[Any]) -> Any:
        good = [r for r in candidates if _accuracy(r)[0] >= ref_acc - tolerance]
        return min(good, key=lambda r: (r.rel_bops, -_accuracy(r)[0]))

    best = cheapest(quantized)
    frame = cheapest([r for r in quantized if r.method == "frame"])
    if best is reference:
        return (f"Best accuracy per BOP on this model: W8A8 frame quantization ({ref_acc:.1f} "
                f"{unit}); no cheaper scheme stays within {tolerance:g} {unit_word} of it.")
    line = (f"Best accuracy per BOP on this model: {_name(best)} keeps {_accuracy(best)[0]:.1f} "
            f"{unit} (W8A8: {ref_acc:.1f}) at {best.rel_bops:.2f}x the BOPs of W8A8")
    if frame is reference:
        line += (f"; no frame-quantization scheme cheaper than W8A8 stays within {tolerance:g} "
                 f"{unit_word}")
    elif frame is not best:
        line += (f"; the cheapest frame-quantization scheme within {tolerance:g} {unit_word} is "
                 f"{frame.scheme} at {frame.rel_bops:.2f}x ({_accuracy(frame)[0]:.1f} {unit})")
    return line + "."


# ----------------------------------------------------------------------------- outputs


def _solved_tau(qm: Any) -> float:
    for _, layer in qm.resq_layers():
        tau = getattr(getattr(layer.residual, "policy", None), "tau", None)
        if tau is not None:
            return float(tau)
    return math.nan


def write_bit_map_figure(figure: dict[str, Any], clip: Any, out: Path) -> list[Path]:
    try:
        from resq_brevitas.experiments.figures import plot_bit_maps

        return [plot_bit_maps(figure["maps"], out / "dynamic_bit_maps.png", video=clip,
                              title=figure["title"], keyframes=figure["keyframes"])]
    except (ImportError, ValueError) as err:
        print(f"(no bit-map figure: {err})")
        return []


def write_outputs(rows: list[Any], out: Path) -> list[Path]:
    """results.json (strict JSON: null for what does not apply), results.csv (the same columns,
    empty cells for null) and the accuracy-vs-BOPs plot."""
    from resq_brevitas.experiments.evaluation import COLUMNS

    out.mkdir(parents=True, exist_ok=True)
    records = [r.record() for r in rows]
    (out / "results.json").write_text(json.dumps(records, indent=2, allow_nan=False) + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records)
    written = [out / "results.json", out / "results.csv"]
    try:
        from resq_brevitas.experiments.figures import plot_accuracy_vs_bops

        written.append(plot_accuracy_vs_bops(rows, out / "accuracy_vs_bops.png"))
    except ImportError as err:
        print(f"(no plot: {err})")
    return written


def export_first_scheme(model: Any, configs: list[tuple[str, int]], calib: list[Any],
                        example_clip: Any, args: argparse.Namespace) -> list[Path]:
    """Calibrate the first ResQ config (else the first config) again and export it."""
    from resq_brevitas.calibrate import calibrate
    from resq_brevitas.config import LineSearch, ResQConfig, Scheme
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


class RowPrinter:
    """With ``--no-progress``: one line per finished row (``[3/11] resq W8A8->W4A4 T=2: ...``)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, row: Any) -> None:
        self.done += 1
        record = row.record()

        def show(key: str, fmt: str, unit: str) -> str:
            value = record[key]
            return "-" if value is None else f"{format(value, fmt)}{unit}"

        print(f"[{self.done}/{self.total}] {row.method} {row.scheme} T={row.period}: mIoU GT "
              f"{show('miou_gt_pct', '.2f', '%')}, mIoU float {show('miou_float_pct', '.2f', '%')}"
              f", SQNR {show('sqnr_db', '.2f', ' dB')}, {show('rel_bops', '.4f', 'x W8A8')} "
              f"({time.perf_counter() - self.start:.1f} s)", flush=True)


def run(args: argparse.Namespace, model: Any, clips: Clips) -> int:
    """Evaluate, print the table, write the outputs."""
    import torch

    from resq_brevitas.config import LineSearch
    from resq_brevitas.experiments.evaluation import (
        TABLE_LEGEND,
        compare_configs,
        compare_schemes,
        config_label,
        format_table,
    )

    torch.manual_seed(0)
    configs = configs_from_args(args)
    dynamic = dynamic_configs_from_args(args)
    variants = variant_configs(args, model)
    progress = not args.no_progress
    printer = None if progress else RowPrinter(
        1 + len(configs) * (2 if args.qat_steps else 1) + len(dynamic) + len(variants)
        + int(args.policy))
    first = clips.evaluation[0]
    print(f"model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
          f"params); {len(clips.evaluation)} evaluation clips of {first.shape[0]} frames "
          f"{tuple(first.shape[1:])}; calibration c={args.calib_samples}, r={args.candidates}")
    for note in clips.notes:
        print(note)
    start = time.perf_counter()
    rows = compare_schemes(
        model, configs, clips.calib, clips.evaluation, clips.labels, clips.num_classes,
        calibration=LineSearch(candidates=args.candidates, samples=args.calib_samples),
        progress=progress, on_row=printer,
    )
    if args.qat_steps:
        rows += qat_rows(model, configs, clips, args, printer)
    figure: dict[str, Any] = {}
    if dynamic:
        pick = figure_config(dynamic)

        def keep_bit_maps(config: Any, qm: Any) -> None:
            if config is pick:
                with torch.no_grad():
                    qm(first.unsqueeze(0))
                figure.update(maps=dict(qm.last_bit_maps), keyframes=qm.last_keyframes,
                              title=f"Dynamic-ResQ {config_label(config)} (tau="
                                    f"{_solved_tau(qm):.3g}): bits per pixel")

        rows += compare_configs(model, dynamic, clips.calib, clips.evaluation, clips.labels,
                                clips.num_classes, progress=progress, include_float=False,
                                on_model=keep_bit_maps, on_row=printer)
    if variants:
        extra = compare_configs(model, [c for _, c in variants], clips.calib, clips.evaluation,
                                clips.labels, clips.num_classes, progress=progress,
                                include_float=False)
        rows += [tagged(row, tag) for (tag, _), row in zip(variants, extra)]
        for row in rows[-len(extra):]:
            if printer is not None:
                printer(row)
    if args.policy:
        rows += policy_rows(model, clips, args, printer)
    if not is_primary():  # under torchrun: every rank computed the rows, rank 0 reports
        return 0
    print()
    print(format_table(rows))
    print(TABLE_LEGEND)
    if variants:
        print(VARIANT_LEGEND)
    written = write_outputs(rows, args.out)
    if figure:
        written += write_bit_map_figure(figure, first, args.out)
    if args.export:
        written += export_first_scheme(model, configs, clips.calib, first, args)
    if args.analyze:
        from resq_brevitas.experiments.analysis import run_analysis

        written += run_analysis(model, args.analyze, args.period, clips.calib, clips.evaluation,
                                args.out, LineSearch(candidates=args.candidates,
                                                     samples=args.calib_samples),
                                progress=progress)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"done in {time.perf_counter() - start:.1f} s")
    print(summary_line(rows))
    return 0


def qat_rows(model: Any, configs: list[Any], clips: Clips, args: argparse.Namespace,
             printer: Any) -> list[Any]:
    """The 'ResQ + QAT' rows: each config calibrated, then trained with ``resq.train_qat``
    (label-free, on the calibration clips), evaluated on the same evaluation clips."""
    import copy

    from resq_brevitas.config import LineSearch, ResQConfig, Scheme
    from resq_brevitas.experiments.evaluation import clip_batches, compare_configs
    from resq_brevitas.train import train_qat

    calib = clip_batches(clips.calib)

    def trained(config: Any, qm: Any) -> Any:
        qm = copy.deepcopy(qm)
        train_qat(qm, calib, steps=args.qat_steps, lr=args.lr, scale_lr=args.scale_lr,
                  progress=not args.no_progress)
        return qm

    calibration = LineSearch(candidates=args.candidates, samples=args.calib_samples)
    full = [ResQConfig(scheme=Scheme.parse(text), period=period, calibration=calibration)
            for text, period in configs]  # as compare_schemes builds the PTQ rows' configs
    def label(row: Any) -> None:
        row.method += "+qat"
        if printer is not None:
            printer(row)

    rows = compare_configs(model, full, clips.calib, clips.evaluation, clips.labels,
                           clips.num_classes, progress=not args.no_progress,
                           include_float=False, prepare=trained, on_row=label)
    return rows


def policy_rows(model: Any, clips: Clips, args: argparse.Namespace, printer: Any) -> list[Any]:
    """The learned residual policy row (method ``videoiq``): calibrated like the others, then
    its policy network trained by ``train_policy`` (the backbone frozen) on 16 demo clips with
    a frozen stretch and a scene cut (``resq_brevitas.demo.clips.event_clips``)."""
    import copy

    from resq_brevitas.config import LearnedFramePolicy, LineSearch, ResQConfig
    from resq_brevitas.demo.clips import event_clips
    from resq_brevitas.experiments.evaluation import compare_configs
    from resq_brevitas.policy.videoiq_training import train_policy

    training = event_clips(16, seed=20_000)

    def trained(config: Any, qm: Any) -> Any:
        qm = copy.deepcopy(qm)
        train_policy(qm, training, model, steps=args.policy_steps, lr=5e-3, w_efficiency=0.05,
                     progress=not args.no_progress)
        return qm

    def label(row: Any) -> None:
        row.method = "videoiq"
        if printer is not None:
            printer(row)

    config = ResQConfig(scheme=POLICY_SCHEME, period=POLICY_PERIOD, policy=LearnedFramePolicy(),
                        calibration=LineSearch(candidates=args.candidates,
                                               samples=args.calib_samples))
    return compare_configs(model, [config], clips.calib, clips.evaluation, clips.labels,
                           clips.num_classes, progress=not args.no_progress,
                           include_float=False, prepare=trained, on_row=label)


def is_primary() -> bool:
    """Rank 0 of torchrun, or the only process."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed() -> bool:
    """Join the process group when started by torchrun (gloo on CPU, nccl with CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = check_options(parser, argv)
    try:
        model = load_model(args)
        clips = load_clips(args, model)
    except UsageError as err:
        parser.error(str(err))
    distributed = init_distributed()
    try:
        return run(args, model, clips)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def prefer_current_directory() -> None:
    """Put the current folder first on the import path, as ``python -m`` does (the script's
    own folder, which Python put there, stays second), so ``--model mynet:build`` finds
    ``./mynet.py``."""
    cwd = os.getcwd()
    if sys.path[:1] != [cwd]:
        sys.path.insert(0, cwd)


if __name__ == "__main__":
    prefer_current_directory()
    sys.exit(main())
