"""Triton kernels for the GPU fast path, each with a pure-torch twin in `reference.py`.

Kernels import only torch and triton. Every public function here takes and returns torch
tensors; `available()` says whether Triton can run (a CUDA GPU, or TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os


def available() -> bool:
    try:
        import triton  # noqa: F401  (only checks that it imports)
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
