"""A CPU stand-in for the GPU's greedy chunks (`FastGPTMoE.greedy_chunk`), for the callers' tests.

In:  a reference `GPTMoE`. Out: the same model with `greedy_chunk`: each chunk's steps run one
at a time from the chunk's metadata as the GPU's advance kernel moves it
(`AttnMetadata.chunk_step`), each step's argmax fed to the next, so the Generator's and the
serving engine's chunk paths (KV reservation, accepting tokens in step order, stops inside a
chunk) run on the CPU. `chunks` records (rows, steps) of every chunk run. `greedy_chunk_start`
/ `greedy_chunk_result` are the queued form the serving engine overlaps with its host work: here
a chunk runs when started, and one started `after` another continues from its last tokens.
"""
from __future__ import annotations

import torch


class StepwiseChunks:
    def __init__(self, model):
        self.model, self.config, self.dtype, self.device = model, model.config, model.dtype, model.device
        self.chunks = []
        self.started = []          # per started chunk: whether it continued the one before

    def __call__(self, *a, **kw):
        return self.model(*a, **kw)

    def greedy_chunk(self, ids, meta, cache, steps, logprobs=False):
        self.chunks.append((ids.shape[0], steps))
        toks, lps = [], []
        tok = ids.reshape(-1)
        for j in range(steps):
            logits = self.model(tok[:, None], meta.chunk_step(j, cache.block_size), cache, last_only=True)
            tok = logits.argmax(-1)
            toks.append(tok)
            lps.append(torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])
        return torch.stack(toks), torch.stack(lps) if logprobs else None

    def greedy_chunk_start(self, ids, meta, cache, steps, logprobs=False, after=None):
        if after is not None:
            ids = after["toks"][-1]
        elif ids is None:
            raise ValueError("a greedy chunk needs token ids unless it continues another")
        toks, lps = self.greedy_chunk(ids, meta, cache, steps, logprobs)
        self.started.append(after is not None)
        return {"toks": toks, "lps": lps}

    def greedy_chunk_result(self, chunk):
        return chunk["toks"], chunk["lps"]
