"""Serve an `LLM` through a real Triton Inference Server with FasterTransformer's GPT tensors.

In:  an `ftmoe.LLM` (or a backend with `LLMBackend`'s three methods) and ports. Per request, FT's
     GPT inputs (SPEC 6), batch dim first: `input_ids` UINT32 [B, L] right-padded (`input_lengths`
     UINT32 [B, 1] gives each row's real length), `request_output_len` UINT32 [B, 1]; optional
     `runtime_top_k`, `runtime_top_p`, `temperature`, `len_penalty`, `repetition_penalty`,
     `presence_penalty`, `min_length`, `random_seed`, `is_return_log_probs`, `beam_width`,
     `start_id`, `end_id`, `beam_search_diversity_rate` (only 0) as [B, 1] (or [B]), and
     `stop_words_list` / `bad_words_list` INT32 [B, 2, W] in FT's format (row 0: the words'
     ids concatenated; row 1: cumulative end offsets, padded with -1). Missing optional inputs
     take `SamplingParams`' defaults (greedy). An empty prompt (length 0) becomes [start_id].
Out: `output_ids` UINT32 [B, beam, T] (prompt + generated, padded with the row's end_id, or 0
     when the model has none, to the longest row), `sequence_length` UINT32 [B, beam] (prompt +
     generated), `cum_log_probs` FP32 [B, beam], `output_log_probs` FP32 [B, beam, N] (N = most
     tokens generated; both zero unless `is_return_log_probs`). Decoupled mode: one response per
     decoding step, each with the output_ids so far (beam dim 1; a beam request streams its best
     hypothesis when it finishes). A bad request gets a Triton error response whose message ends
     with the `RequestError` naming the tensor; the server keeps serving.

`requests_from_inputs`, `outputs_to_tensors`, `stream_tensors` (one mapping) are shared with the
classic repository's model.py (`triton_repo.py`); pytriton is imported only by `serve_triton`.
`LLMBackend` alone runs generation: an `ftmoe.engine.AsyncEngine` adapter with its methods can replace it.
"""
from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from collections.abc import Iterator, Mapping

import numpy as np

from ..errors import RequestError
from ..sampling import SamplingParams

# (name, numpy dtype, dims without the batch dim, optional) -- FT's all_models/gpt config.pbtxt
INPUTS = [("input_ids", np.uint32, (-1,), False), ("input_lengths", np.uint32, (1,), False),
          ("request_output_len", np.uint32, (-1,), False),
          ("runtime_top_k", np.uint32, (1,), True), ("runtime_top_p", np.float32, (1,), True),
          ("beam_search_diversity_rate", np.float32, (1,), True), ("temperature", np.float32, (1,), True),
          ("len_penalty", np.float32, (1,), True), ("repetition_penalty", np.float32, (1,), True),
          ("presence_penalty", np.float32, (1,), True), ("min_length", np.uint32, (1,), True),
          ("random_seed", np.uint64, (1,), True), ("is_return_log_probs", np.bool_, (1,), True),
          ("beam_width", np.uint32, (1,), True), ("start_id", np.uint32, (1,), True),
          ("end_id", np.uint32, (1,), True), ("stop_words_list", np.int32, (2, -1), True),
          ("bad_words_list", np.int32, (2, -1), True)]
OUTPUTS = [("output_ids", np.uint32, (-1, -1)), ("sequence_length", np.uint32, (-1,)),
           ("cum_log_probs", np.float32, (-1,)), ("output_log_probs", np.float32, (-1, -1))]
# optional per-request scalar tensor -> SamplingParams field and its python type
SCALARS = {"runtime_top_k": ("top_k", int), "runtime_top_p": ("top_p", float),
           "temperature": ("temperature", float), "len_penalty": ("len_penalty", float),
           "repetition_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
           "min_length": ("min_length", int), "random_seed": ("seed", int),
           "is_return_log_probs": ("return_log_probs", bool), "beam_width": ("beam_width", int),
           "end_id": ("end_id", int), "request_output_len": ("max_new_tokens", int)}
