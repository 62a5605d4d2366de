"""Iteration-level scheduler: which sequences run in the next engine step.

In:  `Request`s (one per served request: its sampler state from generation.py, its KV-cache
     sequence id, its arrival number) put on the waiting queue by the engine; the shared
     `KVCache` (free blocks); the limits max_num_seqs, max_num_batched_tokens, max_queue.
Out: `schedule()` -> `Batch(prefill, decode, preempted)`: the sequences newly admitted this
     step (each to be prefilled from context 0 with `prefill_ids()`), the running sequences
     that decode one token each, and the sequences preempted this step (already freed and
     back at the front of the waiting queue).

Policy (first come, first served; preemption by recompute, newest first):
1. Decodes first. Running sequences are visited oldest first; each needs 0 or 1 new block
   for its next token. When the free blocks cannot cover it, the newest running sequence
   is preempted (its blocks are freed at once; it goes back to the front of the queue with
   prompt + generated tokens as its prompt and its sampler state untouched), repeatedly,
   until the sequence fits; if it is itself the newest, it is preempted.
2. Then admissions, only in a step without preemption: waiting requests are taken in queue
   order (never skipping the head, so none starves) while
     running + admitted <= max_num_seqs,
     decodes + admitted * longest admitted prompt <= max_num_batched_tokens  (the padded
         [B, T] prefill plus one token per decode: what the two model calls really compute),
     blocks for the admitted prompts + the decodes' new blocks + a watermark (1% of the
         cache, waived when nothing else runs) <= free blocks.
Every request accepted by the engine fits the cache alone (prompt + all its new tokens), and
max_num_batched_tokens >= the model's context, so the queue head is always admitted once the
sequences ahead of it finish: nothing is lost, nothing waits forever.
Running and waiting both stay in arrival order (all running requests arrived before all
waiting ones), so "newest" is simply the end of the running list.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from ..errors import FtmoeError
from ..kv_cache import KVCache


class QueueFullError(FtmoeError):
    """The waiting queue holds max_queue requests (HTTP 503: retry later)."""


class Request:
    """One served request: the sampler (generation.py's per-request state) plus scheduling data."""

    __slots__ = ("request_id", "arrival", "sampler", "status", "arrival_time", "first_token_time",
                 "last_token_time", "preemptions")

    def __init__(self, request_id: str, arrival: int, sampler, arrival_time: float):
        self.request_id, self.arrival, self.sampler = request_id, arrival, sampler
        self.status = "waiting"                 # waiting | running | finished
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.preemptions = 0

    @property
    def seq_id(self) -> int:
        return self.sampler.seq_id

    @property
    def prompt_length(self) -> int:
        return len(self.sampler.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.sampler.tokens)

    @property
    def num_prefill(self) -> int:
        return len(self.sampler.prompt) + len(self.sampler.tokens)

    def prefill_ids(self) -> list[int]:
        """What a (re)admission feeds: the prompt and every token generated so far."""
        return self.sampler.prompt + self.sampler.tokens


@dataclasses.dataclass
class Batch:
    prefill: list[Request]
    decode: list[Request]
    preempted: list[Request]


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int, max_queue: int,
                 watermark: float = 0.01):
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens, self.max_queue = max_num_seqs, max_num_batched_tokens, max_queue
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    # ---- queue -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        req.status = "waiting"
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take an unfinished request out (abort, failure); its blocks are freed at once."""
        where = self.waiting if req.status == "waiting" else self.running if req.status == "running" else None
        if where is not None and req in where:
            where.remove(req)
        self.cache.free(req.seq_id)
        req.status = "finished"

    def drop_finished(self) -> None:
        self.running = [r for r in self.running if r.status == "running"]

    # ---- one iteration -----------------------------------------------------------------
    def _decode_blocks(self, req: Request) -> int:
        n = self.cache.length(req.seq_id)
        return self.cache.blocks_for(n + 1) - self.cache.blocks_for(n)

    def _preempt(self, req: Request) -> None:
        self.cache.free(req.seq_id)
        req.status = "waiting"
        req.preemptions += 1
        self.preemptions += 1

    def schedule(self) -> Batch:
        cache = self.cache
        pending = deque(self.running)             # oldest first
        decode: list[Request] = []
        preempted: list[Request] = []
        reserved = 0                              # blocks the decode call will take
        while pending:
            req = pending.popleft()
            need = self._decode_blocks(req)
            while reserved + need > cache.num_free_blocks:
                victim = pending.pop() if pending else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                decode.append(req)
                reserved += need
        for req in sorted(preempted, key=lambda r: r.arrival, reverse=True):
            self.waiting.appendleft(req)          # the oldest victim ends up first

        prefill: list[Request] = []
        if not preempted:
            free = cache.num_free_blocks - reserved
            longest = 0
            while self.waiting:
                req = self.waiting[0]
                n = req.num_prefill
                if len(decode) + len(prefill) + 1 > self.max_num_seqs:
                    break
                if len(decode) + (len(prefill) + 1) * max(longest, n) > self.max_num_batched_tokens:
                    break
                blocks = cache.blocks_for(n)
                if blocks + (self.watermark_blocks if decode or prefill else 0) > free:
                    break
                self.waiting.popleft()
                cache.add(req.seq_id)
                req.status = "running"
                prefill.append(req)
                free -= blocks
                longest = max(longest, n)
        self.running = decode + prefill
        return Batch(prefill, decode, preempted)
