"""The serving engine: continuous batching over a paged KV cache.

In:  a loaded model (GPTMoE, FastGPTMoE or DistributedModel) and requests (token ids +
     `SamplingParams`, beam_width 1).
Out: `LLMEngine.step()` / `AsyncEngine.generate()` -> per-token `TokenEvent`s; stats and
     Prometheus metrics. See scheduler.py for the scheduling policy.
"""
from .async_engine import AsyncEngine, EngineShutdownError
from .llm_engine import LLMEngine, TokenEvent
from .scheduler import QueueFullError

__all__ = ["LLMEngine", "AsyncEngine", "TokenEvent", "QueueFullError", "EngineShutdownError"]
