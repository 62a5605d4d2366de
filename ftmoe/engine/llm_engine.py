"""LLMEngine: the synchronous continuous-batching core (one thread drives it; not thread-safe).

In:  a model with GPTMoE's call signature (`model(ids [B, T], meta, cache, last_only=True)
     -> fp32 logits [B, V]`, plus .config/.dtype/.device; GPTMoE, FastGPTMoE or
     DistributedModel); requests via `add_request(id, prompt_ids, SamplingParams)`, `abort(id)`.
Out: `step()` -> the `TokenEvent`s of one iteration: one per sequence that ran (its next
     token; `finished` with "stop" / "length" on its last one) plus a final token-less
     "abort" event per request aborted (or failed) since the previous step.

Each step is at most two model calls, so FastGPTMoE stays on its fast paths: one prefill call
for the sequences the scheduler admitted (context 0, right-padded [B, T]) and one decode call
(one token per running sequence), or, when nothing waits and every running request decodes
plain-greedy, one greedy chunk of up to `decode_chunk` steps back to back on the GPU (vLLM's
multi-step decoding; same tokens as single steps). Sampling, stop words, min_length, end_id, the context limit
and seeds are generation.py's per-request sampler (`SampleRequest`), so a request's tokens
equal `Generator.generate`'s for the same prompt and params, whatever it is batched with and
however often it is preempted (a preempted sequence is re-prefilled from prompt + generated
tokens and its sampler, torch.Generator included, continues where it stopped).
KV blocks are taken as sequences grow and freed the moment a request finishes, is aborted
or is preempted (see scheduler.py for the policy). If a model call raises, the requests of
that call end with an "abort" event, their blocks are freed, the error is logged and kept
for `pop_error(id)`; the other requests carry on.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import OrderedDict

import torch

from ..errors import FtmoeError, RequestError
from ..generation import (SampleRequest, check_prompt, decide_together, decode_chunk_steps, greedy_chunk_result,
                          max_new_tokens_for, resolve_end_id, run_greedy_chunk, start_greedy_chunk)
from ..kv_cache import KVCache
from ..sampling import SamplingParams
from .metrics import Metrics
from .scheduler import QueueFullError, Request, Scheduler

log = logging.getLogger(__name__)
KV_MEMORY_FRACTION = 0.8        # default cache on CUDA: this share of the free GPU memory


@dataclasses.dataclass
class TokenEvent:
    request_id: str
    token_id: int | None          # None only for a final event that carries no token (abort)
    logprob: float | None         # log prob of token_id (sampling.py's definition)
    finished: bool
    finish_reason: str | None     # "stop" | "length" | "abort"
    prompt_length: int
    num_generated: int            # tokens generated so far, this one included


def default_kv_tokens(model, max_num_seqs: int) -> int:
    """CUDA: KV_MEMORY_FRACTION of the free memory (counting every layer and head, which is
    conservative for a shard), at most max_num_seqs full contexts; elsewhere 4 contexts."""
    cfg = model.config
    cap = max_num_seqs * cfg.max_pos_seq_len
    dev = torch.device(model.device)
    if dev.type != "cuda":
        return min(cap, 4 * cfg.max_pos_seq_len)
    free, _ = torch.cuda.mem_get_info(dev)
    per_token = KVCache.bytes_per_token(cfg, model.dtype)
    return max(cfg.max_pos_seq_len, min(cap, int(free * KV_MEMORY_FRACTION) // per_token))


class LLMEngine:
    def end_id_for(self, params: SamplingParams) -> int | None:
        return resolve_end_id(self.config, params)

    def _max_gen(self, prompt_len: int, params: SamplingParams) -> int:
        return max_new_tokens_for(self.config, prompt_len, params)

    def __init__(self, model, *, kv_cache_tokens: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, max_queue: int = 1024,
                 decode_chunk: int | None = None):
        """decode_chunk: greedy steps run back to back per engine step when only plain-greedy
        decodes run and nothing waits (default FTMOE_DECODE_CHUNK, 8; 1 = one step at a time)."""
        self.model = model
        self.config = cfg = model.config
        if decode_chunk is None:
            decode_chunk = decode_chunk_steps()
        elif not isinstance(decode_chunk, int) or not 1 <= decode_chunk <= 32:
            raise FtmoeError(f"engine option decode_chunk must be an integer 1..32, found {decode_chunk!r}")
        self.decode_chunk = decode_chunk
        # greedy chunks queued one ahead of the host (FTMOE_CHUNK_OVERLAP=0: each one waited for)
        self.overlap_chunks = os.environ.get("FTMOE_CHUNK_OVERLAP", "1") != "0"
        self._pending = None     # (requests, chunk, steps): a queued greedy chunk whose tokens are not read yet
        for name, v, lo in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                            ("max_queue", max_queue, 0), ("max_num_batched_tokens", max_num_batched_tokens,
                                                          cfg.max_pos_seq_len)):
            if not isinstance(v, int) or v < lo:
                raise FtmoeError(f"engine option {name} must be an integer >= {lo}"
                                 f"{' (the model context: a prompt must fit one step)' if lo > 1 else ''}, "
                                 f"found {v!r}")
        tokens = kv_cache_tokens if kv_cache_tokens is not None else default_kv_tokens(model, max_num_seqs)
        if not isinstance(tokens, int) or tokens < 1:
            raise FtmoeError(f"engine option kv_cache_tokens must be an integer >= 1, found {tokens!r}")
        if hasattr(model, "make_cache"):    # a distributed model keeps its cache shards on every rank
            self.cache = model.make_cache(tokens, block_size)
        else:
            self.cache = KVCache.for_model(cfg, tokens, block_size, dtype=model.dtype, device=model.device)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, max_queue)
        self.metrics = Metrics()
        self._reqs: dict[str, Request] = {}           # every unfinished request
        self._events: list[TokenEvent] = []           # abort events for the next step
        self._errors: OrderedDict[str, BaseException] = OrderedDict()
        self._arrivals = 0
        self._counts = {"finished": 0, "aborted": 0, "generated_tokens": 0}

    @property
    def max_model_len(self) -> int:
        return self.config.max_pos_seq_len

    # ---- requests ----------------------------------------------------------------------
    def check_request(self, request_id: str, prompt_ids, params: SamplingParams,
                      check_duplicate: bool = True) -> list[int]:
        """Validate without changing anything; returns the prompt as a list of ints."""
        cfg = self.config
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request id must be a non-empty string, found {request_id!r:.80}")
        if check_duplicate and request_id in self._reqs:
            raise RequestError(f"request id {request_id!r} is already in use by an unfinished request")
        ids = check_prompt(cfg, prompt_ids, params)
        if params.beam_width > 1:
            raise RequestError(f"beam_width {params.beam_width} is not served by the engine (it samples one "
                               f"sequence per request); use the offline Generator / LLM for beam search")
        new = self._max_gen(len(ids), params)
        need = self.cache.blocks_for(len(ids) + new)
        if need > self.cache.num_blocks:
            bs = self.cache.block_size
            raise RequestError(f"request needs {need * bs} KV-cache tokens (prompt {len(ids)} + {new} new); the "
                               f"engine's cache holds {self.cache.num_blocks * bs} (raise kv_cache_tokens)")
        return ids

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        ids = self.check_request(request_id, prompt_ids, params)
        if len(self.scheduler.waiting) >= self.scheduler.max_queue:
            raise QueueFullError(f"the request queue is full ({self.scheduler.max_queue} waiting); retry later")
        self._arrivals += 1
        sampler = SampleRequest(ids, params, self.end_id_for(params), self._max_gen(len(ids), params),
                                 self.cache, self._arrivals, self.model.device)
        req = Request(request_id, self._arrivals, sampler, time.monotonic())
        self.scheduler.add(req)
        self._reqs[request_id] = req

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now; its final 'abort' event comes with the next step."""
        req = self._reqs.get(request_id)
        if req is not None:
            self._end_without_token(req)

    def abort_all(self, error: BaseException | None = None) -> None:
        """Abort every unfinished request (with `error` kept for `pop_error`, when given)."""
        for req in list(self._reqs.values()):
            if error is not None:
                self._keep_error(req.request_id, error)
            self._end_without_token(req)

    def pop_error(self, request_id: str) -> BaseException | None:
        """The exception that ended a request with 'abort' (a failed model call), if any."""
        return self._errors.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._reqs or self._events)

    def stats(self) -> dict:
        used = self.cache.num_blocks - self.cache.num_free_blocks
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_blocks_used": used, "kv_blocks_total": self.cache.num_blocks,
                "preemptions": self.scheduler.preemptions, **self._counts}

    # ---- one iteration -----------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events, self._events = self._events, []
        if self._pending is not None:            # a chunk runs: queue the next behind it, then read it
            events += self._advance_pending()
        else:
            events += self._schedule_and_run()
        self.scheduler.drop_finished()
        events += self._events                  # requests failed during this step
        self._events = []
        return events

    def _schedule_and_run(self) -> list[TokenEvent]:
        """The scheduler's batch: its prefill, then its decode (a greedy chunk where one can run)."""
        events = []
        batch = self.scheduler.schedule()
        if batch.prefill:
            rows = [r.prefill_ids() for r in batch.prefill]
            lens = [len(x) for x in rows]
            ids = torch.zeros(len(rows), max(lens), dtype=torch.long)             # [B, T] right-padded
            for b, x in enumerate(rows):
                ids[b, :lens[b]] = torch.tensor(x, dtype=torch.long)
            events += self._run(batch.prefill, ids, lens)
        chunk = None
        if batch.decode and not batch.prefill and not self.scheduler.waiting:
            chunk = self._greedy_chunk(batch.decode)
        if chunk is not None:
            events += chunk
        elif batch.decode:
            ids = torch.tensor([[r.sampler.tokens[-1]] for r in batch.decode], dtype=torch.long)   # [B, 1]
            events += self._run(batch.decode, ids, [1] * len(batch.decode))
        return events

    def _run(self, reqs: list[Request], ids: torch.Tensor, lens: list[int]) -> list[TokenEvent]:
        try:
            meta = self.cache.prepare([r.seq_id for r in reqs], lens)
            with torch.no_grad():
                logits = self.model(ids.to(meta.positions.device), meta, self.cache, last_only=True)   # [B, V]
        except Exception as e:  # noqa: BLE001 - the requests of this call fail, the engine goes on
            log.exception("model call failed for %d request(s); aborting them", len(reqs))
            for r in reqs:
                self._fail(r, e)
            return []
        now = time.monotonic()
        out = []
        decided = decide_together([r.sampler for r in reqs], logits)
        for b, r in enumerate(reqs):
            try:
                if b in decided:
                    tok, lp, done, reason = r.sampler.accept(*decided[b])[0]
                else:
                    tok, lp, done, reason = r.sampler.step(logits[b:b + 1])[0]
            except Exception as e:  # noqa: BLE001
                log.exception("sampling failed for request %r; aborting it", r.request_id)
                self._fail(r, e)
                continue
            self._emit(r, tok, lp, done, reason, now, out)
        return self._counted(now, out)

    def _greedy_chunk(self, reqs: list[Request]) -> list[TokenEvent] | None:
        """vLLM's multi-step decoding for plain-greedy batches: up to `decode_chunk` steps on the
        GPU per engine step (`generation.run_greedy_chunk`), taken only when nothing waits, so a
        new request waits at most one chunk for its prefill. The tokens are accepted in step order
        as single steps would accept them (a request that stops inside the chunk drops the later
        ones), so outputs equal single steps'; a stream receives the chunk's tokens together.
        None: single steps run (a sampled request, too few tokens left or blocks free, no chunks
        on this model); a failed chunk aborts its requests like a failed step."""
        overlap = self.overlap_chunks and hasattr(self.model, "greedy_chunk_start")
        try:
            if overlap:
                started = start_greedy_chunk(self.model, self.cache, [r.sampler for r in reqs], self.decode_chunk)
                if started is not None:            # its tokens come with the next engine step
                    self._pending = (reqs, *started)
                    return []
                return None
            got = run_greedy_chunk(self.model, self.cache, [r.sampler for r in reqs], self.decode_chunk)
        except Exception as e:  # noqa: BLE001 - the requests of this call fail, the engine goes on
            return self._chunk_failed(reqs, e)
        return None if got is None else self._accept_chunk(reqs, *got)

    def _chunk_failed(self, reqs: list[Request], e: Exception) -> list[TokenEvent]:
        """A failed greedy chunk aborts its requests still running, like a failed step."""
        log.exception("greedy chunk failed for %d request(s); aborting them", len(reqs))
        for r in reqs:
            if r.status == "running":
                self._fail(r, e)
        return []

    def _advance_pending(self) -> list[TokenEvent]:
        """The queued chunk's tokens, read once it has run; before that, while nothing waits and
        its requests are still the running set, the next chunk is queued behind it, continuing
        from its last tokens on the GPU (the GPU then runs while the host accepts these tokens)."""
        reqs, chunk, steps = self._pending
        self._pending = None
        nxt = None
        try:
            if (not self.scheduler.waiting and all(r.status == "running" for r in reqs)
                    and len(self.scheduler.running) == len(reqs)):
                nxt = start_greedy_chunk(self.model, self.cache, [r.sampler for r in reqs], self.decode_chunk,
                                         after=chunk, ahead=steps)
            got = greedy_chunk_result(self.model, chunk)
        except Exception as e:  # noqa: BLE001 - the requests of this call fail, the engine goes on
            return self._chunk_failed(reqs, e)
        events = self._accept_chunk(reqs, *got)
        if nxt is not None:
            self._pending = (reqs, *nxt)
        return events

    def _accept_chunk(self, reqs: list[Request], toks: list, lps: list | None) -> list[TokenEvent]:
        """A chunk's tokens accepted in step order, as single steps would accept them (a request
        that stopped, or was aborted, takes none of its later tokens)."""
        now = time.monotonic()
        out = []
        for j in range(len(toks)):
            for b, r in enumerate(reqs):
                if r.status != "running":
                    continue
                self._emit(r, *r.sampler.accept(toks[j][b], lps[j][b] if lps else 0.0)[0], now, out)
        return self._counted(now, out)

    def _emit(self, r: Request, tok: int, lp: float, done: bool, reason: str | None, now: float,
              out: list[TokenEvent]) -> None:
        """A token the request's sampler accepted: timing, its event, the request's end."""
        self._observe(r, now)
        out.append(TokenEvent(r.request_id, tok, lp, done, reason, r.prompt_length, r.num_generated))
        if done:
            self._finish(r, reason)

    def _counted(self, now: float, out: list[TokenEvent]) -> list[TokenEvent]:
        self.metrics.tokens(now, len(out))
        self._counts["generated_tokens"] += len(out)
        return out

    def _observe(self, r: Request, now: float) -> None:
        if r.first_token_time is None:
            r.first_token_time = now
            self.metrics.first_token(now - r.arrival_time)
        else:
            self.metrics.inter_token(now - r.last_token_time)
        r.last_token_time = now

    def _finish(self, r: Request, reason: str) -> None:
        r.status = "finished"                   # the sampler has freed its blocks already
        self.cache.free(r.seq_id)
        del self._reqs[r.request_id]
        self._counts["finished"] += 1
        self.metrics.finished(reason)

    def _fail(self, r: Request, e: BaseException) -> None:
        self._keep_error(r.request_id, e)
        self._end_without_token(r)

    def _keep_error(self, request_id: str, e: BaseException) -> None:
        self._errors[request_id] = e
        while len(self._errors) > 1024:         # nobody pops them in a synchronous loop
            self._errors.popitem(last=False)

    def _end_without_token(self, r: Request) -> None:
        self.scheduler.remove(r)                # frees its blocks
        del self._reqs[r.request_id]
        self._counts["aborted"] += 1
        self.metrics.finished("abort")
        self._events.append(TokenEvent(r.request_id, None, None, True, "abort", r.prompt_length,
                                       r.num_generated))
