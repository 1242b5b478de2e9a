"""Conversion of small in-repo versions of real architecture families (issue 12): a ViT block with
``nn.MultiheadAttention`` and a class token, windowed attention (one block calling ``F.linear`` on
its children's weights, one calling them), an r3d-style model built from a ``Conv3d`` subclass,
a block with a BatchNorm subclass that applies an activation, and a ConvNeXt-style block with a
``layer_scale`` Parameter. Each: convert, calibrate, exact with quantization disabled, streaming
== clip, rows independent."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resq_brevitas as resq
from resq_brevitas.convert import convert  # imported before warnings become errors
from tests.helpers import make_clip


class ViTBlock(nn.Module):
    """Patch embedding, class token, position embedding, one pre-norm encoder block, a head."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, 16, D]
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + self.pos_embedding
        h = self.ln1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.ln2(tokens))
        return self.head(tokens[:, 0])


def _windows(x: Tensor, size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B * windows, size * size, C]``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // size, size, w // size, size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, size * size, c)


def _unwindows(x: Tensor, batch: int, h: int, w: int, size: int) -> Tensor:
    c = x.shape[-1]
    x = x.view(batch, h // size, w // size, size, size, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, c, h, w)


class WindowAttention(nn.Module):
    """Windowed self-attention with a relative-position bias table (Swin style). With
    ``functional=True`` it calls ``F.linear`` on its children's weights, as torchvision's
    ``ShiftedWindowAttention`` does; else it calls them."""

    def __init__(self, dim: int, heads: int, size: int, functional: bool) -> None:
        super().__init__()
        self.heads, self.functional = heads, functional
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn(heads, size * size,
                                                                     size * size) * 0.1)

    def forward(self, x: Tensor) -> Tensor:  # [B * windows, N, D]
        n, tokens, dim = x.shape
        if self.functional:
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5
                             + self.relative_position_bias_table, -1)
        out = (attn @ v).transpose(1, 2).reshape(n, tokens, dim)
        if self.functional:
            return F.linear(out, self.proj.weight, self.proj.bias)
        return self.proj(out)


