"""GPU check: programmatic dependent launch (and weight prefetch) changes no bit of the output.

At the real shapes (random bf16 weights), for each batch size: prefill random prompts of mixed
lengths, then greedy-decode steps replayed from CUDA graphs, once with FTMOE_PDL=0 and once
with FTMOE_PDL=1; logits of every step and the KV caches must be bit-identical.
Usage: python3 scripts/pdl_check.py [--batches 1,2,4,8] [--steps 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.bench import config_of, random_model  # noqa: E402
from ftmoe.cuda_graphs import DecodeGraphs  # noqa: E402
from ftmoe.fast_model import FastGPTMoE  # noqa: E402
from ftmoe.kernels import pdl  # noqa: E402
from ftmoe.kv_cache import KVCache  # noqa: E402


def run(fast, cfg, B, steps, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 100, (B,), generator=g).tolist()
    prompt = torch.randint(0, cfg.vocab_size, (B, max(lens)), generator=g).cuda()
    cache = KVCache.for_model(cfg, B * 128 + 64, block_size=16, dtype=torch.bfloat16, device="cuda")
    seqs = list(range(B))
    for s in seqs:
        cache.add(s)
    with torch.inference_mode():
        logits = fast(prompt, cache.prepare(seqs, lens), cache, last_only=True)
    graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=8, buckets=(B,))
    outs = [logits]
    for _ in range(steps):
        tok = outs[-1].argmax(-1)
        meta = cache.prepare(seqs, [1] * B)
        outs.append(graphs.step(tok, meta.positions[:, 0], meta.block_tables.int(), meta.context_lens.int(),
                                meta.slot_mapping[:, 0].int()).clone())
    return torch.stack(outs), cache.k.clone(), cache.v.clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cfg = config_of("gpt-moe-0.35b-64e")
    fast = FastGPTMoE(random_model(cfg, torch.bfloat16, torch.device("cuda")))
    ok = True
    for B in (int(b) for b in a.batches.split(",")):
        res = []
        for flag in ("0", "1"):
            os.environ["FTMOE_PDL"] = flag
            pdl._enabled.cache_clear()
            res.append(run(fast, cfg, B, a.steps, seed=B))
        same = [torch.equal(x, y) for x, y in zip(*res)]
        ok &= all(same)
        print(f"B={B:<4} logits/k/v bit-identical with and without PDL: {same} -> {'PASS' if all(same) else 'FAIL'}",
              flush=True)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
