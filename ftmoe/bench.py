"""`ftmoe bench`: decode and prefill speed beside the hardware floor and the eager baseline.

In:  a preset (random weights at the real shapes, built on the GPU) or a converted folder,
     a dtype, batch sizes and a context length.
Out: a table on stdout and a JSON file: one row per measurement with phase (decode |
     prefill | latency), batch, ms, floor_ms, ratio, tokens/s and the eager pure-torch time
     on the same weights, plus the card, the date, the measured copy bandwidth and matmul rate.

Floor of a decode step = bytes it must read (attention and dense weights, the experts its
tokens actually route to, the tied head, the KV cache) / copy bandwidth measured here.
Prefill floor = max(bytes / bandwidth, FLOPs / matmul rate).
A decode step is timed as the serving engine runs one: token ids and metadata on the host, one
copy to the GPU, the graph replay, waited for (`DecodeGraphs.step_host`); and as greedy
`generate` runs it (`--greedy-chunk N`, a second row per batch: N steps back to back, each
argmax fed back on the GPU, the tokens read once per chunk; per-step time). The latency table
runs greedy generate's path (prefill through `FastGPTMoE.__call__`, then chunks of steps).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

import torch

from .config import ModelConfig
from .errors import FtmoeError
from .kv_cache import AttnMetadata, KVCache
from .model import GPTMoE
from .synthetic import PRESETS


def _events_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median time of fn() in ms, measured with CUDA events (host clock without a GPU)."""
    if not torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def measure_hardware(dev: torch.device) -> dict:
    n = 1 << 29                                              # 1 GiB of bf16
    x = torch.randn(n, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = _events_ms(lambda: y.copy_(x), 20)
    bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)      # bytes read + written
    x = y = None                                              # free before the matmul test
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = _events_ms(lambda: a @ b, 10)
    rate = 2 * 8192 ** 3 / (ms * 1e-3)
    a = b = None
    torch.cuda.empty_cache()
    return {"copy_bandwidth_GBps": bw / 1e9, "matmul_TFLOPs": rate / 1e12}


def config_of(preset: str) -> ModelConfig:
    s = PRESETS[preset]
    return ModelConfig(head_num=s.num_attention_heads, size_per_head=s.hidden_size // s.num_attention_heads,
                       inter_size=s.ffn_hidden_size, num_layer=s.num_layers, max_pos_seq_len=s.max_position_embeddings,
                       vocab_size=s.vocab_size, expert_num=s.num_experts, moe_layers=tuple(s.moe_layers),
                       moe_k=s.topk)


@torch.no_grad()
def random_model(cfg: ModelConfig, dtype: torch.dtype, dev: torch.device, seed: int = 0, par=None) -> GPTMoE:
    """Random weights at the real shapes, drawn on the device (std like a trained model's). With a
    ParallelState, this rank's shard; ranks of one TP group draw identical replicated tensors
    (the gate among them), so they route alike."""
    torch.manual_seed(seed)
    with torch.device(dev):
        m = GPTMoE(cfg, dtype, par=par)
    for name, p in m.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.05)
        elif name.endswith("bias") or "layernorm" in name:
            p.normal_(0.0, 0.02)
        elif name in ("wte", "wpe"):
            p.normal_(0.0, 0.02)
        else:
            fan_in = p.shape[1] if p.dim() == 3 and ".experts." in name else p.shape[0]   # [E, in, out] / [in, ...]
            p.normal_(0.0, fan_in ** -0.5)
    return m.eval()


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_bytes(m: GPTMoE, B: int, ctx: int, touched: list[int], kv_itemsize: int) -> int:
    """Bytes one decode step must move: every non-expert weight it uses, the experts routed to
    (touched[i] distinct experts in MoE layer i), the head, and the KV cache read + write."""
    cfg = m.config
    total = _bytes(m.wte) + B * _bytes(m.wpe[0])
    moe_i = 0
    for blk in m.blocks():
        for name, p in blk.named_parameters():
            if ".experts." not in "." + name:
                total += _bytes(p)
        if blk.is_moe:
            ex = blk.mlp.moe.experts
            per_expert = sum(_bytes(p[0]) for p in (ex.dense_h_to_4h.weight, ex.dense_h_to_4h.bias,
                                                     ex.dense_4h_to_h.weight, ex.dense_4h_to_h.bias))
            total += touched[moe_i] * per_expert
            moe_i += 1
    total += cfg.num_layer * 2 * B * (ctx + 1) * cfg.hidden_size * kv_itemsize
    return total


