"""The OpenAI completions protocol, apart from the HTTP plumbing.

In:  the raw JSON body of `POST /v1/completions`, the model's tokenizer (or None) and its
     context length; then, per choice, the token ids the engine produces.
Out: `parse_request(body)` -> a checked `CompletionRequest` (every mistake is an `ApiError`
     with OpenAI's status, message, type and the offending `param`);
     `prompt_ids(req, tokenizer)` -> [(ids, text or None)] per prompt;
     `sampling_params(req, max_new_tokens, i)` -> the `SamplingParams` of choice i;
     `plan_choices(req, tokenizer, max_len)` -> both for every choice (context checked), and
     the echo prefixes;
     `TextState`: token ids in, text deltas out (stop strings cut, incomplete characters
     and possible stop-string starts held back); `logprobs_obj` -> OpenAI's logprobs object.

OpenAI -> FasterTransformer sampling: temperature 0 is greedy (top_k=1). Otherwise OpenAI's
top_p=1 means "no nucleus", which FT spells top_p=1.0 too (FT's *greedy* is top_k=0 with
top_p=0, so the OpenAI defaults temperature=1, top_p=1 sample from the full distribution).
top_k (extension, vLLM style) 0 or -1 is off. presence_penalty is additive as in FT;
repetition_penalty (multiplicative, extension) excludes it; min_tokens -> min_length.
Seeds: choice i of a request with `seed` s uses s + i (so n > 1 choices differ).
Stop strings are matched on the decoded text, as OpenAI does, and cut from it.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import RequestError
from ..sampling import SamplingParams

PROMPT_TYPES = "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids"
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_length": "min_tokens"}   # FT name -> OpenAI name


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = 16          # None: the rest of the context
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None             # extension; 0 / -1 = off
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float = 1.0      # extension (FT / CTRL style)
    min_tokens: int = 0                  # extension (FT min_length)
    ignore_eos: bool = False             # extension
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_request(body: bytes) -> CompletionRequest:
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err.get("loc") or ()
        if err["type"] == "json_invalid":
            raise ApiError(400, f"request body is not valid JSON ({err['msg']})", code="invalid_json") from None
        if not loc:
            raise ApiError(400, "request body must be a JSON object") from None
        field = str(loc[0])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {field}", field) from None
        if err["type"] == "missing":
            raise ApiError(400, f"you must provide a '{field}' parameter", field) from None
        if field == "prompt":
            raise ApiError(400, PROMPT_TYPES, field) from None
        where = ".".join(str(x) for x in loc)
        raise ApiError(400, f"'{where}': {err['msg']}, found {err.get('input')!r:.80}", field) from None
    _check(req)
    return req


def _check(req: CompletionRequest) -> None:
    def bad(field: str, why: str) -> ApiError:
        return ApiError(400, f"'{field}' {why}, found {getattr(req, field)!r:.80}", field)

    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad("max_tokens", "must be an integer >= 1")
    if not 1 <= req.n <= 128:
        raise bad("n", "must be an integer in 1..128")
    if req.best_of is not None and req.best_of != req.n:
        raise bad("best_of", "is not supported (only best_of == n)")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise bad("logprobs", "must be an integer in 0..20")
    if req.echo and req.logprobs is not None:
        raise bad("echo", "with 'logprobs' is not supported (the engine does not score prompt tokens)")
    if req.temperature is not None and req.temperature < 0:
        raise bad("temperature", "must be >= 0 (0 = greedy)")
    if req.frequency_penalty:
        raise bad("frequency_penalty", "is not supported (use presence_penalty or repetition_penalty)")
    if req.logit_bias:
        raise bad("logit_bias", "is not supported")
    if req.suffix is not None:
        raise bad("suffix", "is not supported")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "is only allowed when 'stream' is true")
    if len(req.stops) > 16 or any(not s for s in req.stops):
        raise bad("stop", "must be a non-empty string or a list of at most 16 non-empty strings")


def prompt_ids(req: CompletionRequest, tokenizer) -> list[tuple[list[int], str | None]]:
    """[(token ids, prompt text or None)] per prompt of the request."""
    p = req.prompt
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not items:
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: send 'prompt' as token ids", "prompt")
            ids = tokenizer.encode(item)
            out.append((ids, item))
        else:
            out.append((list(item), None))
        if not out[-1][0]:
            raise ApiError(400, "'prompt' is empty (0 tokens); give at least one token", "prompt")
    return out


def sampling_params(req: CompletionRequest, max_new_tokens: int, index: int = 0) -> SamplingParams:
    greedy = req.temperature == 0
    top_k = req.top_k if req.top_k not in (None, -1) else 0
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if greedy or req.temperature is None else req.temperature,
            top_k=1 if greedy else top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            presence_penalty=req.presence_penalty or 0.0,
            repetition_penalty=req.repetition_penalty,
            min_length=req.min_tokens,
            seed=None if req.seed is None else req.seed + index,
            return_log_probs=req.logprobs is not None,
            ignore_eos=req.ignore_eos)
    except RequestError as e:
        m = re.search(r"'(\w+)'", str(e))
        name = _PARAM_NAMES.get(m.group(1), m.group(1)) if m else None
        msg = str(e)
        for ft, oa in _PARAM_NAMES.items():
            msg = msg.replace(f"'{ft}'", f"'{oa}'")
        raise ApiError(400, msg, name) from None


def plan_choices(req: CompletionRequest, tokenizer, max_len: int | None):
    """(prompts [(ids, text)], choices [(ids, SamplingParams)] in OpenAI's order (prompt-major,
    then n), echo prefixes per choice). The prompt plus max_tokens must fit the context."""
    prompts, items = prompt_ids(req, tokenizer), []
    if req.stops and tokenizer is None:
        raise ApiError(400, "'stop' strings need a tokenizer, and this server has none", "stop")
    for ids, _ in prompts:
        if max_len is not None and len(ids) + (req.max_tokens or 1) > max_len:
            raise ApiError(400, f"this model's maximum context length is {max_len} tokens, but the prompt has "
                           f"{len(ids)} tokens and max_tokens is {req.max_tokens}: reduce the prompt or max_tokens",
                           "prompt" if len(ids) >= max_len else "max_tokens", "context_length_exceeded")
        max_new = req.max_tokens or (max_len - len(ids) if max_len else 16)
        items += [(ids, sampling_params(req, max_new, j)) for j in range(req.n)]
    prefixes = [_echo(tokenizer, ids, text) if req.echo else "" for ids, text in prompts for _ in range(req.n)]
    return prompts, items, prefixes


def _echo(tokenizer, ids: list[int], text: str | None) -> str:
    if text is not None:
        return text
    return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""


class TextState:
    """The text of one choice. `add(token_id, finished, logprob)` -> the text that can be sent now.

    Decoding is incremental (vLLM style: each step decodes a window of a few tokens, so a
    step costs O(1)), and on the last token the whole generated part is decoded once, so the
    final `text` equals `tokenizer.decode(ids)` (what `LLM.generate` returns) unless a stop
    string cut it. Without `incremental` (no stops to watch, no stream, no offsets wanted),
    text is only decoded at the end.
    """

    def __init__(self, tokenizer, stops: list[str], incremental: bool = True):
        self.tok, self.stops = tokenizer, stops
        self.incremental = incremental or bool(stops)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.offsets: list[int] = []     # per token: where its text starts in `text`
        self.text, self.sent, self.stopped = "", 0, False
        self._p = self._r = 0            # decode window: prefix offset, read offset

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int | None, finished: bool, logprob: float | None = None) -> str:
        if token_id is not None:
            self.offsets.append(len(self.text))
            self.ids.append(token_id)
            self.logprobs.append(logprob)
        if self.tok is None or self.stopped:
            return ""
        old = len(self.text)
        if finished:
            full = self._decode(self.ids)
            self.text = full if full.startswith(self.text) or not self.incremental else self.text + full[old:]
        elif self.incremental and token_id is not None:
            prefix = self._decode(self.ids[self._p:self._r])
            new = self._decode(self.ids[self._p:])
            if len(new) > len(prefix) and not new.endswith("\ufffd"):
                self.text += new[len(prefix):]
                self._p, self._r = self._r, len(self.ids)
        if self.stops and len(self.text) > old:
            start = max(0, old - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if finished or self.stopped else len(self.text) - self.hold
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def token_str(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def logprobs_obj(tokenizer, st: TextState, prefix_len: int = 0, lo: int = 0) -> dict:
    """OpenAI's logprobs object for tokens lo.. of a choice (top_logprobs: not computed)."""
    n = len(st.text)
    return {"tokens": [token_str(tokenizer, t) for t in st.ids[lo:]], "token_logprobs": st.logprobs[lo:],
            "top_logprobs": None, "text_offset": [prefix_len + min(o, n) for o in st.offsets[lo:]]}
