"""GPU A/B of decode-step variants in one process, interleaved, on the same weights and cache.

Each variant is a set of switches applied while its decode graphs are captured (the switches
are read at capture time):
- `pdl=N`: programmatic dependent launch with the early trigger up to N rows; `pdlx=N`: the
  trigger at exit, for larger steps up to N rows; `pdlalso=LO:HI|0`: the early trigger also at
  LO..HI rows (`pdl.EARLY_ALSO`), or not;
- `gate=auto|cublas|triton` (FTMOE_GATE); `lngate=auto|0|1` (FTMOE_LN_GATE: the gate logits in the
  LN2 kernel: up to 64 rows, never, always);
- `attn=S` (FTMOE_ATTN_SPLIT: decode-attention context splits, 0 = one pass); `preload=0|1`
  (FTMOE_ATTN_PRELOAD: attention's first K/V tile loaded before the PDL wait);
- `gemv=auto|0|1`, `gemvhead=auto|0|1` (FTMOE_GEMV, FTMOE_GEMV_HEAD: the dense GEMMs and the head of
  steps up to 16 rows on `kernels.gemv`); `feed=0|1` (FTMOE_PDL_FEED: with the GEMV, the bounded
  cascade of `pdl.feed_on`); `attnlaunch=FROM:BLOCK_NxWARPS`
  (FTMOE_ATTN_LAUNCH: decode attention's launch config from FROM (row, head) programs on);
  `fetch=0|1` (FTMOE_GRAPH_FETCH: `step_host`'s inputs read from pinned host memory by the graph's
  first kernel, no copy; time it with --synced); `gemvtma=0|1` (FTMOE_GEMV_TMA: the GEMVs' weight
  tiles loaded by TMA into shared memory, the swapped wgmma form); `gemvexperts=0|1`
  (FTMOE_GEMV_EXPERTS: the MoE layer's expert GEMMs on `gemv.gemv_experts`); `wosplits=S`
  (FTMOE_GEMV_WO_SPLITS: Wo's K in S splits); `lnwarps=W` (FTMOE_LN_WARPS: add_layernorm's warps);
  `w2tiles=BNxBKxS|0` (FTMOE_GEMV_W2_TILES: the dense W2 GEMV's tiles and K splits, 0 = gemv.plan's);
  `alignwarps=W` (FTMOE_ALIGN_WARPS: the one-program MoE alignment's warps); `moepreload=auto|0|1`
  (FTMOE_MOE_PRELOAD: fused-MoE launches that may load their first weight tile before the PDL wait);
  `topkalign=auto|0|1` (FTMOE_TOPK_ALIGN: the MoE top-k and the slot alignment in one kernel);
  `gatesplits=N` (FTMOE_GATE_SPLITS: the Triton gate GEMM's split-K count); `moepersist=auto|0|1`
  (FTMOE_MOE_PERSISTENT: aligned expert GEMMs on resident programs looping over the routed tiles);
  `lnpre=0|1` (FTMOE_LN_PRELOAD: the LayerNorm kernels' weights, and the LN2 + gate kernel's gate
  columns, loaded before the PDL wait; on by default since the twenty-third session);
- `table=PATH`: a kernel-config table in place of the package's;
- `skip=ln+attn+gate`: those kernels replaced by stand-ins that launch nothing (wrong results,
  timing only: what each costs in a step; past batch 1 skip ln together with gate, or the zero
  gate input sends every token to one expert).
Every (variant, batch) graph is captured once; then R rounds replay each graph `iters` times
in turn, so slow drifts of the card (clocks, temperature) hit every variant alike. Prints, per
batch, each variant's median ms over the rounds and its ratio to the first variant. --synced
times each step alone with its input copies (as `ftmoe bench` does) instead of back to back:
from the host in one copy (the engine's path), or `--synced device` from device tensors.
Usage: python3 scripts/ab_decode.py --batches 32,64,256 --variants "base" "pdl=4096" "gate=triton"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.bench import _events_ms, config_of, random_model  # noqa: E402
from ftmoe.cuda_graphs import DecodeGraphs  # noqa: E402
from ftmoe.tune_step import StepRig, back_to_back_ms  # noqa: E402
from ftmoe import fast_model  # noqa: E402
from ftmoe.fast_model import FastGPTMoE  # noqa: E402
from ftmoe.kernels import configs, pdl  # noqa: E402


ENV_SWITCHES = {"gate": "FTMOE_GATE", "attn": "FTMOE_ATTN_SPLIT", "preload": "FTMOE_ATTN_PRELOAD",
                "lngate": "FTMOE_LN_GATE", "gemv": "FTMOE_GEMV", "gemvhead": "FTMOE_GEMV_HEAD",
                "feed": "FTMOE_PDL_FEED", "attnlaunch": "FTMOE_ATTN_LAUNCH", "fetch": "FTMOE_GRAPH_FETCH",
                "gemvtma": "FTMOE_GEMV_TMA", "gemvexperts": "FTMOE_GEMV_EXPERTS", "wosplits": "FTMOE_GEMV_WO_SPLITS",
                "lnwarps": "FTMOE_LN_WARPS", "w2tiles": "FTMOE_GEMV_W2_TILES",
                "alignwarps": "FTMOE_ALIGN_WARPS", "moepreload": "FTMOE_MOE_PRELOAD",
                "topkalign": "FTMOE_TOPK_ALIGN", "gatesplits": "FTMOE_GATE_SPLITS", "moepersist": "FTMOE_MOE_PERSISTENT",
                "lnpre": "FTMOE_LN_PRELOAD"}


def _knock_out(part: str):
    """Replace one of the step's kernels by a stand-in that launches nothing (wrong results, for
    timing only: what the step would cost without it). Returns (name, original) to restore."""
    cache = {}

    def zeros(shape, dtype, device):
        """A persistent zero tensor, made in a warm-up step (outside capture): the stand-ins'
        outputs stay finite, so the kernels after them route and address as usual."""
        key = (tuple(shape), dtype)
        if key not in cache:
            cache[key] = torch.zeros(shape, dtype=dtype, device=device)
        return cache[key]

    def ln(x, weight, bias, eps, add=None, add_bias=None, want_fp32=False, res_out=None, y_out=None):
        return (x, x, zeros(x.shape, torch.float32, x.device)) if want_fp32 else (x, x)

    def attn(qkv, *args, **kw):
        return zeros((qkv.shape[0], qkv.shape[2], qkv.shape[3]), qkv.dtype, qkv.device)

    def gate(u, wg32, k, slots=None, backend=None):
        N, E = u.shape[0], wg32.shape[1]
        if (N, k) not in cache:       # made in a warm-up step, outside capture: distinct experts per slot
            cache[(N, k)] = (torch.full((N, k), 1.0 / k, device=u.device),
                             (torch.arange(N * k, device=u.device, dtype=torch.int32) % E).view(N, k))
        return cache[(N, k)]

    if part not in ("ln", "attn", "gate"):
        raise SystemExit(f"skip: expected ln, attn or gate, found {part!r}")
    name, fn = {"ln": ("add_layernorm", ln), "attn": ("decode_attention", attn), "gate": ("gate_topk", gate)}[part]
    old = getattr(fast_model, name)
    setattr(fast_model, name, fn)
    return name, old


@contextlib.contextmanager
def switches(spec: str, device_name: str):
    """Apply a variant's switches ("base", or comma-separated key=value) for the block."""
    saved_rows, saved_exit, saved_also = pdl.MAX_ROWS, pdl.EXIT_MAX_ROWS, pdl.EARLY_ALSO
    saved_fns = []
    saved_env = {v: os.environ.get(v) for v in ENV_SWITCHES.values()}
    tables = contextlib.ExitStack()
    try:
        for kv in [] if spec == "base" else spec.split(","):
            key, value = kv.split("=", 1)
            if key == "pdl":
                pdl.MAX_ROWS = int(value)
            elif key == "pdlx":
                pdl.EXIT_MAX_ROWS = int(value)
            elif key == "pdlalso":
                pdl.EARLY_ALSO = None if value == "0" else tuple(int(x) for x in value.split(":"))
            elif key == "skip":
                for part in value.split("+"):
                    saved_fns.append(_knock_out(part))
            elif key in ENV_SWITCHES:
                os.environ[ENV_SWITCHES[key]] = value
            elif key == "table":
                with open(value) as f:
                    tables.enter_context(configs.using_table(json.load(f)))
            else:
                raise SystemExit(f"unknown switch {key!r} in variant {spec!r}")
        yield
    finally:
        for name, fn in saved_fns:
            setattr(fast_model, name, fn)
        pdl.MAX_ROWS, pdl.EXIT_MAX_ROWS, pdl.EARLY_ALSO = saved_rows, saved_exit, saved_also
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        tables.close()


