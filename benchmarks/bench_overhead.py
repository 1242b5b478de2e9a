"""Simulated-inference overhead of ResQ against what a Brevitas user runs instead.

All models run the same 16-frame clip in the same process, interleaved, repeated, and the ratios
of medians are printed:

- ``qm(clip)`` of the ResQ model (``W8A8->W4A4``, T=4: time-batched, every layer once over all
  frames) and the same with ``clip_execution="sequential"`` (frame by frame);
- the baseline: the same network with plain ``brevitas.nn`` layers and the keyframe quantizers
  (W8A8 frame quantization, same calibrated ranges), **the 16 frames as one batch**; also frame
  by frame, for reference;
- the float model on the same frames as one batch.

Target: ResQ clip forward <= 1.3x plain Brevitas on the frames as one batch.

    python benchmarks/bench_overhead.py [--size 64] [--frames 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import brevitas.nn as qnn
import torch
from brevitas.graph.base import ModuleInstanceToModuleInstance
from torch import nn

import resq_brevitas as resq
from resq_brevitas.demo.model import load_demo_model
from resq_brevitas.demo.synthetic import make_clip
from resq_brevitas.quant import act_quant, weight_quant
from resq_brevitas.quant.line_search import act_threshold, set_act_threshold

_BREVITAS_FOR = {
    nn.Conv2d: qnn.QuantConv2d,
    nn.ConvTranspose2d: qnn.QuantConvTranspose2d,
    nn.Linear: qnn.QuantLinear,
}
_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode")


def plain_brevitas_model(qm: resq.ResQModel, bits: int) -> nn.Module:
    """The converted network with every ResQ layer swapped for a plain Brevitas layer."""
    net = copy.deepcopy(qm.model)
    for name, layer in list(dict(net.named_modules()).items()):
        if not resq.nn.is_resq_layer(layer):
            continue
        cls = _BREVITAS_FOR[layer.float_class]
        if cls is qnn.QuantLinear:
            kwargs = dict(in_features=layer.in_features, out_features=layer.out_features)
        else:
            kwargs = {k: getattr(layer, k) for k in _CONV_KEYS}
            if cls is qnn.QuantConvTranspose2d:
                kwargs["output_padding"] = layer.output_padding
        plain = cls(**kwargs, bias=layer.bias is not None, weight_quant=weight_quant(bits),
                    input_quant=act_quant(bits), return_quant_tensor=False)
        with torch.no_grad():
            plain.weight.copy_(layer.weight)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        set_act_threshold(plain.input_quant, act_threshold(layer.input_quant))
        net = ModuleInstanceToModuleInstance(layer, plain).apply(net)
        del name
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    clip = make_clip(123, frames=args.frames, size=args.size)[0].unsqueeze(0)
    qm = resq.convert(model, resq.ResQConfig("W8A8->W4A4", period=4))
    resq.calibrate(qm, [make_clip(7, frames=16, size=args.size)[0]], samples=16, progress=False)
    plain = plain_brevitas_model(qm, 8)

    frames = clip.flatten(0, 1)
    sequential = copy.deepcopy(qm)
    sequential.clip_execution = "sequential"

    def plain_looped() -> torch.Tensor:
        return torch.stack([plain(clip[:, t]) for t in range(clip.shape[1])], 1)

    runs = {
        "resq": lambda: qm(clip),
        "resq_sequential": lambda: sequential(clip),
        "plain_batched": lambda: plain(frames),
        "plain_looped": plain_looped,
        "float_batched": lambda: model(frames),
    }
    with torch.no_grad():
        # sanity: the plain model is the ResQ model's keyframe path; both ResQ runs agree
        torch.testing.assert_close(plain_looped()[:, 0], qm(clip)[:, 0])
        torch.testing.assert_close(sequential(clip), qm(clip), rtol=1e-5, atol=1e-5)
        timings: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats + 1):  # first round warms up
            for label, fn in runs.items():
                start = time.perf_counter()
                fn()
                timings[label].append(time.perf_counter() - start)
    t = {k: statistics.median(v[1:]) for k, v in timings.items()}
    print(f"clip [1, {args.frames}, 3, {args.size}, {args.size}], demo model, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"plain Brevitas W8A8, frames as one batch:   {1e3 * t['plain_batched']:8.1f} ms")
    print(f"plain Brevitas W8A8, frame by frame:        {1e3 * t['plain_looped']:8.1f} ms")
    print(f"float model, frames as one batch:           {1e3 * t['float_batched']:8.1f} ms")
    print(f"ResQ W8A8->W4A4 T=4, qm(clip) time-batched: {1e3 * t['resq']:8.1f} ms")
    print(f"ResQ W8A8->W4A4 T=4, frame by frame:        {1e3 * t['resq_sequential']:8.1f} ms")
    print(f"ResQ / plain batched:  {t['resq'] / t['plain_batched']:.3f}x (target <= 1.3x)")
    print(f"ResQ / float batched:  {t['resq'] / t['float_batched']:.3f}x")
    print(f"ResQ frame by frame / plain frame by frame: "
          f"{t['resq_sequential'] / t['plain_looped']:.3f}x")


if __name__ == "__main__":
    main()
