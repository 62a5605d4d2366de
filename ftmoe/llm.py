"""High-level offline API: text or token ids in, generated ids and text out.

In:  a converted model folder (`<out>/<t>-gpu/` or its parent), a dtype and a device; an
     optional tokenizer folder (default: the model folder; no tokenizer is fine for
     token-id prompts). Prompts: a str, a list of str, a list of ints (one prompt) or a
     list of lists of ints; params: one `SamplingParams` for all or one per prompt.
Out: `generate` -> one `GenerationOutput` per prompt with `text` = the generated part
     decoded with special tokens skipped (a list per beam; None without a tokenizer);
     `stream` -> `StreamChunk`s for one prompt.

String stop words / bad words are tokenized on their own with the model's tokenizer
(the ids a word gets in context may differ, as with FT's word lists built from text).
Streaming text: the whole generated part is decoded after each token and the new suffix
is emitted; while the decoded text ends in U+FFFD (an incomplete UTF-8 character, which a
byte-level BPE produces mid-character) the delta is held back, and the rest is flushed
with the last chunk. So deltas never split a multi-byte character, and their
concatenation equals the final `text`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from .errors import RequestError
from .generation import GenerationOutput, Generator
from .kv_cache import KVCache
from . import launch
from .config import ModelConfig
from .distributed import ParallelConfig
from .launch import under_torchrun
from .loader import load_model, resolve_model_dir
from .sampling import SamplingParams

Prompt = str | Sequence[int]


@dataclasses.dataclass
class StreamChunk:
    token_id: int
    text_delta: str            # "" without a tokenizer, or while a character is incomplete
    logprob: float
    finished: bool
    finish_reason: str | None = None


class LLM:
    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu",
                 tokenizer_dir: str | None = None, max_batch_tokens: int | None = None, moe_options=None,
                 fast: bool | None = None, tp: int = 1, ep: int = 1, pp: int = 1,
                 micro_batches: int | None = None, timeout_s: float = 120.0,
                 gpu_memory_utilization: float | None = None):
        """fast: run the Triton/CUDA-graph path (default: on a CUDA device, unless capacity mode).
        tp/ep/pp: tensor, expert and pipeline parallel sizes; tp*ep*pp processes are started on
        this node (this process is rank 0), or taken from torchrun. Call close() (or use `with`).
        gpu_memory_utilization: on CUDA, size the KV cache to this fraction of the GPU memory left
        after loading the weights (instead of max_batch_tokens)."""
        self.model_dir = resolve_model_dir(model_dir)
        self._procs: list = []
        self._runner = None
        pc = ParallelConfig(tp, ep, pp)
        if pc.world_size > 1 or under_torchrun():
            pc.check(ModelConfig.from_dir(self.model_dir))      # before any process starts
            self._runner, self._procs = launch.start(pc, self.model_dir, dtype, device, moe_options,
                                                     micro_batches, timeout_s, fast)
            if self._runner is None:                            # a torchrun worker: rank 0 is done
                raise SystemExit(0)
            self.model = self._runner
            fast = False                                        # the runner picks its own path on every rank
        else:
            launch.limit_host_threads(device)
            self.model = load_model(self.model_dir, dtype, device, moe_options=moe_options)
        self.config = self.model.config
        from .tokenizer import load_tokenizer      # lazy: token-id users need no tokenizer files

        self.tokenizer = load_tokenizer(tokenizer_dir or self.model_dir)
        if fast is None:
            fast = self.model.device.type == "cuda" and (moe_options is None or moe_options.capacity_factor is None)
        self.rank = self._runner.par.rank if self._runner is not None else 0
        if gpu_memory_utilization is not None and self.model.device.type == "cuda" and self._runner is None:
            import torch

            if not 0 < gpu_memory_utilization <= 1:
                raise RequestError(f"gpu_memory_utilization must be in (0, 1], found {gpu_memory_utilization}")
            free, _ = torch.cuda.mem_get_info(self.model.device)
            max_batch_tokens = KVCache.tokens_for_memory(self.config, int(free * gpu_memory_utilization),
                                                         self.model.dtype)
        runner = self.model
        if fast:
            from .fast_model import FastGPTMoE

            runner = FastGPTMoE(self.model)
        self.generator = Generator(runner, max_batch_tokens=max_batch_tokens)
        if fast and self.model.device.type == "cuda":
            runner.enable_cuda_graphs(self.generator.cache)

    # ---- lifetime (parallel runs own worker processes) -------------------------
    def close(self) -> None:
        if self._runner is not None:
            launch.stop(self._runner, self._procs)
            self._runner, self._procs = None, []

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- text helpers ----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(f"text given but {self.model_dir} has no tokenizer (tokenizer.json or "
                               f"vocab.json + merges.txt); pass tokenizer_dir or token ids")
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- requests ----------------------------------------------------------------
    def _prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.encode(prompts)]
        if hasattr(prompts, "tolist"):                  # torch / numpy arrays: [T] or [B, T]
            prompts = prompts.tolist()
        prompts = list(prompts)
        if not prompts:
            return []
        if all(isinstance(p, str) for p in prompts):
            return [self.encode(p) for p in prompts]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [prompts]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.encode(p))
            elif isinstance(p, (list, tuple)) or hasattr(p, "tolist"):
                out.append(p.tolist() if hasattr(p, "tolist") else list(p))
            else:
                raise RequestError(f"prompt {i} must be a str or a list of token ids, found {type(p).__name__}")
        return out

    def _params(self, params, n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * n
        params = list(params)
        if len(params) != n:
            raise RequestError(f"got {len(params)} SamplingParams for {n} prompts")
        return [self._tokenize_words(p) for p in params]

    def _tokenize_words(self, p: SamplingParams) -> SamplingParams:
        if not isinstance(p, SamplingParams):
            raise RequestError(f"params must be SamplingParams, found {type(p).__name__}")
        changes = {}
        for field in ("stop_words", "bad_words"):
            words = getattr(p, field)
            if any(isinstance(w, str) for w in words):
                ids = [self.encode(w) if isinstance(w, str) else list(w) for w in words]
                empty = [w for w, i in zip(words, ids) if not i]
                if empty:
                    raise RequestError(f"sampling parameter '{field}': {empty[0]!r} encodes to no tokens")
                changes[field] = ids
        return dataclasses.replace(p, **changes) if changes else p

    def _add_text(self, out: GenerationOutput) -> GenerationOutput:
        if self.tokenizer is not None:
            gen = out.generated_ids
            out.text = [self.decode(g) for g in gen] if gen and isinstance(gen[0], list) else self.decode(gen)
        return out

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        ids = self._prompts(prompts)
        outs = self.generator.generate(ids, self._params(params, len(ids)))
        return [self._add_text(o) for o in outs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Chunks for one prompt as tokens are produced (beam search: the best beam, at the end).
        Validation errors are raised here, before iteration."""
        ids = self._prompts(prompt)
        if len(ids) != 1:
            raise RequestError(f"stream takes one prompt, got {len(ids)}")
        events = self.generator.stream(ids, self._params(params, 1))
        return self._chunks(events)

    def _chunks(self, events) -> Iterator[StreamChunk]:
        tokens: list[int] = []
        emitted = ""
        with contextlib.closing(events):
            for ev in events:
                tokens.append(ev.token_id)
                delta = ""
                if self.tokenizer is not None:
                    text = self.decode(tokens)
                    if not ev.finished:
                        text = text.rstrip("\ufffd")
                    if len(text) > len(emitted) and text.startswith(emitted):
                        delta, emitted = text[len(emitted):], text
                    elif ev.finished and text != emitted:
                        # decoding changed earlier characters (rare): send what was not sent yet
                        delta, emitted = text[len(emitted):], text
                yield StreamChunk(ev.token_id, delta, ev.logprob, ev.finished, ev.finish_reason)

