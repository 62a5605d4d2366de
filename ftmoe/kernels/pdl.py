"""Programmatic dependent launch (PDL, Hopper and later) for the step's Triton kernels.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running. Every kernel here starts with `pdl_start`: it waits (griddepcontrol.wait) until the
previous kernel has finished and its writes are visible, then lets the next kernel launch
(griddepcontrol.launch_dependents). Nothing is written before the wait, and the only reads
before it are of data no kernel of the step writes (decode attention's first tile of cached
K/V, written by earlier steps: `attention.preload`), so the results are those of plain stream
order; what is gained is the launch and the CTA scheduling of the next kernel, which overlap
the tail of this one (about a microsecond per kernel boundary inside a CUDA graph, where a
batch-1 decode step is ~200 short kernels).

In: a tensor the kernel works on (its device decides). Out: the launch keyword arguments:
`USE_PDL=mode, launch_pdl=True` on a CUDA device of compute capability 9.0 or later, nothing
elsewhere (the CPU interpreter, older GPUs, FTMOE_PDL=0, or inside `allowed(False)`). Mode
EARLY lets the next kernel launch right after the wait (best when a kernel is one wave);
AT_EXIT lets it launch as the programs exit (for multi-wave kernels of larger steps). FEED lets
it launch before the wait, for a kernel whose successor loads constant weights before its own wait
(`kernels.gemv`): only inside `feeding()`, so the chain of kernels in flight stays short.

Measured on H200s (2026-11-28, decode steps replayed from graphs, `ftmoe bench` with and
without FTMOE_PDL=0; `benchmarks/results/2026-11-28-h200-pdl-and-gate-ab.txt`): batch 1
0.982 -> 0.853 ms, batch 8 1.276 -> 1.217, batch 16 1.800 -> 1.728, batch 32 2.123 -> 2.134 and
batch 64 2.612 -> 2.606 (another run: 2.519 -> 2.658), batch 256 4.208 -> 4.354 ms. So the model
turns the early trigger on for steps of at most `MAX_ROWS` rows and of the `EARLY_ALSO` range
only (`mode_for`; `FastGPTMoE` wraps each step in `allowed(mode_for(rows))`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl


OFF, EARLY, AT_EXIT, FEED = 0, 1, 2, 3     # launch modes (USE_PDL)


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """USE_PDL 1 (EARLY): wait, then let the next kernel launch at once; 2 (AT_EXIT): wait only,
    so the next kernel launches as this one's programs exit (its programs do not take SM room
    from this kernel's later waves). Letting the next kernel launch before the wait (every
    kernel of a small step, "cascade") was 2-17 % slower on an H100 (2026-12-06, tenth session);
    3 (FEED): let the next kernel launch, then wait: for the kernel just before a GEMV that
    loads its weights before its wait (`feeding`), and only there."""
    if USE_PDL == 3:
        tl.extra.cuda.gdc_launch_dependents()
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


#: steps of at most this many rows launch with the early trigger (it cost time at batch 64);
#: FTMOE_PDL_MAX_ROWS overrides it (read at import)
MAX_ROWS = int(os.environ.get("FTMOE_PDL_MAX_ROWS", "16"))
#: steps of LO..HI rows launch with the early trigger too (None: none): the decode bucket of 64
#: rows. Whole decode steps on one H100 (2026-12-07, scripts/ab_decode.py, one process) against
#: the trigger at exit: x0.978 / 0.982 / 0.980 at 64 rows (three runs; the base repeated x0.996 /
#: 1.000), where 32 rows measured x1.004 / 1.013 / 1.012 and 128 x1.027
#: (benchmarks/results/2026-12-07-h100-round41.txt to -round43.txt)
EARLY_ALSO: tuple[int, int] | None = (33, 64)
#: larger steps of at most this many rows launch with the trigger at exit (0: none; every decode
#: bucket by default). Whole decode steps on an H200 against no PDL (scripts/ab_decode.py, sixth
#: session): -0.6 % at batch 32, -0.7 % at 64, -0.5 % at 128 and 256, where the early trigger
#: cost +1.7, +0.4, +1.5 and +3.9 %. FTMOE_PDL_EXIT_MAX_ROWS overrides it (read at import)
EXIT_MAX_ROWS = int(os.environ.get("FTMOE_PDL_EXIT_MAX_ROWS", "1024"))
_ALLOWED = contextvars.ContextVar("ftmoe_pdl_allowed", default=EARLY)
_FEEDING = contextvars.ContextVar("ftmoe_pdl_feeding", default=False)


def feed_on() -> bool:
    """FTMOE_PDL_FEED=1: in steps of early-trigger size, the kernel before each weight-preloading
    GEMV lets it launch before its own wait (`feeding`), and the GEMVs trigger after their wait
    unless another GEMV follows (a bounded cascade: at most ~4 kernels in flight). On by default
    (FTMOE_PDL_FEED=0: each GEMV lets the next kernel launch first, as before; the GEMV alone was
    level with the tuned path, with the cascade -6.2 % at batch 1 on an H100: `fast_model`'s
    GEMV_MAX_ROWS). Read at each call (graph capture)."""
    v = os.environ.get("FTMOE_PDL_FEED", "1")
    if v not in ("0", "1"):
        raise ValueError(f"FTMOE_PDL_FEED: expected 0 or 1, found {v!r}")
    return v == "1"


def mode_for(rows: int) -> int:
    """The launch mode of a step of `rows` rows."""
    if rows <= MAX_ROWS or (EARLY_ALSO is not None and EARLY_ALSO[0] <= rows <= EARLY_ALSO[1]):
        return EARLY
    return AT_EXIT if rows <= EXIT_MAX_ROWS else OFF


@contextlib.contextmanager
def allowed(mode: bool | int):
    """Kernels launched inside use PDL in this mode (True = EARLY, False = OFF), where the device
    supports it."""
    token = _ALLOWED.set(int(mode))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


@functools.lru_cache(maxsize=None)
def _enabled(device_index: int) -> bool:
    if os.environ.get("FTMOE_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.version.hip is not None or not _triton_supports_pdl():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _triton_supports_pdl() -> bool:
    """Triton >= 3.3 has griddepcontrol (tl.extra.cuda.gdc_wait) and the launch_pdl option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@contextlib.contextmanager
def feeding(on: bool = True):
    """Kernels launched inside (where the mode is EARLY) let the next kernel launch before their
    wait (FEED): use it around the kernel just before a GEMV that loads weights before its wait."""
    token = _FEEDING.set(bool(on))
    try:
        yield
    finally:
        _FEEDING.reset(token)


def launch_kwargs(t: torch.Tensor) -> dict:
    mode = _ALLOWED.get()
    if t.device.type != "cuda" or not mode:
        return {}
    if mode == EARLY and _FEEDING.get():
        mode = FEED
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return {"USE_PDL": mode, "launch_pdl": True} if _enabled(idx) else {}
