"""Decode attention over the paged KV cache, writing the new token's K/V in place.

In:  qkv [B, 3, h, D] (one new token per row, FT's q|k|v layout), caches [NB, h, bs, D],
     block_tables [B, nb], context_lens [B] (tokens already cached), slots [B] (where the
     new K/V go; -1 for padding rows). Out: ctx [B, h, D]. One program per (row, head): online softmax over
     the cached tokens, the new token taken from registers, then the new K/V stored.

Few rows (B x heads up to 256 programs: batches 1-16 at 16 heads) split each row's context over
S programs (flash-decoding): each writes its block range's (max, sum, weighted V)
partial, and a second kernel, one program per (row, head), merges the S partials with the new
token, writes the output and stores the new K/V. A one-program-per-row pass is a chain of
dependent loads over the whole context in one SM (~10 us at batch 1 on an H200 whatever the
context up to 128); the split shortens each chain S-fold. A step whose contexts are all short
(`max_ctx`: one tile of ONE_PASS_TILES, loaded before the PDL wait) runs in one pass up to
ONE_PASS_MAX_PROGRAMS programs: one kernel instead of two.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import size_switch
from .pdl import launch_kwargs, pdl_start


@triton.jit
def _qkv_vec(ptrs, stride_qs, PARTS: tl.constexpr, DTYPE: tl.constexpr):
    """A vector of qkv: loaded, or (PARTS > 0) the sum of the QKV GEMV's PARTS fp32 split-K
    partials rounded to DTYPE (the cache's), as a stored qkv would be."""
    x = tl.load(ptrs)
    if PARTS > 0:              # (one return: Triton types every return of a function alike)
        for p in tl.static_range(1, PARTS):
            x += tl.load(ptrs + p * stride_qs)
        x = x.to(DTYPE)
    return x


@triton.jit
def _new_token(QKV, b, h, scale, stride_qb, stride_q3, stride_qs, D: tl.constexpr, PARTS: tl.constexpr,
               DTYPE: tl.constexpr):
    """Row b, head h of qkv: q (fp32, scaled), and the new token's k and v."""
    base = QKV + b * stride_qb + h * D + tl.arange(0, D)
    return (_qkv_vec(base, stride_qs, PARTS, DTYPE).to(tl.float32) * scale,
            _qkv_vec(base + stride_q3, stride_qs, PARTS, DTYPE), _qkv_vec(base + 2 * stride_q3, stride_qs, PARTS, DTYPE))


@triton.jit
def _load_tile(KC, VC, TABLES, b, h, start, hi, stride_cb, stride_cp, stride_ch, stride_tb,
               BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cached tokens [start, start + BLOCK_N) of row b, head h (those < hi): (mask, k, v), fp32."""
    d = tl.arange(0, D)
    pos = start + tl.arange(0, BLOCK_N)
    pm = pos < hi
    blk = tl.load(TABLES + b * stride_tb + pos // BS, mask=pm, other=0).to(tl.int64)
    off = blk * stride_cb + (pos % BS) * stride_cp + h * stride_ch
    k = tl.load(KC + off[:, None] + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
    v = tl.load(VC + off[:, None] + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
    return pm, k, v


@triton.jit
def _first_tile(KC, VC, TABLES, b, h, start, hi, stride_cb, stride_cp, stride_ch, stride_tb, BS: tl.constexpr,
                D: tl.constexpr, BLOCK_N: tl.constexpr, PRELOAD: tl.constexpr, USE_PDL: tl.constexpr):
    """`_load_tile` of the first tile and the PDL wait, in that order with PRELOAD (the tile's
    loads then overlap the kernel before: earlier steps wrote those tokens, and the tables and
    lengths are the step's inputs), else wait first."""
    if PRELOAD:
        pm, k, v = _load_tile(KC, VC, TABLES, b, h, start, hi, stride_cb, stride_cp, stride_ch, stride_tb, BS, D,
                              BLOCK_N)
        pdl_start(USE_PDL)
    else:
        pdl_start(USE_PDL)
        pm, k, v = _load_tile(KC, VC, TABLES, b, h, start, hi, stride_cb, stride_cp, stride_ch, stride_tb, BS, D,
                              BLOCK_N)
    return pm, k, v


@triton.jit
def _consume(q, pm, k, v, m_i, l_i, acc):
    """The online-softmax update of (max m_i, sum l_i, weighted V acc) by one tile."""
    s = tl.where(pm, tl.sum(q[None, :] * k, axis=1), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)


@triton.jit
def _attend(q, KC, VC, TABLES, b, h, lo, hi, m_i, l_i, acc, stride_cb, stride_cp, stride_ch, stride_tb,
            BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of q over the cached tokens [lo, hi) of row b, head h, continuing the running
    (max m_i, sum l_i, weighted V acc) -> the updated triple."""
    for start in range(lo, hi, BLOCK_N):
        pm, k, v = _load_tile(KC, VC, TABLES, b, h, start, hi, stride_cb, stride_cp, stride_ch, stride_tb,
                              BS, D, BLOCK_N)
        m_i, l_i, acc = _consume(q, pm, k, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _finish(OUT, KC, VC, SLOTS, b, h, acc, l_i, k_new, v_new, stride_cb, stride_cp, stride_ch, stride_ob,
            BS: tl.constexpr, D: tl.constexpr):
    """OUT[b, h] = acc / l_i; the new token's K/V stored at row b's slot (none for a padding row,
    slot < 0)."""
    d = tl.arange(0, D)
    tl.store(OUT + b * stride_ob + h * D + d, (acc / l_i).to(OUT.dtype.element_ty))
    slot = tl.load(SLOTS + b).to(tl.int64)
    dst = (tl.maximum(slot, 0) // BS) * stride_cb + (tl.maximum(slot, 0) % BS) * stride_cp + h * stride_ch + d
    smask = (d * 0 + slot) >= 0
    tl.store(KC + dst, k_new.to(KC.dtype.element_ty), mask=smask)
    tl.store(VC + dst, v_new.to(VC.dtype.element_ty), mask=smask)


@triton.jit
def _decode_attention_kernel(QKV, KC, VC, OUT, TABLES, CTX, SLOTS, scale,
                             stride_qb, stride_q3, stride_qs, stride_cb, stride_cp, stride_ch, stride_tb, stride_ob,
                             BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRELOAD: tl.constexpr = True,
                             QKV_PARTS: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n_ctx = tl.load(CTX + b)
    pm, k, v = _first_tile(KC, VC, TABLES, b, h, 0, n_ctx, stride_cb, stride_cp, stride_ch, stride_tb, BS, D,
                           BLOCK_N, PRELOAD, USE_PDL)
    q, k_new, v_new = _new_token(QKV, b, h, scale, stride_qb, stride_q3, stride_qs, D, QKV_PARTS,
                                 KC.dtype.element_ty)
    m_i = tl.sum(q * k_new.to(tl.float32), axis=0)       # the new token starts the running max
    m_i, l_i, acc = _consume(q, pm, k, v, m_i, m_i * 0.0 + 1.0, v_new.to(tl.float32))
    m_i, l_i, acc = _attend(q, KC, VC, TABLES, b, h, BLOCK_N, n_ctx, m_i, l_i, acc,
                            stride_cb, stride_cp, stride_ch, stride_tb, BS, D, BLOCK_N)
    _finish(OUT, KC, VC, SLOTS, b, h, acc, l_i, k_new, v_new, stride_cb, stride_cp, stride_ch, stride_ob, BS, D)


@triton.jit
def _decode_attention_split_kernel(QKV, KC, VC, PART, TABLES, CTX, SLOTS, scale,
                                   stride_qb, stride_q3, stride_qs, stride_cb, stride_cp, stride_ch, stride_tb,
                                   BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                                   PRELOAD: tl.constexpr = True, QKV_PARTS: tl.constexpr = 0,
                                   USE_PDL: tl.constexpr = False):
    """Program (b, h, s): the cached tokens of split s (whole KV blocks, ceil(blocks / SPLITS) of
    them) -> PART[b, h, s] = (unnormalised weighted V [D], running max, sum of exponentials)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    d = tl.arange(0, D)
    n_ctx = tl.load(CTX + b)
    chunk = tl.cdiv(tl.cdiv(n_ctx, BS), SPLITS) * BS
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n_ctx)
    pm, k, v = _first_tile(KC, VC, TABLES, b, h, lo, hi, stride_cb, stride_cp, stride_ch, stride_tb, BS, D,
                           BLOCK_N, PRELOAD, USE_PDL)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)    # scalars: 0 and -inf (an empty split)
    m_i = l_i - float("inf")
    acc = tl.zeros([D], dtype=tl.float32)
    q = _qkv_vec(QKV + b * stride_qb + h * D + d, stride_qs, QKV_PARTS, KC.dtype.element_ty).to(tl.float32) * scale
    if lo < hi:
        m_i, l_i, acc = _consume(q, pm, k, v, m_i, l_i, acc)
    m_i, l_i, acc = _attend(q, KC, VC, TABLES, b, h, lo + BLOCK_N, hi, m_i, l_i, acc,
                            stride_cb, stride_cp, stride_ch, stride_tb, BS, D, BLOCK_N)
    part = PART + ((b * tl.num_programs(1) + h) * SPLITS + sp) * (D + 2)
    tl.store(part + d, acc)
    tl.store(part + D, m_i)
    tl.store(part + D + 1, l_i)


@triton.jit
def _decode_attention_merge_kernel(QKV, KC, VC, OUT, PART, SLOTS, scale,
                                   stride_qb, stride_q3, stride_qs, stride_cb, stride_cp, stride_ch, stride_ob,
                                   BS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                                   QKV_PARTS: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    """Program (b, h): the new token, then the SPLITS partials in order (an empty split has max
    -inf and weighs nothing) -> OUT[b, h]; the new K/V stored at the row's slot."""
    pdl_start(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    q, k_new, v_new = _new_token(QKV, b, h, scale, stride_qb, stride_q3, stride_qs, D, QKV_PARTS,
                                 KC.dtype.element_ty)
    m = tl.sum(q * k_new.to(tl.float32), axis=0)
    l_i = m * 0.0 + 1.0
    acc = v_new.to(tl.float32)
    d = tl.arange(0, D)
    part = PART + (b * tl.num_programs(1) + h) * SPLITS * (D + 2)
    for sp in tl.static_range(SPLITS):
        m_s = tl.load(part + sp * (D + 2) + D)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_s - m_new)
        l_i = l_i * alpha + tl.load(part + sp * (D + 2) + D + 1) * beta
        acc = acc * alpha + tl.load(part + sp * (D + 2) + d) * beta
        m = m_new
    _finish(OUT, KC, VC, SLOTS, b, h, acc, l_i, k_new, v_new, stride_cb, stride_cp, stride_ch, stride_ob, BS, D)


#: grids of at most this many programs load their first K/V tile before the PDL wait. Whole decode
#: steps on an H200 against loading after it (scripts/ab_decode.py, sixth session): -1.8 % at
#: batch 1 (128 programs: they fit beside the QKV kernel), +2.0 % at 8, +0.9 % at 64, +0.4 % at 256
PRELOAD_MAX_PROGRAMS = 128


def preload(programs: int) -> bool:
    """Whether a grid of `programs` loads its first tile of cached K/V before the programmatic-
    dependent-launch wait, so those loads overlap the kernel before it (nothing in the step writes
    those tokens; the new token's K/V is stored after the wait). FTMOE_ATTN_PRELOAD=1 / 0 forces it."""
    return size_switch("FTMOE_ATTN_PRELOAD", programs, PRELOAD_MAX_PROGRAMS)


def launch_config(programs: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for B x heads programs. Measured on an H200 (bf16, 16 heads of 64;
    `scripts/attn_sweep.py`): few programs want wide tiles and 8 warps (B = 1, context 128: 10.0 us
    against 12.2 us for (64, 4); B = 8, context 2048: 62.9 us, against 74.1 for (128, 8)); many
    want narrow one-warp programs, so more of them are resident per SM (context 128: B = 256
    48.8 us against 60.3; B = 1024 145 against 192). Between them (257..2048 programs: batches
    17-128 at 16 heads) 64-token one-warp tiles: the H100 sweep's fastest at batch 64 (22.7 us
    against 25.4 for (128, 1) at context 128, 108.5 against 112.3 at 1024), and whole decode
    steps on an H100 -1.8 % at batch 32, -3.5 % at 64 and at 128 against (128, 1)
    (scripts/ab_decode.py, 2026-12-07, benchmarks/results/2026-12-07-h100-round24.txt). Past 512
    programs (batches 33-128) 32-token tiles: x0.993 at batch 64, x0.983 at 128 against (64, 1),
    x1.010 at 32 (benchmarks/results/2026-12-07-h100-round33.txt). Past 2048 programs (batches
    above 128) 16-token tiles: x0.991 at 256 (twice), x0.989 at 512, x0.995 at 1024 against
    (32, 1); x1.002 at 128, so 2048 programs keep (32, 1); (16, 2) x1.015-1.025
    (benchmarks/results/2026-12-07-h100-round38.txt). A short-context step's one pass takes its
    tile from `one_pass_tile` instead.
    FTMOE_ATTN_LAUNCH=FROM:BLOCK_NxWARPS (read at each call, i.e. at graph capture) uses that
    config from FROM programs on, for `scripts/ab_decode.py`'s A/B of the rule."""
    forced = os.environ.get("FTMOE_ATTN_LAUNCH")
    if forced:
        try:
            start, cfg = forced.split(":")
            bn, nw = (int(x) for x in cfg.split("x"))
            start = int(start)
        except ValueError:
            raise ValueError(f"FTMOE_ATTN_LAUNCH: expected FROM:BLOCK_NxWARPS (e.g. 257:64x1), found {forced!r}") from None
        if programs >= start:
            return bn, nw
    if programs <= 256:
        return 256, 8
    if programs <= 512:
        return 64, 1
    if programs <= 2048:
        return 32, 1
    return 16, 1


#: up to this many (row, head) programs the context is split over SPLITS programs each
#: (flash-decoding); FTMOE_ATTN_SPLIT=0 turns the split off, =N forces N splits. Whole decode steps
#: on an H200 against one pass per row (scripts/ab_decode.py, 2026-11-28): 8 splits -5.6 % at
#: batch 1, -4.1 % at 4, -4.6 % at 8 and 16 (16 heads); at 32 and 64 any split was slower
#: (benchmarks/results/2026-11-28-h200-attn-split.txt)
SPLIT_MAX_PROGRAMS = 256
SPLITS = 8
#: a short-context step of at most ONE_PASS_MAX_PROGRAMS (row, head) programs (batches 1-8 at 16
#: heads), whose rows all have at most C cached tokens (which the caller knows: the decode graphs
#: read the lengths on the host), runs in one pass, one kernel, on one [BLOCK_N, D] tile of 8 warps
#: loaded before the PDL wait: (C, BLOCK_N) in ONE_PASS_TILES. Whole decode steps on an H100 against
#: the 8-way split (scripts/ab_decode.py, 2026-12-07, one process; benchmarks/results/
#: 2026-12-07-h100-round41.txt to -round43.txt): at context 128, (128, 8) x0.984 / 0.988 / 0.993 at
#: batch 1, 0.979 / 0.978 / 0.980 at 2, 0.988 / 0.985 / 0.982 at 4, 0.999 / 0.995 / 0.994 at 8 (three
#: runs), x1.018 at 16; (256, 8) there x1.04-1.06. At 144, (256, 8) x0.993 / 0.980 / 0.964 / 0.985
#: at 1 / 2 / 4 / 8 ((128, 8): x1.016-1.047); at 256, x1.013 / 0.985 / 0.973 / 0.987
ONE_PASS_MAX_PROGRAMS = 128
ONE_PASS_TILES = ((128, 128), (256, 256))


def num_splits(programs: int) -> int:
    """Context splits per (row, head) for B x heads = `programs` (a step of any context)."""
    forced = os.environ.get("FTMOE_ATTN_SPLIT")
    if forced is not None:
        if not forced.isdigit():
            raise ValueError(f"FTMOE_ATTN_SPLIT: expected a number of splits (0 = off), found {forced!r}")
        return max(1, int(forced))
    return SPLITS if programs <= SPLIT_MAX_PROGRAMS else 1


def one_pass_tile(programs: int, max_ctx: int | None) -> int | None:
    """BLOCK_N of the one pass of a step of `programs` (row, head) programs whose rows have at
    most max_ctx cached tokens (`ONE_PASS_TILES`), or None where the step takes `num_splits`'
    rule (max_ctx None: not known; too many programs or tokens; FTMOE_ATTN_SPLIT set)."""
    if max_ctx is None or programs > ONE_PASS_MAX_PROGRAMS or os.environ.get("FTMOE_ATTN_SPLIT") is not None:
        return None
    return next((bn for limit, bn in ONE_PASS_TILES if max_ctx <= limit), None)


def one_pass_differs(programs: int) -> bool:
    """Whether short-context steps of `programs` (row, head) programs launch other attention
    kernels than steps of any context (the decode graphs then keep short-context graphs too)."""
    return one_pass_tile(programs, 0) is not None and num_splits(programs) > 1


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, slots: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int | None = None, splits: int | None = None,
                     max_ctx: int | None = None) -> torch.Tensor:
    """qkv [B, 3, h, D], or the QKV GEMV's fp32 split-K partials [P, B, 3, h, D] (summed and
    rounded to the cache's dtype as they are loaded; ctx then in the cache's dtype).
    splits: context splits per (row, head) (default `num_splits`; 1 = one pass per row).
    max_ctx: no row has more cached tokens (the caller knows; None: any), for the one pass of
    short contexts (`one_pass_tile`; a longer row is still served correctly, only slower)."""
    B, h, D, parts = _qkv_shape(qkv, k_cache)
    o = out if out is not None else torch.empty(B, h, D, dtype=k_cache.dtype if parts else qkv.dtype,
                                                device=qkv.device)
    tile = one_pass_tile(B * h, max_ctx) if splits is None and block_n is None else None
    if tile is not None:
        splits, block_n, num_warps = 1, tile, num_warps or 8
    # more splits than the table has blocks per row would always be empty
    splits = splits or min(num_splits(B * h), block_tables.shape[1])
    strides = _strides(qkv, k_cache)
    bs = k_cache.shape[2]
    if splits > 1:
        part = _split_partials(qkv, k_cache, v_cache, block_tables, context_lens, slots, scale, splits, block_n,
                               num_warps or 1)
        _decode_attention_merge_kernel[(B, h)](
            qkv, k_cache, v_cache, o, part, slots, scale, *strides, o.stride(0), BS=bs, D=D, SPLITS=splits,
            QKV_PARTS=parts, num_warps=1, **launch_kwargs(qkv))
        return o
    bn, nw = launch_config(B * h)
    block_n, num_warps = block_n or bn, num_warps or nw
    _decode_attention_kernel[(B, h)](
        qkv, k_cache, v_cache, o, block_tables, context_lens, slots, scale, *strides,
        block_tables.stride(0), o.stride(0), BS=bs, D=D, BLOCK_N=block_n, PRELOAD=preload(B * h), QKV_PARTS=parts,
        num_warps=num_warps, **launch_kwargs(qkv))
    return o


def _qkv_shape(qkv: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, h, D, partials) of qkv [B, 3, h, D] (partials 0) or of fp32 partials [P, B, 3, h, D] (P)."""
    parts = qkv.shape[0] if qkv.dim() == 5 else 0
    assert qkv.dim() in (4, 5), f"qkv {tuple(qkv.shape)}: expected [B, 3, h, D] or partials [P, B, 3, h, D]"
    B, three, h, D = qkv.shape[-4:]
    assert three == 3 and qkv.stride(-1) == 1 and qkv.stride(-2) == D and k_cache.stride(3) == 1, \
        f"qkv {tuple(qkv.shape)} with strides {qkv.stride()}: expected [(P,) B, 3, h, D], contiguous heads"
    assert not parts or qkv.dtype == torch.float32, "qkv partials are fp32"
    return B, h, D, parts


def _strides(qkv: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, ...]:
    """qkv's row, q|k|v and partial strides, then the cache's block, position and head strides."""
    return (qkv.stride(-4), qkv.stride(-3), qkv.stride(0) if qkv.dim() == 5 else 0,
            k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))


def _split_partials(qkv, k_cache, v_cache, block_tables, context_lens, slots, scale: float, splits: int,
                    block_n: int | None, num_warps: int) -> torch.Tensor:
    """The split kernel's partials [B, h, splits, D + 2] (fp32), for the merge kernel (which also
    takes the new token and stores its K/V)."""
    B, h, D, parts = _qkv_shape(qkv, k_cache)
    bs = k_cache.shape[2]
    part = torch.empty(B, h, splits, D + 2, dtype=torch.float32, device=qkv.device)
    _decode_attention_split_kernel[(B, h, splits)](
        qkv, k_cache, v_cache, part, block_tables, context_lens, slots, scale, *_strides(qkv, k_cache),
        block_tables.stride(0), BS=bs, D=D, BLOCK_N=block_n or bs, SPLITS=splits,
        PRELOAD=preload(B * h * splits), QKV_PARTS=parts, num_warps=num_warps, **launch_kwargs(qkv))
    return part


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