def _time_replays(dg: DecodeGraphs, B: int, inputs, iters: int, synced: str | None) -> float:
    """ms per replay of one captured step, its static inputs set first: back to back (the host
    enqueues the next replay while the GPU runs this one: GPU time), or synced (each step timed
    alone, then waited for, as `ftmoe bench` and a serving loop that samples on the host do: the
    host's launch work is inside; median). synced "host": ids and metadata from the host in one
    copy (`step_host`, the engine's path); "device": device tensors copied field by field (`step`)."""
    ids, meta = inputs
    max_ctx = dg.max_ctx(meta)
    g = dg.graph(B, max_ctx)          # the graph a step from the host replays at this context
    dev = dg.fast.device
    dev_args = (ids.to(dev)[:, 0], *(t.to(dev) for t in (
        meta.positions[:, 0], meta.block_tables, meta.context_lens, meta.slot_mapping[:, 0])))
    dg.step(*dev_args, max_ctx=max_ctx)
    torch.cuda.synchronize()
    if synced == "host":
        return _events_ms(lambda: dg.step_host(ids, meta), iters, warmup=1)
    if synced == "device":
        return _events_ms(lambda: dg.step(*dev_args, max_ctx=max_ctx), iters, warmup=1)
    return back_to_back_ms(g.replay, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--variants", nargs="+", default=["base", "pdl=4096"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--synced", nargs="?", const="host", choices=("host", "device"), default=None,
                    help="time each step alone, its input copies included: from the host in one copy "
                         "(default, the engine's path) or from device tensors field by field")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    cfg = config_of("gpt-moe-0.35b-64e")
    batches = [int(b) for b in a.batches.split(",")]
    rig = StepRig(FastGPTMoE(random_model(cfg, torch.bfloat16, dev)), batches, ctx=a.ctx)
    ctx, inputs = a.ctx, rig.inputs
    graphs = {}
    for v in a.variants:
        with switches(v, name):
            dg = rig.graphs()
            for B in batches:
                dg.capture(B)
            graphs[v] = dg
        print(f"captured {v}", flush=True)
    times = {(v, B): [] for v in a.variants for B in batches}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for B in batches:
                for v in a.variants:
                    times[(v, B)].append(_time_replays(graphs[v], B, inputs[B], a.iters, a.synced))
    rows = []
    for B in batches:
        ref = statistics.median(times[(a.variants[0], B)])
        for v in a.variants:
            ms = statistics.median(times[(v, B)])
            spread = max(times[(v, B)]) - min(times[(v, B)])
            rows.append({"batch": B, "variant": v, "ms": ms, "spread_ms": spread, "vs_first": ms / ref})
            print(f"B={B:<5} {v:<40} {ms:8.4f} ms  (spread {spread:.4f})  x{ms / ref:.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "rounds": a.rounds, "iters": a.iters, "ctx": ctx, "synced": a.synced, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
