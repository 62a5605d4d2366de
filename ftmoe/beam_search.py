"""Beam search for one request, FasterTransformer/HF style, on the shared paged KV cache.

In:  the request's prompt ids, its `SamplingParams` (beam_width W, len_penalty, temperature,
     penalties, min_length, bad/stop words, end_id), and each step's logits for its alive
     beams [n, V].
Out: after each step, the cache rows to feed next (`rows()`); when done, up to W finished
     hypotheses best-first (`hypotheses()`), each with its tokens, per-token log probs,
     cumulative log prob, normalised score and finish reason.

Each step: every alive beam's logits go through `process_logits` (the same pipeline as
sampling), `log_softmax` gives per-token log probs, and the 2W best (beam, token)
extensions by cumulative log prob are visited in order (ties: lower beam, then lower id).
An extension ending in end_id or a stop word becomes a finished hypothesis if it ranks
among the first W (HF's rule, also FT's); the others fill the W alive beams. Hypotheses
are ranked by FT's normalised score `cum_log_prob / generated_length ** len_penalty`
(the length counts the end/stop token). At most W finished hypotheses are kept.
Stopping: at max length every alive beam is finished with reason "length"; earlier, once
W hypotheses are finished and no alive beam can still beat the worst of them. That test
is exact (not HF's heuristic): a continuation's cum log prob can only fall, so the best
reachable score of a beam with cum c and length L is c / Lmax**a for a > 0 and
c / (L+1)**a for a <= 0. top_k, top_p and seed do not apply to beam search (as in FT).

KV cache: the prompt is prefilled in slot 0; after the first step the chosen beams are
`fork`ed from it; later steps `reorder` the W slot sequences by parent. Slots without an
alive beam are truncated to zero tokens, so the peak is 2 * W * (prompt + new) tokens
(reorder copies before it frees).
"""
from __future__ import annotations

import dataclasses

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, ends_with_word, process_logits


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]          # generated tokens only
    log_probs: list[float]     # per generated token
    cum_log_prob: float
    score: float               # cum_log_prob / len(tokens) ** len_penalty
    finish_reason: str         # "stop" or "length"


@dataclasses.dataclass
class _Beam:
    tokens: list[int]
    log_probs: list[float]
    cum: float


class BeamRequest:
    def __init__(self, prompt: list[int], params: SamplingParams, end_id: int | None, max_gen: int,
                 cache: KVCache, slots: list[int]):
        self.prompt, self.params, self.end_id, self.max_gen = prompt, params, end_id, max_gen
        self.W = params.beam_width
        self.cache = cache
        self.slots = slots                       # W cache sequence ids; slots[0] holds the prompt
        self.stops = params.word_ids("stop_words")
        self.bads = params.word_ids("bad_words")
        self.alive: list[_Beam] = [_Beam([], [], 0.0)]
        self.finished: list[Hypothesis] = []
        self.started = False
        self.done = False

    # ---- scheduling ------------------------------------------------------------
    def rows(self) -> list[tuple[int, int]]:
        """(cache sequence id, last token) of each alive beam, in slot order."""
        return [(self.slots[i], b.tokens[-1]) for i, b in enumerate(self.alive)]

    def release(self) -> None:
        for s in self.slots:
            self.cache.free(s)

    # ---- scores -----------------------------------------------------------------
    def _norm(self, cum: float, length: int) -> float:
        return cum / (length ** self.params.len_penalty)

    def _bound(self, cum: float, length: int) -> float:
        a = self.params.len_penalty
        return self._norm(cum, self.max_gen) if a > 0 else self._norm(cum, length + 1)

    def _finish(self, beam: _Beam, reason: str) -> None:
        score = self._norm(beam.cum, len(beam.tokens))
        if len(self.finished) == self.W and score <= self.finished[-1].score:
            return
        self.finished.append(Hypothesis(beam.tokens, beam.log_probs, beam.cum, score, reason))
        self.finished.sort(key=lambda h: -h.score)   # stable: earlier hypotheses win ties
        del self.finished[self.W:]

    # ---- one step ----------------------------------------------------------------
    def step(self, logits: torch.Tensor) -> None:
        """logits [n_alive, V] for the alive beams; updates beams, hypotheses and the cache."""
        p, W = self.params, self.W
        beams = self.alive
        V = logits.shape[-1]
        lps = torch.stack([torch.log_softmax(process_logits(
            logits[i], self.prompt + b.tokens, len(b.tokens), p, self.end_id, self.bads), dim=-1)
            for i, b in enumerate(beams)]).double()                             # [n, V]
        total = lps + torch.tensor([b.cum for b in beams], dtype=torch.float64, device=lps.device)[:, None]
        vals, idx = torch.sort(total.reshape(-1), descending=True, stable=True)
        k = min(2 * W, vals.numel())
        vals, idx = vals[:k].tolist(), idx[:k].tolist()
        new: list[_Beam] = []
        parents: list[int] = []
        for rank, (v, j) in enumerate(zip(vals, idx)):
            if v == float("-inf"):
                break
            i, t = divmod(j, V)
            b = beams[i]
            cand = _Beam(b.tokens + [t], b.log_probs + [float(lps[i, t])], v)
            stop = (self.end_id is not None and t == self.end_id and not p.ignore_eos) or \
                (self.stops and ends_with_word(self.prompt + cand.tokens, self.stops))
            if stop:
                if rank < W:
                    self._finish(cand, "stop")
                continue
            new.append(cand)
            parents.append(i)
            if len(new) == W:
                break
        length = len(beams[0].tokens) + 1
        if new and length >= self.max_gen:
            for b in new:
                self._finish(b, "length")
            new = []
        elif new and len(self.finished) == W and self._bound(new[0].cum, length) <= self.finished[-1].score:
            new = []
        self.alive = new
        if not new:
            self.done = True
            self.release()
            return
        self._reorder_cache(parents)

    def _reorder_cache(self, parents: list[int]) -> None:
        n = len(parents)
        if not self.started:
            self.started = True
            for j in range(1, self.W):
                if j < n:
                    self.cache.fork(self.slots[0], self.slots[j])
                else:
                    self.cache.add(self.slots[j])
            return
        self.cache.reorder(self.slots, parents + list(range(n, self.W)))
        for j in range(n, self.W):
            self.cache.truncate(self.slots[j], 0)

    def hypotheses(self) -> list[Hypothesis]:
        return list(self.finished)
