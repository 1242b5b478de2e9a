"""FX graph-mode QAT of an unrolled clip: prepare_qat_fx and torchao's prepare_qat_pt2e train it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resq_brevitas.deploy import unroll
from resq_brevitas.observers import attach_output_consumers


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    clip = torch.randn(2, 2, 3, 6, 6)
    clip[:, 1] = clip[:, 0] + 0.3 * torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        target = net(clip.flatten(0, 1)).unflatten(0, (2, 2))
    return net, clip, target


def _train(prepared: nn.Module, clip: torch.Tensor, target: torch.Tensor,
           steps: int = 8) -> list[float]:
    optimiser = torch.optim.Adam(prepared.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(prepared(clip), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    return losses


def test_prepare_qat_fx_unrolled_clip_trains_and_converts() -> None:
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_qat_fx

    from resq_brevitas.observers import unrolled_qconfig_mapping

    net, clip, target = _setup()
    unrolled = unroll(net, 2, clip)
    mapping = unrolled_qconfig_mapping(unrolled, "W8A8->W2A2", samples=4, candidates=8)
    prepared = prepare_qat_fx(unrolled.train(), mapping, (clip,))
    attach_output_consumers(prepared)
    losses = _train(prepared, clip, target)
    assert losses[-1] < losses[0]
    prepared.eval()
    # the reference form (quantize-dequantize around float ops): the unrolled graph mixes
    # quantized call sites with float state arithmetic (x - x_ref, + z_ref)
    converted = convert_to_reference_fx(prepared)
    with torch.no_grad():
        out = converted(clip)
    assert out.shape == target.shape and bool(torch.isfinite(out).all())


def test_prepare_qat_pt2e_unrolled_clip_trains_and_converts() -> None:
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from resq_brevitas.observers import resq_pt2e_quantizer

    net, clip, target = _setup()
    unrolled = unroll(net, 2, clip)
    exported = torch.export.export(unrolled, (clip,)).module()
    quantizer = resq_pt2e_quantizer(unrolled, "W8A8->W2A2", samples=4, candidates=8)
    prepared = prepare_qat_pt2e(exported, quantizer)
    attach_output_consumers(prepared)
    losses = _train(prepared, clip, target)
    assert losses[-1] < losses[0]
    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        out = converted(clip)
    assert out.shape == target.shape and bool(torch.isfinite(out).all())
