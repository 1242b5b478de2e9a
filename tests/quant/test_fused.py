"""FusedActQuant: the Brevitas activation proxy's values, in one fresh tensor, where exact."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch

from resq_brevitas.quant.fused import FusedActQuant, fusable
from resq_brevitas.quant.quantizers import act_quant, make_unsigned


def _proxy(bits: int, threshold: float, unsigned: bool = False):
    layer = qnn.QuantIdentity(act_quant=act_quant(bits), return_quant_tensor=False).eval()
    proxy = layer.act_quant
    if unsigned:
        make_unsigned(proxy)
    for module in proxy.modules():
        if hasattr(module, "value") and isinstance(module.value, torch.nn.Parameter):
            module.value.data.fill_(threshold)
    return proxy


def _value(out):
    return out.value if hasattr(out, "value") else out


def _inputs(scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 9, generator=g) * 3 * scale
    # Exact half steps (round half to even), far outside the range, signed zeros, inf and NaN.
    specials = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 100.0, -100.0, -0.0, 0.0,
                             float("inf"), float("-inf"), float("nan")]) * scale
    return torch.cat([x.flatten(), specials])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("unsigned", [False, True])
def test_equals_the_brevitas_proxy(bits: int, unsigned: bool) -> None:
    proxy = _proxy(bits, threshold=1.7, unsigned=unsigned)
    assert fusable(proxy)
    fused = FusedActQuant(proxy)
    scale = 1.7 / ((2**bits - 1) if unsigned else (2**bits - 1) / 2)
    x = _inputs(scale)
    if unsigned:
        x = x.abs()
    with torch.no_grad():
        assert fused.fast(x)
        expected, got = _value(proxy(x)), fused(x)
    assert torch.equal(expected.isnan(), got.isnan())
    finite = ~expected.isnan()
    assert torch.equal(expected[finite], got[finite])


def test_follows_a_changed_threshold() -> None:
    proxy = _proxy(4, threshold=1.0)
    fused = FusedActQuant(proxy)
    x = _inputs(0.2)[:300]  # finite values only
    with torch.no_grad():
        before = fused(x)
        for module in proxy.modules():
            if hasattr(module, "value") and isinstance(module.value, torch.nn.Parameter):
                module.value.data.fill_(0.3)
        after = fused(x)
        assert torch.equal(after, _value(proxy(x)))
    assert not torch.equal(before, after)


def test_gradient_takes_the_brevitas_chain() -> None:
    proxy = _proxy(4, threshold=1.0)
    proxy.train()
    fused = FusedActQuant(proxy)
    x = _inputs(0.1)[:200].clone().requires_grad_(True)
    assert not fused.fast(x)
    fused(x).sum().backward()
    grad_fused = x.grad.clone()
    params_fused = [p.grad.clone() for p in proxy.parameters()]
    x.grad = None
    for p in proxy.parameters():
        p.grad = None
    _value(proxy(x)).sum().backward()
    assert torch.equal(grad_fused, x.grad)
    assert all(torch.equal(a, p.grad) for a, p in zip(params_fused, proxy.parameters()))


def test_disabled_and_unfusable_proxies_call_the_proxy() -> None:
    zero = qnn.QuantIdentity(act_quant=act_quant(0), return_quant_tensor=False).eval().act_quant
    assert not fusable(zero)
    x = _inputs(0.1)[:100]
    with torch.no_grad():
        assert torch.equal(FusedActQuant(zero)(x), _value(zero(x)))
        proxy = _proxy(4, threshold=1.0)
        proxy.disable_quant = True
        assert not FusedActQuant(proxy).fast(x)
        assert torch.equal(FusedActQuant(proxy)(x), x)


def test_traced_calls_record_the_proxy() -> None:
    proxy = _proxy(4, threshold=1.0)
    fused = FusedActQuant(proxy)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proxy = proxy

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused(x)

    class ProxyLeaf(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:
            return m is proxy or super().is_leaf_module(m, name)

    graph = ProxyLeaf().trace(Wrap())
    # A traced call must record the proxy (the exportable chain), not the fused in-place ops.
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["proxy"]
