"""Decode attention over the paged KV cache, writing the new token's K/V in place.

In:  qkv [B, 3, h, D] (one new token per row, FT's q|k|v layout), caches [NB, h, bs, D],
     block_tables [B, nb], context_lens [B] (tokens already cached), slots [B] (where the
     new K/V go; -1 for padding rows). Out: ctx [B, h, D]. One program per (row, head): online softmax over
     the cached tokens, the new token taken from registers, then the new K/V stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_start


@triton.jit
def _decode_attention_kernel(QKV, KC, VC, OUT, TABLES, CTX, SLOTS, scale,
                             stride_qb, stride_q3, stride_cb, stride_cp, stride_ch, stride_tb, stride_ob,
                             BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    base = QKV + b * stride_qb + h * D + d
    q = tl.load(base).to(tl.float32) * scale
    k_new = tl.load(base + stride_q3)
    v_new = tl.load(base + 2 * stride_q3)
    n_ctx = tl.load(CTX + b)
    m_i = tl.sum(q * k_new.to(tl.float32), axis=0)       # the new token starts the running max
    l_i = m_i * 0.0 + 1.0
    acc = v_new.to(tl.float32)
    for start in range(0, n_ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pm = pos < n_ctx
        blk = tl.load(TABLES + b * stride_tb + pos // BS, mask=pm, other=0).to(tl.int64)
        off = blk * stride_cb + (pos % BS) * stride_cp + h * stride_ch
        k = tl.load(KC + off[:, None] + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        v = tl.load(VC + off[:, None] + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        s = tl.where(pm, tl.sum(q[None, :] * k, axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(OUT + b * stride_ob + h * D + d, (acc / l_i).to(OUT.dtype.element_ty))
    slot = tl.load(SLOTS + b).to(tl.int64)              # < 0: a padding row, nothing to store
    dst = (tl.maximum(slot, 0) // BS) * stride_cb + (tl.maximum(slot, 0) % BS) * stride_cp + h * stride_ch + d
    smask = (d * 0 + slot) >= 0
    tl.store(KC + dst, k_new.to(KC.dtype.element_ty), mask=smask)
    tl.store(VC + dst, v_new.to(VC.dtype.element_ty), mask=smask)


def launch_config(programs: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for B x heads programs. Measured on an H200 (bf16, 16 heads of 64;
    `scripts/attn_sweep.py`): few programs want wide tiles and 8 warps (B = 1, context 128: 10.0 us
    against 12.2 us for (64, 4); B = 8, context 2048: 62.9 us, against 74.1 for (128, 8)); many
    want narrow one-warp programs, so more of them are resident per SM (context 128: B = 256
    48.8 us against 60.3; B = 1024 145 against 192)."""
    if programs <= 256:
        return 256, 8
    if programs <= 2048:
        return 128, 1
    return 32, 1


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, slots: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    B, three, h, D = qkv.shape
    bn, nw = launch_config(B * h)
    block_n, num_warps = block_n or bn, num_warps or nw
    assert three == 3 and qkv.stride(3) == 1 and k_cache.stride(3) == 1
    o = out if out is not None else torch.empty(B, h, D, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(B, h)](
        qkv, k_cache, v_cache, o, block_tables, context_lens, slots, scale,
        qkv.stride(0), qkv.stride(1), k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        block_tables.stride(0), o.stride(0), BS=k_cache.shape[2], D=D, BLOCK_N=block_n, num_warps=num_warps,
        **launch_kwargs(qkv))
    return o


@triton.jit
def _write_kv_kernel(QKV, KC, VC, SLOTS, stride_qt, stride_q3, stride_cb, stride_cp, stride_ch, heads,
                     BS: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + tok).to(tl.int64)
    if slot >= 0:                                        # -1: padding, nothing to store
        hs = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        m = (hs < heads)[:, None]
        src = QKV + tok * stride_qt + hs[:, None] * D + d[None, :]
        dst = (slot // BS) * stride_cb + (slot % BS) * stride_cp + hs[:, None] * stride_ch + d[None, :]
        tl.store(KC + dst, tl.load(src + stride_q3, mask=m).to(KC.dtype.element_ty), mask=m)
        tl.store(VC + dst, tl.load(src + 2 * stride_q3, mask=m).to(VC.dtype.element_ty), mask=m)


def write_kv(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the k and v of every token of qkv [N, 3, h, D] at slots [N] (-1 = skip) in caches
    [NB, h, bs, D]. One launch, no host synchronisation (prefill's cache write)."""
    N, three, h, D = qkv.shape
    assert three == 3 and qkv.stride(3) == 1 and qkv.stride(2) == D
    if N:
        _write_kv_kernel[(N,)](qkv, k_cache, v_cache, slots, qkv.stride(0), qkv.stride(1), k_cache.stride(0),
                               k_cache.stride(2), k_cache.stride(1), h, BS=k_cache.shape[2], D=D,
                               BLOCK_H=triton.next_power_of_2(h), num_warps=4, **launch_kwargs(qkv))
