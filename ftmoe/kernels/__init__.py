"""Triton kernels for the GPU fast path, each with a pure-torch twin in `reference.py`.

Kernels import only torch and triton. Every public function here takes and returns torch
tensors; `available()` says whether Triton can run (a CUDA GPU, or TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import os


def available() -> bool:
    try:
        import triton  # noqa: F401  (only checks that it imports)
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def auto_switch(var: str) -> str:
    """The value of an environment switch `var` of auto (the default), 0 or 1."""
    v = os.environ.get(var, "auto")
    if v not in ("auto", "0", "1"):
        raise ValueError(f"{var}: expected auto, 0 or 1, found {v!r}")
    return v


def size_switch(var: str, size: int, limit: int) -> bool:
    """An environment switch `var` of auto (the default: on up to `limit`), 0 (never) or 1 (always)."""
    v = auto_switch(var)
    return v == "1" or (v == "auto" and size <= limit)


def warps_switch(var: str, default: int) -> int:
    """A kernel's warps: `default`, or the power of two from 1 to 32 that the environment's `var` names."""
    v = os.environ.get(var)
    if v is None:
        return default
    if v not in ("1", "2", "4", "8", "16", "32"):
        raise ValueError(f"{var}: expected a power of two from 1 to 32, found {v!r}")
    return int(v)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of torch device `device` (4 on the CPU interpreter: few programs,
    quick tests)."""
    if device.type != "cuda":
        return 4
    import torch

    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
