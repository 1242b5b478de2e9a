"""ResQ multi-head attention: ``nn.MultiheadAttention`` with ResQ projections.

``nn.MultiheadAttention`` holds its input projection as a packed ``in_proj_weight`` (or three
``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and calls ``F.linear`` on it, and its
``out_proj`` child too, inside ``F.multi_head_attention_forward``: none of them is a module call a
ResQ layer could replace. As Brevitas's ``QuantMultiheadAttention`` does, the packed projection is
split into three linear layers; here each of ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
is a :class:`~resq_brevitas.nn.ResQLinear` with its own temporal state (its own keyframe
reference and residuals). The attention itself (``q k^T``, softmax, ``attn v``) has no weight and
runs in floating point; the module lists it in :attr:`ResQAttentionBase.float_operations`,
which :func:`resq_brevitas.convert` reports.

The forward is written with plain tensor ops (``matmul``, ``softmax``): it never takes PyTorch's
fused fast path (``aten::_native_multi_head_attention``), so it traces and exports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resq_brevitas.config import Precision
from resq_brevitas.nn.residual import PrecisionPolicy

__all__ = ["ResQAttentionBase"]


def _additive_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A boolean mask (``True``: not attended) as an additive ``-inf`` mask; float masks are
    added as they are (``nn.MultiheadAttention``'s convention)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class ResQAttentionBase(nn.Module):
    """``nn.MultiheadAttention`` whose four projections are ResQ linear layers of class
    :attr:`projection_class` (:class:`~resq_brevitas.nn.ResQMultiheadAttention` uses
    ``ResQLinear``; the class is an attribute so that this module need not import the layers).

    Same constructor arguments and ``forward`` as ``nn.MultiheadAttention`` (``batch_first``
    both ways, unbatched inputs, ``key_padding_mask``, ``attn_mask``, ``need_weights``,
    ``average_attn_weights``), plus the ResQ precisions. ``add_bias_kv`` and ``add_zero_attn``
    are not supported.

    Args:
        embed_dim: Model dimension ``E``.
        num_heads: Heads (``E`` must be a multiple).
        dropout: Dropout on the attention weights (training only).
        bias: Projection biases.
        kdim: Key features (default ``E``).
        vdim: Value features (default ``E``).
        batch_first: Inputs are ``[B, L, E]`` (else ``[L, B, E]``).
        keyframe: Keyframe precision of the projections.
        residual: Residual precision of the projections (``None``: frame quantization).
        weight_granularity: ``"tensor"`` or ``"channel"``.
        policy: Precision policy of a pool residual.
        residual_weights: ``"separate"`` or ``"truncated"`` residual weights of the projections.
        family: A family scheme (VideoIQ) the projections also build paths for.
    """

    #: The ResQ ``Linear`` class of the projections.
    projection_class: type[nn.Module]
    #: The weight-free operations that stay in floating point (reported by ``convert``).
    float_operations = ("attention matmuls (q k^T, softmax, attn v) in floating point",)

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 *, keyframe: Precision | str = "W8A8", residual: Precision | str | None = "W4A4",
                 weight_granularity: str = "tensor",
                 policy: PrecisionPolicy | None = None, residual_weights: str = "separate",
                 family: Any = None) -> None:
        super().__init__()
        linear = self.projection_class
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and "
                             f"{num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        resq: dict[str, Any] = {"keyframe": keyframe, "residual": residual,
                                "weight_granularity": weight_granularity, "policy": policy,
                                "residual_weights": residual_weights, "family": family}
        self.q_proj = linear(embed_dim, embed_dim, bias=bias, **resq)
        self.k_proj = linear(self.kdim, embed_dim, bias=bias, **resq)
        self.v_proj = linear(self.vdim, embed_dim, bias=bias, **resq)
        self.out_proj = linear(embed_dim, embed_dim, bias=bias, **resq)

    @classmethod
    def from_float(cls, module: nn.Module, name: str | None = None, *,
                   keyframe: Precision | str = "W8A8", residual: Precision | str | None = "W4A4",
                   weight_granularity: str = "tensor",
                   policy: PrecisionPolicy | None = None, residual_weights: str = "separate",
                   family: Any = None) -> ResQAttentionBase:
        """The ResQ attention of an ``nn.MultiheadAttention``, its weights copied (the packed
        ``in_proj_weight`` split in three, as ``F.multi_head_attention_forward`` does).

        Raises:
            ValueError: ``add_bias_kv`` or ``add_zero_attn`` (not supported).
        """
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"attention {name!r}: add_bias_kv and add_zero_attn are not "
                             "supported by ResQMultiheadAttention")
        e = module.embed_dim
        new = cls(e, module.num_heads, module.dropout, module.in_proj_bias is not None,
                  module.kdim, module.vdim, module.batch_first, keyframe=keyframe,
                  residual=residual, weight_granularity=weight_granularity, policy=policy,
                  residual_weights=residual_weights, family=family)
        ref = module.out_proj.weight
        new.to(device=ref.device, dtype=ref.dtype)
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.split(e)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (module.in_proj_bias.split(e) if module.in_proj_bias is not None
                  else (None, None, None))
        projections = (new.q_proj, new.k_proj, new.v_proj)
        with torch.no_grad():
            for layer, weight, bias in zip(projections, weights, biases):
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.train(module.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; ``is_causal`` is only a hint that ``attn_mask``
        is causal (the mask is applied as given)."""
        if is_causal and attn_mask is None:
            raise ValueError("is_causal needs attn_mask (a causal mask), got attn_mask=None")
        batched = query.dim() == 3
        if not batched:  # [L, E]: one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # the projections see one row per stream: batch first
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, tgt_len, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, src_len, heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, src_len, heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
        mask = _additive_mask(attn_mask, scores.dtype, "attn_mask")
        if mask is not None:  # [L, S] or [B * heads, L, S]
            scores = scores + (mask if mask.dim() == 2 else mask.view(batch, heads, tgt_len,
                                                                      src_len))
        padding = _additive_mask(key_padding_mask, scores.dtype, "key_padding_mask")
        if padding is not None:  # [B, S]
            scores = scores + padding.view(batch, 1, 1, src_len)
        weights = torch.softmax(scores, dim=-1)
        if self.dropout > 0.0 and self.training:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if not batched else weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")
