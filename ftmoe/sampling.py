"""Sampling parameters and the per-step logits pipeline, with FasterTransformer semantics.

In:  one row of fp32 next-token logits [V], the sequence so far (prompt + generated ids)
     and a `SamplingParams`.
Out: the processed logits (`process_logits`), then one token and its log probability
     (`sample`). All functions are pure: they never modify their inputs.

Order of operations, as in FT v5.3 (`DynamicDecodeLayer` + `BaseSamplingLayer`):
  1. bad words: banned ids get -inf (FT bans them before anything else);
  2. temperature: logits / temperature;
  3. repetition penalty (CTRL style: a positive logit of a token already in the sequence,
     prompt included, is divided by the penalty, a negative one multiplied) OR presence
     penalty (subtracted once from each distinct token already in the sequence);
  4. min_length: end_id gets -inf until `min_length` new tokens exist;
  5. greedy (argmax, first index on ties) when top_k == 1 or top_k == top_p == 0;
     otherwise top-k (k=0: the whole vocabulary), renormalised, then top-p the FT way:
     u ~ U(0, top_p), the token is the first (by descending probability) whose cumulative
     probability reaches u. That is the smallest nucleus whose mass reaches top_p, with
     the last token's share cut at top_p (FT's kernel), not HF's full last token.
Log probabilities are `log_softmax` of the logits after steps 1-4, taken before the top-k /
top-p truncation (what FT reports): they describe the model's distribution as modified by
the request, and do not depend on the random draw or on top_k/top_p.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .errors import RequestError

Words = list  # list[list[int]] or list[str] (strings are tokenized by `LLM`)


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    min_length: int = 0
    end_id: int | None = None           # None: the model's config end_id
    stop_words: Words = dataclasses.field(default_factory=list)
    bad_words: Words = dataclasses.field(default_factory=list)
    seed: int | None = None             # None: a fresh random seed per request
    beam_width: int = 1
    len_penalty: float = 0.0
    return_log_probs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ----------------------------------------------------------
    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise RequestError naming the field and the bad value; returns self."""
        def bad(field: str, why: str) -> RequestError:
            return RequestError(f"sampling parameter '{field}' {why}, found {getattr(self, field)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "must be a number > 0 (use top_k=1 for greedy decoding)")
        if not is_int(self.top_k) or self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            raise bad("top_k", f"must be an integer in 0..{vocab_size or 'vocab_size'}")
        if not is_num(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", "must be a number in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1.0 = off)")
        if not is_num(self.presence_penalty):
            raise bad("presence_penalty", "must be a finite number (0.0 = off)")
        if self.repetition_penalty != 1.0 and self.presence_penalty != 0.0:
            raise RequestError(
                f"sampling parameters 'repetition_penalty' ({self.repetition_penalty!r}) and 'presence_penalty' "
                f"({self.presence_penalty!r}) are mutually exclusive (as in FasterTransformer); set only one")
        if not is_int(self.min_length) or self.min_length < 0:
            raise bad("min_length", "must be an integer >= 0")
        if self.end_id is not None and (not is_int(self.end_id) or self.end_id < 0
                                        or (vocab_size is not None and self.end_id >= vocab_size)):
            raise bad("end_id", f"must be None or a token id in 0..{vocab_size - 1 if vocab_size else 'V-1'}")
        for field in ("stop_words", "bad_words"):
            words = getattr(self, field)
            if not isinstance(words, (list, tuple)):
                raise bad(field, "must be a list of token-id lists or of strings")
            for w in words:
                if isinstance(w, str):
                    if not w:
                        raise bad(field, "must not contain an empty string")
                    continue
                if (not isinstance(w, (list, tuple)) or not w or not all(is_int(t) for t in w)
                        or any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in w)):
                    hi = vocab_size - 1 if vocab_size else "V-1"
                    raise RequestError(f"sampling parameter '{field}' has bad entry {w!r}: each must be a "
                                       f"non-empty list of token ids in 0..{hi} or a string")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 64):
            raise bad("seed", "must be None or an integer in [0, 2**64)")
        if not is_int(self.beam_width) or self.beam_width < 1 or (vocab_size is not None
                                                                  and self.beam_width > vocab_size):
            raise bad("beam_width", f"must be an integer in 1..{vocab_size or 'vocab_size'}")
        if not is_num(self.len_penalty):
            raise bad("len_penalty", "must be a finite number")
        for field in ("return_log_probs", "ignore_eos"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "must be a bool")
        return self

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)

    def word_ids(self, field: str) -> list[list[int]]:
        """`stop_words` / `bad_words` as id lists (strings must have been tokenized)."""
        words = getattr(self, field)
        if any(isinstance(w, str) for w in words):
            raise RequestError(f"sampling parameter '{field}' holds strings; they need a tokenizer "
                               f"(use LLM.generate, or pass token-id lists)")
        return [list(w) for w in words]

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


