"""Batched generation on one paged KV cache: sampling, greedy and beam search, streaming.

In:  a `GPTMoE`, prompts (lists of token ids, different lengths) and one `SamplingParams`
     per prompt (or one for all).
Out: `Generator.generate` -> one `GenerationOutput` per prompt, in order;
     `Generator.stream` -> `StreamEvent`s (request index, token id, log prob, finished flag)
     as tokens are produced.

How a batch runs: the prompts are prefilled in one right-padded forward
(`cache.prepare(ids, lengths)`), then every step feeds one token (T=1) for each unfinished
sequence (one row per sampling request, one per alive beam). Each request samples with its
own params and its own `torch.Generator` (seeded by `seed`), which draws exactly one number
per step, so a request's tokens do not depend on what it is batched with. If the batch's
worst case (prompt + max_new_tokens per sequence, 2x for beams' reorders) does not fit the
cache (`max_batch_tokens`), it runs in consecutive waves. A request finishes on end_id
(unless `ignore_eos`) or a stop word ("stop"; the token stays in `output_ids`), or after
`max_new_tokens` or at the model's `max_pos_seq_len` total tokens ("length"); its cache
blocks are freed at once, and every block is freed on exceptions or when a stream is
closed early. Beam requests stream their best hypothesis's tokens when they finish.
Not thread-safe: one Generator runs one batch at a time.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Iterator, Sequence

import torch

from .beam_search import BeamRequest
from .errors import FtmoeError, RequestError
from .kv_cache import KVCache
from .sampling import SamplingParams, ends_with_word, process_logits, sample, sample_rows, to_device, tokens_to_host


@dataclasses.dataclass
class GenerationOutput:
    """FT-style result. For beam_width > 1 every field except prompt_length is a list over
    beams, best first (by cum_log_prob / generated_length ** len_penalty)."""

    output_ids: list[int] | list[list[int]]              # prompt + generated
    sequence_length: int | list[int]                     # len(output_ids)
    cum_log_probs: float | list[float] | None            # None unless return_log_probs
    output_log_probs: list[float] | list[list[float]] | None
    finish_reason: str | list[str]                       # "stop" or "length"
    prompt_length: int
    scores: list[float] | None = None                    # beams: normalised scores
    text: str | list[str] | None = None                  # set by LLM (generated part)

    @property
    def generated_ids(self) -> list[int] | list[list[int]]:
        if self.output_ids and isinstance(self.output_ids[0], list):
            return [ids[self.prompt_length:] for ids in self.output_ids]
        return self.output_ids[self.prompt_length:]


@dataclasses.dataclass
class StreamEvent:
    index: int                  # which prompt of the batch
    token_id: int
    logprob: float
    finished: bool
    finish_reason: str | None = None


class SampleRequest:
    def __init__(self, prompt: list[int], params: SamplingParams, end_id: int | None, max_gen: int,
                 cache: KVCache, seq_id: int, device: torch.device):
        self.prompt, self.params, self.end_id, self.max_gen = prompt, params, end_id, max_gen
        self.cache, self.seq_id = cache, seq_id
        self.stops = params.word_ids("stop_words")
        self.bads = params.word_ids("bad_words")
        self.generator = None if params.greedy else params.make_generator(device)
        self.tokens: list[int] = []
        self.log_probs: list[float] = []
        self.finish_reason: str | None = None
        self.done = False

    def rows(self) -> list[tuple[int, int]]:
        return [(self.seq_id, self.tokens[-1])]

    def release(self) -> None:
        self.cache.free(self.seq_id)

    def is_plain_greedy(self) -> bool:
        """This step's token is argmax(logits / temperature): no penalty, ban or min_length applies,
        so a batch of such rows can be decided at once (see the serving engine)."""
        return self.params.greedy and self._plain()

    def is_plain_sampled(self) -> bool:
        """This step samples from softmax(logits / temperature) truncated by top-k / top-p alone: no
        penalty, ban or min_length applies, so such rows can be sampled together (`sample_rows`)."""
        return not self.params.greedy and self._plain()

    def _plain(self) -> bool:
        """No ban, penalty or pending min_length changes this step's logits past the temperature."""
        p = self.params
        return (not self.bads and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                and (self.end_id is None or len(self.tokens) >= p.min_length))

    def step(self, logits: torch.Tensor) -> list[tuple[int, float, bool, str | None]]:
        seq = self.prompt + self.tokens
        proc = process_logits(logits[0], seq, len(self.tokens), self.params, self.end_id, self.bads)
        return self.accept(*sample(proc, self.params, self.generator))

    def accept(self, tok: int, lp: float) -> list[tuple[int, float, bool, str | None]]:
        """Record a chosen token; returns [(token, log prob, finished, finish reason)]."""
        seq = self.prompt + self.tokens
        self.tokens.append(tok)
        self.log_probs.append(lp)
        reason = None
        if tok == self.end_id and not self.params.ignore_eos:
            reason = "stop"
        elif self.stops and ends_with_word(seq + [tok], self.stops):
            reason = "stop"
        elif len(self.tokens) >= self.max_gen:
            reason = "length"
        if reason is not None:
            self.finish_reason, self.done = reason, True
            self.release()
        return [(tok, lp, self.done, reason)]

    def output(self) -> GenerationOutput:
        lp = self.params.return_log_probs
        ids = self.prompt + self.tokens
        return GenerationOutput(ids, len(ids), sum(self.log_probs) if lp else None,
                                list(self.log_probs) if lp else None, self.finish_reason or "length",
                                len(self.prompt))


