"""Where a distributed decode step spends its wall time: a per-rank timeline of one step.

Run under torchrun on a GPU host, e.g.
    torchrun --nproc-per-node 2 scripts/harness_probe.py --tp 2 --batch 1 --out DIR
Every rank records (time, label) around the step's broadcasts, sends/receives, host syncs and
graph replays (time.perf_counter is one clock for all processes of a host); rank 0 prints the
median of each gap over the timed steps and writes the raw events to DIR/events_rank*.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

EVENTS: list[tuple[float, str]] = []


def mark(label: str) -> None:
    EVENTS.append((time.perf_counter(), label))


def wrap(owner, name: str, label: str | None = None) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        mark(f"{label or name}>")
        try:
            return fn(*a, **k)
        finally:
            mark(f"{label or name}<")

    setattr(owner, name, inner)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_forward(cls, first: int, n: int, out: str) -> None:
    """Trace calls [first, first + n) of cls._forward on every rank: kernel table and chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    fn, state = cls._forward, {"calls": 0, "prof": None}

    def inner(self, *a, **k):
        i = state["calls"]
        state["calls"] += 1
        if i == first:
            sync()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].start()
        r = fn(self, *a, **k)
        if i == first + n - 1:
            sync()
            prof = state["prof"]
            prof.stop()
            rank = dist.get_rank() if dist.is_initialized() else 0
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"kernels_rank{rank}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30,
                                                  max_name_column_width=70))
            if rank < 2:
                prof.export_chrome_trace(os.path.join(out, f"trace_rank{rank}.json"))
        return r

    cls._forward = inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--preset", default="gpt-moe-0.35b-64e")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=100)
    ap.add_argument("--out", default=".")
    ap.add_argument("--profile", type=int, default=0, help="also trace the GPU kernels of this many steps (after 8)")
    a = ap.parse_args()
    from ftmoe import launch
    from ftmoe.cuda_graphs import DecodeGraphs
    from ftmoe.distributed import ParallelConfig
    from ftmoe.parallel_runner import DistributedModel

    for n in ("broadcast", "send", "recv", "isend"):
        wrap(dist, n)
    wrap(torch.Tensor, "tolist")
    wrap(torch.cuda, "synchronize")
    wrap(DecodeGraphs, "step", "replay")
    wrap(DistributedModel, "_forward")
    if a.profile:
        profile_forward(DistributedModel, 8, a.profile, a.out)
    wrap(DistributedModel, "_gather_logits", "gather")
    pc = ParallelConfig(a.tp, a.ep, a.pp)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runner, procs = launch.start(pc, None, torch.bfloat16 if dev == "cuda" else torch.float32, dev, random_preset=a.preset)
    rank = int(os.environ.get("RANK", "0"))
    if runner is not None:
        cache = runner.make_cache(a.batch * 160 + 1024, 16)
        seqs = list(range(a.batch))
        for s in seqs:
            cache.add(s)
            cache.prepare([s], [a.ctx])
        tok = torch.randint(0, runner.config.vocab_size, (a.batch, 1))
        steps = []
        for i in range(a.steps + 3):
            torch.cuda.synchronize() if dev == "cuda" else None
            t0 = time.perf_counter()
            mark("STEP>")
            meta = cache.prepare(seqs, [1] * a.batch)
            mark("prepared")
            runner(tok, meta, cache, last_only=True)
            mark("called")
            for s in seqs:
                cache.truncate(s, a.ctx)
            torch.cuda.synchronize() if dev == "cuda" else None
            mark("STEP<")
            if i >= 3:
                steps.append((time.perf_counter() - t0) * 1e3)
        print(f"rank0 step median {statistics.median(steps):.3f} ms  (tp={a.tp} ep={a.ep} pp={a.pp} B={a.batch}"
              f" OMP={os.environ.get('OMP_NUM_THREADS')} env={ {k: v for k, v in os.environ.items() if k.startswith(('NCCL_', 'FTMOE_', 'CUDA_'))} })")
        launch.stop(runner, procs)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"events_rank{rank}.json"), "w") as f:
        json.dump(EVENTS, f)


if __name__ == "__main__":
    main()