def _profile_table(fn, what: str, log, cpu: bool = False) -> None:
    """Per-kernel GPU time (and host time with cpu=True) of one call of fn, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    log(f"---- kernels of {what} ----")
    log(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    if cpu:
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


@dataclasses.dataclass
class Row:
    phase: str
    batch: int
    ms: float
    floor_ms: float | None
    tokens_per_s: float
    eager_ms: float | None = None
    ctx: int | None = None
    in_len: int | None = None
    out_len: int | None = None
    kernels_per_step: int | None = None
    variant: str | None = None          # prefill: "cuda-graph" (replayed from a graph); decode: "greedy-chunk-N"
    experts_touched: float | None = None  # decode: distinct experts per MoE layer, mean (over the chunk's steps)

    @property
    def ratio(self) -> float | None:
        return self.ms / self.floor_ms if self.floor_ms else None


def _count_kernels(fn) -> int | None:
    """GPU kernels launched by fn (graph replays are traced kernel by kernel)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) or None
    except Exception:  # profiler unavailable: the count is informative only
        return None


def run_bench(preset: str = "gpt-moe-0.35b-64e", model_dir: str | None = None, dtype: str = "bf16",
              batches=(1, 8, 64, 256), ctx: int = 128, prefill=(8, 512), eager: bool = True,
              latency: bool = True, iters: int = 50, json_path: str | None = None, log=print,
              profile: bool = False, device: str = "cuda", latency_batches=(1, 8, 32, 64),
              latency_shapes=((128, 8), (512, 32)), prefill_graphs: bool = False, greedy_chunk: int = 16) -> dict:
    """device "cpu" is a smoke test of the whole procedure (Triton interpreter, no graphs, no floors).
    prefill_graphs: also time prefill replayed from a CUDA graph (and use it in the latency table).
    greedy_chunk: also time decode steps run that many at a time (`DecodeGraphs.greedy_chunk`: the
    argmax fed back on the GPU, steps back to back, tokens read once per chunk), as greedy
    generation runs them; 0 skips it."""
    from .cuda_graphs import DecodeGraphs, PrefillGraphs
    from .fast_model import FastGPTMoE
    from .launch import limit_host_threads
    from .loader import load_model, parse_dtype

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FtmoeError("ftmoe bench needs a CUDA GPU (none is visible to torch)")
    limit_host_threads(dev)          # as serving does (LLM, distributed ranks)
    tdtype = parse_dtype(dtype)
    hw, bw, rate = {}, None, None
    if dev.type == "cuda":
        hw = measure_hardware(dev)
        bw, rate = hw["copy_bandwidth_GBps"] * 1e9, hw["matmul_TFLOPs"] * 1e12
        log(f"device {torch.cuda.get_device_name()}: copy {hw['copy_bandwidth_GBps']:.0f} GB/s, "
            f"bf16 matmul {hw['matmul_TFLOPs']:.0f} TFLOP/s")
    t0 = time.time()
    m = load_model(model_dir, dtype=tdtype, device=dev) if model_dir else random_model(config_of(preset), tdtype, dev)
    cfg = m.config
    log(f"model {'random ' + preset if not model_dir else model_dir}: {sum(_bytes(p) for p in m.parameters()) / 1e9:.2f} GB "
        f"{dtype} ({time.time() - t0:.1f} s)")
    fast = FastGPTMoE(m)
    bs = 16
    max_b = max(batches)
    per_seq = -(-(ctx + max(1, greedy_chunk)) // bs) * bs
    tokens = max(max_b * per_seq, 64 * (512 + 32 + bs), prefill[0] * (prefill[1] + bs) if prefill else 0) + 64 * bs
    cache = KVCache.for_model(cfg, tokens, block_size=bs, dtype=tdtype, device=dev)
    cache.k.normal_()
    cache.v.normal_()
    nb = -(-cfg.max_pos_seq_len // bs)            # graphs take tables wide enough for any sequence
    nb_ctx = -(-(ctx + 1) // bs)
    if dev.type == "cuda":
        graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=nb, buckets=tuple(sorted(set(batches))))
    else:
        graphs = _EagerSteps(fast, cache, nb, tuple(sorted(set(batches))))
    rows: list[Row] = []
    graphed = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    for B in batches:
        seqs = list(range(B))
        tables, slots = seat_rows(cache, B, ctx, nb)
        tables, slots = tables.to(dev, torch.int32), slots.to(dev, torch.int32)
        ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        ids = torch.randint(0, cfg.vocab_size, (B,), device=dev, generator=g)
        pos = torch.full((B,), ctx, dtype=torch.long, device=dev)
        touched = _routed(fast, cache, ids, pos, tables, ctx_lens, slots)    # for the floor
        floor = decode_bytes(m, B, ctx, touched, cache.k.element_size()) / bw * 1e3 if bw else None
        graphs.capture(B)
        # timed as the engine runs a step: ids and metadata on the host, one copy, then the replay
        meta_h = AttnMetadata(pos[:, None].cpu(), slots.long()[:, None].cpu(), tables[:, :nb_ctx].long().cpu(),
                              ctx_lens.long().cpu(), torch.ones(B, dtype=torch.long))
        ids_h = ids.cpu()
        ms = _events_ms(lambda: graphs.step_host(ids_h, meta_h), iters, _reps(3, iters))
        kernels = _count_kernels(lambda: graphs.graph(B, ctx).replay()) if graphed else None
        if profile and graphed:
            _profile_table(lambda: graphs.graph(B, ctx).replay(), f"decode B={B}", log)
        eager_ms = None
        if eager:
            meta = meta_h.to(dev)
            with torch.inference_mode():
                eager_ms = _events_ms(lambda: m(ids[:, None], meta, cache, last_only=True),
                                      _reps(5 if B <= 64 else 3, iters), 1)
        rows.append(Row("decode", B, ms, floor, B / ms * 1e3, eager_ms, ctx=ctx, kernels_per_step=kernels,
                        experts_touched=statistics.mean(touched) if touched else None))
        log(_fmt(rows[-1]) + f"  experts touched/layer {statistics.mean(touched) if touched else 0:.1f}")
        if greedy_chunk > 1:
            for s in seqs:
                cache.reserve(s, greedy_chunk)       # the chunk's tokens: positions ctx .. ctx + chunk - 1
            nb_c = cache.blocks_for(ctx + greedy_chunk)
            meta_c = AttnMetadata(meta_h.positions, meta_h.slot_mapping,
                                  torch.tensor([cache.block_table(s)[:nb_c] for s in seqs]), meta_h.context_lens,
                                  meta_h.seq_lens)
            ms_c = _events_ms(lambda: graphs.greedy_chunk(ids_h, meta_c, greedy_chunk),
                              max(3, iters // greedy_chunk), 1) / greedy_chunk
            # the chunk feeds its own tokens back, so its steps route differently from the step above:
            # each step's experts, from the chunk's tokens; the floor is the mean of the steps' floors
            # (step j reads ctx + j cached tokens)
            toks, _ = graphs.greedy_chunk(ids_h, meta_c, greedy_chunk)
            touched_c = _chunk_routing(fast, cache, ids_h, toks, meta_c)
            floor_c = (statistics.mean(decode_bytes(m, B, ctx + j, t, cache.k.element_size())
                                       for j, t in enumerate(touched_c)) / bw * 1e3 if bw else None)
            mean_c = statistics.mean(statistics.mean(t) for t in touched_c) if touched_c[0] else None
            rows.append(Row("decode", B, ms_c, floor_c, B / ms_c * 1e3, None, ctx=ctx, kernels_per_step=None,
                            variant=f"greedy-chunk-{greedy_chunk}", experts_touched=mean_c))
            log(_fmt(rows[-1]) + f"  experts touched/layer {mean_c or 0:.1f} "
                f"({greedy_chunk} steps back to back, argmax fed back on the GPU)")
    for s in range(max_b):
        cache.free(s)
    if prefill:
        rows.append(_bench_prefill(m, fast, cache, prefill, bw, rate, eager, log, profile, iters=iters))
    if prefill_graphs:
        fast.prefill_graphs = PrefillGraphs(fast, cache)
        if prefill:
            rows.append(_bench_prefill(m, fast, cache, prefill, bw, rate, False, log, profile, variant="cuda-graph",
                                       iters=iters))
    if latency:
        if graphed:
            fast.graphs, cache.meta_device = graphs, "cpu"      # what enable_cuda_graphs sets up
        rows += _bench_latency(fast, graphs, cache, log, latency_batches, latency_shapes, iters=iters)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "command": "ftmoe " + " ".join(sys.argv[1:]),
              "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FTMOE_")},
              "dtype": dtype, "preset": None if model_dir else preset, **hw,
              "max_memory_allocated_GB": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None,
              "weights_GB": sum(_bytes(p) for p in m.parameters()) / 1e9, "kv_cache_GB": 2 * _bytes(cache.k) / 1e9,
              "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


@torch.inference_mode()
def _chunk_routing(fast, cache: KVCache, ids: torch.Tensor, toks: torch.Tensor,
                   meta: AttnMetadata) -> list[list[int]]:
    """Distinct experts per MoE layer in each step of a greedy chunk that started from `ids` with
    `meta` (`KVCache.prepare_chunk`'s, on the host) and produced `toks` [steps, B]: its steps
    re-run one by one, eagerly, on those tokens (their K/V rewritten in place)."""
    dev = fast.device
    out = []
    for j in range(toks.shape[0]):
        mj = meta.chunk_step(j, cache.block_size).to(dev)
        step_ids = (ids.reshape(-1) if j == 0 else toks[j - 1]).to(dev)
        out.append(_routed(fast, cache, step_ids, mj.positions[:, 0], mj.block_tables.int(), mj.context_lens.int(),
                           mj.slot_mapping[:, 0].int()))
    return out


@torch.inference_mode()
def _routed(fast, cache: KVCache, *step) -> list[int]:
    """Distinct experts per MoE layer of one eager decode step (ids, positions, tables, context
    lengths, slots on the device), from the fast path's routing trace."""
    fast.trace = []
    try:
        fast.decode_step(*step, cache)
        return [int(torch.unique(t[t >= 0]).numel()) for t in fast.trace]
    finally:
        fast.trace = None


def seat_rows(cache: KVCache, B: int, ctx: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences 0..B-1 in `cache`, each with `ctx` tokens "already cached" (whatever K/V the
    cache holds) and room for one more (those that exist are kept). Returns their block tables
    [B, nb] (zero-padded) and the new token's slots [B], long, on the host: a decode step at
    context ctx."""
    bs = cache.block_size
    for s in range(B):
        if not cache.has(s):
            cache.add(s)
            cache.prepare([s], [ctx])
            cache.reserve(s, 1)
    tables = torch.tensor([(cache.block_table(s) + [0] * nb)[:nb] for s in range(B)])
    slots = torch.tensor([cache.block_table(s)[ctx // bs] * bs + ctx % bs for s in range(B)])
    return tables, slots


class _EagerSteps:
    """DecodeGraphs' interface without graphs (CPU smoke runs)."""

    def __init__(self, fast, cache, nb, buckets):
        self.fast, self.cache, self.nb, self.buckets = fast, cache, nb, buckets

    def capture(self, B: int) -> None:
        pass

    @torch.inference_mode()
    def step(self, ids, positions, tables, ctx, slots):
        return self.fast.decode_step(ids, positions, tables, ctx, slots, self.cache)

    def step_host(self, ids, meta):
        meta = meta.to(self.fast.device)
        return self.step(ids.reshape(-1).to(self.fast.device), meta.positions[:, 0], meta.block_tables,
                         meta.context_lens, meta.slot_mapping[:, 0])

    def greedy_chunk(self, ids, meta, steps, logprobs=False):
        """The chunk's steps one by one (the CPU smoke run: no graphs)."""
        tok, toks = ids.reshape(-1), []
        for j in range(steps):
            tok = self.step_host(tok, meta.chunk_step(j, self.cache.block_size)).argmax(-1).cpu()
            toks.append(tok)
        return torch.stack(toks), None


def _fmt(r: Row) -> str:
    eager = f"{r.eager_ms:9.2f}" if r.eager_ms else "        -"
    sp = f"{r.eager_ms / r.ms:7.1f}x" if r.eager_ms else "       -"
    what = f"{r.phase} B={r.batch}" + (f" {r.in_len}/{r.out_len}" if r.in_len else "") + \
        (f" ({r.variant})" if r.variant else "")
    floor = f"floor {r.floor_ms:8.3f} ms  ratio {r.ratio:5.2f}" if r.floor_ms else "floor        - (no GPU)"
    return (f"{what:<24} {r.ms:9.3f} ms  {floor}  "
            f"{r.tokens_per_s:10.0f} tok/s  eager {eager} ms {sp}"
            + (f"  kernels/step {r.kernels_per_step}" if r.kernels_per_step else ""))


def _reps(n: int, iters: int) -> int:
    """Repeats of a timing that takes n by default: fewer when the run asks for fewer iterations
    (`--iters`; a CPU smoke run takes 2)."""
    return max(1, min(n, iters))


def _bench_prefill(m, fast, cache, shape, bw, rate, eager, log, profile=False, variant=None, iters: int = 50) -> Row:
    B, T = shape
    cfg = m.config
    dev = m.device
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    seqs = list(range(10_000, 10_000 + B))

    def run(model):
        for s in seqs:
            cache.add(s)
        meta = cache.prepare(seqs, [T] * B)
        with torch.inference_mode():
            out = model(ids, meta, cache, last_only=True)
        for s in seqs:
            cache.free(s)
        return out

    ms = _events_ms(lambda: run(fast), _reps(5, iters), _reps(2, iters))
    if profile:
        _profile_table(lambda: run(fast), f"prefill {B}x{T}", log, cpu=True)
    eager_ms = _events_ms(lambda: run(m), _reps(2, iters), 1) if eager else None
    weight_bytes = sum(_bytes(p) for p in m.parameters())   # ~all experts are touched by B*T tokens
    floor, bytes_ms, flops_ms = prefill_floor_ms(cfg, weight_bytes, B, T, bw, rate) if bw else (None, 0, 0)
    row = Row("prefill", B, ms, floor, B * T / ms * 1e3, eager_ms, in_len=T, variant=variant)
    log(_fmt(row) + (f"  (bytes floor {bytes_ms:.2f} ms, flops floor {flops_ms:.2f} ms)" if bw else ""))
    return row


def prefill_floor_ms(cfg, weight_bytes: int, B: int, T: int, bw: float, rate: float) -> tuple[float, float, float]:
    """(floor, bytes floor, FLOPs floor) in ms of a B x T prefill: every weight read once, or the
    matmul FLOPs (active parameters, causal attention, the head for B last tokens) at `rate`."""
    active = cfg.param_counts()["active_per_token"] - cfg.vocab_size * cfg.hidden_size - cfg.max_pos_seq_len * cfg.hidden_size
    flops = 2 * B * T * active + cfg.num_layer * 2 * B * T * T * cfg.hidden_size + 2 * B * cfg.hidden_size * cfg.vocab_size
    bytes_ms, flops_ms = weight_bytes / bw * 1e3, flops / rate * 1e3
    return max(bytes_ms, flops_ms), bytes_ms, flops_ms


def _bench_latency(fast, graphs, cache, log, batches=(1, 8, 32, 64), shapes=((128, 8), (512, 32)),
                   iters: int = 50) -> list[Row]:
    """FasterTransformer-style end-to-end latency: prefill + greedy decode, batch x (in, out), as
    greedy `generate` runs it (the decode steps in chunks of FTMOE_DECODE_CHUNK)."""
    from .generation import decode_chunk_steps

    chunk = decode_chunk_steps()
    cfg = fast.config
    rows = []
    bs = cache.block_size
    for T_in, T_out in shapes:
        for B in batches:
            if B > graphs.buckets[-1] or B * (T_in + T_out) > cache.num_free_blocks * bs:
                continue
            ids = torch.randint(0, cfg.vocab_size, (B, T_in))
            seqs = list(range(20_000, 20_000 + B))
            nb_needed = -(-(T_in + T_out) // bs)
            if nb_needed > graphs.nb:
                continue

            def run():
                for s in seqs:
                    cache.add(s)
                meta = cache.prepare(seqs, [T_in] * B)
                with torch.inference_mode():     # greedy generate's path: prefill, then chunks of steps
                    tok = fast(ids.to(meta.positions.device), meta, cache, last_only=True).argmax(-1).cpu()
                    left = T_out - 1
                    while left:
                        k = min(chunk, left)
                        toks, _ = graphs.greedy_chunk(tok, cache.prepare_chunk(seqs, k), k)
                        tok, left = toks[-1], left - k
                for s in seqs:
                    cache.free(s)
                return tok

            ms = _events_ms(run, _reps(3, iters), 1)
            row = Row("latency", B, ms, None, B * T_out / ms * 1e3, in_len=T_in, out_len=T_out)
            rows.append(row)
            log(f"latency B={B:<3} {T_in}/{T_out}: {ms:8.2f} ms end to end")
    return rows
