"""Decode-attention launch sweep: (BLOCK_N, num_warps) against batch and context, on a GPU.

Usage (repo root, GPU host): python3 scripts/attn_sweep.py [--split [--batches 1,4,16] [--ctx 128,2048]]
Prints, per (B, ctx), the time and KV read bandwidth of the current choice
(`kernels.attention.launch_config`) and of the four fastest candidates. The 0.35B model's
attention: 16 heads of 64, bf16, KV blocks of 16 tokens scattered over the cache.
--split: the small batches (1-16) with the context split over S programs and merged
(`attention.num_splits`), S x BLOCK_N x warps, timed as 100 calls in a CUDA graph with
programmatic dependent launch, as a decode step runs them.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.kernels import pdl  # noqa: E402
from ftmoe.kernels.attention import decode_attention, launch_config, num_splits  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch_probe import graph_us  # noqa: E402


def _inputs(B: int, ctx: int, h: int = 16, D: int = 64, bs: int = 16, dev: str = "cuda"):
    nb = -(-(ctx + 1) // bs)
    NB = B * nb + 1
    kc = torch.randn(NB, h, bs, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(NB - 1, device=dev)[:B * nb].view(B, nb).int()
    ctx_t = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    slots = (tables[:, ctx // bs] * bs + ctx % bs).int()
    qkv = torch.randn(B, 3, h, D, device=dev, dtype=torch.bfloat16)
    out = torch.empty(B, h, D, device=dev, dtype=torch.bfloat16)
    return qkv, kc, vc, tables, ctx_t, slots, out, 2 * B * (ctx + 1) * h * D * 2


def split_sweep(batches=(1, 4, 16), ctxs=(128, 2048)) -> None:
    torch.manual_seed(0)
    h, D = 16, 64
    for B, ctx in itertools.product(batches, ctxs):
        qkv, kc, vc, tables, ctx_t, slots, out, kv_bytes = _inputs(B, ctx)
        one_pass = (1, *launch_config(B * h))
        S0 = min(num_splits(B * h), tables.shape[1])
        default = one_pass if S0 == 1 else (S0, 16, 1)       # decode_attention's defaults: BLOCK_N = 16, 1 warp
        cands = [one_pass] + list(itertools.product((2, 4, 8, 16), (16, 64), (1, 4)))
        res = []
        with pdl.allowed(True):
            for S, bn, nw in cands:
                def call(S=S, bn=bn, nw=nw):
                    decode_attention(qkv, kc, vc, tables, ctx_t, slots, 1 / math.sqrt(D), out=out, block_n=bn,
                                     num_warps=nw, splits=S)
                res.append((graph_us(lambda: [call() for _ in range(100)], 100), S, bn, nw))
        us = {r[1:]: r[0] for r in res}
        res.sort()
        print(f"B={B} ctx={ctx}: one pass {us[one_pass]:.2f} us; default split {S0}: {us[default]:.2f} us; fastest "
              + ", ".join(f"S={S} BN={bn} w={nw} {t:.2f} us ({kv_bytes / t / 1e3:.0f} GB/s)" for t, S, bn, nw in res[:4]),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--batches", default="1,4,16", help="--split: batches (comma-separated)")
    ap.add_argument("--ctx", default="128,2048", help="--split: contexts (comma-separated)")
    args = ap.parse_args()
    if args.split:
        return split_sweep(tuple(int(x) for x in args.batches.split(",")), tuple(int(x) for x in args.ctx.split(",")))
    torch.manual_seed(0)
    h, D = 16, 64
    for B, ctx in [(1, 128), (8, 128), (64, 128), (256, 128), (1024, 128), (64, 1024), (8, 2048)]:
        qkv, kc, vc, tables, ctx_t, slots, out, kv_bytes = _inputs(B, ctx)

        def time_us(bn, nw):
            return triton.testing.do_bench(lambda: decode_attention(
                qkv, kc, vc, tables, ctx_t, slots, 1 / math.sqrt(D), out=out, block_n=bn, num_warps=nw, splits=1),
                warmup=20, rep=100) * 1e3

        res = sorted((time_us(bn, nw), bn, nw) for bn, nw in itertools.product((32, 64, 128, 256), (1, 2, 4, 8))
                     if bn <= 2 * ctx + 64)
        cur = launch_config(B * h)
        t_cur = next(t for t, bn, nw in res if (bn, nw) == cur)
        print(f"B={B} ctx={ctx}: chosen {cur} {t_cur:.1f} us ({kv_bytes / t_cur / 1e3:.0f} GB/s); fastest "
              + ", ".join(f"{(bn, nw)} {t:.1f} us ({kv_bytes / t / 1e3:.0f} GB/s)" for t, bn, nw in res[:4]),
              flush=True)


if __name__ == "__main__":
    main()