class _BeamAdapter(BeamRequest):
    """BeamRequest with the generator's request interface (events, output)."""

    def step(self, logits: torch.Tensor) -> list[tuple[int, float, bool, str | None]]:
        super().step(logits)
        if not self.done:
            return []
        hyps = self.hypotheses()
        if not hyps:
            return []
        best = hyps[0]
        n = len(best.tokens)
        return [(t, lp, i == n - 1, best.finish_reason if i == n - 1 else None)
                for i, (t, lp) in enumerate(zip(best.tokens, best.log_probs))]

    @property
    def seq_id(self) -> int:
        return self.slots[0]

    def output(self) -> GenerationOutput:
        hyps = self.hypotheses()
        lp = self.params.return_log_probs
        ids = [self.prompt + h.tokens for h in hyps]
        return GenerationOutput(ids, [len(x) for x in ids], [h.cum_log_prob for h in hyps] if lp else None,
                                [list(h.log_probs) for h in hyps] if lp else None,
                                [h.finish_reason for h in hyps], len(self.prompt), [h.score for h in hyps])


class Generator:
    def __init__(self, model, max_batch_tokens: int | None = None, block_size: int = 16):
        """max_batch_tokens: KV-cache capacity in tokens, shared by all sequences of a wave
        (default 4 x max_pos_seq_len)."""
        self.model = model
        self.config = model.config
        cap = max_batch_tokens if max_batch_tokens is not None else 4 * self.config.max_pos_seq_len
        if hasattr(model, "make_cache"):   # a distributed model keeps its cache shards on every rank
            self.cache = model.make_cache(cap, block_size)
        else:
            self.cache = KVCache.for_model(self.config, cap, block_size, dtype=model.dtype, device=model.device)
        self._next_seq = 0
        self.decode_chunk = decode_chunk_steps()

    # ---- public ------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        reqs_in = self._check(prompts, params)
        outputs: list[GenerationOutput | None] = [None] * len(reqs_in)
        for _ in self._run(reqs_in, outputs):
            pass
        return outputs  # type: ignore[return-value]

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Events as tokens are produced. Validation happens before the first event."""
        reqs_in = self._check(prompts, params)
        return self._run(reqs_in, [None] * len(reqs_in))

    def end_id_for(self, params: SamplingParams) -> int | None:
        return resolve_end_id(self.config, params)

    # ---- validation --------------------------------------------------------------
    def _check(self, prompts, params) -> list[tuple[list[int], SamplingParams]]:
        cfg = self.config
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        out = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            where = f"request {i}: " if len(prompts) > 1 else ""
            ids = check_prompt(cfg, prompt, p, where)
            need = self._blocks_needed(len(ids), p)
            if need > self.cache.num_blocks:
                bs = self.cache.block_size
                raise RequestError(f"{where}needs {need * bs} KV-cache tokens (prompt {len(ids)} + "
                                   f"{self._max_gen(len(ids), p)} new, beam_width {p.beam_width}); the generator "
                                   f"holds {self.cache.num_blocks * bs} (raise max_batch_tokens)")
            out.append((ids, p))
        return out

    def _max_gen(self, prompt_len: int, p: SamplingParams) -> int:
        return max_new_tokens_for(self.config, prompt_len, p)

    def _blocks_needed(self, prompt_len: int, p: SamplingParams) -> int:
        per_seq = self.cache.blocks_for(prompt_len + self._max_gen(prompt_len, p))
        return per_seq if p.beam_width == 1 else 2 * p.beam_width * per_seq

    # ---- running -----------------------------------------------------------------
    def _new_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _waves(self, reqs: list[tuple[list[int], SamplingParams]]) -> Iterator[list[int]]:
        wave, used = [], 0
        for i, (ids, p) in enumerate(reqs):
            need = self._blocks_needed(len(ids), p)
            if wave and used + need > self.cache.num_blocks:
                yield wave
                wave, used = [], 0
            wave.append(i)
            used += need
        if wave:
            yield wave

    def _make(self, ids: list[int], p: SamplingParams):
        end_id, max_gen = self.end_id_for(p), self._max_gen(len(ids), p)
        if p.beam_width > 1:
            return _BeamAdapter(ids, p, end_id, max_gen, self.cache, [self._new_seq() for _ in range(p.beam_width)])
        return SampleRequest(ids, p, end_id, max_gen, self.cache, self._new_seq(), self.model.device)

    def _forward(self, ids: torch.Tensor, seq_ids: list[int], lens: list[int]) -> torch.Tensor:
        meta = self.cache.prepare(seq_ids, lens)
        with torch.no_grad():
            return self.model(ids.to(meta.positions.device), meta, self.cache, last_only=True)   # [B, V]

    def _greedy_chunk(self, active: list) -> list[StreamEvent] | None:
        """Up to `decode_chunk` greedy steps for every active request at once (`run_greedy_chunk`),
        accepted on the host token by token in step order, as single steps would be: a request
        that ends inside the chunk ignores the chunk's later tokens (their KV is freed with it).
        None when a single step must run instead."""
        got = run_greedy_chunk(self.model, self.cache, [r for _, r in active], self.decode_chunk)
        if got is None:
            return None
        toks, lps = got
        events = []
        for j in range(len(toks)):
            for b, (i, r) in enumerate(active):
                if not r.done:
                    events += [StreamEvent(i, *ev) for ev in r.accept(toks[j][b], lps[j][b] if lps else 0.0)]
        return events

    def _run(self, reqs_in, outputs: list) -> Iterator[StreamEvent]:
        for wave in self._waves(reqs_in):
            reqs = []
            try:
                for i in wave:
                    reqs.append(self._make(*reqs_in[i]))
                    self.cache.add(reqs[-1].seq_id)
                lens = [len(r.prompt) for r in reqs]
                ids = torch.zeros(len(reqs), max(lens), dtype=torch.long)
                for b, r in enumerate(reqs):
                    ids[b, :lens[b]] = torch.tensor(r.prompt, dtype=torch.long)
                logits = self._forward(ids, [r.seq_id for r in reqs], lens)
                for b, (i, r) in enumerate(zip(wave, reqs)):
                    for ev in r.step(logits[b:b + 1]):
                        yield StreamEvent(i, *ev)
                while True:
                    active = [(i, r) for i, r in zip(wave, reqs) if not r.done]
                    if not active:
                        break
                    chunk = self._greedy_chunk(active)
                    if chunk is not None:
                        yield from chunk
                        continue
                    rows = [r.rows() for _, r in active]
                    flat = [x for rr in rows for x in rr]
                    toks = torch.tensor([[t] for _, t in flat], dtype=torch.long)
                    logits = self._forward(toks, [s for s, _ in flat], [1] * len(flat))
                    offs = [0]
                    for rr in rows:
                        offs.append(offs[-1] + len(rr))
                    decided = decide_together([r for _, r in active], logits, offs[:-1])
                    for k, ((i, r), rr) in enumerate(zip(active, rows)):
                        events = r.accept(*decided[k]) if k in decided else r.step(logits[offs[k]:offs[k + 1]])
                        for ev in events:
                            yield StreamEvent(i, *ev)
                for i, r in zip(wave, reqs):
                    outputs[i] = r.output()
            finally:
                for r in reqs:
                    r.release()


def decide_together(samplers: list, logits: torch.Tensor, rows: list[int] | None = None) -> dict[int, tuple[int, float]]:
    """The tokens and log probs of every sampler i (its logits: row rows[i], default i) whose step
    needs nothing of its own: plain greedy rows (argmax of logits / temperature) in one batch,
    plain sampled rows (temperature, top-k, top-p) in one batch per temperature, each from its own
    generator (`sampling.sample_rows`), with one copy to the host per batch instead of several
    per row. Returns {i: (token, log prob)}, to `accept`; the others step one by one."""
    rows = list(range(len(samplers))) if rows is None else rows
    out: dict[int, tuple[int, float]] = {}
    greedy = [i for i, r in enumerate(samplers) if isinstance(r, SampleRequest) and r.is_plain_greedy()]
    if greedy:
        want = [rows[i] for i in greedy]
        proc = logits if want == list(range(logits.shape[0])) else logits[to_device(want, torch.long, logits.device)]
        proc = proc.float()
        temps = [samplers[i].params.temperature for i in greedy]
        if any(t != 1.0 for t in temps):        # (the common temperature 1 needs no copy to the device)
            proc = proc / to_device(temps, torch.float32, logits.device)[:, None]
        toks = proc.argmax(dim=-1)
        out.update(zip(greedy, tokens_to_host(toks, torch.log_softmax(proc, dim=-1).gather(1, toks[:, None])[:, 0])))
    groups: dict[float, list[int]] = {}
    together = os.environ.get("FTMOE_BATCH_SAMPLING", "1") != "0"       # 0: each sampled row on its own (A/B)
    for i, r in enumerate(samplers):
        if together and isinstance(r, SampleRequest) and r.is_plain_sampled():
            groups.setdefault(r.params.temperature, []).append(i)
    for t, members in groups.items():
        proc = logits[to_device([rows[i] for i in members], torch.long, logits.device)].float()
        proc = proc / t if t != 1.0 else proc              # as `sampling.apply_penalties` divides one row
        got = sample_rows(proc, [samplers[i].params for i in members], [samplers[i].generator for i in members])
        out.update(zip(members, got))
    return out


def _chunk_plan(model, cache: KVCache, reqs: list, limit: int, ahead: int = 0):
    """(seq_ids, lengths, steps) of a greedy chunk of `reqs`, or None where single steps must
    run: the model has no greedy chunks here, a request samples, penalises, bans words, has a
    temperature other than 1 (its argmax of logits / temperature could break a tie differently)
    or fewer than 2 tokens left, or the cache has no free blocks for 2 steps of every row (fewer
    steps are planned when that is what fits). ahead: tokens each request has coming from a chunk
    still running (counted against its budget, not yet in its tokens)."""
    if limit < 2 or not reqs or not getattr(model, "can_greedy_chunk", lambda c, b: True)(cache, len(reqs)):
        return None
    if not all(isinstance(r, SampleRequest) and r.is_plain_greedy() and r.params.temperature == 1.0 for r in reqs):
        return None
    seq_ids = [r.seq_id for r in reqs]
    lens = [cache.length(q) for q in seq_ids]
    held = [len(cache.block_table(q)) for q in seq_ids]
    steps = min(limit, min(r.max_gen - len(r.tokens) - ahead for r in reqs))
    while steps >= 2 and sum(max(0, cache.blocks_for(n + steps) - h) for n, h in zip(lens, held)) > cache.num_free_blocks:
        steps -= 1
    return (seq_ids, lens, steps) if steps >= 2 else None


def run_greedy_chunk(model, cache: KVCache, reqs: list, limit: int):
    """Up to `limit` greedy decode steps of every request in `reqs` run back to back on the GPU
    (the model feeds each step's argmax to the next: `FastGPTMoE.greedy_chunk`), with KV room
    for them reserved and each sequence's length advanced by the steps taken. Returns (tokens,
    log probs or None) as lists [steps][row], for the caller to accept in step order; or None
    (nothing reserved) when single steps must run instead (`_chunk_plan`)."""
    fn = getattr(model, "greedy_chunk", None)
    got = None if fn is None else _reserved_chunk(
        model, cache, reqs, limit, 0, lambda ids, meta, steps, lp: fn(ids.to(meta.positions.device), meta, cache,
                                                                      steps, lp))
    if got is None:
        return None
    (toks, lps), _ = got
    return toks.tolist(), lps.tolist() if lps is not None else None


def start_greedy_chunk(model, cache: KVCache, reqs: list, limit: int, after=None, ahead: int = 0):
    """`run_greedy_chunk` queued without the wait, where the model can (`greedy_chunk_start`):
    returns (chunk, steps) for `greedy_chunk_result`, or None (nothing reserved). after: the chunk
    of the same requests still running, with `ahead` tokens per row the host has not accepted
    yet; this one continues from its last tokens on the device, so the GPU need not wait for the
    host between chunks."""
    fn = getattr(model, "greedy_chunk_start", None)
    if fn is None:
        return None
    return _reserved_chunk(model, cache, reqs, limit, ahead, lambda ids, meta, steps, lp: fn(
        None if after is not None else ids, meta, cache, steps, lp, after=after))


def _reserved_chunk(model, cache: KVCache, reqs: list, limit: int, ahead: int, call):
    """Plan a greedy chunk (`_chunk_plan`), reserve its KV room and run call(ids [B] on the host,
    meta, steps, logprobs); returns (what call returned, steps), or None with the reservation
    undone when there is no plan or call returns None (the model cannot after all)."""
    plan = _chunk_plan(model, cache, reqs, limit, ahead)
    if plan is None:
        return None
    seq_ids, lens, steps = plan
    ids = torch.tensor([r.tokens[-1] for r in reqs], dtype=torch.long)
    meta = cache.prepare_chunk(seq_ids, steps)
    with torch.no_grad():
        got = call(ids, meta, steps, any(r.params.return_log_probs for r in reqs))
    if got is None:
        for q, n in zip(seq_ids, lens):
            cache.truncate(q, n)
        return None
    return got, steps


def greedy_chunk_result(model, chunk) -> tuple[list, list | None]:
    """A started chunk's tokens and log probs (or None) as lists [steps][row], once it has run."""
    toks, lps = model.greedy_chunk_result(chunk)
    return toks.tolist(), lps.tolist() if lps is not None else None


