"""Decode attention for many rows: the one-pass kernel against a head-grouped variant, on a GPU.

The one-pass kernel (one program per (row, head), BLOCK_N tokens per step) reads the KV cache
at 43-67 % of the copy bandwidth at batch 64-256, context 128 (`scripts/attn_sweep.py`), against
91 % at batch 1024: it is bound by each program's chain of dependent loads, not by bytes. The
variant here takes G heads of a row per program and one whole KV block per step: the G heads'
tokens of a block are one contiguous G x 2 KB run ([NB, heads, bs, D] layout), the block number is
loaded once per step for all of them, and the loop is software-pipelined over STAGES.
Checks every variant's output and KV writes against `decode_attention`, then times both
(triton's do_bench: L2 flushed between calls). Usage: python3 scripts/attn_probe.py
"""
from __future__ import annotations

import itertools
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.kernels.attention import decode_attention, launch_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_sweep import _inputs  # noqa: E402


def _us(fn) -> float:
    """us per call, L2 flushed between calls (triton's do_bench), as attn_sweep times the one pass."""
    return triton.testing.do_bench(fn, warmup=20, rep=100) * 1e3


@triton.jit
def _grouped_kernel(QKV, KC, VC, OUT, TABLES, CTX, SLOTS, scale, stride_qb, stride_q3, stride_cb, stride_cp,
                    stride_ch, stride_tb, stride_ob, BS: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                    STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * G
    g = tl.arange(0, G)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    qoff = b * stride_qb + (h0 + g)[:, None] * D + d[None, :]                     # [G, D]
    q = tl.load(QKV + qoff).to(tl.float32) * scale
    k_new = tl.load(QKV + qoff + stride_q3)
    v_new = tl.load(QKV + qoff + 2 * stride_q3)
    m_i = tl.sum(q * k_new.to(tl.float32), axis=1)                                # [G]
    l_i = m_i * 0.0 + 1.0
    acc = v_new.to(tl.float32)                                                    # [G, D]
    n_ctx = tl.load(CTX + b)
    inner = (h0 + g)[:, None, None] * stride_ch + t[None, :, None] * stride_cp + d[None, None, :]   # [G, BS, D]
    for j in tl.range(0, tl.cdiv(n_ctx, BS), num_stages=STAGES):
        blk = tl.load(TABLES + b * stride_tb + j).to(tl.int64)
        pm = (j * BS + t) < n_ctx
        k = tl.load(KC + blk * stride_cb + inner, mask=pm[None, :, None], other=0.0).to(tl.float32)
        v = tl.load(VC + blk * stride_cb + inner, mask=pm[None, :, None], other=0.0).to(tl.float32)
        s = tl.where(pm[None, :], tl.sum(q[:, None, :] * k, axis=2), float("-inf"))   # [G, BS]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        m_i = m_new
    tl.store(OUT + b * stride_ob + (h0 + g)[:, None] * D + d[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty))
    slot = tl.load(SLOTS + b).to(tl.int64)
    dst = (tl.maximum(slot, 0) // BS) * stride_cb + (tl.maximum(slot, 0) % BS) * stride_cp + \
        (h0 + g)[:, None] * stride_ch + d[None, :]
    sm = (dst * 0 + slot) >= 0
    tl.store(KC + dst, k_new, mask=sm)
    tl.store(VC + dst, v_new, mask=sm)


def grouped(qkv, kc, vc, tables, ctx, slots, scale, out, G, stages, warps):
    B, _, h, D = qkv.shape
    _grouped_kernel[(B, h // G)](qkv, kc, vc, out, tables, ctx, slots, scale, qkv.stride(0), qkv.stride(1),
                                 kc.stride(0), kc.stride(2), kc.stride(1), tables.stride(0), out.stride(0),
                                 BS=kc.shape[2], D=D, G=G, STAGES=stages, num_warps=warps)


def main() -> None:
    torch.manual_seed(0)
    h, D = 16, 64
    scale = 1 / math.sqrt(D)
    for B, ctx in [(32, 128), (64, 128), (128, 128), (256, 128), (256, 512), (1024, 128)]:
        qkv, kc, vc, tables, ctx_t, slots, out, kv_bytes = _inputs(B, ctx)
        want = decode_attention(qkv, kc.clone(), vc.clone(), tables, ctx_t, slots, scale, splits=1).float()
        kw, vw = kc.clone(), vc.clone()
        decode_attention(qkv, kw, vw, tables, ctx_t, slots, scale, splits=1)
        res = []
        base = _us(lambda: decode_attention(qkv, kc, vc, tables, ctx_t, slots, scale, out=out, splits=1))
        for G, stages, warps in itertools.product((2, 4, 8, 16), (1, 2, 3), (1, 2, 4, 8)):
            k2, v2 = kc.clone(), vc.clone()
            o2 = torch.full_like(out, float("nan"))
            grouped(qkv, k2, v2, tables, ctx_t, slots, scale, o2, G, stages, warps)
            err = float((o2.float() - want).abs().max())
            if not (err < 2e-2 and torch.equal(k2, kw) and torch.equal(v2, vw)):
                print(f"  G={G} stages={stages} warps={warps}: WRONG (max err {err:.3g})", flush=True)
                continue
            us = _us(lambda: grouped(qkv, kc, vc, tables, ctx_t, slots, scale, out, G, stages, warps))
            res.append((us, G, stages, warps))
        res.sort()
        print(f"B={B} ctx={ctx}: one pass {launch_config(B * h)} {base:.1f} us ({kv_bytes / base / 1e3:.0f} GB/s); "
              "grouped fastest " + ", ".join(f"G={G} st={st} w={w} {t:.1f} us ({kv_bytes / t / 1e3:.0f} GB/s)"
                                             for t, G, st, w in res[:4]), flush=True)


if __name__ == "__main__":
    main()
