"""NCCL parity on the GPUs of one host. Prints one line per layout and path.

1. Tiny model, fp32: every layout of `--layouts` that fits the GPUs gives the one-GPU logits and
   greedy tokens, prefill + 16 decode steps, on the reference path (relative error < 1e-5)
   and on the fast path (Triton kernels + per-rank CUDA graphs, < 1e-4).
2. `--real`: the 0.35B-MoE-64 shapes with random weights in bf16 (one folder written first; the
   tied embedding scaled by `--sharpen` so the logits are peaked and greedy choices clear),
   layouts from `--layouts` (default TP=2, EP=2, TP=4, EP=4, TP=2xEP=2 as far as the GPUs go):
   a batch of prompts of mixed lengths, prefill + `--steps` greedy decode steps. The one-GPU
   fast path is the reference, and an fp32 reference-path run on the same weights gives the
   error budget of plain bf16. Reported: free-running greedy tokens (equal, or where they first
   differ and the one-GPU top-2 logit margin there), and teacher-forced logits (each step fed
   the one-GPU tokens): max relative error against one GPU and against fp32 (must stay within
   1.5x the one-GPU bf16 error), and argmax agreement where the margin is clear.
Usage: python3 scripts/gpu_parallel_check.py [--tiny] [--real] [--layouts 2x1x1,1x4x1] [--steps 64]
"""
import argparse
import gc
import itertools
import sys
import tempfile
import time

import torch

