"""Training and calibration under real torch.distributed (2 gloo processes, spawned)."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import resq_brevitas as resq
from resq_brevitas.train import clip_stream
from tests.helpers import make_clip, make_tiny_segnet

WORLD = 2
CONFIG = resq.ResQConfig(scheme="W8A8->W4A4", period=4)
RRM = resq.ResQConfig(scheme="W8A8->W4A4", period=4, reference="previous", threshold=0.05,
                      refresh=resq.ErrorBudgetRefresh(budget=0.05))


def _clip(batch: int, frames: int, seed: int) -> torch.Tensor:
    return make_clip(batch, frames, size=8, seed=seed, drift=0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker: Any, tmp_path: Path, *args: Any) -> list[Any]:
    port = _free_port()
    mp.spawn(_entry, args=(worker, port, tmp_path, args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank: int, worker: Any, port: int, tmp_path: Path, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    # A deadlock fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(worker(rank, *args), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _model(ranges: dict[str, float]) -> resq.ResQModel:
    qm = resq.convert(make_tiny_segnet(0), CONFIG)
    resq.set_activation_ranges(qm, ranges)
    qm.calibrated = True
    return qm


def _sgd_steps(qm: torch.nn.Module, clips: list[torch.Tensor], lr: float = 0.05) -> None:
    optimiser = torch.optim.SGD(qm.parameters(), lr=lr)
    for clip in clips:
        optimiser.zero_grad()
        qm(clip).square().mean().backward()
        optimiser.step()


def _ddp_worker(rank: int, ranges: dict[str, float], clips: list[torch.Tensor]) -> dict:
    qm = _model(ranges).train()
    ddp = DistributedDataParallel(qm)
    _sgd_steps(ddp, [c.chunk(WORLD)[rank] for c in clips])
    return {k: v.detach().clone() for k, v in qm.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _ranges() -> dict[str, float]:
    qm = resq.convert(make_tiny_segnet(0), CONFIG)
    resq.calibrate(qm, [_clip(2, 8, seed=s) for s in range(2)], samples=16, progress=False)
    return resq.activation_ranges(qm)


def test_ddp_ranks_stay_in_sync_and_equal_one_process_on_the_whole_batch(tmp_path: Path
                                                                         ) -> None:
    ranges = _ranges()
    clips = [_clip(4, 6, seed=80 + s) for s in range(3)]
    per_rank = _run(_ddp_worker, tmp_path, ranges, clips)
    single = _model(ranges).train()
    _sgd_steps(single, clips)
    for key, value in single.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(per_rank[0][key], per_rank[1][key]), key
        torch.testing.assert_close(per_rank[0][key], value, rtol=1e-5, atol=1e-6)
    # the SGD steps did move the weights and the thresholds
    start = _model(ranges).state_dict()
    assert any(not torch.equal(start[k], per_rank[0][k]) for k in start
               if k.endswith("scaling_impl.value"))


def _rank_clips(rank: int) -> list[torch.Tensor]:
    # rank 1 holds only single-frame clips: it sees no residual at all
    if rank == 0:
        return [_clip(2, 6, seed=90)]
    return [_clip(2, 1, seed=92 + s) for s in range(6)]


def _calibration_worker(rank: int, config: resq.ResQConfig) -> dict:
    qm = resq.convert(make_tiny_segnet(0), config)
    resq.calibrate(qm, _rank_clips(rank), samples=12, progress=False)
    return {"ranges": resq.activation_ranges(qm), "polynomial": qm.error_polynomial}


@pytest.mark.parametrize("config", [CONFIG, RRM], ids=["resq", "rrm-error-budget"])
def test_a_rank_without_residuals_calibrates_like_one_process_on_all_clips(
        tmp_path: Path, config: resq.ResQConfig) -> None:
    per_rank = _run(_calibration_worker, tmp_path, config)
    assert per_rank[0] == per_rank[1]
    single = resq.convert(make_tiny_segnet(0), config)
    resq.calibrate(single, _rank_clips(0) + _rank_clips(1), samples=24, progress=False)
    assert per_rank[0]["ranges"] == pytest.approx(resq.activation_ranges(single), rel=1e-6)
    if config is RRM:
        assert per_rank[0]["polynomial"] is not None
        assert per_rank[0]["polynomial"] == pytest.approx(single.error_polynomial, rel=1e-6)


def _train_worker(rank: int, ranges: dict[str, float], clips: list[torch.Tensor]) -> dict:
    qm = _model(ranges)
    if rank == 1:  # rank 0's parameters win: train_qat starts every rank from them
        with torch.no_grad():
            next(qm.weight_parameters()).add_(1.0)
    history = resq.train_qat(qm, clips, steps=4, lr=1e-3, progress=False)
    state = {k: v.detach().clone() for k, v in qm.state_dict().items()
             if isinstance(v, torch.Tensor)}
    return {"state": state, "loss": history.loss}


def test_train_qat_under_torch_distributed_keeps_ranks_identical(tmp_path: Path) -> None:
    ranges = _ranges()
    clips = [_clip(2, 6, seed=100 + s) for s in range(4)]
    per_rank = _run(_train_worker, tmp_path, ranges, clips)
    for key, value in per_rank[0]["state"].items():
        assert torch.equal(value, per_rank[1]["state"][key]), key
    assert per_rank[0]["loss"] != per_rank[1]["loss"]  # each rank trained on its own clips


def test_clip_stream_splits_each_epoch_over_ranks() -> None:
    clips = list(range(5))
    streams = [clip_stream(clips, seed=3, rank=r, world=2) for r in range(2)]
    epoch = [[next(s) for _ in range(3)] for s in streams]  # 5 clips padded to 6
    assert set(epoch[0] + epoch[1]) == set(clips)  # every clip once, one repeated as padding
    again = clip_stream(clips, seed=3, rank=0, world=2)
    assert [next(again) for _ in range(3)] == epoch[0]
    with pytest.raises(TypeError, match="sized"):
        next(clip_stream(iter(clips), rank=0, world=2))
