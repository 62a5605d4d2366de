"""Host time of deciding a serving step's tokens behind a queued decode step, on a GPU.

Usage (repo root, GPU host): python3 scripts/sampling_probe.py [--rows 1,2,4,16] [--rounds 7]
Per iteration: a stand-in decode step is queued (bf16 matmuls, ~0.7 ms of GPU work), then the
rows' tokens are decided as `ftmoe serve` decides them, then read on the host; the time per
iteration is printed for each way of deciding, interleaved over rounds (median):
  greedy      plain-greedy rows (argmax in one batch): the reference;
  rowwise     sampled rows one by one (process_logits + sample: FTMOE_BATCH_SAMPLING=0);
  together    sampled rows together (generation.decide_together, the default);
  together-blocking   the same with every small host list copied by a blocking copy (which
              synchronises the stream before the sampling kernels are queued: the code before
              `sampling.to_device`).
Sampled rows: temperature 0.8, top-p 0.95, the 0.35B model's vocabulary.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe import generation, sampling  # noqa: E402
from ftmoe.sampling import SamplingParams  # noqa: E402


def _blocking(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


class _Row:
    """The parts of generation.SampleRequest that deciding a token reads."""

    def __init__(self, params: SamplingParams, device):
        self.params, self.bads, self.end_id, self.tokens, self.prompt = params, [], None, [1], [1, 2, 3]
        self.generator = None if params.greedy else params.make_generator(device)

    is_plain_greedy = generation.SampleRequest.is_plain_greedy
    is_plain_sampled = generation.SampleRequest.is_plain_sampled
    _plain = generation.SampleRequest._plain


def _decide(rows, logits, mode: str):
    os.environ["FTMOE_BATCH_SAMPLING"] = "0" if mode == "rowwise" else "1"
    real = sampling.to_device
    if mode == "together-blocking":
        sampling.to_device = generation.to_device = _blocking
    try:
        got = generation.decide_together(rows, logits)
        for i, r in enumerate(rows):
            if i not in got:
                proc = sampling.process_logits(logits[i], r.prompt + r.tokens, len(r.tokens), r.params, None, [])
                got[i] = sampling.sample(proc, r.params, r.generator)
    finally:
        sampling.to_device = generation.to_device = real
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=50048)
    args = ap.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def fake_step():
        x = a
        for _ in range(5):
            x = x @ a
        return x

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        fake_step()
    torch.cuda.synchronize()
    print(f"device {torch.cuda.get_device_name()}: stand-in step {(time.perf_counter() - t) / 20 * 1e3:.3f} ms of GPU work")
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=8)
    greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8)
    modes = ("greedy", "rowwise", "together", "together-blocking")
    for R in (int(x) for x in args.rows.split(",")):
        logits = torch.randn(R, args.vocab, device=dev) * 3
        rows = {m: [_Row(greedy if m == "greedy" else sampled, dev) for _ in range(R)] for m in modes}
        times = {m: [] for m in modes}
        for m in modes:                                  # warm-up (kernels, allocator)
            for _ in range(3):
                fake_step()
                _decide(rows[m], logits, m)
        for _ in range(args.rounds):
            for m in modes:
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.iters):
                    fake_step()
                    _decide(rows[m], logits, m)       # every way ends with its tokens on the host
                times[m].append((time.perf_counter() - t) / args.iters * 1e3)
        base = statistics.median(times["greedy"])
        for m in modes:
            med = statistics.median(times[m])
            print(f"R={R:<3d} {m:18s} {med:7.3f} ms per step  (spread {max(times[m]) - min(times[m]):.3f})"
                  f"  +{med - base:6.3f} ms over greedy")


if __name__ == "__main__":
    main()
