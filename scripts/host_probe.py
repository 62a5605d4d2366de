"""GPU probe: what a CUDA graph's launch costs the host, and how much of it a step timed alone pays.

A decode step timed alone (`ftmoe bench`'s decode rows, a serving loop that samples on the host)
pays for the host's packing of the inputs, the copy's and the graph's launch calls, in series
with the GPU; replayed back to back the host work overlaps the previous replay. This measures:
(a) graphs of N chained one-program kernels (PDL as the step's kernels), N = 25..400: the host
    time of the launch call, a replay timed alone (events, synchronized each time) and back to
    back, per replay; so whether the launch cost grows with the node count and is paid in series;
(b) the same 200 kernels as 1, 2, 4 or 8 graphs launched one after another: a replay timed
    alone (if the GPU can start on the first graph while the host launches the rest, splitting
    hides most of the launch);
(c) the real decode step at the given batches (no profiler in the process): the host time of
    `_load` (pack + the copy queued) and of the launch call, the step alone and back to back; the
    input copy alone and copy + replay alone (what the step costs without the host's packing).
Usage: python3 scripts/host_probe.py [--batches 1,8] [--no-chains]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.bench import _events_ms, config_of, random_model  # noqa: E402
from ftmoe.fast_model import FastGPTMoE  # noqa: E402
from ftmoe.kernels.pdl import launch_kwargs, pdl_start  # noqa: E402
from ftmoe.tune_step import StepRig, back_to_back_ms  # noqa: E402


@triton.jit
def _bump(X, Y, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    tl.store(Y, tl.load(X) + 1.0)


def _chain_graph(bufs: list[torch.Tensor], lo: int, hi: int) -> torch.cuda.CUDAGraph:
    def run():
        for i in range(lo, hi):
            _bump[(1,)](bufs[i], bufs[i + 1], **launch_kwargs(bufs[i]))
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g


def _alone_us(fn, n: int = 200) -> float:
    return _events_ms(fn, n, 5) * 1e3          # each call timed alone, synchronized (median)


def _b2b_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return back_to_back_ms(fn, n) * 1e3


def _call_us(fn, n: int = 200) -> float:
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-chains", action="store_true", help="only (c): the real decode step")
    a = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}")
    bufs = [torch.zeros(1, device="cuda") for _ in range(401)]
    for n in () if a.no_chains else (25, 50, 100, 200, 400):
        g = _chain_graph(bufs, 0, n)
        print(f"chain of {n:3d} kernels, one graph: launch call {_call_us(g.replay):6.1f} us, alone "
              f"{_alone_us(g.replay):7.1f} us, back to back {_b2b_us(g.replay):7.1f} us")
    for parts in () if a.no_chains else (1, 2, 4, 8):
        step = 200 // parts
        gs = [_chain_graph(bufs, i * step, (i + 1) * step) for i in range(parts)]

        def replay_all(gs=gs):
            for g in gs:
                g.replay()
        print(f"chain of 200 kernels in {parts} graphs: launch calls {_call_us(replay_all):6.1f} us, alone "
              f"{_alone_us(replay_all):7.1f} us, back to back {_b2b_us(replay_all):7.1f} us")

    batches = [int(b) for b in a.batches.split(",")]
    rig = StepRig(FastGPTMoE(random_model(config_of("gpt-moe-0.35b-64e"), torch.bfloat16, torch.device("cuda"))),
                  batches, ctx=128)
    dg = rig.graphs()
    with torch.inference_mode():
        for B in batches:
            dg.capture(B)
            ids, meta = rig.inputs[B]
            bucket = dg.bucket_for(B)
            g = dg.graph(bucket, 128)
            load = _call_us(lambda: dg._load(ids, meta, bucket))
            call = _call_us(g.replay)
            print(f"decode step B={B}: _load {load:.1f} us, launch call {call:.1f} us; step_host alone "
                  f"{_alone_us(lambda: dg.step_host(ids, meta)):.1f} us, replay alone {_alone_us(g.replay):.1f} us, "
                  f"back to back {_b2b_us(g.replay):.1f} us")
            packed = dg.graphs[bucket][1]["packed"]
            buf = dg._staging(bucket)[0]

            def copy_replay():
                packed.copy_(buf, non_blocking=True)
                g.replay()
            print(f"decode step B={B}: the input copy alone {_alone_us(lambda: packed.copy_(buf, non_blocking=True)):.1f} us, "
                  f"copy + replay alone {_alone_us(copy_replay):.1f} us (step_host less the host's packing)")


if __name__ == "__main__":
    main()
