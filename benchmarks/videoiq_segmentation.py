"""The segmentation half of ``bench_videoiq.py``: the learned residual policy
``W8A8->{W8A4,W4A4,W2A2,skip,key}`` on the embedded DemoSegNet against static ResQ
``W8A8->W4A4`` T=4 and Dynamic-ResQ ``W8A8->W8A{0,4,8}`` T=4 at the static row's BOPs, and the
policy's behaviour on clips with a frozen stretch and a scene cut.

Event clips (:func:`resq_brevitas.demo.clips.event_clip`): frames of one demo clip, then its
frame ``frozen_at`` repeated (a stalled stream: the frozen frames are bit-identical), then, from
``cut``, the frames of another clip (a scene cut). The policy is trained (distillation from the
float model, the default of ``train_policy``) on such clips with random event positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import resq_brevitas as resq
from resq_brevitas.demo.clips import demo_clips, event_clip, event_clips
from resq_brevitas.demo.model import NUM_CLASSES, load_demo_model
from resq_brevitas.experiments.metrics import miou, sqnr_db
from resq_brevitas.policy.videoiq_training import train_policy

SEG_FAMILY = "W8A8->{W8A4,W4A4,W2A2,skip,key}"
#: Keyframes the schedule forces: only each clip's first frame (T = 16); the policy's ``key``
#: action places the others.
SEG_PERIOD = 16
#: Shown the difference to the previous frame and its mean |.|, not the frame: of the five runs
#: in benchmarks/RESULTS.md section 13, the only one that keyed after the cuts (the inputs with
#: the frame collapsed to one action for every frame).
SEG_POLICY = resq.LearnedFramePolicy(input_size=16, channels=(8, 16), hidden=32,
                                     inputs=("difference", "mean_abs_difference"))
TRAIN_SEED, EVENT_SEED = 20_000, 30_000


def _calibrated(cfg: Any, model: torch.nn.Module, calib: list[Tensor], progress: bool) -> Any:
    qm = resq.convert(model, cfg)
    resq.calibrate(qm, calib, progress=progress)
    return qm.eval()


@torch.no_grad()
def _evaluate(qm: Any, videos: list[Tensor], labels: list[Tensor], teacher: Any
              ) -> dict[str, float]:
    outs, refs, bops = [], [], []
    for v in videos:
        outs.append(qm(v.unsqueeze(0))[0])
        bops.append(qm.last_cost.mean_bops)
        refs.append(teacher(v))
    out, ref = torch.cat(outs), torch.cat(refs)
    return {"sqnr_db": sqnr_db(ref, out),
            "miou_gt": 100 * miou(out.argmax(1), torch.cat(labels), NUM_CLASSES),
            "miou_float": 100 * miou(out.argmax(1), ref.argmax(1), NUM_CLASSES),
            "mean_bops": sum(bops) / len(bops)}


def run_segmentation(steps: int = 150, lr: float = 5e-3, w_efficiency: float = 0.02,
                     train_clips: int = 16, batch: int = 1, progress: bool = True,
                     threads: int = 1, inputs: tuple[str, ...] | None = None
                     ) -> dict[str, Any]:
    """Train the learned residual policy and measure every row; returns rows and events.

    ``inputs``: the policy's :attr:`~resq_brevitas.LearnedFramePolicy.inputs` (``None``: those
    of :data:`SEG_POLICY`).
    """
    torch.set_num_threads(threads)
    teacher = load_demo_model()
    calib, videos, labels = demo_clips()
    search = resq.LineSearch(candidates=20, samples=64)
    rows: list[dict[str, Any]] = []
    w8 = _calibrated(resq.ResQConfig(scheme="W8A8", calibration=search), teacher, calib,
                     progress)
    rows.append({"method": "frame", "scheme": "W8A8", "period": 1,
                 **_evaluate(w8, videos, labels, teacher)})
    static = _calibrated(resq.ResQConfig(scheme="W8A8->W4A4", period=4, calibration=search),
                         teacher, calib, progress)
    rows.append({"method": "resq", "scheme": "W8A8->W4A4", "period": 4,
                 **_evaluate(static, videos, labels, teacher)})
    share = rows[-1]["mean_bops"] / rows[0]["mean_bops"]
    dynamic = _calibrated(resq.ResQConfig(
        scheme="W8A8->W8A{0,4,8}", period=4, calibration=search,
        policy=resq.ErrorBoundPolicy(target_bops=share)), teacher, calib, progress)
    rows.append({"method": "dynamic", "scheme": f"W8A8->W8A{{0,4,8}} @{share:.3g}x",
                 "period": 4, **_evaluate(dynamic, videos, labels, teacher)})
    policy = SEG_POLICY if inputs is None else replace(SEG_POLICY, inputs=tuple(inputs))
    learned = _calibrated(resq.ResQConfig(scheme=SEG_FAMILY, period=SEG_PERIOD,
                                          calibration=search, policy=policy),
                          teacher, calib, progress)
    t0 = time.perf_counter()
    history = train_policy(learned, event_clips(train_clips, TRAIN_SEED, batch), teacher,
                           steps=steps, lr=lr, w_efficiency=w_efficiency, progress=progress)
    train_time = time.perf_counter() - t0
    row = {"method": "learned", "scheme": SEG_FAMILY, "period": SEG_PERIOD,
           **_evaluate(learned, videos, labels, teacher)}
    rows.append(row)
    # Events: 4 clips, frames 4..9 frozen (a copy of frame 3), a cut at frame 11.
    names = [str(a) for a in learned.config.scheme.family]
    skip, key = names.index("skip"), names.index("key")
    events = []
    event_videos, event_actions = [], []
    for i in range(4):
        video, _, frozen, cut = event_clip(EVENT_SEED + i)
        with torch.no_grad():
            learned(video.unsqueeze(0))
        actions = learned.last_actions[0]
        keys = [t for t in range(cut, len(actions)) if int(actions[t]) in (key, -1)]
        events.append({"frozen_skipped": float((actions[frozen] == skip).float().mean()),
                       "frames_to_key_after_cut": (keys[0] - cut) if keys else math.inf,
                       "actions": actions.tolist()})
        event_videos.append(video)
        event_actions.append(actions.clone())
    return {"rows": rows, "events": events, "action_names": names, "history": history,
            "inputs": list(policy.inputs),
            "train_time_s": train_time, "event_videos": torch.stack(event_videos),
            "event_actions": torch.stack(event_actions)}


def print_segmentation(result: dict[str, Any]) -> None:
    """The segmentation table and the event measurements."""
    rows = result["rows"]
    w8 = rows[0]["mean_bops"]
    print("\nSegmentation demo (DemoSegNet, 6 clips x 16 frames, seeds 9000..9005)")
    print(f"{'method':8s} {'scheme':36s} {'T':>2s} {'SQNR dB':>8s} {'mIoU GT':>8s} "
          f"{'mIoU fl':>8s} {'GBOPs/fr':>9s} {'x W8A8':>7s}")
    print("-" * 94)
    for r in rows:
        print(f"{r['method']:8s} {r['scheme']:36s} {r['period']:2d} {r['sqnr_db']:8.2f} "
              f"{r['miou_gt']:8.2f} {r['miou_float']:8.2f} {r['mean_bops'] / 1e9:9.4f} "
              f"{r['mean_bops'] / w8:7.4f}")
    names = result["action_names"]
    print("\nEvent clips (frames 4-9 frozen = copies of frame 3, scene cut at frame 11):")
    for i, e in enumerate(result["events"]):
        acts = " ".join("K" if a == -1 else names[a] for a in e["actions"])
        print(f"  clip {i}: frozen frames skipped {100 * e['frozen_skipped']:.0f}%, keyframe "
              f"{e['frames_to_key_after_cut']} frame(s) after the cut | {acts}")
    skipped = sum(e["frozen_skipped"] for e in result["events"]) / len(result["events"])
    delays = [e["frames_to_key_after_cut"] for e in result["events"]]
    print(f"  mean share of frozen frames skipped {100 * skipped:.0f}% (target: most); keyframe "
          f"within 2 frames of the cut in {sum(d <= 2 for d in delays)}/{len(delays)} clips")
    print(f"  policy inputs {tuple(result['inputs'])}; policy training: "
          f"{result['train_time_s']:.0f} s")
