"""GPU probe: how fast can a batch-1 GEMV over one expert's [1024 x 4096] bf16 weight (8.4 MB) go?

Times, in CUDA graphs of 100 calls with PDL (as the decode step launches them), rotating over 64
experts so that L2 does not hold the weights:
(1) the fused-MoE kernel (tl.dot on a 16-row tile) with the tuned tile, with split-K 1 and 4;
(2) a dense GEMV on the same tl.dot tile, with and without an L2 prefetch of the program's
    weight columns before the PDL wait (a dense weight does not depend on the previous kernel);
(3) the same GEMV over a transposed weight [N, K] (K contiguous: each program streams one
    contiguous block).
Usage: python3 scripts/gemv_probe.py [--N 4096 --K 1024]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.kernels import pdl  # noqa: E402
from ftmoe.kernels.configs import get_config  # noqa: E402
from ftmoe.kernels.fused_moe import fused_moe  # noqa: E402
from ftmoe.kernels.pdl import launch_kwargs, pdl_start  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch_probe import graph_us  # noqa: E402


@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of every address in ptrs (side effect only)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _gemv_dot(A, W, C, N, K, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              USE_PDL: tl.constexpr = False):
    """Dense [1, K] x [K, N] on a 16-row tl.dot tile; PREFETCH: the program's weight columns are
    prefetched into L2 before the PDL wait (weights do not depend on the previous kernel)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH:
        kk = tl.arange(0, 1024)
        for k0 in range(0, K, 1024):
            _prefetch_l2(W + (k0 + kk) * N + pid_n * BLOCK_N)
    pdl_start(USE_PDL)
    r = tl.arange(0, 16)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + r[:, None] * 0 + (k0 + offs_k)[None, :], mask=(r == 0)[:, None], other=0.0)
        w = tl.load(W + (k0 + offs_k)[:, None] * N + offs_n[None, :])
        acc += tl.dot(a, w)
    tl.store(C + r[:, None] * 0 + offs_n[None, :], acc.to(C.dtype.element_ty), mask=(r == 0)[:, None])


@triton.jit
def _gemv_t(A, WT, C, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The same GEMV over a transposed weight WT [N, K] (K contiguous): each program streams one
    contiguous [BLOCK_N, K] block of memory instead of BLOCK_N-wide column strips of [K, N] rows."""
    pid_n = tl.program_id(0)
    pdl_start(USE_PDL)
    r = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + r[:, None] * 0 + (k0 + offs_k)[None, :], mask=(r == 0)[:, None], other=0.0)
        wt = tl.load(WT + offs_n[:, None] * K + (k0 + offs_k)[None, :])
        acc += tl.dot(a, tl.trans(wt))
    tl.store(C + r[:, None] * 0 + offs_n[None, :], acc.to(C.dtype.element_ty), mask=(r == 0)[:, None])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--K", type=int, default=1024)
    a_ = ap.parse_args()
    N, K, E = a_.N, a_.K, 64
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    bf = torch.bfloat16
    a = torch.randn(1, K, device=dev, dtype=bf)
    w = torch.randn(E, K, N, device=dev, dtype=bf) * K ** -0.5
    ids = [torch.tensor([i], device=dev, dtype=torch.int32) for i in range(E)]
    nbytes = K * N * 2
    results = []
    with pdl.allowed(True):
        base = get_config(E, N, K, "bf16", 1, name)
        for s in (1, 4):
            us = graph_us(lambda: [fused_moe(a, w, None, 1, routing=ids[i % E], config=base, split_k=s)
                                   for i in range(100)], 100)
            results.append((us, f"dot {base} split-K {s}"))
            print(f"dot   split-K {s} {base}: {us:6.2f} us {nbytes / us / 1e3:6.0f} GB/s", flush=True)
        wd = [torch.randn(K, N, device=dev, dtype=bf) * K ** -0.5 for _ in range(16)]
        wt = [x.t().contiguous() for x in wd]
        c = torch.empty(1, N, device=dev, dtype=bf)

        def measure(label, run):
            """Check run(3) against a @ wd[3], then time 100 calls over the 16 weight copies."""
            try:
                run(3)
                torch.cuda.synchronize()
                err = (c[0].float() - (a.float() @ wd[3].float())[0]).abs().max().item()
                us = graph_us(lambda: [run(i) for i in range(100)], 100)
            except Exception as e:  # noqa: BLE001
                print(f"{label}: {type(e).__name__} {str(e)[:200]}")
                return
            results.append((us, f"{label} (err {err:.1e})"))
            print(f"{label}: {us:6.2f} us {nbytes / us / 1e3:6.0f} GB/s", flush=True)

        for pf, bn, bk, stages in itertools.product((False, True), (32, 64), (64, 128), (3, 5)):
            measure(f"dense dot prefetch={pf} BN {bn} BK {bk} stages {stages}",
                    lambda i, pf=pf, bn=bn, bk=bk, stages=stages: _gemv_dot[(N // bn,)](
                        a, wd[i % 16], c, N, K, PREFETCH=pf, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                        num_stages=stages, **launch_kwargs(a)))
        for bn, bk, stages in itertools.product((16, 32, 64), (128, 256, 512), (2, 3, 4)):
            measure(f"transposed [N, K] BN {bn} BK {bk} stages {stages}", lambda i, bn=bn, bk=bk, stages=stages:
                    _gemv_t[(N // bn,)](a, wt[i % 16], c, N, K, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                                        num_stages=stages, **launch_kwargs(a)))
    results.sort()
    print("fastest:")
    for us, what in results[:15]:
        print(f"{us:6.2f} us {nbytes / us / 1e3:6.0f} GB/s  {what}")


if __name__ == "__main__":
    main()
