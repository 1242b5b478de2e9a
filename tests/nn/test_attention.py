"""ResQMultiheadAttention: ``nn.MultiheadAttention`` with ResQ projections (issue 12 item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import resq_brevitas as resq
from resq_brevitas.nn import ResQMultiheadAttention, is_resq_layer
from tests.helpers import make_clip

B, L, S, E = 3, 4, 6, 8


def _inputs(batch_first: bool, kdim: int | None, vdim: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def shape(n: int, e: int) -> tuple[int, ...]:
        return (B, n, e) if batch_first else (n, B, e)

    return (torch.randn(shape(L, E), generator=g), torch.randn(shape(S, kdim or E), generator=g),
            torch.randn(shape(S, vdim or E), generator=g))


OPTIONS = {
    "plain": {},
    "no-weights": {"need_weights": False},
    "masks": {"key_padding_mask": torch.tensor([[False] * S, [False] * 4 + [True] * 2,
                                                [True] + [False] * 5]),
              "attn_mask": torch.randn(L, S)},
    "per-head-bool-mask": {"attn_mask": torch.rand(B * 2, L, S) > 0.7,
                           "average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", [(None, None), (5, 7)], ids=["same-dims", "kdim-vdim"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equals_float_attention_with_quantization_disabled(batch_first, dims, option) -> None:
    torch.manual_seed(0)
    float_attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, kdim=dims[0],
                                       vdim=dims[1]).eval()
    attn = ResQMultiheadAttention.from_float(float_attn, "attn")
    assert all(is_resq_layer(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj",
                                                         "out_proj"))
    q, k, v = _inputs(batch_first, *dims)
    with torch.no_grad(), resq.quantization_disabled(attn):
        want, want_w = float_attn(q, k, v, **OPTIONS[option])
        got, got_w = attn(q, k, v, **OPTIONS[option])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # quantized: close but not equal
        assert not torch.equal(attn(q, k, v, **OPTIONS[option])[0], want)


def test_unbatched_input_and_unsupported_options() -> None:
    torch.manual_seed(0)
    float_attn = nn.MultiheadAttention(E, 2).eval()
    attn = ResQMultiheadAttention.from_float(float_attn, "attn")
    x = torch.randn(L, E)
    with torch.no_grad(), resq.quantization_disabled(attn):
        for got, want in zip(attn(x, x, x), float_attn(x, x, x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is_causal needs attn_mask"):
        attn(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn"):
        ResQMultiheadAttention.from_float(nn.MultiheadAttention(E, 2, add_bias_kv=True), "a")


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_never_takes_the_fused_fast_path() -> None:
    """Under no_grad and eval, nn.MultiheadAttention runs aten::_native_multi_head_attention
    (not exportable); the ResQ module runs plain matmuls and softmax."""
    torch.manual_seed(0)
    float_attn = nn.MultiheadAttention(E, 2, batch_first=True).eval()
    attn = ResQMultiheadAttention.from_float(float_attn, "attn").eval()
    x = torch.randn(B, L, E)
    with torch.no_grad():
        with _Ops() as fused:
            float_attn(x, x, x)
        with _Ops() as ours:
            attn(x, x, x)
    assert any("native_multi_head_attention" in n for n in fused.names)
    assert not any("native_multi_head_attention" in n for n in ours.names)


class CrossAttention(nn.Module):
    """Self-attention over pixel tokens, then cross-attention to a pooled memory (kv differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, E, 4, stride=4)
        self.memory = nn.Linear(E, 5)
        self.self_attn = nn.MultiheadAttention(E, 2)  # sequence-first
        self.cross = nn.MultiheadAttention(E, 2, kdim=5, vdim=5, batch_first=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.embed(x).flatten(2).permute(2, 0, 1)  # [N, B, E]
        t = t + self.self_attn(t, t, t, need_weights=False)[0]
        t = t.transpose(0, 1)  # [B, N, E]
        mem = self.memory(t[:, ::3])
        out, weights = self.cross(t, mem, mem)
        return out, weights


def test_attention_in_a_model_streams_with_a_state_per_projection() -> None:
    torch.manual_seed(0)
    net = CrossAttention().eval()
    qm = resq.convert(net, resq.ResQConfig(period=3, strict=True))
    names = [n for n, _ in qm.resq_layers()]
    assert names == ["embed", "memory", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.out_proj", "cross.q_proj", "cross.k_proj",
                     "cross.v_proj", "cross.out_proj"]
    assert len(qm.float_operations) == 2
    clip = make_clip(batch=2, frames=5, size=8, seed=4)
    resq.calibrate(qm, [clip[:1]], samples=5, candidates=4, progress=False)
    with torch.no_grad():
        dense = [torch.stack(o, 1) for o in zip(*(net(clip[:, t]) for t in range(5)))]
        with resq.quantization_disabled(qm):
            for got, want in zip(qm(clip), dense):
                assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
        out = qm(clip)
        qm.reset()
        steps = [qm.step(clip[:, t]) for t in range(5)]
        for got, want in zip((torch.stack(o, 1) for o in zip(*steps)), out):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        row = qm(clip[1:])
        for got, want in zip(row, out):
            torch.testing.assert_close(got[0], want[1], rtol=1e-5, atol=1e-5)
    # Each projection has its own reference (the temporal state is per layer).
    refs = {n: qm._states[n].ref for n in names}
    assert all(r is not None for r in refs.values())
    assert refs["self_attn.q_proj"].z.data_ptr() != refs["self_attn.k_proj"].z.data_ptr()