WORDS = {"stop_words_list": "stop_words", "bad_words_list": "bad_words"}
Request = tuple[list[int], SamplingParams]


# ---- FT tensors -> requests ----------------------------------------------------------------------
def parse_word_list(arr, name: str = "stop_words_list") -> list[list[int]]:
    """One request's FT word list [2, W] -> list of token-id lists."""
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[0] != 2:
        raise RequestError(f"input '{name}' must be [2, W] per request (row 0 ids, row 1 end offsets), "
                           f"found shape {list(a.shape)}")
    ids, offsets = [int(x) for x in a[0]], [int(x) for x in a[1]]
    words, start = [], 0
    for off in offsets:
        if off < 0:                                 # -1 pads the offsets row
            break
        if not start < off <= len(ids):
            raise RequestError(f"input '{name}' offsets must increase and stay <= {len(ids)} (row 1 is "
                               f"cumulative end offsets padded with -1), found {offsets}")
        words.append(ids[start:off])
        start = off
    return words


def word_list_tensor(batch_words: list[list[list[int]]]) -> np.ndarray:
    """Client helper, FT's `to_word_list_format`: per request a list of words -> INT32 [B, 2, W]."""
    width = max([1] + [sum(len(w) for w in words) for words in batch_words])
    out = np.zeros((len(batch_words), 2, width), np.int32)
    out[:, 1, :] = -1
    for b, words in enumerate(batch_words):
        flat = [t for w in words for t in w]
        out[b, 0, :len(flat)] = flat
        out[b, 1, :len(words)] = np.cumsum([len(w) for w in words]) if words else []
    return out


def _value(x, typ):
    if typ is bool:
        return bool(x)
    if typ is float:
        return float(str(np.float32(x)))             # 0.9 stays 0.9, not 0.8999999761581543
    return int(x)


def _rows(inputs: Mapping[str, np.ndarray], name: str, batch: int) -> np.ndarray:
    a = np.asarray(inputs[name])
    if a.ndim == 0 or a.shape[0] != batch or a.size == 0:
        raise RequestError(f"input '{name}' has shape {list(a.shape)}; expected the batch size {batch} "
                           f"first and at least one value per request")
    return a.reshape(batch, -1) if name not in WORDS else a


def requests_from_inputs(inputs: Mapping[str, np.ndarray], vocab_size: int | None = None) -> list[Request]:
    """FT GPT input tensors (batch dim first) -> one (prompt ids, SamplingParams) per row,
    checked against `vocab_size` when given."""
    unknown = sorted(set(inputs) - {n for n, *_ in INPUTS})
    if unknown:
        raise RequestError(f"unknown input tensor(s) {unknown}; this model takes {[n for n, *_ in INPUTS]}")
    missing = [n for n in ("input_ids", "input_lengths", "request_output_len") if n not in inputs]
    if missing:
        raise RequestError(f"required input '{missing[0]}' is missing")
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim != 2 or 0 in ids.shape:
        raise RequestError(f"input 'input_ids' must be [batch, max_len] (both > 0), found shape {list(ids.shape)}")
    batch = ids.shape[0]
    lengths = _rows(inputs, "input_lengths", batch)[:, 0]
    rows = {name: _rows(inputs, name, batch) for name in inputs if name != "input_ids"}
    out = []
    for b in range(batch):
        n = int(lengths[b])
        if not 0 <= n <= ids.shape[1]:
            raise RequestError(f"request {b}: input_lengths {n} is outside 0..{ids.shape[1]} (input_ids width)")
        prompt = [int(t) for t in ids[b, :n]]
        prompt = prompt or ([int(rows["start_id"][b, 0])] if "start_id" in rows else [])
        if "beam_search_diversity_rate" in rows and float(rows["beam_search_diversity_rate"][b, 0]) != 0.0:
            raise RequestError(f"request {b}: input 'beam_search_diversity_rate' must be 0 (diverse beam "
                               f"search is not supported), found {float(rows['beam_search_diversity_rate'][b, 0])}")
        kw = {f: _value(rows[name][b, 0], typ) for name, (f, typ) in SCALARS.items() if name in rows}
        kw.update({f: parse_word_list(rows[name][b], name) for name, f in WORDS.items() if name in rows})
        try:
            params = SamplingParams(**kw).validate(vocab_size)
        except RequestError as e:
            tensor = next((t for t, (f, _) in SCALARS.items() if f"'{f}'" in str(e)), None)
            tensor = tensor or next((t for t, f in WORDS.items() if f"'{f}'" in str(e)), None)
            raise RequestError(f"request {b}: {e}" + (f" (from input '{tensor}')" if tensor else "")) from None
        out.append((prompt, params))
    return out


