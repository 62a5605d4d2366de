"""GPU probe: can weight streaming continue across the dependent steps of a batch-1 decode?

The batch-1 step's GEMVs run at 1.3-1.8 TB/s each (scripts/launch_probe.py) against ~4.2 TB/s
copy bandwidth, and an L2 prefetch one kernel ahead did not help. This probe times, in CUDA graphs
(weights rotated so that L2 does not hold them):
(A) a pure read of 8.4 MB per kernel, 100 kernels back to back: the best a separate kernel can do;
(B) a [16, K] x [K, N] GEMV whose programs load their whole weight tile with one load, with the
    PDL order varied: wait then load (as today), load then wait, and "cascade" (let the next
    kernel launch first, then load, then wait: every kernel's weights in flight while the
    kernels before it still run);
(C) one persistent kernel (a program per SM) running 24 dependent GEMVs with a grid barrier
    between them, the next GEMV's weight tile loaded before the barrier or after it;
(D) the grid barrier alone (1000 of them), atomic polling against ld.acquire polling.
Usage: python3 scripts/stream_probe.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.tune import _time  # noqa: E402


@triton.jit
def _ld_acquire(p):
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [p], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _grid_sync(BAR, target, ERR, POLL: tl.constexpr):
    """All programs arrive (release), then wait until BAR reaches target (acquire). A wait past
    ~2^22 polls sets ERR[0] and gives up (no hang)."""
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    it = 0
    if POLL == 0:
        v = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        while (v < target) & (it < 4194304):
            v = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
            it += 1
    else:
        one = BAR + tl.zeros([1], dtype=tl.int32)
        v = tl.max(_ld_acquire(one), axis=0)
        while (v < target) & (it < 4194304):
            v = tl.max(_ld_acquire(one), axis=0)
            it += 1
    if it >= 4194304:
        tl.store(ERR, 1)
    tl.debug_barrier()


@triton.jit
def _read_kernel(X, OUT, CHUNK: tl.constexpr, R: tl.constexpr, USE_PDL: tl.constexpr):
    """Program p sums X[p*CHUNK:(p+1)*CHUNK] (bf16) in [R, 1024]-element loads."""
    pid = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, R)[:, None] * 1024 + tl.arange(0, 1024)[None, :]
    base = X + pid.to(tl.int64) * CHUNK
    acc = tl.zeros([R, 1024], dtype=tl.float32)
    for c in tl.static_range(0, CHUNK, R * 1024):
        acc += tl.load(base + c + offs).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(OUT + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _gemv_tile(A, W, C, N, K, ORDER: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """C[ks] = A[:, ks*BK:(ks+1)*BK] @ W[ks*BK:, n*BN:] for program (n, ks), fp32 partials [S, 16, N].
    ORDER 0: no PDL; 1: wait, trigger, load (today's order); 2: load, wait, trigger; 3: trigger,
    load, wait (cascade)."""
    pn = tl.program_id(0)
    ks = tl.program_id(1)
    rk = ks * BK + tl.arange(0, BK)
    rn = pn * BN + tl.arange(0, BN)
    r = tl.arange(0, 16)
    if ORDER == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ORDER == 3:
        tl.extra.cuda.gdc_launch_dependents()
    w = tl.load(W + rk[:, None] * N + rn[None, :])
    if ORDER == 2:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ORDER == 3:
        tl.extra.cuda.gdc_wait()
    a = tl.load(A + r[:, None] * K + rk[None, :], mask=(r == 0)[:, None], other=0.0)
    if DOT:
        acc = tl.dot(a, w)
    else:
        a_row = tl.sum(a.to(tl.float32), axis=0)
        acc_row = tl.sum(a_row[:, None] * w.to(tl.float32), axis=0)
        acc = tl.where((r == 0)[:, None], acc_row[None, :], 0.0)
    tl.store(C + ks * 16 * N + r[:, None] * N + rn[None, :], acc, mask=(r == 0)[:, None])


@triton.jit
def _persistent_chain(A0, W, P, BAR, ERR, L, N: tl.constexpr, K: tl.constexpr, PREFETCH: tl.constexpr,
                      BK: tl.constexpr, BN: tl.constexpr, POLL: tl.constexpr):
    """L dependent GEMVs in one launch: layer l's input row is the sum of layer l-1's split-K
    partials (first K columns), so every layer waits for the one before (a grid barrier).
    Program p < units owns tile (p % (N/BN), p // (N/BN)) of every layer; PREFETCH loads the next
    layer's tile before the barrier."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    NT: tl.constexpr = N // BN
    S: tl.constexpr = K // BK
    units = NT * S
    active = pid < units
    u = tl.minimum(pid, units - 1)
    pn = u % NT
    ks = u // NT
    rk = ks * BK + tl.arange(0, BK)
    rn = pn * BN + tl.arange(0, BN)
    r = tl.arange(0, 16)
    if PREFETCH:
        wl = tl.load(W + rk[:, None] * N + rn[None, :])
    for l in range(L):
        if PREFETCH:
            w = wl
        else:
            w = tl.load(W + l * K * N + rk[:, None] * N + rn[None, :])
        if l == 0:
            a = tl.load(A0 + rk)
        else:
            src = P + ((l - 1) % 2) * S * N
            a = tl.zeros([BK], dtype=tl.float32)
            for s in tl.static_range(S):
                a += tl.load(src + s * N + rk, cache_modifier=".cg")
            a = a.to(tl.bfloat16)
        a2 = tl.where((r == 0)[:, None], a[None, :], 0.0).to(tl.bfloat16)
        acc = tl.dot(a2, w)
        row = tl.sum(tl.where((r == 0)[:, None], acc, 0.0), axis=0) * 0.03
        if active:
            tl.store(P + (l % 2) * S * N + ks * N + rn, row)
        if PREFETCH:
            if l + 1 < L:
                wl = tl.load(W + (l + 1) * K * N + rk[:, None] * N + rn[None, :])
        _grid_sync(BAR, (l + 1) * G, ERR, POLL)


@triton.jit
def _barrier_only(BAR, ERR, L, POLL: tl.constexpr):
    G = tl.num_programs(0)
    for l in range(L):
        _grid_sync(BAR, (l + 1) * G, ERR, POLL)


def graph_us(fn, calls: int) -> float:
    return _time(lambda _: fn(), 1, iters=1) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    print(f"device {props.name}: {sms} SMs, L2 {props.L2_cache_size >> 20} MB", flush=True)
    bf = torch.bfloat16
    K, N = 1024, 4096
    MB = K * N * 2
    sets = 16
    ws = [torch.randn(K, N, device=dev, dtype=bf) * 0.03 for _ in range(sets)]

    # (A) reading 8.4 MB per kernel
    out = torch.empty(4096, device=dev)
    for chunk_kb, R in ((64, 8), (32, 4), (16, 2)):
        chunk = chunk_kb * 512       # bf16 elements
        progs = K * N // chunk
        for pdl in (False, True):
            try:
                kw = {"launch_pdl": True} if pdl else {}
                us = graph_us(lambda: [_read_kernel[(progs,)](ws[i % sets], out, CHUNK=chunk, R=R, USE_PDL=pdl,
                                                              num_warps=8, **kw) for i in range(100)], 100)
                print(f"(A) read 8.4 MB, {progs} programs x {chunk_kb} KB, PDL cascade {pdl}: {us:6.2f} us "
                      f"{MB / us / 1e3:6.0f} GB/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"(A) {chunk_kb} KB {pdl}: {type(e).__name__} {str(e)[:300]}", flush=True)

    # (B) whole-tile GEMV, PDL order varied
    a = torch.randn(16, K, device=dev, dtype=bf)
    tiles = [(256, 128, 8), (128, 128, 4), (512, 64, 8), (1024, 32, 8), (256, 64, 4)]
    if args.quick:
        tiles = tiles[:2]
    for bk, bn, nw in tiles:
        S = K // bk
        c = torch.empty(S, 16, N, device=dev)
        ref = (a[:1].float() @ ws[3].float())[0]
        for dot in (True, False):
            for order in (1, 2, 3, 0):
                kw = {"launch_pdl": True} if order else {}
                try:
                    _gemv_tile[(N // bn, S)](a, ws[3], c, N, K, ORDER=order, BK=bk, BN=bn, DOT=dot, num_warps=nw, **kw)
                    torch.cuda.synchronize()
                    err = (c[:, 0].sum(0) - ref).abs().max().item() / ref.abs().max().item()
                    us = graph_us(lambda: [_gemv_tile[(N // bn, S)](a, ws[i % sets], c, N, K, ORDER=order, BK=bk,
                                                                   BN=bn, DOT=dot, num_warps=nw, **kw)
                                           for i in range(100)], 100)
                    print(f"(B) tile [{bk}, {bn}] warps {nw} dot {dot!s:5} order {order}: {us:6.2f} us "
                          f"{MB / us / 1e3:6.0f} GB/s  (rel err {err:.1e})", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"(B) [{bk},{bn}] dot {dot} order {order}: {type(e).__name__} {str(e)[:300]}", flush=True)

    # (D) barrier alone, (C) persistent chain
    bar = torch.zeros(1, dtype=torch.int32, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    for poll in (0, 1):
        for grid in (sms, 64):
            try:
                nb = 1000

                def run():
                    bar.zero_()
                    _barrier_only[(grid,)](bar, err, nb, POLL=poll, num_warps=8)
                run()
                torch.cuda.synchronize()
                us = graph_us(lambda: [run() for _ in range(5)], 5) / nb
                print(f"(D) grid barrier, {grid} programs, poll {'ld.acquire' if poll else 'atomic'}: {us:6.3f} us "
                      f"per barrier (timeouts {err.item()}, count {bar.item()})", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"(D) poll {poll}: {type(e).__name__} {str(e)[:300]}", flush=True)
    L = 24
    wl = torch.randn(L * 2, K, N, device=dev, dtype=bf) * 0.03      # 2 sets of 24 layers, 400 MB
    a0 = torch.randn(K, device=dev, dtype=bf)
    for bk, bn, nw in ((256, 128, 8), (1024, 32, 8), (512, 64, 8)):
        S = K // bk
        p = torch.zeros(2, S, N, device=dev)
        for poll in (0, 1):
            for pre in (False, True):
                try:
                    def run(j):
                        bar.zero_()
                        _persistent_chain[(sms,)](a0, wl[j * L:], p, bar, err, L, N=N, K=K, PREFETCH=pre, BK=bk,
                                                  BN=bn, POLL=poll, num_warps=nw)
                    run(0)
                    torch.cuda.synchronize()
                    # check against torch: the chain of layers
                    x = a0.float()
                    for l in range(L):
                        parts = torch.stack([(x[s * bk:(s + 1) * bk].to(bf).float() @ wl[l, s * bk:(s + 1) * bk].float())
                                             for s in range(S)]) * 0.03
                        x = parts.sum(0)[:K]
                        last = parts
                    got = p[(L - 1) % 2].sum(0)
                    e_rel = (got - last.sum(0)).abs().max().item() / (last.sum(0).abs().max().item() + 1e-30)
                    us = graph_us(lambda: [run(i % 2) for i in range(6)], 6) / L
                    print(f"(C) persistent chain tile [{bk}, {bn}] poll {poll} prefetch {pre!s:5}: {us:6.2f} us per "
                          f"layer {MB / us / 1e3:6.0f} GB/s (rel err {e_rel:.1e}, timeouts {err.item()})", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"(C) [{bk},{bn}] poll {poll} pre {pre}: {type(e).__name__} {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
