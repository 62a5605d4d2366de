"""Pure-torch twins of every Triton kernel: the definition of what each kernel computes.

Legend: N tokens (rows), H hidden, E experts, F ffn, k top-k, B batch, D head dim.
"""
from __future__ import annotations

import torch

from ..layers.basic import gelu_tanh as gelu_tanh_ref  # the model's GELU is the kernels' definition
from ..layers.mlp import route


def add_layernorm_ref(x, weight, bias, eps, add=None, add_bias=None):
    """(res, y): res = x + add + add_bias (fp32 sum, stored in x.dtype); y = LN(res) in x.dtype."""
    r = x.float()
    if add is not None:
        r = r + add.float()
    if add_bias is not None:
        r = r + add_bias.float()
    y = torch.nn.functional.layer_norm(r, r.shape[-1:], weight.float(), bias.float(), eps)
    return r.to(x.dtype), y.to(x.dtype)


def gate_topk_ref(u, wg, k, slots=None):
    """u [N, H], wg [H, E] -> (probs [N, k] fp32, ids [N, k] int32): the model's routing (fp32
    softmax, ties to the lower id: `layers.mlp.route`) on the fp32 gate logits.
    Rows whose slot is negative (padding) get id -1 and prob 0."""
    probs, ids_t = route(u.float() @ wg.float(), k)
    if slots is not None:
        pad = (slots < 0)[:, None]
        probs, ids_t = probs.masked_fill(pad, 0.0), ids_t.masked_fill(pad, -1)
    return probs, ids_t.to(torch.int32)


def moe_align_ref(ids, num_experts, block_m):
    """ids [N, k] -> (sorted_slots [max_len] int32, block_expert [max_blocks] int32, num_post [1] int32).

    Slots s = n*k + j are grouped by expert (in slot order within an expert); each expert's
    group is padded to a multiple of block_m with the sentinel N*k. Blocks past num_post
    are unused (their expert id is clamped to E-1). Negative ids are left out."""
    flat = ids.reshape(-1).long()
    nk = flat.numel()
    max_len = nk + num_experts * (block_m - 1)
    max_blocks = -(-max_len // block_m)
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    out = torch.full((max_blocks * block_m,), nk, dtype=torch.int32, device=ids.device)
    for e in range(num_experts):
        slots = (flat == e).nonzero(as_tuple=True)[0]
        out[starts[e]:starts[e] + slots.numel()] = slots.to(torch.int32)
    block_starts = torch.arange(max_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp(max=num_experts - 1)
    return out, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


def fused_moe_ref(a, w, bias, ids, probs, topk, a_per_slot=False, gelu=False, mul_prob=False):
    """Per slot s=(n, j) with expert e=ids[n, j]: out[s] = act(a[row] @ w[e] + bias[e]) (* probs[n, j]).
    a [N, K] (row = n) or [N*k, K] (row = s when a_per_slot); w [E, K, N_out] -> out [N*k, N_out].
    Slots with a negative expert id come out as zeros (the kernel leaves them unwritten)."""
    flat = ids.reshape(-1).long()
    skip = flat < 0
    flat = flat.clamp(min=0)
    rows = torch.arange(flat.numel(), device=a.device) if a_per_slot else \
        torch.arange(flat.numel(), device=a.device) // topk
    y = torch.einsum("sk,skn->sn", a[rows].float(), w[flat].float())
    if bias is not None:
        y = y + bias[flat].float()
    if gelu:
        y = gelu_tanh_ref(y)
    if mul_prob:
        y = y * probs.reshape(-1, 1).float()
    return y.masked_fill(skip[:, None], 0.0).to(a.dtype)


def decode_attention_ref(qkv, k_cache, v_cache, block_tables, context_lens, slots, scale):
    """One new token per row. qkv [B, 3, h, D]; caches [NB, h, bs, D]; the new k/v are written
    at `slots` [B]; attends over the context_lens[b] cached tokens plus the new one.
    Returns ctx [B, h, D] (mutates the caches)."""
    B, _, h, D = qkv.shape
    bs = k_cache.shape[2]
    q, k_new, v_new = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out = torch.empty(B, h, D, dtype=qkv.dtype, device=qkv.device)
    for b in range(B):
        n = int(context_lens[b])
        pos = torch.arange(n, device=qkv.device)
        blk = block_tables[b, pos // bs].long()
        k = torch.cat([k_cache[blk, :, pos % bs].float(), k_new[b:b + 1].float()], 0)   # [n+1, h, D]
        v = torch.cat([v_cache[blk, :, pos % bs].float(), v_new[b:b + 1].float()], 0)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v).to(qkv.dtype)
    keep = slots >= 0
    s = slots[keep].long()
    k_cache[s // bs, :, s % bs] = k_new[keep].to(k_cache.dtype)
    v_cache[s // bs, :, s % bs] = v_new[keep].to(v_cache.dtype)
    return out


def gemv_ref(a, w, bias=None, gelu=False, gelu_a=False):
    """`gemv.gemv` in fp32, before its output rounding: a [M, K] (or fp32 partials [P, M, K],
    summed, through GELU with gelu_a, then rounded to w's dtype) @ w [K, N] + bias, GELU."""
    if a.dim() == 3:
        a = a.float().sum(0)
        a = (gelu_tanh_ref(a) if gelu_a else a).to(w.dtype)
    y = a.float() @ w.float()
    if bias is not None:
        y = y + bias.float()
    return gelu_tanh_ref(y) if gelu else y


def gemv_experts_ref(a, w, bias, ids, probs=None, a_div=1, gelu_a=False):
    """`gemv.gemv_experts` in fp32, summed over its partials: row s = a[s // a_div] @ w[ids[s]] +
    bias[ids[s]], times probs[s]; a may be fp32 partials [Q, S, K] (summed, GELU with gelu_a,
    rounded to w's dtype). Rows of slots without an expert (id -1) are NaN."""
    if a.dim() == 3:
        a = a.float().sum(0)
        a = (gelu_tanh_ref(a) if gelu_a else a).to(w.dtype)
    out = torch.full((ids.shape[0], w.shape[2]), float("nan"), dtype=torch.float32, device=a.device)
    for s, e in enumerate(ids.tolist()):
        if e < 0:
            continue
        y = a[s // a_div].float() @ w[e].float()
        if bias is not None:
            y = y + bias[e].float()
        out[s] = y * (float(probs[s]) if probs is not None else 1.0)
    return out