def decode_chunk_steps() -> int:
    """Greedy steps run back to back on the GPU between host visits, where the model can
    (FTMOE_DECODE_CHUNK, default 8; 1 = every step on its own)."""
    v = os.environ.get("FTMOE_DECODE_CHUNK", "8")
    if not v.isdigit() or not 1 <= int(v) <= 32:
        raise FtmoeError(f"FTMOE_DECODE_CHUNK: expected a number of steps 1..32, found {v!r}")
    return int(v)


def resolve_end_id(cfg, params: SamplingParams) -> int | None:
    """The request's end_id; the config's, when it names a token of the vocabulary."""
    if params.end_id is not None:
        return params.end_id
    e = cfg.end_id
    return e if 0 <= e < cfg.vocab_size else None


def max_new_tokens_for(cfg, prompt_len: int, params: SamplingParams) -> int:
    """max_new_tokens, cut at the model's context."""
    return min(params.max_new_tokens, cfg.max_pos_seq_len - prompt_len)


def check_prompt(cfg, prompt, params: SamplingParams, where: str = "") -> list[int]:
    """A request's prompt and params against the model: returns the prompt as ints, or raises
    RequestError naming what is wrong (shared by the Generator and the serving engine)."""
    try:
        ids = as_ids(prompt)
    except TypeError:
        raise RequestError(f"{where}prompt must be a list of token ids, found {prompt!r:.80}") from None
    if not ids:
        raise RequestError(f"{where}prompt is empty (has 0 tokens); give at least one token")
    if len(ids) >= cfg.max_pos_seq_len:
        raise RequestError(f"{where}prompt has {len(ids)} tokens; the model's context is "
                           f"{cfg.max_pos_seq_len} (prompt + new tokens), so at most "
                           f"{cfg.max_pos_seq_len - 1} prompt tokens")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise RequestError(f"{where}prompt has token id {bad[0]} outside the vocabulary 0..{cfg.vocab_size - 1}")
    if not isinstance(params, SamplingParams):
        raise RequestError(f"{where}params must be SamplingParams, found {type(params).__name__}")
    params.validate(cfg.vocab_size)
    params.word_ids("stop_words"), params.word_ids("bad_words")
    return ids


def as_ids(prompt) -> list[int]:
    """A prompt as a list of Python ints; TypeError for anything else (str, floats, bools)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, (str, bytes)):
        raise TypeError("text prompt")
    ids = []
    for t in prompt:
        if isinstance(t, bool):
            raise TypeError("bool is not a token id")
        ids.append(operator.index(t))
    return ids
