"""Where a captured decode step's time goes, kernel by kernel, under PDL (GPU only).

torch.profiler's per-kernel durations are misleading under programmatic dependent launch: a
kernel launched early is "running" while it waits for the kernel before. What a kernel adds to
the step is how far it moves the step's frontier: its end minus the latest end of the kernels
before it (0 when it finished inside them). This replays each batch's step graph (and, with
--greedy, its greedy-chunk graph: step + argmax + advance) under the profiler, reads every
kernel's start and end from the trace, and prints per kernel name: count, mean duration and
the mean and total frontier advance, plus the span of one replay (first start to last end)
and the time between replays. --detail N lists the first N kernels of one replay in order.
--host also times, per batch, the host side of a step run from the host (`step_host`): packing
the inputs and queueing their copy, the graph launch call, and the whole step timed alone
against the same graph replayed back to back.
Usage: python3 scripts/critical_path.py --batches 1,8 [--greedy] [--detail 40]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.bench import config_of, random_model  # noqa: E402
from ftmoe.fast_model import FastGPTMoE  # noqa: E402
from ftmoe.tune_step import StepRig  # noqa: E402


def _kernels(replay, reps: int) -> list[list[tuple[str, float, float]]]:
    """(name, start us, end us) of every kernel of `reps` back-to-back replays, split per replay."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    ks = sorted(((e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"]))
                 for e in events if e.get("cat") == "kernel" and "ts" in e and "dur" in e), key=lambda k: k[1])
    n = len(ks) // reps
    return [ks[i * n:(i + 1) * n] for i in range(reps)] if n else []


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def report(what: str, runs: list[list[tuple[str, float, float]]], detail: int) -> None:
    if not runs or not runs[0]:
        print(f"==== {what}: no kernel events in the trace")
        return
    per = collections.defaultdict(lambda: [0, 0.0, 0.0])       # name -> [count, dur, advance]
    spans, between = [], []
    for r, ks in enumerate(runs):
        front = ks[0][1]
        for name, s, e in ks:
            p = per[_short(name)]
            p[0] += 1
            p[1] += e - s
            p[2] += max(0.0, e - front)
            front = max(front, e)
        spans.append(ks[-1][2] - ks[0][1])
        if r:
            between.append(ks[0][1] - runs[r - 1][-1][2])
    n = len(runs)
    print(f"==== {what}: {len(runs[0])} kernels per replay, span {statistics.median(spans):.1f} us "
          f"(median of {n}), first start after the last replay's end {statistics.median(between or [0]):.1f} us")
    print(f"{'kernel':<50} {'per step':>8} {'mean dur':>9} {'mean adv':>9} {'adv/step':>9}")
    for name, (c, dur, adv) in sorted(per.items(), key=lambda kv: -kv[1][2]):
        print(f"{name:<50} {c / n:8.1f} {dur / c:9.2f} {adv / c:9.2f} {adv / n:9.1f}")
    if detail:
        ks = runs[n // 2]
        t0, front = ks[0][1], ks[0][1]
        print(f"-- first {detail} kernels of one replay (us from its first start): start end advance name")
        for name, s, e in ks[:detail]:
            print(f"{s - t0:8.2f} {e - t0:8.2f} {max(0.0, e - front):6.2f}  {_short(name)}")
            front = max(front, e)


def host_times(dg, B: int, inputs, n: int = 200) -> None:
    """Host microseconds of `_load` (pack + queue the copy) and of the graph launch call, each
    waited for apart; then the step timed alone (as `ftmoe bench`) and back to back."""
    import time

    from ftmoe.bench import _events_ms
    from ftmoe.tune_step import back_to_back_ms

    ids, meta = inputs
    bucket = dg.bucket_for(B)
    g = dg.graph(bucket, dg.max_ctx(meta))
    load, launch = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dg._load(ids, meta, bucket)
        t1 = time.perf_counter()
        g.replay()
        t2 = time.perf_counter()
        load.append((t1 - t0) * 1e6)
        launch.append((t2 - t1) * 1e6)
    torch.cuda.synchronize()
    alone = _events_ms(lambda: dg.step_host(ids, meta), 100, 5)
    b2b = back_to_back_ms(g.replay, 100)
    print(f"host B={B}: pack + copy queued {statistics.median(load):.1f} us, graph launch call "
          f"{statistics.median(launch):.1f} us; step alone {alone * 1e3:.1f} us, back to back {b2b * 1e3:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--detail", type=int, default=0)
    ap.add_argument("--host", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    batches = [int(b) for b in a.batches.split(",")]
    rig = StepRig(FastGPTMoE(random_model(config_of("gpt-moe-0.35b-64e"), torch.bfloat16, dev)), batches, ctx=a.ctx)
    dg = rig.graphs()
    print(f"device {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        for B in batches:
            dg.capture(B)
            dg.step_host(*rig.inputs[B])
            report(f"decode B={B}", _kernels(dg.graph(B, a.ctx).replay, a.reps), a.detail)
            if a.host:
                host_times(dg, B, rig.inputs[B])
            if a.greedy:
                short = dg.short_limit(B, a.ctx, a.reps + 3)    # the graph a chunk of these steps replays
                dg.capture_greedy(B, False, short)
                dg.step_host(*rig.inputs[B])      # real rows again (capture set them to padding)
                # each replay moves the rows one position on (past MAX_CHUNK its tokens are not stored)
                report(f"greedy step B={B}", _kernels(dg.greedy[(B, False, short)][0].replay, a.reps), a.detail)


if __name__ == "__main__":
    main()