# ---- results -> FT tensors -----------------------------------------------------------------------
def _pack(rows: list[list[tuple[list[int], float, list[float]]]], pads: list[int],
          prompt_lens: list[int]) -> dict[str, np.ndarray]:
    """rows[b][beam] = (ids, cum_log_prob, log_probs) -> the four padded output tensors."""
    B, W, T = len(rows), max(len(r) for r in rows), max(len(ids) for r in rows for ids, _, _ in r)
    N = max(1, max(len(ids) - p for r, p in zip(rows, prompt_lens) for ids, _, _ in r))
    out = {"output_ids": np.zeros((B, W, T), np.uint32), "sequence_length": np.zeros((B, W), np.uint32),
           "cum_log_probs": np.zeros((B, W), np.float32), "output_log_probs": np.zeros((B, W, N), np.float32)}
    for b, beams in enumerate(rows):
        out["output_ids"][b] = pads[b]
        for k, (ids, cum, lps) in enumerate(beams):
            out["output_ids"][b, k, :len(ids)] = ids
            out["sequence_length"][b, k] = len(ids)
            out["cum_log_probs"][b, k] = cum
            out["output_log_probs"][b, k, :len(lps)] = lps
    return out


def outputs_to_tensors(outs, pads: list[int]) -> dict[str, np.ndarray]:
    """`GenerationOutput`s (one per row, beams as lists) -> FT output tensors."""
    rows = []
    for o in outs:
        beams = o.output_ids and isinstance(o.output_ids[0], list)
        ids = o.output_ids if beams else [o.output_ids]
        cums = (o.cum_log_probs if beams else [o.cum_log_probs]) if o.cum_log_probs is not None else [0.0] * len(ids)
        lps = (o.output_log_probs if beams else [o.output_log_probs]) if o.output_log_probs is not None \
            else [[] for _ in ids]
        rows.append(list(zip(ids, cums, lps)))
    return _pack(rows, pads, [o.prompt_length for o in outs])


