"""A precision policy and a refresh policy defined here, with no edit to the package, run end to
end: convert, calibrate, run, cost, serialise. And a calibrated model swaps its policy without
recalibrating."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

import resq_brevitas as resq
from resq_brevitas.policy import StreamStatus
from tests.helpers import make_clip

POOL_SCHEME = "W8A8->W8A{0,4,8}"
TOY_POLICY_BOPS = 1000


@dataclass(frozen=True)
class FixedIndexPolicy:
    """Toy settings: every residual pixel takes pool quantizer ``index``."""

    implementation: ClassVar[str] = "tests.policy.test_custom_policies:FixedIndexSelector"

    index: int = 1


class FixedIndexSelector(nn.Module):
    """Toy precision policy: a constant decision, a constant cost."""

    def __init__(self, settings: FixedIndexPolicy) -> None:
        super().__init__()
        self.settings = settings

    def select(self, delta: Tensor, quantized: Sequence[Tensor], weight_norm: Tensor,
               channel_dim: int) -> tuple[Tensor, int]:
        spatial = delta.shape[:1] + (delta.shape[2:] if channel_dim == 1 else delta.shape[1:-1])
        return torch.full(spatial, self.settings.index, dtype=torch.long,
                          device=delta.device), 1

    def cost(self, pool_size: int, channels: int, positions: int, units: int,
             act_bits: int) -> int:
        return TOY_POLICY_BOPS


@dataclass(frozen=True)
class EveryNRefresh:
    """Toy refresh settings: a keyframe once a stream's phase reaches ``every``."""

    implementation: ClassVar[str] = "tests.policy.test_custom_policies:EveryNTrigger"

    every: int = 2


class EveryNTrigger(nn.Module):
    """Toy refresh trigger deciding before each frame from the stream's phase."""

    def __init__(self, settings: EveryNRefresh) -> None:
        super().__init__()
        self.every = settings.every

    def before_frame(self, stream: StreamStatus) -> Tensor:
        return stream.phase >= self.every


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h.mean((2, 3)))


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def _calibrated(config: resq.ResQConfig) -> resq.ResQModel:
    qm = resq.convert(_net(), config)
    return resq.calibrate(qm, [make_clip(batch=1, frames=8, size=8, seed=1)[0]], samples=8,
                          candidates=8, progress=False)


def test_custom_precision_policy_runs_end_to_end() -> None:
    toy = _calibrated(resq.ResQConfig(POOL_SCHEME, period=4, policy=FixedIndexPolicy(index=1)))
    static = _calibrated(resq.ResQConfig("W8A8->W8A4", period=4))
    clip = make_clip(batch=2, frames=8, size=8, seed=2)
    with torch.no_grad():
        out, expected = toy(clip), static(clip)
    # Pool quantizer 1 (4 bits) is calibrated like the static 4-bit one: the same outputs.
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    pool_bits = resq.Scheme.parse(POOL_SCHEME).residual.act_bits
    for name, bits in toy.last_bit_maps.items():
        assert bool((bits[:, 1:4] == pool_bits[1]).all()), name
    # Each residual frame costs the static residual BOPs plus the toy policy's own, per layer.
    layers = len(list(toy.resq_layers()))
    for t in range(8):
        extra = 0 if t % 4 == 0 else TOY_POLICY_BOPS * layers
        assert toy.last_cost.per_frame[t] == pytest.approx(static.last_cost.per_frame[t] + extra)
        assert toy.last_cost.per_frame_policy[t] == pytest.approx(extra)


def test_custom_refresh_policy_runs_end_to_end() -> None:
    config = resq.ResQConfig("W8A8->W4A4", period=4, refresh=EveryNRefresh(every=2))
    toy = _calibrated(config)
    reference = resq.convert(_net(), resq.ResQConfig("W8A8->W4A4", period=2))
    resq.copy_ranges(toy, reference, paths=("keyframe", "residual"))
    assert reference.calibrated
    # A refresh trigger makes `toy` step frame by frame; the reference must too for bit
    # equality (float32 time-batched clips equal stepping only to float rounding).
    reference.clip_execution = "sequential"
    clip = make_clip(batch=2, frames=9, size=8, seed=3)
    with torch.no_grad():
        out, expected = toy(clip), reference(clip)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    frames = torch.arange(9)
    assert torch.equal(toy.last_keyframes, (frames % 2 == 0).expand(2, 9))
    # Every keyframe after the first was forced: a refresh restarts the phase, so the period-4
    # schedule never comes due.
    assert torch.equal(toy.last_refreshes, ((frames % 2 == 0) & (frames > 0)).expand(2, 9))


def test_custom_settings_round_trip_through_the_config_and_the_state_dict() -> None:
    config = resq.ResQConfig(POOL_SCHEME, period=4, policy=FixedIndexPolicy(index=2),
                             refresh=(EveryNRefresh(3),))
    assert resq.ResQConfig.from_dict(config.to_dict()) == config
    qm = _calibrated(config)
    assert resq.ResQModel.config_from_state_dict(qm.state_dict()) == config


def test_settings_without_implementation_are_refused() -> None:
    @dataclass(frozen=True)
    class Nameless:
        tau: float = 1.0

    with pytest.raises(TypeError, match="policy must be"):
        resq.ResQConfig(POOL_SCHEME, policy=Nameless())


def test_with_policy_equals_calibrating_from_scratch() -> None:
    base = _calibrated(resq.ResQConfig(POOL_SCHEME, period=3,
                                       policy=resq.ErrorBoundPolicy(tau=0.0)))
    clip = make_clip(batch=2, frames=6, size=8, seed=4)
    with torch.no_grad():
        before = base(clip)
    for tau in (1e-3, 1e-1, 10.0):
        swapped = base.with_policy(resq.ErrorBoundPolicy(tau=tau))
        fresh = _calibrated(resq.ResQConfig(POOL_SCHEME, period=3,
                                            policy=resq.ErrorBoundPolicy(tau=tau)))
        assert swapped.config == fresh.config
        with torch.no_grad():
            torch.testing.assert_close(swapped(clip), fresh(clip), rtol=0, atol=0)
        assert swapped.last_cost.per_frame == pytest.approx(fresh.last_cost.per_frame)
    with torch.no_grad():
        torch.testing.assert_close(base(clip), before, rtol=0, atol=0)  # the original is intact
    assert base.config.policy == resq.ErrorBoundPolicy(tau=0.0)
