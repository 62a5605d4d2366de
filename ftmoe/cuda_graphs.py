"""CUDA graphs for the decode step, one per batch-size bucket, sharing one memory pool.

In:  a `FastGPTMoE`, the `KVCache` it decodes into, and per step the rows' token ids,
     positions, block tables, context lengths and slots.
Out: logits [B, V] from replaying the graph of the smallest bucket >= B; rows past B are
     padding (slot -1, context 0), so they read and write no cache.

A graph bakes in the cache tensors and the block-table width, so a runner belongs to one
cache; inputs are copied into static buffers before each replay (no allocation per step).
On a shard of a parallel model the graphs hold its collectives (NCCL is captured), every
rank captures and replays the same buckets in the same order, and a pipeline stage after
the first takes the residual [B, H] instead of token ids.
"""
from __future__ import annotations

import torch

from .fast_model import FastGPTMoE
from .kv_cache import KVCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class DecodeGraphs:
    def __init__(self, fast: FastGPTMoE, cache: KVCache, max_blocks_per_seq: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.fast, self.cache = fast, cache
        self.nb = max_blocks_per_seq
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = None

    def bucket_for(self, B: int) -> int:
        for b in self.buckets:
            if b >= B:
                return b
        raise ValueError(f"batch {B} is larger than the largest graph bucket {self.buckets[-1]}")

    def _static(self, B: int) -> dict:
        dev = self.fast.device
        first = self.fast.par.is_first_stage
        return {"ids": torch.zeros(B, dtype=torch.long, device=dev) if first else
                torch.zeros(B, self.fast.H, dtype=self.fast.dtype, device=dev),
                "positions": torch.zeros(B, dtype=torch.long, device=dev),
                "tables": torch.zeros(B, self.nb, dtype=torch.int32, device=dev),
                "ctx": torch.zeros(B, dtype=torch.int32, device=dev),
                "slots": torch.full((B,), -1, dtype=torch.int32, device=dev)}

    def _run(self, s: dict) -> torch.Tensor:
        return self.fast.decode_step(s["ids"], s["positions"], s["tables"], s["ctx"], s["slots"], self.cache)

    @torch.inference_mode()
    def capture(self, B: int) -> None:
        if B in self.graphs:
            return
        s = self._static(B)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):          # warm up: compile kernels, pick cuBLAS algorithms
                self._run(s)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self._run(s)
        if self.pool is None:
            self.pool = g.pool()
        self.graphs[B] = (g, s, out)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
             context_lens: torch.Tensor, slots: torch.Tensor, min_rows: int = 0) -> torch.Tensor:
        """min_rows: replay a bucket of at least this many rows (expert-parallel ranks must agree)."""
        B = ids.shape[0]
        bucket = self.bucket_for(max(B, min_rows))
        self.capture(bucket)
        g, s, out = self.graphs[bucket]
        s["ids"][:B].copy_(ids)
        s["positions"][:B].copy_(positions)
        s["tables"][:B, : block_tables.shape[1]].copy_(block_tables)
        s["ctx"][:B].copy_(context_lens)
        s["slots"][:B].copy_(slots)
        if B < bucket:
            s["slots"][B:].fill_(-1)
            s["ctx"][B:].fill_(0)
        g.replay()
        return out[:B]
