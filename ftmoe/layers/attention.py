"""Causal multi-head self-attention with FT's fused QKV layout and the paged KV cache.

In:  x [B, T, H] (already layer-normed), optional `AttnMetadata` + `KVCache`.
Out: ctx @ Wo [B, T, H] *without* the output bias (added by the caller after the
     tensor-parallel reduce, as Megatron does).

QKV weight is FT's [H, 3, H/t]: columns grouped q | k | v, each head-major, so a
[B, T, 3H/t] projection views as [B, T, 3, heads, D].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kv_cache import AttnMetadata, KVCache
from .basic import Linear, _empty


class QKV(nn.Module):
    def __init__(self, hidden: int, local_hidden: int, dtype, device=None):
        super().__init__()
        self.weight = _empty(hidden, 3, local_hidden, dtype=dtype, device=device)  # [H, 3, H/t]
        self.bias = _empty(3, local_hidden, dtype=dtype, device=device)            # [3, H/t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = self.weight.shape[0]
        return x @ self.weight.reshape(H, -1) + self.bias.reshape(-1)             # [B, T, 3H/t]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, layer_idx: int, dtype, device=None, tp: int = 1):
        super().__init__()
        self.heads = heads // tp
        self.head_dim = hidden // heads
        self.layer_idx = layer_idx
        local = self.heads * self.head_dim
        self.query_key_value = QKV(hidden, local, dtype, device)
        self.dense = Linear(local, hidden, dtype, device)                          # [H/t, H]

    def forward(self, x: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)                                                    # [B, T, heads, D]
        if cache is not None:
            slots = meta.slot_mapping.reshape(-1)
            keep = slots >= 0
            cache.write(self.layer_idx, slots[keep], k.reshape(-1, self.heads, self.head_dim)[keep],
                        v.reshape(-1, self.heads, self.head_dim)[keep])
            k, v = cache.gather(self.layer_idx, meta.block_tables)                  # [B, S, heads, D]
        ctx = attention_ref(q, k.to(q.dtype), v.to(q.dtype), mask)                 # [B, T, heads, D]
        return self.dense(ctx.reshape(B, T, -1), add_bias=False)


def causal_mask(meta: AttnMetadata | None, T: int, S: int, device) -> torch.Tensor:
    """[B or 1, 1, T, S] bool: query t of row b sees key j iff j <= context_lens[b] + t."""
    j = torch.arange(S, device=device)
    t = torch.arange(T, device=device)
    if meta is None:
        return (j[None, :] <= t[:, None])[None, None]
    limit = meta.context_lens[:, None] + t[None, :]                                 # [B, T]
    return (j[None, None, :] <= limit[:, :, None])[:, None]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention in fp32. q [B, T, h, D], k/v [B, S, h, D], mask [B|1, 1, T, S] -> [B, T, h, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale          # [B, h, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)