from ftmoe.config import ModelConfig
from ftmoe.convert import convert
from ftmoe.kv_cache import KVCache
from ftmoe.llm import LLM
from ftmoe.loader import load_model
from ftmoe.sampling import SamplingParams
from ftmoe.bench import config_of, random_model
from ftmoe.synthetic import PRESETS, save_ft_model, save_megatron_checkpoint


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def batch_of(prompts):
    lens = [len(p) for p in prompts]
    batch = torch.zeros(len(prompts), max(lens), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = torch.tensor(p)
    return batch, lens


def teacher_forced(runner, cache, prompts, feed):
    """Prefill, then decode feeding feed[step] [B]; returns last-token logits per call on the CPU."""
    batch, lens = batch_of(prompts)
    seqs = [5000 + i for i in range(len(prompts))]
    for s in seqs:
        cache.add(s)
    outs = [runner(batch, cache.prepare(seqs, lens), cache, last_only=True).float().cpu()]
    for tok in feed:
        outs.append(runner(tok[:, None], cache.prepare(seqs, [1] * len(seqs)), cache, last_only=True).float().cpu())
    for s in seqs:
        cache.free(s)
    return outs


def tiny_check(n_gpu, layouts):
    d = tempfile.mkdtemp()
    ck = save_megatron_checkpoint(d + "/ck", PRESETS["tiny"], seed=1, dtype=torch.float32)
    md = convert(ck, d + "/out", tp=1, dtype="fp32", progress=False)
    prompts = [[5, 17, 33, 2, 99], [7, 8, 200, 31, 4, 4, 9, 100, 12, 300, 77], [42, 1]]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = load_model(md, "float32", "cuda")
    with LLM(md, device="cuda", fast=False) as one:
        want_tokens = [o.output_ids for o in one.generate(prompts, greedy)]
    g = torch.Generator().manual_seed(0)
    feed = [torch.randint(0, 512, (3,), generator=g) for _ in range(16)]
    rc = KVCache.for_model(ref.config, 512, block_size=16, device="cuda")
    want = teacher_forced(lambda ids, m, c, last_only: ref(ids.cuda(), m, c, last_only=last_only), rc, prompts, feed)
    layouts = [lay for lay in layouts if lay[0] * lay[1] * lay[2] <= n_gpu]
    print(f"tiny fp32: {n_gpu} GPUs ({torch.cuda.get_device_name()}), layouts {layouts}", flush=True)
    ok = True
    for (tp, ep, pp), fast in itertools.product(layouts, (False, True)):
        tol = 1e-4 if fast else 1e-5
        with LLM(md, device="cuda", tp=tp, ep=ep, pp=pp, timeout_s=120, fast=fast) as llm:
            runner, cache = llm.generator.model, llm.generator.cache
            got = teacher_forced(runner, cache, prompts, feed)
            worst = max(rel(a, b) for a, b in zip(got, want))
            chunks, real = [], runner.greedy_chunk_start
            runner.greedy_chunk_start = lambda *a, **k: chunks.append(1) or real(*a, **k)
            same = [o.output_ids for o in llm.generate(prompts, greedy)] == want_tokens
        # greedy generate on graphs without a pipeline runs in chunks (argmax fed back on the GPUs)
        chunked = fast and pp == 1
        good = worst < tol and same and bool(chunks) == chunked
        ok &= good
        print(f"NCCL tiny fp32 tp={tp} ep={ep} pp={pp} {'fast+graphs' if fast else 'reference'}: max rel logit error "
              f"{worst:.2e} (tol {tol:g}), greedy tokens {'equal' if same else 'DIFFER'} ({len(chunks)} greedy "
              f"chunks, {'expected' if chunked else 'expected none'}): {'PASS' if good else 'FAIL'}", flush=True)
    return ok


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def real_check(n_gpu, layouts, steps, margin_clear=0.5, preset="gpt-moe-0.35b-64e", device="cuda",
               sharpen=10.0):
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    dtype = "bfloat16" if device == "cuda" else "float32"   # CPU: a smoke test of this script (interpreter)
    # random weights give nearly flat logits (greedy ties everywhere); a larger tied embedding
    # (`sharpen` x its std) gives peaked ones, so token agreement means something
    m = random_model(config_of(preset), torch.float32, torch.device(device), seed=3)
    m.wte.mul_(sharpen)
    md = save_ft_model(m, d, "bf16" if device == "cuda" else "fp32")
    del m
    _free()
    print(f"{preset}: wrote random {dtype} folder in {time.perf_counter() - t0:.0f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    cfg = ModelConfig.from_dir(md)
    lens = [n for n in (7, 33, 128, 300, 1, 64) if n + steps <= cfg.max_pos_seq_len]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    greedy = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    one = LLM(md, dtype=dtype, device=device, fast=True)
    outs = one.generate(prompts, greedy)
    want_tokens = [o.output_ids for o in outs]
    feed = [torch.tensor([t[len(p) + s] for t, p in zip(want_tokens, prompts)]) for s in range(steps)]
    want = teacher_forced(one.generator.model, one.generator.cache, prompts, feed)
    one.close()
    del one
    _free()
    # the fp32 reference path on the same weights: the error budget of plain bf16
    ref = load_model(md, "float32", device)
    rc = KVCache.for_model(ref.config, 4096, block_size=16, device=device)
    exact = teacher_forced(lambda ids, mt, c, last_only: ref(ids.to(device), mt, c, last_only=last_only), rc,
                           prompts, feed)
    del ref, rc
    _free()
    err_one = max(rel(a, b) for a, b in zip(want, exact))
    top2 = [w.topk(2, dim=-1).values for w in want]
    margins = [(t[:, 0] - t[:, 1]) for t in top2]                # [B] per call
    clear32 = [(e.topk(2, dim=-1).values[:, 0] - e.topk(2, dim=-1).values[:, 1]) > margin_clear for e in exact]
    n_clear32 = sum(int(c.sum()) for c in clear32)
    agree_one = sum(int((w.argmax(-1)[c] == e.argmax(-1)[c]).sum()) for w, e, c in zip(want, exact, clear32))
    print(f"one GPU {dtype} fast path vs fp32 reference: max rel logit error {err_one:.2e}, argmax equal on "
          f"{agree_one}/{n_clear32} steps clear in fp32 (margin > {margin_clear}); one-GPU margins > {margin_clear} "
          f"on {sum(int((mm > margin_clear).sum()) for mm in margins)}/{sum(mm.numel() for mm in margins)}", flush=True)
    ok = True
    for tp, ep, pp in layouts:
        if tp * ep * pp > n_gpu:
            continue
        t0 = time.perf_counter()
        llm = LLM(md, dtype=dtype, device=device, tp=tp, ep=ep, pp=pp, timeout_s=300, fast=True)
        try:
            load_s = time.perf_counter() - t0
            got_tokens = [o.output_ids for o in llm.generate(prompts, greedy)]
            got = teacher_forced(llm.generator.model, llm.generator.cache, prompts, feed)
        finally:
            llm.close()
            del llm
        errs = [rel(a, b) for a, b in zip(got, want)]
        err32 = max(rel(a, b) for a, b in zip(got, exact))
        agree32 = sum(int((a.argmax(-1)[c] == e.argmax(-1)[c]).sum()) for a, e, c in zip(got, exact, clear32))
        clear = agree = 0
        for a, b, m in zip(got, want, margins):
            sel = m > margin_clear
            clear += int(sel.sum())
            agree += int((a.argmax(-1)[sel] == b.argmax(-1)[sel]).sum())
        diverge = []                                             # (row, step, one-GPU margin there)
        for i, (gt, wt, p) in enumerate(zip(got_tokens, want_tokens, prompts)):
            if gt != wt:
                s = next(j for j in range(len(wt)) if gt[j] != wt[j]) - len(p)
                diverge.append((i, s, float(margins[s][i])))
        # a free-running difference is acceptable only where the one-GPU choice was a near tie
        # within the error budget of plain bf16 (vs fp32), the fp32 choice kept wherever it is clear,
        # and free-running differences only where the one-GPU choice was a near tie
        good = (err32 <= 1.5 * err_one + 1e-3 and agree32 >= min(agree_one, n_clear32) and agree == clear
                and all(m <= margin_clear for _, _, m in diverge))
        _free()
        ok &= good
        print(f"{preset} {dtype} tp={tp} ep={ep} pp={pp} (load {load_s:.0f} s): vs fp32 {err32:.2e} (one GPU "
              f"{err_one:.2e}), fp32 argmax kept {agree32}/{n_clear32}; vs one GPU: teacher-forced max rel logit error "
              f"{max(errs):.2e} (median {sorted(errs)[len(errs) // 2]:.2e}), argmax equal on {agree}/{clear} clear "
              f"steps (margin > {margin_clear}); free-running greedy {len(prompts)}x{steps} tokens "
              f"{'equal' if not diverge else 'differ at ' + '; '.join(f'row {i} step {s} (margin {m:.3f})' for i, s, m in diverge)}: {'PASS' if good else 'FAIL'}",
              flush=True)
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--layouts", default="2x1x1,1x2x1,1x1x2,4x1x1,1x4x1,2x2x1")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--preset", default="gpt-moe-0.35b-64e")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script (gloo, interpreter)")
    ap.add_argument("--ranks", type=int, default=None, help="processes available (default: the GPUs)")
    ap.add_argument("--sharpen", type=float, default=10.0, help="scale of the random tied embedding (peaked logits)")
    a = ap.parse_args()
    n = a.ranks or torch.cuda.device_count()
    ok = True
    layouts = [tuple(int(v) for v in s.split("x")) for s in a.layouts.split(",")]
    if a.tiny or not a.real:
        ok &= tiny_check(n, layouts)
    if a.real:
        ok &= real_check(n, layouts, a.steps, preset=a.preset, device=a.device, sharpen=a.sharpen)
    sys.exit(0 if ok else 1)
