"""Line search (eq. 8): brute force, streaming == in-memory, beats min-max, distributed."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from resq_brevitas.quant import (
    StreamingLineSearch,
    candidate_thresholds,
    line_search,
    quantize_eq1,
)


def _conv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, None, stride=2, padding=1, dilation=1, groups=2)


def _weights(seed: int = 0, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 2, 3, 3, generator=g)
    s = 2 * w.abs().max() / (2**bits - 1)
    return w, quantize_eq1(w, s, bits)


def _outlier_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(n)]
    batches[0][0, 0, 3, 3] = 40.0  # one rare outlier that min-max would let dominate the range
    return batches


def test_candidates_follow_linspace_abs_without_zero() -> None:
    c = candidate_thresholds(-3.0, 1.0, 5)  # linspace: -3, -2, -1, 0, 1
    torch.testing.assert_close(c, torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.all(candidate_thresholds(0.0, 0.0, 4) > 0)


def test_line_search_is_argmin_of_brute_force_objective() -> None:
    bits = 4
    w, qw = _weights(bits=bits)
    x = torch.cat(_outlier_batches(3))
    threshold, thresholds, _ = line_search(x, bits, _conv_op, w, qw, candidates=20)
    # brute force over every (r_max, r_min) pair of the grid, objective of eq. 8 written directly
    grid = torch.linspace(x.min().item(), x.max().item(), 20, dtype=torch.float64)
    best, best_err = None, float("inf")
    target = F.conv2d(x, w, None, 2, 1, 1, 2).double()
    for r_max in grid.tolist():
        for r_min in grid.tolist():
            t = max(r_max, -r_min)
            if t <= 0:
                continue
            s = 2 * t / (2**bits - 1)
            q = torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
            err = (target - F.conv2d(q, qw, None, 2, 1, 1, 2).double()).pow(2).sum().item()
            if err < best_err:
                best, best_err = t, err
    assert threshold == pytest.approx(best, rel=1e-9)


def test_streaming_equals_all_in_memory() -> None:
    bits = 4
    w, qw = _weights(1, bits)
    batches = _outlier_batches(5, seed=3)
    search = StreamingLineSearch(bits, candidates=20)
    for x in batches:
        search.observe_range(x)
    for x in batches:
        search.accumulate(x, _conv_op, w, qw)
    stream_t, stream_grid, stream_sse = search.result()
    mem_t, mem_grid, mem_sse = line_search(torch.cat(batches), bits, _conv_op, w, qw, 20)
    assert stream_t == mem_t
    torch.testing.assert_close(stream_grid, mem_grid)
    torch.testing.assert_close(stream_sse, mem_sse, rtol=1e-9, atol=0)


def test_line_search_beats_min_max_on_outliers() -> None:
    bits = 4
    w, qw = _weights(2, bits)
    x = torch.cat(_outlier_batches(4, seed=5))
    threshold, _, _ = line_search(x, bits, _conv_op, w, qw)
    target = _conv_op(x, w)

    def out_err(t: float) -> float:
        q = quantize_eq1(x, 2 * t / (2**bits - 1), bits)
        return (target - _conv_op(q, qw)).pow(2).sum().item()

    min_max = max(x.max().item(), -x.min().item())
    assert threshold < min_max
    assert out_err(threshold) < 0.5 * out_err(min_max)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bits = 4
        w, qw = _weights(1, bits)
        shard = _outlier_batches(4, seed=3)[rank::world]
        search = StreamingLineSearch(bits, candidates=12)
        for x in shard:
            search.observe_range(x)
        for x in shard:
            search.accumulate(x, _conv_op, w, qw)
        threshold, _, sse = search.result()
        torch.save({"threshold": threshold, "sse": sse}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_all_reduce_matches_single_process(tmp_path) -> None:
    world = 2
    mp.spawn(_distributed_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    bits = 4
    w, qw = _weights(1, bits)
    single_t, _, single_sse = line_search(torch.cat(_outlier_batches(4, seed=3)), bits, _conv_op,
                                          w, qw, candidates=12)
    for result in results:
        assert result["threshold"] == single_t
        torch.testing.assert_close(result["sse"], single_sse, rtol=1e-9, atol=0)


def test_half_precision_search_does_not_overflow_and_agrees_with_float32() -> None:
    """Squared errors of large float16 activations overflow float16 (max 65504): the search
    must accumulate them in float64 and pick the range float32 picks."""
    g = torch.Generator().manual_seed(0)
    x = 300 * torch.randn(16, 4, 8, 8, generator=g)
    weight = torch.randn(6, 4, 3, 3, generator=g)

    def op(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, w, padding=1)

    qweight = quantize_eq1(weight, weight.abs().max() / 127.5, 8)
    t32, _, sse32 = line_search(x, 8, op, weight, qweight, candidates=12)
    t16, _, sse16 = line_search(x.half(), 8, op, weight.half(), qweight.half(), candidates=12)
    assert torch.isfinite(sse16).all() and float(sse16.max()) > 65504
    assert t16 == pytest.approx(t32, rel=1e-3)
