"""`ftmoe bench --tp T --ep E --pp P`: decode step time of a parallel model, and the expert load.

In:  a ParallelConfig, a preset (random weights drawn per rank) or a converted folder, batch
     sizes and a context length. Out: a table (ms per decode step, tokens/s, the one-GPU floor
     measured on rank 0's device) and, under expert parallelism, the tokens each EP rank
     received per MoE layer (load imbalance); JSON rows like `ftmoe bench`'s.

Each timed step is what serving does: rank 0 broadcasts the step, every rank runs its shard
(Triton kernels and per-rank decode CUDA graphs on GPUs), logits come back to rank 0.
The context stays at `ctx` (each step's token is dropped again), so every step is the same.
Greedy chunks (`--greedy-chunk N`, default 8) add a row per batch: N steps per broadcast, each
step's argmax fed back on the devices, the tokens gathered once (ms per step; without a
pipeline, where the runner has decode graphs). Prefill (B x T fresh prompts) is timed the same way. At tp = ep = pp = 1 the same harness
gives the one-GPU baseline of a scaling table (`ftmoe bench --distributed`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time

import torch

from . import launch
from .distributed import ParallelConfig


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_parallel_bench(pc: ParallelConfig, preset: str | None = "gpt-moe-0.35b-64e", model_dir: str | None = None,
                       dtype: str = "bf16", device: str = "cuda", batches=(1, 64, 256), ctx: int = 128,
                       iters: int = 20, json_path: str | None = None, log=print, timeout_s: float = 300.0,
                       prefill: tuple[int, int] | None = None, greedy_chunk: int = 8, fast: bool | None = None) -> dict:
    """greedy_chunk: also time decode steps run that many at a time on every rank
    (`DistributedModel.greedy_chunk`: one broadcast and one token gather per chunk), where the
    runner can (decode graphs, no pipeline); 0 or 1: not. fast: as `launch.start`'s."""
    from .bench import measure_hardware
    from .loader import parse_dtype

    tdtype = parse_dtype(dtype)
    rows, hw = [], {}

    def save() -> dict:   # after every row, so a run cut short keeps what it measured
        result = {"date": datetime.date.today().isoformat(), "parallel": dataclasses.asdict(pc), "dtype": dtype,
                  "preset": preset if model_dir is None else None, "device": device, "hardware": hw,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else None,
                  "rows": rows}
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
        return result

    runner, procs = launch.start(pc, model_dir, tdtype, device, timeout_s=timeout_s, fast=fast,
                                 random_preset=preset if model_dir is None else None)
    try:
        cfg = runner.config
        dev = runner.device
        if dev.type == "cuda":
            hw.update(measure_hardware(dev))
        bs = 16
        tokens = max(max(batches) * (-(-(ctx + max(1, greedy_chunk)) // bs)) * bs, prefill[0] * (-(-prefill[1] // bs)) * bs if prefill else 0)
        cache = runner.make_cache(tokens + 64 * bs, bs)
        g = torch.Generator().manual_seed(0)
        if prefill:
            rows.append(_bench_prefill(runner, cache, prefill, pc, hw, iters, g, log))
            save()
        for B in batches:
            seqs = list(range(B))
            for s in seqs:
                if not cache.has(s):
                    cache.add(s)
                    cache.prepare([s], [ctx])
            tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)

            def step():
                meta = cache.prepare(seqs, [1] * B)
                out = runner(tok, meta, cache, last_only=True)
                for s in seqs:
                    cache.truncate(s, ctx)
                return out

            ms, host_ms = _median_ms(step, dev, warmups=2, iters=iters)
            load = runner.moe_load()
            row = {"phase": "decode", "batch": B, "ctx": ctx, "ms": ms, "host_ms": host_ms, "tokens_per_s": B / ms * 1e3,
                   "tp": pc.tp, "ep": pc.ep, "pp": pc.pp, "fast_path": runner.fast is not None,
                   "cuda_graphs": runner.cuda_graphs, "ep_tokens_per_rank": load}
            if hw:   # the one-GPU floor of the same step
                touched = _touched(runner, cache, seqs, tok, ctx)
                row["experts_touched"] = touched is not None
                if touched is None:   # several ranks: each of min(B * k, E) experts read, an upper estimate
                    touched = [min(B * cfg.moe_k, cfg.expert_num)] * len(cfg.moe_layers)
                floor_bytes = _full_model_decode_bytes(cfg, runner.dtype, B, ctx, touched)
                row["one_gpu_floor_ms"] = floor_bytes / (hw["copy_bandwidth_GBps"] * 1e9) * 1e3
                row["floor_ms"] = row["one_gpu_floor_ms"]
            rows.append(row)
            save()
            imb = ""
            if load:
                per_layer = [max(r) / max(1e-9, statistics.mean(r)) for r in load if r]
                imb = f"  EP load max/mean {statistics.mean(per_layer):.2f} (worst layer {max(per_layer):.2f})"
            floor = ""
            if "one_gpu_floor_ms" in row:
                floor = f"  one-GPU floor {row['one_gpu_floor_ms']:.3f} ms" + \
                    ("" if row["experts_touched"] else " (if min(B*k, E) experts are read)")
            log(f"decode tp={pc.tp} ep={pc.ep} pp={pc.pp} B={B:<4} {ms:9.3f} ms  {row['tokens_per_s']:10.0f} tok/s"
                f"  (host {host_ms:.3f} ms){floor}{imb}")
            if greedy_chunk > 1 and runner.can_greedy_chunk(cache, B):
                rows.append(_bench_chunk(runner, cache, seqs, tok, ctx, greedy_chunk, dict(row), dev, iters, log))
                save()
            for s in seqs:
                cache.free(s)
    finally:
        launch.stop(runner, procs)
    return save()


def _bench_chunk(runner, cache, seqs: list[int], tok: torch.Tensor, ctx: int, k: int, row: dict, dev, iters: int,
                 log) -> dict:
    """Greedy chunks of k steps from context ctx (every sequence cut back to ctx after each):
    ms and rank 0's host ms per step, beside the step row `row` (whose floor it keeps)."""
    ids = tok[:, 0]
    queued = []     # rank 0's host time until the chunk was queued on every rank (before its wait)

    def chunk():
        t0 = time.perf_counter()
        started = runner.greedy_chunk_start(ids, cache.prepare_chunk(seqs, k), cache, k)
        queued.append((time.perf_counter() - t0) * 1e3)
        toks, _ = runner.greedy_chunk_result(started)
        for s in seqs:
            cache.truncate(s, ctx)
        return toks

    n = max(3, iters // k + 2)
    ms, _ = _median_ms(chunk, dev, warmups=2, iters=n)
    B = len(seqs)
    row.update(variant=f"greedy-chunk-{k}", ms=ms / k, host_ms=statistics.median(queued[-n:]) / k,
               tokens_per_s=B / ms * k * 1e3)
    row.pop("ep_tokens_per_rank", None)
    pc = runner.par.config
    log(f"decode tp={pc.tp} ep={pc.ep} pp={pc.pp} B={B:<4} {row['ms']:9.3f} ms  {row['tokens_per_s']:10.0f} tok/s"
        f"  (greedy chunks of {k}: host {row['host_ms']:.3f} ms a step)")
    return row


def _touched(runner, cache, seqs: list[int], tok: torch.Tensor, ctx: int) -> list[int] | None:
    """Distinct experts per MoE layer of the step (one eager fast-path step from the routing
    trace, as `ftmoe bench` counts them), where rank 0 can run it alone (one rank); else None."""
    if runner.par.config.world_size > 1 or runner.fast is None:
        return None
    from .bench import _routed

    meta = cache.prepare(seqs, [1] * len(seqs))
    dev = runner.device
    try:
        return _routed(runner.fast, cache, tok[:, 0].to(dev), meta.positions[:, 0].to(dev), meta.block_tables.to(dev),
                       meta.context_lens.to(dev), meta.slot_mapping[:, 0].to(dev))
    finally:
        for s in seqs:
            cache.truncate(s, ctx)


def _median_ms(fn, dev, warmups: int, iters: int) -> tuple[float, float]:
    """Median wall time of fn() in ms, each call synchronised (whole serving steps, host work
    included), and the median time until fn() returned: rank 0's host work before it waits on
    the GPU (on GPUs the rest of the step is device time it could overlap)."""
    for _ in range(warmups):
        fn()
    times, host = [], []
    for _ in range(iters):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), statistics.median(host)


def _meta_model(cfg, dtype):
    """The whole (unsharded) model on the meta device: its parameter shapes, no memory."""
    from .model import GPTMoE

    with torch.device("meta"):
        return GPTMoE(cfg, dtype)


def _bench_prefill(runner, cache, shape, pc, hw, iters, g, log) -> dict:
    """B x T fresh prompts through the runner (last-token logits to rank 0), median of `iters` // 4 + 2."""
    B, T = shape
    cfg = runner.config
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    seqs = list(range(100_000, 100_000 + B))

    def run():
        for s in seqs:
            cache.add(s)
        runner(ids, cache.prepare(seqs, [T] * B), cache, last_only=True)
        for s in seqs:
            cache.free(s)

    ms, _ = _median_ms(run, runner.device, warmups=1, iters=max(2, iters // 4 + 2))
    row = {"phase": "prefill", "batch": B, "in_len": T, "ms": ms, "tokens_per_s": B * T / ms * 1e3,
           "tp": pc.tp, "ep": pc.ep, "pp": pc.pp, "fast_path": runner.fast is not None}
    floor = ""
    if hw:
        from .bench import _bytes, prefill_floor_ms

        wbytes = sum(_bytes(p) for p in _meta_model(cfg, runner.dtype).parameters())
        row["floor_ms"] = row["one_gpu_floor_ms"] = prefill_floor_ms(cfg, wbytes, B, T, hw["copy_bandwidth_GBps"] * 1e9,
                                                                     hw["matmul_TFLOPs"] * 1e12)[0]
        floor = f"  one-GPU floor {row['floor_ms']:.3f} ms"
    log(f"prefill tp={pc.tp} ep={pc.ep} pp={pc.pp} {B}x{T} {ms:9.3f} ms  {row['tokens_per_s']:10.0f} tok/s{floor}")
    return row


def _full_model_decode_bytes(cfg, dtype, B: int, ctx: int, touched: list[int]) -> int:
    """decode_bytes of the whole (unsharded) model, without materialising it."""
    from .bench import decode_bytes

    return decode_bytes(_meta_model(cfg, dtype), B, ctx, touched, torch.empty((), dtype=dtype).element_size())
