"""Decode-attention launch sweep: (BLOCK_N, num_warps) against batch and context, on a GPU.

Usage (repo root, GPU host): python3 scripts/attn_sweep.py
Prints, per (B, ctx), the time and KV read bandwidth of the current choice
(`kernels.attention.launch_config`) and of the four fastest candidates. The 0.35B model's
attention: 16 heads of 64, bf16, KV blocks of 16 tokens scattered over the cache.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton

from ftmoe.kernels.attention import decode_attention, launch_config


def main() -> None:
    torch.manual_seed(0)
    dev, h, D, bs = "cuda", 16, 64, 16
    for B, ctx in [(1, 128), (8, 128), (64, 128), (256, 128), (1024, 128), (64, 1024), (8, 2048)]:
        nb = -(-(ctx + 1) // bs)
        NB = B * nb + 1
        kc = torch.randn(NB, h, bs, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = torch.randperm(NB - 1, device=dev)[:B * nb].view(B, nb).int()
        ctx_t = torch.full((B,), ctx, device=dev, dtype=torch.int32)
        slots = (tables[:, ctx // bs] * bs + ctx % bs).int()
        qkv = torch.randn(B, 3, h, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty(B, h, D, device=dev, dtype=torch.bfloat16)
        kv_bytes = 2 * B * (ctx + 1) * h * D * 2

        def time_us(bn, nw):
            return triton.testing.do_bench(lambda: decode_attention(
                qkv, kc, vc, tables, ctx_t, slots, 1 / math.sqrt(D), out=out, block_n=bn, num_warps=nw),
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
