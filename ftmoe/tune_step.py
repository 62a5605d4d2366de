"""Tile choices refined inside whole decode steps (`ftmoe tune --in-step`).

In:  a `FastGPTMoE` (random weights at a preset's shapes, or a converted model), a tuned table
     (`kernels/configs/<device>.json`, written by `ftmoe tune`) and small batch sizes.
Out: the table with the entries that those batches' decode steps use refined, written back.

`ftmoe tune` times every kernel alone. Inside a decode step the kernels overlap under
programmatic dependent launch and share the SMs with their neighbours, and the best tile can
differ: on an H200 (2026-11-28) 4 pipeline stages instead of the isolated winner's 5 made batch-8
steps 3.6-4.4 % faster (`benchmarks/results/2026-11-28-h200-seventh-session-ab.txt`). So for each
batch B this records which entries B's step resolves (`configs.using_table(record=...)`), gives
each its own exact entry for B's row or slot count (so tuning B leaves the other batches' steps
alone), then, one entry at a time, times whole steps replayed from CUDA graphs with that entry's
variants (pipeline stages, BLOCK_K halved and doubled; for a dense GEMM left on cuBLAS, Triton
tiles) in one process, interleaved over rounds, and keeps a variant only when its median step is
faster by more than `min_gain`.
`StepRig` (the model, a KV cache at a fixed context, host inputs per batch, one captured step per
table) is shared with `scripts/ab_decode.py`.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Callable

import torch

from .bench import seat_rows
from .cuda_graphs import DecodeGraphs
from .fast_model import FastGPTMoE
from .kernels import configs
from .kv_cache import AttnMetadata, KVCache


class StepRig:
    """Decode steps of `fast` at the given batches: a KV cache of random K/V at context `ctx`
    for max(batches) rows, and each batch's token ids and metadata on the host."""

    def __init__(self, fast: FastGPTMoE, batches: list[int], ctx: int = 128, block_size: int = 16, seed: int = 0):
        self.fast, self.batches, self.ctx = fast, list(batches), ctx
        cfg, bs = fast.config, block_size
        self.cache = cache = KVCache.for_model(cfg, max(batches) * (ctx + 2 * bs) + 64 * bs, block_size=bs,
                                               dtype=fast.dtype, device=fast.device)
        g = torch.Generator(device=fast.device).manual_seed(seed)
        for t in (cache.k, cache.v):
            t.normal_(generator=g)
        self.nb = nb = -(-cfg.max_pos_seq_len // bs)
        self.inputs = {}
        ids = torch.randint(0, cfg.vocab_size, (max(batches), 1), generator=torch.Generator().manual_seed(seed))
        for B in self.batches:
            tables, slots = seat_rows(cache, B, ctx, nb)
            meta = AttnMetadata(torch.full((B, 1), ctx), slots[:, None], tables, torch.full((B,), ctx),
                                torch.ones(B, dtype=torch.long))
            self.inputs[B] = (ids[:B], meta)             # on the host, as the engine has them

    def graphs(self, buckets=None) -> DecodeGraphs:
        return DecodeGraphs(self.fast, self.cache, max_blocks_per_seq=self.nb, buckets=tuple(buckets or self.batches))

    @torch.inference_mode()
    def step_fn(self, B: int, table: dict | None = None, record: list | None = None) -> Callable[[], object]:
        """One decode step of batch B with kernel configs from `table` (None: the card's file),
        set up and run once: a graph captured under the table on a GPU, whose replay is returned;
        on the CPU (tests) the eager step, which reads the table at every call. `record` collects
        the table entries the step resolves (`configs.using_table`)."""
        dg = self.graphs((B,))
        with self._tables(table, record):
            dg.capture(B)
            dg.step_host(*self.inputs[B])                 # fills the static inputs; runs the step once
        g = dg.graph(B, self.ctx)                  # the graph the engine replays at this context
        if g is not None:
            return g.replay
        s, short = dg.graphs[B][1], dg.short_limit(B, self.ctx)

        def eager():
            with self._tables(table, None):
                return dg._run(s, short)
        return eager

    def _tables(self, table: dict | None, record: list | None):
        if table is None and record is None:
            return contextlib.nullcontext()
        return configs.using_table(table if table is not None else configs._file_table(self.fast.device_name), record)


def back_to_back_ms(fn: Callable[[], object], iters: int) -> float:
    """ms per call of `fn` run `iters` times back to back (GPU time: the host queues the next
    replay while the GPU runs this one); host time without a GPU."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / iters


def variants(entry: dict, M: int, stages=(3, 4, 5, 6), others=()) -> list[dict]:
    """An entry's neighbours to try in a step: other pipeline depths, BLOCK_K halved and doubled
    (32-512). For a cuBLAS choice (a dense GEMM), Triton instead: the tiles its key holds for other
    M, and the heuristic tile for M, without split-K. Tiles that do not fit in shared memory fail
    when captured and are skipped."""
    if "num_stages" not in entry:
        out = []
        for e in [*others, dict(configs.default_config(M), backend="triton", split_k=1)]:
            if "num_stages" in e and e not in out:
                out.append(dict(e))
        return out
    out = [dict(entry, num_stages=s) for s in stages if s != entry.get("num_stages")]
    out += [dict(entry, BLOCK_K=bk) for bk in (entry["BLOCK_K"] // 2, entry["BLOCK_K"] * 2)
            if 32 <= bk <= 512]
    return out


def refine_in_step(rig: StepRig, table: dict, *, rounds: int = 5, iters: int = 20, min_gain: float = 0.003,
                   stages=(3, 4, 5, 6), log=print, timer: Callable | None = None,
                   save: Callable[[dict], None] | None = None) -> dict:
    """The table with the entries used by each of rig's batches refined in whole steps (see the
    module doc). `timer(fn, B, key, entry)` -> ms of one step (default: back-to-back replays);
    a variant wins on the median of `rounds` interleaved timings. `save(table)` runs after each
    batch, so a run cut short keeps what it refined."""
    table = copy.deepcopy(table)
    t0 = time.time()
    for B in rig.batches:
        used: list = []
        rig.step_fn(B, table, used)
        targets = []
        for key, M, m in dict.fromkeys(used):           # in the step's order, once each
            entry = table[key][m]
            table[key].setdefault(str(M), dict(entry))  # this batch's own entry
            if (key, str(M)) not in targets:
                targets.append((key, str(M)))
        for key, m in targets:
            base = table[key][m]
            trials = [(base, table)]
            for v in variants(base, int(m), stages, [e for k, e in table[key].items() if k != m]):
                t = copy.deepcopy(table)
                t[key][m] = v
                trials.append((v, t))
            fns = []
            for v, t in trials:
                try:
                    fns.append((v, t, rig.step_fn(B, t)))
                except Exception as e:  # noqa: BLE001 - a tile past this card's resources
                    log(f"  B={B} {key} M={m}: {_short(v)} skipped ({type(e).__name__})")
            if len(fns) < 2:
                continue
            times = [[] for _ in fns]
            for _ in range(rounds):
                for i, (v, _, fn) in enumerate(fns):
                    times[i].append(timer(fn, B, key, v) if timer else back_to_back_ms(fn, iters))
            med = [statistics.median(x) for x in times]
            best = min(range(len(fns)), key=med.__getitem__)
            gain = 1 - med[best] / med[0]
            if best and gain > min_gain:
                table = fns[best][1]
                log(f"[{time.time() - t0:6.1f}s] B={B} {key} M={m}: {_short(base)} -> {_short(fns[best][0])}: "
                    f"{med[0]:.4f} -> {med[best]:.4f} ms per step ({-100 * gain:+.1f} %)")
            else:
                log(f"[{time.time() - t0:6.1f}s] B={B} {key} M={m}: {_short(base)} kept ({med[0]:.4f} ms; best "
                    f"other {min(med[1:]):.4f})")
            del fns
        if save is not None:
            save(table)
    return table


def _short(entry: dict) -> str:
    if "num_stages" not in entry:
        return "cuBLAS"
    return (f"BM {entry['BLOCK_M']} BN {entry['BLOCK_N']} BK {entry['BLOCK_K']} stages {entry['num_stages']}"
            + (f" split-K {entry['split_k']}" if entry.get("split_k", 1) > 1 else ""))
