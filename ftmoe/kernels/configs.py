"""Tile configs for the fused-MoE kernel, tuned per device and shape.

In:  the GEMM's (E, N, K), dtype, the number of routed slots M, and the device name.
Out: a config dict (BLOCK_M/N/K, GROUP_M, num_warps, num_stages).

Tuned tables live in `configs/<device>.json` (written by `ftmoe tune`), keyed
"E=..,N=..,K=..,dtype=.." -> {M: config}; the entry with the nearest M is used. Without
a table, a heuristic by M.

Dense GEMMs of the decode step (QKV, attention out, the dense MLP's second GEMM) are keyed
"dense:N=..,K=..,dtype=.." -> {M: {"backend": "cublas"} or {"backend": "triton", "split_k": S,
tile...}}: `ftmoe tune` times cuBLAS against the Triton kernel and keeps the faster. Without
an entry (or past twice the largest tuned M, or with FTMOE_DENSE_GEMM=cublas) cuBLAS runs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def device_key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def shape_key(E: int, N: int, K: int, dtype: str) -> str:
    return f"E={E},N={N},K={K},dtype={dtype}"


#: cards of one architecture share tiles well enough that a sibling's table beats the heuristic
_FAMILIES = (("H100", "H200", "H800", "H20", "GH200"),)


_override: dict | None = None          # `using_table`'s table, read instead of the card's file
_record: list | None = None            # `using_table`'s log of resolved entries


def _table(device_name: str) -> dict:
    return _override if _override is not None else _file_table(device_name)


@contextlib.contextmanager
def using_table(table: dict, record: list | None = None):
    """Inside the block every lookup reads `table` instead of the card's file; with `record`, each
    tuned entry a lookup resolves is appended as (key, M asked for, M of the entry used). For
    timing table variants in one process (`ftmoe tune --in-step`, `scripts/ab_decode.py`)."""
    global _override, _record
    saved = _override, _record
    _override, _record = table, record
    get_dense_choice.cache_clear()
    try:
        yield
    finally:
        _override, _record = saved
        get_dense_choice.cache_clear()


@functools.lru_cache(maxsize=None)
def _file_table(device_name: str) -> dict:
    """The card's own tuned table; else a tuned sibling's of the same architecture; else {}."""
    path = os.path.join(CONFIG_DIR, device_key(device_name) + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    names = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".json")) if os.path.isdir(CONFIG_DIR) else []
    for family in _FAMILIES:
        mine = [m for m in family if m in device_name]
        if mine:
            # a sibling of the same model first (an H100 PCIe takes the H100 SXM's table), then any
            ranked = [n for n in names if any(m in n for m in mine)] + [n for n in names if any(m in n for m in family)]
            if ranked:
                with open(os.path.join(CONFIG_DIR, ranked[0])) as f:
                    return json.load(f)
    return {}


def default_config(M: int, E: int = 1) -> dict:
    if M <= 32:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    if M <= 512 or M < 4 * E:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _nearest_shape(table: dict, E: int, N: int, K: int, dtype: str):
    """An expert-parallel rank's E/ep experts see the same routed slots M as the whole layer
    (tokens per expert ~ M / E_total either way): reuse the table of the same (N, K, dtype)
    with the nearest E > 1 (dense, E = 1, only matches itself). Returns (key, entries), both None
    when nothing matches."""
    best = None
    for key, entries in table.items():
        if not key.startswith("E="):                # the dense GEMMs' entries live in the same table
            continue
        f = dict(kv.split("=") for kv in key.split(","))
        if (int(f["N"]), int(f["K"]), f["dtype"]) == (N, K, dtype) and (int(f["E"]) > 1) == (E > 1):
            d = abs(int(f["E"]) - E)
            if best is None or d < best[0]:
                best = (d, key, entries)
    return best[1:] if best else (None, None)


def get_config(E: int, N: int, K: int, dtype: str, M: int, device_name: str = "") -> dict:
    table = _table(device_name)
    key = shape_key(E, N, K, dtype)
    entries = table.get(key)
    if not entries:
        key, entries = _nearest_shape(table, E, N, K, dtype)
    if entries:
        return dict(_nearest_m(entries, M, key))
    return default_config(M, E)


def _nearest_m(entries: dict, M: int, key: str) -> dict:
    """The entry tuned for the routed-slot / row count nearest M (keys are M as strings)."""
    m = min(entries, key=lambda m: abs(int(m) - M))
    if _record is not None:
        _record.append((key, M, m))
    return entries[m]


def dense_key(N: int, K: int, dtype: str) -> str:
    return f"dense:N={N},K={K},dtype={dtype}"


@functools.lru_cache(maxsize=4096)
def get_dense_choice(N: int, K: int, dtype: str, M: int, device_name: str = "") -> dict | None:
    """The Triton config (with "split_k") for a dense [M, K] x [K, N] GEMM, or None for cuBLAS."""
    if os.environ.get("FTMOE_DENSE_GEMM", "tuned") == "cublas":
        return None
    entries = _table(device_name).get(dense_key(N, K, dtype))
    if not entries:
        return None
    if M > 2 * max(int(m) for m in entries):
        return None
    best = dict(_nearest_m(entries, M, dense_key(N, K, dtype)))
    if best.pop("backend", "cublas") != "triton":
        return None
    return best
