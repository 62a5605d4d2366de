"""GPU probe: registers, spills and shared memory of every Triton kernel a decode step compiles,
and how many of its programs fit on one SM at once.

Under PDL a kernel's weight loads overlap the kernel before only where its programs can be
resident beside that kernel's: an SM holds 64K 32-bit registers, 228 KB of shared memory,
2048 threads and 32 programs. A GEMV whose programs each take most of an SM's registers cannot
start loading until the one before it has left the SM, whatever PDL allows.
Usage: python3 scripts/kernel_resources.py [--batches 1,8] [--env FTMOE_GEMV=0 ...] (--env: a second
pass of the steps under those switches, whose kernels are listed with the first pass's)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REGS, SMEM, THREADS, CTAS = 65536, 228 * 1024, 2048, 32


def per_sm(n_regs: int, warps: int, shared: int) -> tuple[int, str]:
    """Programs of one kernel resident on one SM at most, and what limits them (Hopper)."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256           # allocated in units of 256
    fits = {"registers": REGS // (regs_per_warp * warps), "shared": SMEM // (shared + 1024),
            "threads": THREADS // (32 * warps), "programs": CTAS}
    lim = min(fits, key=fits.get)
    return fits[lim], lim


def compiled_kernels():
    """(name, CompiledKernel) of every Triton kernel in ftmoe.kernels compiled so far, one row per
    compiled variant."""
    import importlib
    import pkgutil

    import ftmoe.kernels as pkg
    from triton.runtime.jit import JITFunction

    seen = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"ftmoe.kernels.{m.name}")
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction) or id(fn) in seen:
                continue
            seen.add(id(fn))
            for cache in fn.device_caches.values():
                for k in cache[0].values():
                    k._init_handles()
                    yield name, k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--env", nargs="*", default=[],
                    help="NAME=VALUE switches for a second pass of the same steps (their kernels listed too)")
    a = ap.parse_args()
    from ftmoe.bench import config_of, random_model
    from ftmoe.fast_model import FastGPTMoE
    from ftmoe.tune_step import StepRig

    batches = [int(b) for b in a.batches.split(",")]
    rig = StepRig(FastGPTMoE(random_model(config_of("gpt-moe-0.35b-64e"), torch.bfloat16, torch.device("cuda"))),
                  batches, ctx=128)
    for B in batches:
        rig.step_fn(B)
    for kv in a.env:
        k, v = kv.split("=", 1)
        os.environ[k] = v
    if a.env:
        for B in batches:
            rig.step_fn(B)
    torch.cuda.synchronize()
    print(f"device {torch.cuda.get_device_name()}; env {' '.join(a.env) or '-'}; batches {a.batches}")
    print(f"{'kernel':34s} {'regs':>4s} {'spill':>5s} {'smem':>7s} {'warps':>5s} {'per SM':>6s}  limit")
    rows = []
    for name, k in compiled_kernels():
        md = k.metadata
        n, lim = per_sm(k.n_regs, md.num_warps, md.shared)
        rows.append((name, k.n_regs, k.n_spills, md.shared, md.num_warps, n, lim))
    for r in sorted(rows, key=lambda r: (r[0], -r[1])):
        print(f"{r[0]:34s} {r[1]:4d} {r[2]:5d} {r[3]:7d} {r[4]:5d} {r[5]:6d}  {r[6]}")


if __name__ == "__main__":
    main()
