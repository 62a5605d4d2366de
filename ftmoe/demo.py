"""`ftmoe demo` / `make demo`: the whole pipeline on a small embedded model.

In:  a work folder. Out: a random GPT-MoE checkpoint in Megatron-DeepSpeed layout with a
small JiebaBPE tokenizer, its FasterTransformer conversion, and generated text (greedy and
sampled) with tokens/s printed. The weights are random, so the text is gibberish: the
point is that every stage runs end to end.
"""
from __future__ import annotations

import os
import shutil
import time

import torch

from .synthetic import SyntheticSpec, save_megatron_checkpoint

DEMO_SPEC = SyntheticSpec(num_layers=4, hidden_size=128, num_attention_heads=8, ffn_hidden_size=256,
                          num_experts=8, expert_interval=2, topk=1, vocab_size=512, max_position_embeddings=256)
PROMPTS = ["今天天气很好，我们", "人工智能的发展", "The weather today is"]


def run_demo(workdir: str = "demo_out") -> int:
    from .convert import convert
    from .demo_tokenizer import build_jieba_bpe_tokenizer
    from .llm import LLM
    from .sampling import SamplingParams

    t0 = time.perf_counter()
    if os.path.isdir(workdir):
        shutil.rmtree(workdir)
    tok_dir = os.path.join(workdir, "tokenizer")
    build_jieba_bpe_tokenizer(tok_dir, vocab_size=DEMO_SPEC.vocab_size)
    ckpt = save_megatron_checkpoint(os.path.join(workdir, "megatron_ckpt"), DEMO_SPEC, seed=0, dtype=torch.float16)
    n_files = len(os.listdir(ckpt))
    print(f"[1/3] random Megatron-DeepSpeed checkpoint: {ckpt} ({n_files} files: main + "
          f"{len(DEMO_SPEC.moe_layers)} MoE layers x {DEMO_SPEC.num_experts} experts)")
    model_dir = convert(ckpt, os.path.join(workdir, "c-model"), tp=1, dtype="fp16", tokenizer_dir=tok_dir,
                        progress=False)
    print(f"[2/3] converted to FasterTransformer layout: {model_dir} ({len(os.listdir(model_dir))} files)")
    llm = LLM(model_dir, dtype="float32")
    print(f"[3/3] generating with {model_dir} (random weights: expect gibberish)")
    for name, params in (("greedy", SamplingParams(max_new_tokens=24)),
                         ("top_k=40 top_p=0.9 repetition_penalty=1.5 seed=1234",
                          SamplingParams(max_new_tokens=24, top_k=40, top_p=0.9, repetition_penalty=1.5, seed=1234))):
        t = time.perf_counter()
        outs = llm.generate(PROMPTS, params)
        dt = time.perf_counter() - t
        n_new = sum(o.sequence_length - len(llm.tokenizer.encode(p)) for o, p in zip(outs, PROMPTS))
        print(f"  -- {name}: {n_new} new tokens in {dt:.2f} s ({n_new / dt:.1f} tokens/s, batch {len(PROMPTS)})")
        for p, o in zip(PROMPTS, outs):
            print(f"     {p!r} -> {o.text!r}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; try: ftmoe info {model_dir}")
    return 0