class WindowNet(nn.Module):
    """Conv stem, windowed attention over 4x4 windows, a conv head."""

    def __init__(self, functional: bool = False, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.attn = WindowAttention(dim, 2, 4, functional)
        self.head = nn.Conv2d(dim, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        b, _, hh, ww = h.shape
        h = h + _unwindows(self.attn(_windows(h, 4)), b, hh, ww, 4)
        return self.head(h)


class Conv3DSimple(nn.Conv3d):
    """torchvision's r3d convolution: a Conv3d subclass that only changes ``__init__``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, out_planes, (3, 3, 3), stride, (1, 1, 1), bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class R3DNet(nn.Module):
    """An r3d-style 3-D CNN over short clips ``[B, C, T', H, W]`` (one "frame" of a stream of
    sliding clips)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(Conv3DSimple(3, 8), nn.BatchNorm3d(8), nn.ReLU())
        self.block = nn.Sequential(Conv3DSimple(8, 8), nn.BatchNorm3d(8), nn.ReLU(),
                                   Conv3DSimple(8, 8), nn.BatchNorm3d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.fc(h.mean((2, 3, 4)))


class OwnForwardConv(nn.Conv2d):
    """A Conv2d subclass whose forward does more than the parent's."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass that also applies its activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.Hardswish()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class ActNoCheck(nn.BatchNorm2d):
    """BN + activation written without rank checks, so that torch.fx traces through it."""

    def _check_input_dim(self, x: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                       self.bias, False, 0.0, self.eps))


class PlainBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass that changes nothing: folding it is exact."""


class BNActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = PlainBatchNorm(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm over channels-last, MLP, ``layer_scale``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * h


class BareWeightLinear(nn.Module):
    """A module with a bare weight that *is* a linear op's weight: unsupported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.conv(x).permute(0, 2, 3, 1), self.weight.t())


def _warm_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net.eval()


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check(net: nn.Module, clip: Tensor, config: resq.ResQConfig | None = None) -> resq.ResQModel:
    """Convert and calibrate; assert exactness with quantization disabled (<= 1e-5), clip ==
    frame-by-frame streaming, and batch rows independent of each other."""
    config = config or resq.ResQConfig(period=3)
    qm = convert(net, config)
    resq.calibrate(qm, [clip[:1]], samples=clip.shape[1], candidates=4, progress=False)
    with torch.no_grad():
        dense = torch.stack([net(clip[:, t]) for t in range(clip.shape[1])], 1)
        with resq.quantization_disabled(qm):
            assert _rel(qm(clip), dense) <= 1e-5
        out = qm(clip)
        qm.reset()
        stepped = torch.stack([qm.step(clip[:, t]) for t in range(clip.shape[1])], 1)
        torch.testing.assert_close(stepped, out, rtol=1e-5, atol=1e-5)
        for b in range(clip.shape[0]):
            torch.testing.assert_close(qm(clip[b:b + 1])[0], out[b], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, dense)  # quantization is on outside the block
    return qm


def test_vit_block_converts_every_projection_and_keeps_bare_parameters() -> None:
    torch.manual_seed(0)
    net = ViTBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unsupported: no warning
        strict = convert(net, resq.ResQConfig(period=3, strict=True))
    names = [n for n, _ in strict.resq_layers()]
    assert names == ["patch", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                     "mlp.0", "mlp.2", "head"]
    assert strict.unsupported_layers == ()
    assert strict.float_operations == (
        "attn: attention matmuls (q k^T, softmax, attn v) in floating point",)
    qm = _check(net, make_clip(batch=2, frames=5, size=16, seed=1))
    assert set(qm.last_cost.macs) == set(names)
    assert qm.last_cost.macs["attn.q_proj"] == 17 * 16 * 16  # tokens x in x out per frame
    assert qm.last_cost.float_operations == strict.float_operations
    assert "not counted (floating point): attn: attention matmuls" in qm.last_cost.table()


def test_windowed_attention_calling_its_children_streams_with_window_rows() -> None:
    """The Linear layers see [B * windows, N, D]: k * B rows per frame."""
    torch.manual_seed(0)
    net = WindowNet(functional=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        convert(net, resq.ResQConfig(strict=True))  # the bias table is no weight layer
    clip = make_clip(batch=2, frames=5, size=8, seed=2)
    qm = _check(net, clip)
    assert qm.last_cost.macs["attn.qkv"] == 4 * 16 * 8 * 24  # 4 windows of 16 tokens, per stream
    with torch.no_grad():
        qm.reset()
        qm.step(clip[:, 0])
        qm.reset(rows=[1])  # the streams' phases now differ; window rows have no known owner
        with pytest.raises(RuntimeError, match=r"'attn\.qkv' sees 8 rows for 2 streams"):
            qm.step(clip[:, 1])


def test_parent_using_its_childrens_weights_is_reported_by_name() -> None:
    torch.manual_seed(0)
    net = WindowNet(functional=True).eval()
    with pytest.raises(ValueError, match=r"attn \(WindowAttention: calls F\.linear/F\.conv on "
                                         r"proj, qkv\.weight\)"):
        convert(net, resq.ResQConfig(strict=True))
    with pytest.warns(UserWarning, match=r"use their children's weights directly.*attn "
                                         r"\(WindowAttention"):
        qm = convert(net, resq.ResQConfig(period=3))
    # The children stay float: calibration works (no "never reached" error) on the rest.
    assert [n for n, _ in qm.resq_layers()] == ["stem", "head"]
    assert type(qm.model.attn.qkv) is nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _check(net, make_clip(batch=2, frames=4, size=8, seed=3))


def test_r3d_model_of_a_conv3d_subclass_converts_every_conv() -> None:
    net = _warm_bn(R3DNet(), seed=4)
    torch.manual_seed(0)
    qm = convert(net, resq.ResQConfig(period=3))
    assert [n for n, _ in qm.resq_layers()] == ["stem.0", "block.0", "block.3", "fc"]
    assert qm.unsupported_layers == ()
    assert isinstance(qm.model.stem[1], nn.Identity)  # its BN folded into the subclass conv
    g = torch.Generator().manual_seed(5)
    clip = torch.randn(2, 1, 3, 4, 8, 8, generator=g) + 0.1 * torch.randn(
        2, 4, 3, 4, 8, 8, generator=g).cumsum(1)  # 4 steps of sliding clips [C, T'=4, 8, 8]
    _check(net, clip)


def test_subclass_with_its_own_forward_is_reported_not_converted() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), OwnForwardConv(4, 4, 3))
    with pytest.raises(ValueError, match=r"1 \(OwnForwardConv: a Conv2d subclass overriding "
                                         r"forward\)"):
        convert(net, resq.ResQConfig(strict=True))
    with pytest.warns(UserWarning, match="override their forward"):
        qm = convert(net)
    assert [n for n, _ in qm.resq_layers()] == ["0"]
    assert type(qm.model[1]) is OwnForwardConv


def test_batch_norm_subclass_with_an_activation_is_kept_and_plain_subclass_folded() -> None:
    """BatchNormAct2d's forward checks the input rank (torch.fx cannot trace it), so BN folds
    on the eager trace at calibration; the fx path is the r3d test's."""
    net = _warm_bn(BNActNet(), seed=6)
    with pytest.warns(UserWarning, match=r"bn1 \(BatchNormAct2d\)"):
        qm = convert(net, resq.ResQConfig(period=3))
    assert qm.kept_batch_norms == ("bn1 (BatchNormAct2d)",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qm = _check(net, make_clip(batch=2, frames=4, size=8, seed=7))
    assert type(qm.model.bn1) is BatchNormAct2d  # not folded, not replaced by Identity
    assert isinstance(qm.model.bn2, nn.Identity)  # a plain subclass folds


def test_plain_batch_norm_subclass_folds_on_the_fx_path_and_the_act_one_is_kept() -> None:
    class Traceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), PlainBatchNorm(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 3, 3, padding=1), ActNoCheck(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    net = _warm_bn(Traceable(), seed=8)
    with pytest.warns(UserWarning, match=r"bn2 \(ActNoCheck\)"):
        qm = convert(net, resq.ResQConfig(period=3))
    assert not qm.bn_fold_pending  # traced: folded at convert
    assert isinstance(qm.model.bn1, nn.Identity) and type(qm.model.bn2) is ActNoCheck
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _check(net, make_clip(batch=2, frames=4, size=8, seed=9))


def test_convnext_block_with_layer_scale_is_accepted_under_strict() -> None:
    torch.manual_seed(0)
    net = ConvNeXtBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qm = convert(net, resq.ResQConfig(period=3, strict=True))
    assert [n for n, _ in qm.resq_layers()] == ["stem", "dwconv", "pw1", "pw2"]
    _check(net, make_clip(batch=2, frames=4, size=8, seed=10))


def test_a_bare_parameter_read_by_a_linear_op_is_still_reported() -> None:
    with pytest.raises(ValueError, match=r"<root> \(BareWeightLinear\)"):
        convert(BareWeightLinear(), resq.ResQConfig(strict=True))
