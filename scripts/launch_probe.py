"""GPU probe: what one kernel boundary costs inside a CUDA graph, with and without programmatic
dependent launch, and what the decode step's GEMVs cost back to back.

(a) a chain of N one-program Triton kernels (each reads what the previous wrote): us per kernel;
(b) the batch-1 expert GEMV shapes (W1 8 MB, W2 8 MB, QKV 6 MB, Wo 2 MB) 100 times in a graph,
    with the step's tiles and PDL as the step launches them: us per call and GB/s.
Usage: python3 scripts/launch_probe.py
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.kernels import pdl  # noqa: E402
from ftmoe.kernels.configs import get_config, get_dense_choice  # noqa: E402
from ftmoe.kernels.fused_moe import fused_moe  # noqa: E402
from ftmoe.kernels.pdl import launch_kwargs, pdl_start  # noqa: E402
from ftmoe.tune import _time  # noqa: E402


@triton.jit
def _bump(X, Y, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    tl.store(Y, tl.load(X) + 1.0)


def graph_us(fn, calls: int) -> float:
    """us per launch of fn() (which makes `calls` launches), replayed from a CUDA graph."""
    return _time(lambda _: fn(), 1, iters=1) / calls * 1e3


def main():
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    bufs = [torch.zeros(1, device=dev) for _ in range(2)]
    n = 200
    for on in (False, True):
        with pdl.allowed(on):
            def chain():
                for i in range(n):
                    _bump[(1,)](bufs[i % 2], bufs[(i + 1) % 2], **launch_kwargs(bufs[0]))
            print(f"(a) chain of {n} one-program kernels, PDL {'on ' if on else 'off'}: {graph_us(chain, n):6.2f} us per kernel")
    H, F, E = 1024, 4096, 64
    bf = torch.bfloat16
    a = torch.randn(1, H, device=dev, dtype=bf)
    h = torch.randn(1, F, device=dev, dtype=bf)
    sets = 16   # rotate over weight copies so that L2 (50 MB) does not hold them
    w1 = [torch.randn(E, H, F, device=dev, dtype=bf) * 0.03 for _ in range(2)]
    w2 = [torch.randn(E, F, H, device=dev, dtype=bf) * 0.03 for _ in range(2)]
    ids = [torch.randint(0, E, (1,), device=dev, dtype=torch.int32) for _ in range(sets)]
    probs = torch.rand(1, 1, device=dev)
    wqkv = [torch.randn(H, 3 * H, device=dev, dtype=bf) for _ in range(sets)]
    wo = [torch.randn(H, H, device=dev, dtype=bf) for _ in range(sets)]
    for on in (False, True):
        with pdl.allowed(on):
            c1 = get_config(E, F, H, "bf16", 1, name)
            c2 = get_config(E, H, F, "bf16", 1, name)
            cases = {
                "W1 expert (8.4 MB, +GELU)": (lambda i: fused_moe(a, w1[i % 2], None, 1, routing=ids[i], gelu=True, config=c1), H * F * 2),
                "W2 expert (8.4 MB, split-K 4)": (lambda i: fused_moe(h, w2[i % 2], None, 1, routing=ids[i], a_per_slot=True,
                                                                     probs=probs, mul_prob=True, config=c2, split_k=4), H * F * 2),
            }
            for label, w, N in (("QKV dense (6.3 MB)", wqkv, 3 * H), ("Wo dense (2.1 MB)", wo, H)):
                ch = get_dense_choice(N, H, "bf16", 1, name)
                if ch is not None:
                    cfg = dict(ch)
                    s = cfg.pop("split_k", 1)
                    cfg.pop("backend", None)
                    cases[label + f" Triton split-K {s}"] = (lambda i, w=w, cfg=cfg, s=s: fused_moe(a, w[i].unsqueeze(0), None, 1, config=cfg, split_k=s), H * N * 2)
                cases[label + " cuBLAS"] = (lambda i, w=w: a @ w[i], H * N * 2)
            for label, (fn, nbytes) in cases.items():
                us = graph_us(lambda: [fn(i % sets) for i in range(100)], 100)
                print(f"(b) PDL {'on ' if on else 'off'} {label:<40} {us:6.2f} us  {nbytes / us / 1e3:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