# ---- the logits pipeline -------------------------------------------------------
def apply_penalties(logits: torch.Tensor, token_history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Temperature, then repetition or presence penalty over the distinct ids of
    `token_history` (prompt + generated). logits [..., V] -> new tensor [..., V]."""
    out = logits / params.temperature if params.temperature != 1.0 else logits.clone()
    if (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0) or len(token_history) == 0:
        return out
    ids = torch.unique(torch.as_tensor(list(token_history), dtype=torch.long, device=out.device))
    sel = out[..., ids]
    if params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        sel = torch.where(sel > 0, sel / p, sel * p)
    else:
        sel = sel - params.presence_penalty
    out[..., ids] = sel
    return out


def banned_tokens(sequence: Sequence[int], bad_words: list[list[int]]) -> list[int]:
    """Ids that would complete a bad word: a one-token word always, a longer one when
    `sequence` (prompt + generated) ends with the word minus its last token."""
    out = []
    for w in bad_words:
        n = len(w) - 1
        if n == 0 or (len(sequence) >= n and list(sequence[len(sequence) - n:]) == w[:-1]):
            out.append(w[-1])
    return out


def ends_with_word(sequence: Sequence[int], words: list[list[int]]) -> bool:
    """True when `sequence` ends with one of `words` (stop-word check after each token)."""
    return any(len(sequence) >= len(w) and list(sequence[len(sequence) - len(w):]) == w for w in words)


def process_logits(logits: torch.Tensor, sequence: Sequence[int], num_generated: int, params: SamplingParams,
                   end_id: int | None, bad_words: list[list[int]] | None = None) -> torch.Tensor:
    """Steps 1-4 of the module docstring for one row. logits [V] fp32 -> [V] fp32."""
    bad_words = params.word_ids("bad_words") if bad_words is None else bad_words
    out = logits.float()
    ban = banned_tokens(sequence, bad_words)
    if ban:
        out = out.clone()
        out[to_device(ban, torch.long, out.device)] = float("-inf")
    out = apply_penalties(out, sequence, params)
    if end_id is not None and num_generated < params.min_length:
        out[end_id] = float("-inf")
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """One token from processed logits [V] -> (token id, log prob before truncation).
    Consumes exactly one uniform draw from `generator` unless decoding greedily."""
    if params.greedy:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    return sample_rows(logits[None], [params], [generator])[0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[tuple[int, float]]:
    """`sample` for R rows of processed logits [R, V] at once, none greedy: each row takes its own
    top-k / top-p and one uniform draw from its own generator, and the R tokens and log probs
    reach the host in one copy (a serving step samples its rows together instead of paying ~4
    device syncs per row). `sample` runs a single row through here, so a row samples the same
    token alone or in a batch (every operation below works row by row)."""
    dev = logits.device
    logp = torch.log_softmax(logits.float(), dim=-1)                                   # [R, V]
    probs = logp.double().exp()
    u = torch.stack([torch.rand((), generator=g, device=g.device if g is not None else "cpu",
                                dtype=torch.float64).to(dev) for g in generators])
    u = u * to_device([p.top_p if 0.0 < p.top_p < 1.0 else 1.0 for p in params], torch.float64, dev)
    toks = torch.empty(len(params), dtype=torch.long, device=dev)
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(params):
        groups.setdefault(p.top_k, []).append(r)
    for k, rows in groups.items():
        sel = None if len(rows) == len(params) else to_device(rows, torch.long, dev)
        pr = probs if sel is None else probs[sel]
        if k > 0:
            vals, idx = torch.topk(pr, k, dim=-1)                    # sorted, descending
        else:
            # (a torch.topk of the 1,024 most likely first was slower on an H100: 2026-12-06)
            vals, idx = torch.sort(pr, dim=-1, descending=True, stable=True)
        cum = torch.cumsum(vals, dim=-1)
        cum = cum / cum[:, -1:]                                      # renormalise within top-k
        pos = torch.searchsorted(cum, (u if sel is None else u[sel])[:, None]).clamp_(max=idx.shape[1] - 1)
        if sel is None:
            toks = idx.gather(1, pos)[:, 0]
        else:
            toks[sel] = idx.gather(1, pos)[:, 0]
    return tokens_to_host(toks, logp.gather(1, toks[:, None])[:, 0])


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A short host list as a tensor on `device`, copied without waiting for the work queued on the
    device (`torch.tensor(values, device=cuda)` synchronises the stream first, so the host would
    wait out the decode step before it queues the sampling kernels behind it)."""
    t = torch.tensor(values, dtype=dtype)
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def tokens_to_host(toks: torch.Tensor, lps: torch.Tensor) -> list[tuple[int, float]]:
    """[(token, log prob)] of R rows' tokens [R] and log probs [R], in one copy to the host
    (as float64: exact for token ids below 2^53)."""
    both = torch.stack([toks.double(), lps.double()]).tolist()
    return [(int(t), lp) for t, lp in zip(*both)]


def nucleus_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The exact distribution `sample` draws from, [V] float64 (for tests and tooling)."""
    probs = torch.softmax(logits.double(), dim=-1)
    out = torch.zeros_like(probs)
    if params.greedy:
        out[torch.argmax(logits)] = 1.0
        return out
    if params.top_k > 0:
        vals, idx = torch.topk(probs, params.top_k)
    else:
        vals, idx = torch.sort(probs, descending=True, stable=True)
    vals = vals / vals.sum()
    limit = params.top_p if 0.0 < params.top_p < 1.0 else 1.0
    cum = torch.cumsum(vals, 0)
    mass = (torch.clamp(cum, max=limit) - (cum - vals)).clamp(min=0)
    out[idx] = mass / mass.sum()
    return out