def stream_tensors(events, reqs: list[Request], pads: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """`StreamEvent`s (index, token_id, logprob, ...) -> one tensor dict per decoding step, each
    holding every row's prompt + tokens so far (a new step starts when the row index stops rising)."""
    toks, lps = [[] for _ in reqs], [[] for _ in reqs]

    def snapshot():
        rows = [[(prompt + t, sum(lp) if p.return_log_probs else 0.0, lp if p.return_log_probs else [])]
                for (prompt, p), t, lp in zip(reqs, toks, lps)]
        return _pack(rows, pads, [len(p) for p, _ in reqs])

    last = None
    for ev in events:
        if last is not None and ev.index <= last:
            yield snapshot()
        toks[ev.index].append(ev.token_id)
        lps[ev.index].append(ev.logprob)
        last = ev.index
    if last is not None:
        yield snapshot()


# ---- execution backend ---------------------------------------------------------------------------
class LLMBackend:
    """The only code that runs the model: offline `LLM` batches, one at a time (a lock).
    An `AsyncEngine` adapter needs the same three methods."""

    def __init__(self, llm):
        self.llm = llm
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.llm.config.vocab_size

    def pad_id(self, params: SamplingParams) -> int:
        end = self.llm.generator.end_id_for(params)
        return 0 if end is None else end

    def generate(self, reqs: list[Request]) -> list:
        with self._lock:
            return self.llm.generate([p for p, _ in reqs], [s for _, s in reqs])

    def stream(self, reqs: list[Request]) -> Iterator:
        with self._lock:
            yield from self.llm.generator.stream([p for p, _ in reqs], [s for _, s in reqs])


# one Triton request's tensors -> its outputs / its outputs per decoding step (raise RequestError)
def infer_batch(backend, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    reqs = requests_from_inputs(inputs, getattr(backend, "vocab_size", None))
    return outputs_to_tensors(backend.generate(reqs), [backend.pad_id(s) for _, s in reqs])


def infer_stream(backend, inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    reqs = requests_from_inputs(inputs, getattr(backend, "vocab_size", None))
    return stream_tensors(backend.stream(reqs), reqs, [backend.pad_id(s) for _, s in reqs])


# ---- the server ----------------------------------------------------------------------------------
def libpython_dir() -> str | None:
    """This interpreter's libpython folder when the loader would not find it by itself (pyenv and
    other non-system builds); None for a system Python. Triton's python stub links libpython3.X:
    without this folder on LD_LIBRARY_PATH it takes the system's copy, whose layout differs, and
    models fail to load (`_recursion_count`)."""
    libdir, so = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    ok = libdir and so and os.path.exists(os.path.join(libdir, so)) and not libdir.startswith(("/usr/lib", "/lib"))
    return libdir if ok else None


def stub_env(env: dict | None = None) -> dict:
    """`env` (default os.environ) with `libpython_dir()` first on LD_LIBRARY_PATH and this
    interpreter's bin first on PATH (the stub's Python finds its packages from there)."""
    env = dict(os.environ if env is None else env)
    for var, first in (("LD_LIBRARY_PATH", libpython_dir()), ("PATH", os.path.dirname(sys.executable))):
        parts = [p for p in env.get(var, "").split(":") if p]
        if first and first not in parts:
            env[var] = ":".join([first] + parts)
    return env


def serve_triton(llm, model_name: str = "ftmoe_gpt", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, decoupled: bool = False, max_batch_size: int = 64,
                 address: str = "0.0.0.0", block: bool = True, log_verbose: int = 0,
                 exit_timeout_secs: int = 10):
    """Bind `llm` as `model_name` with FT's GPT tensors and start tritonserver (via pytriton).
    block=True serves until Ctrl-C or SIGTERM; block=False returns the running
    `pytriton.triton.Triton` (call `.stop()`). Sets LD_LIBRARY_PATH for the stub (`stub_env`)."""
    os.environ.update(stub_env())                    # pytriton starts tritonserver with os.environ
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    backend = llm if hasattr(llm, "pad_id") else LLMBackend(llm)
    if decoupled:
        def infer(requests):
            for request in requests:                  # no dynamic batcher: one request per call
                for out in infer_stream(backend, dict(request)):
                    yield [out]
    else:
        def infer(requests):
            return [infer_batch(backend, dict(request)) for request in requests]

    config = TritonConfig(http_address=address, grpc_address=address, metrics_address=address,
                          http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log_verbose=log_verbose, exit_timeout_secs=exit_timeout_secs)
    triton = Triton(config=config)
    triton.bind(model_name=model_name, infer_func=infer,
                inputs=[Tensor(name=n, dtype=d, shape=s, optional=o) for n, d, s, o in INPUTS],
                outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in OUTPUTS],
                config=ModelConfig(batching=True, max_batch_size=max_batch_size, batcher=None,
                                   decoupled=decoupled), strict=False)
    if not block:
        triton.run()
        return triton
    if threading.current_thread() is threading.main_thread():    # SIGTERM (docker stop) = Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        triton.serve()                               # returns on Ctrl-C / SIGTERM
    finally:
        triton.stop()


def _interrupt(*_):
    raise KeyboardInterrupt
