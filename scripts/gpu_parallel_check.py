"""NCCL parity on the GPUs of one host: TP, EP and PP layouts (up to the number of GPUs) give
the one-GPU logits (fp32, relative error < 1e-5) and greedy tokens, prefill + 16 decode steps.
Usage: python3 scripts/gpu_parallel_check.py   (prints one line per layout)"""
import itertools
import tempfile

import torch

from ftmoe.convert import convert
from ftmoe.kv_cache import KVCache
from ftmoe.llm import LLM
from ftmoe.loader import load_model
from ftmoe.sampling import SamplingParams
from ftmoe.synthetic import PRESETS, save_megatron_checkpoint

if __name__ == "__main__":
    n_gpu = torch.cuda.device_count()
    d = tempfile.mkdtemp()
    ck = save_megatron_checkpoint(d + "/ck", PRESETS["tiny"], seed=1, dtype=torch.float32)
    md = convert(ck, d + "/out", tp=1, dtype="fp32", progress=False)
    prompts = [[5, 17, 33, 2, 99], [7, 8, 200, 31, 4, 4, 9, 100, 12, 300, 77], [42, 1]]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = load_model(md, "float32", "cuda")
    with LLM(md, device="cuda", fast=False) as one:
        want_tokens = [o.output_ids for o in one.generate(prompts, greedy)]
    layouts = [(tp, ep, pp) for tp, ep, pp in itertools.product([1, 2, 4, 8], repeat=3)
               if 1 < tp * ep * pp <= n_gpu]
    print(f"{n_gpu} GPUs ({torch.cuda.get_device_name()}), layouts {layouts}")
    for tp, ep, pp in layouts:
        with LLM(md, device="cuda", tp=tp, ep=ep, pp=pp, timeout_s=120) as llm:
            runner, cache = llm.generator.model, llm.generator.cache
            lens = [len(p) for p in prompts]
            seqs = [1000 + i for i in range(3)]
            rc = KVCache.for_model(ref.config, 512, block_size=cache.block_size, device="cuda")
            for s in seqs:
                cache.add(s)
                rc.add(s)
            batch = torch.zeros(3, max(lens), dtype=torch.long)
            for i, p in enumerate(prompts):
                batch[i, :len(p)] = torch.tensor(p)
            got = runner(batch, cache.prepare(seqs, lens), cache, last_only=True)
            want = ref(batch.cuda(), rc.prepare(seqs, lens), rc, last_only=True)
            worst = float((got - want).abs().max() / want.abs().max())
            g = torch.Generator().manual_seed(0)
            for _ in range(16):
                tok = torch.randint(0, 512, (3, 1), generator=g)
                got = runner(tok, cache.prepare(seqs, [1] * 3), cache, last_only=True)
                want = ref(tok.cuda(), rc.prepare(seqs, [1] * 3), rc, last_only=True)
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            for s in seqs:
                cache.free(s)
            same = [o.output_ids for o in llm.generate(prompts, greedy)] == want_tokens
        print(f"NCCL tp={tp} ep={ep} pp={pp}: max rel logit error {worst:.2e} "
              f"({'PASS' if worst < 1e-5 else 'FAIL'}), greedy tokens {'equal' if same else 'DIFFER'}", flush=True)
