"""ftmoe: FasterTransformer-compatible inference for Megatron-DeepSpeed GPT-MoE models.

Public surface: `convert` (checkpoint -> FT folder), `load_model` (FT folder -> torch
module), `LLM` + `SamplingParams` (generation).
"""
from .convert import convert
from .errors import FtmoeError
from .loader import load_model

__all__ = ["FtmoeError", "LLM", "SamplingParams", "convert", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # generation pulls in more modules; import it on first use
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ftmoe' has no attribute {name!r}")
