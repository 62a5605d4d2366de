"""`ftmoe tune`: search fused-MoE tile configs on this GPU and write them where the runtime looks.

In:  the model shapes (a preset or a converted folder), dtype, and the routed-slot counts M
     to tune for. Out: `ftmoe/kernels/configs/<device>.json` (or `--out`), keyed by
     (E, N, K, dtype) then M, read by `kernels.configs.get_config`.

The grid is pruned by M (small M: thin BLOCK_M=16 tiles that stream weights; large M:
square tiles), so a run takes minutes. Timing rotates over several weight copies or random
routings so that repeated runs do not just measure the L2 cache.
"""
from __future__ import annotations

import itertools
import json
import os
import time

import torch

from .errors import FtmoeError
from .kernels.configs import CONFIG_DIR, dense_key, device_key, shape_key
from .kernels.fused_moe import fused_moe
from .fast_model import SMALL_BATCH_SLOTS, small_batch_split_k
from .kernels.routing import moe_align

DEFAULT_MS = (1, 8, 32, 64, 256, 1024, 4096)
#: batch sizes at which the decode step's dense GEMMs are tried on Triton against cuBLAS
DENSE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def candidate_configs(M: int) -> list[dict]:
    if M <= 16:   # GEMVs: BLOCK_N = 16 doubles the programs that stream a weight at M = 1
        grid = itertools.product([16], [16, 32, 64, 128], [64, 128, 256], [4], [3, 5], [1])
    elif M <= 512:
        grid = itertools.product([16, 32, 64], [64, 128], [64, 128], [4, 8], [3], [1, 8])
    else:
        grid = itertools.product([64, 128], [64, 128], [64], [4, 8], [3, 4], [8])
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, GROUP_M=g)
            for bm, bn, bk, w, s, g in grid]


def _time(fn, n_sets: int, iters: int = 10) -> float:
    """ms per call, from a CUDA graph of iters x n_sets calls (launch overhead excluded,
    as in the captured decode step)."""
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            for i in range(n_sets):
                fn(i)
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        g.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / (3 * iters * n_sets)


def tune_shape(E: int, N: int, K: int, M: int, dtype: torch.dtype, stage: str, n_sets: int = 8,
               dev: str = "cuda") -> tuple[dict, float]:
    """Best config for c = fused_moe(a [M..], w [E, K, N]) with `stage` = w1 (gelu) or w2 (prob),
    routed as the model routes M slots (dense, per slot or aligned)."""
    k = 1
    weights = [torch.randn(E, K, N, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n_sets if E == 1 else 1)]
    bias = torch.randn(E, N, device=dev, dtype=dtype)
    a = torch.randn(M, K, device=dev, dtype=dtype)
    ids = [torch.randint(0, E, (M, k), device=dev, dtype=torch.int32) for _ in range(n_sets)]
    probs = torch.rand(M, k, device=dev)
    out = torch.empty(M, N, device=dev, dtype=dtype)
    best, best_ms = None, float("inf")
    for cfg in candidate_configs(M):
        try:
            split_k = 1
            if E == 1:
                routings = [None] * n_sets
            elif M * k <= SMALL_BATCH_SLOTS:
                routings = [i.view(-1) for i in ids]
                split_k = small_batch_split_k(N, K) if stage == "w2" else 1
            else:
                routings = [moe_align(i, E, cfg["BLOCK_M"]) for i in ids]

            def run(i, cfg=cfg, routings=routings):
                fused_moe(a, weights[i % len(weights)], bias, M, topk=k, routing=routings[i], probs=probs,
                          a_per_slot=stage == "w2", gelu=stage == "w1", mul_prob=stage == "w2" and E > 1,
                          out=None if split_k > 1 else out, config=cfg, split_k=split_k)
            ms = _time(run, n_sets)
        except Exception:  # out of resources for this tile: skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def tune_dense(N: int, K: int, M: int, dtype: torch.dtype, parts_ok: bool, bias: bool,
               n_sets: int = 8, dev: str = "cuda") -> tuple[dict, float, float]:
    """cuBLAS against the Triton kernel (split-K where the consumer sums partials) for a dense
    [M, K] x [K, N] GEMM. Returns (table entry, best Triton ms, cuBLAS ms)."""
    weights = [torch.randn(K, N, device=dev, dtype=dtype) * K ** -0.5 for _ in range(n_sets)]
    b = torch.randn(N, device=dev, dtype=dtype)
    a = torch.randn(M, K, device=dev, dtype=dtype)
    cublas_ms = _time(lambda i: torch.addmm(b, a, weights[i]) if bias else a @ weights[i], n_sets)
    best, best_ms = None, float("inf")
    for cfg, split_k in itertools.product(candidate_configs(M), (1, 2, 4, 8) if parts_ok else (1,)):
        try:
            ms = _time(lambda i, cfg=cfg, s=split_k: fused_moe(a, weights[i].unsqueeze(0), b[None] if bias else None,
                                                               M, config=cfg, split_k=s), n_sets)
        except Exception:  # out of resources for this tile: skip it
            continue
        if ms < best_ms:
            best, best_ms = dict(cfg, split_k=split_k), ms
    if best is None or best_ms >= cublas_ms:
        return {"backend": "cublas"}, best_ms, cublas_ms
    return dict(best, backend="triton"), best_ms, cublas_ms


def dense_shapes(cfg, tp: int = 1) -> list[tuple[int, int, bool, bool]]:
    """(N, K, partials allowed, bias fused) of the decode step's dense GEMMs on one TP rank:
    QKV (+bias), attention out, the dense MLP's second GEMM (the first is the tuned E=1 'w1')."""
    H, F = cfg.hidden_size, cfg.inter_size
    return [(3 * H // tp, H, True, True), (H, H // tp, True, False), (H, F // tp, True, False)]


def run_tune(shapes: list[tuple[int, int, int, str]], dtype: torch.dtype, ms=DEFAULT_MS, out: str | None = None,
             log=print, dense: list[tuple[int, int, bool, bool]] = (), dense_ms=DENSE_MS) -> str:
    path = _table_path(out)
    table = {}
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    t0 = time.time()
    for E, N, K, stage in shapes:
        key = shape_key(E, N, K, dt)
        entry = table.setdefault(key, {})
        for M in ms:
            cfg, best = tune_shape(E, N, K, M, dtype, stage)
            if cfg is None:
                continue
            entry[str(M)] = cfg
            w_bytes = (min(E, M) if E > 1 else 1) * K * N * torch.finfo(dtype).bits // 8
            log(f"[{time.time() - t0:6.1f}s] {key} {stage} M={M:<5} {best * 1e3:8.1f} us "
                f"(~{w_bytes / (best * 1e-3) / 1e9:6.0f} GB/s of weights) {cfg}")
            _write_table(table, path)
    for N, K, parts_ok, bias in dense:
        entry = table.setdefault(dense_key(N, K, dt), {})
        for M in dense_ms:
            choice, tri, cub = tune_dense(N, K, M, dtype, parts_ok, bias)
            entry[str(M)] = choice
            log(f"[{time.time() - t0:6.1f}s] {dense_key(N, K, dt)} M={M:<3} cuBLAS {cub * 1e3:7.1f} us, Triton "
                f"{tri * 1e3:7.1f} us -> {choice['backend']} {choice if choice['backend'] == 'triton' else ''}")
            _write_table(table, path)
    _write_table(table, path)
    log(f"wrote {path}")
    return path


def run_tune_in_step(cfg, dtype: torch.dtype, batches: list[int], out: str | None = None, log=print,
                     model=None) -> str:
    """Refine the table's small-batch entries inside whole decode steps (`tune_step`): random
    weights at cfg's shapes (or `model`, a loaded GPTMoE), the table at `out` (default: this
    card's in the package) read, refined for `batches` and written back."""
    from .bench import random_model
    from .fast_model import FastGPTMoE
    from .tune_step import StepRig, refine_in_step

    path = _table_path(out)
    if not os.path.isfile(path):
        raise FtmoeError(f"{path}: no tuned table to refine (run `ftmoe tune` first)")
    with open(path) as f:
        table = json.load(f)
    log(f"refining {path} inside decode steps at batches {', '.join(map(str, batches))}")
    fast = FastGPTMoE(model if model is not None else random_model(cfg, dtype, torch.device("cuda")))
    refine_in_step(StepRig(fast, batches), table, log=log, save=lambda t: _write_table(t, path))
    log(f"wrote {path}")
    return path


def _table_path(out: str | None) -> str:
    """`out`, or this card's table in the package's configs folder."""
    return out or os.path.join(CONFIG_DIR, device_key(torch.cuda.get_device_name()) + ".json")


def _write_table(table: dict, path: str) -> None:
    """Write the table whole (temporary file + rename), so a run cut short keeps what it tuned."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def model_shapes(cfg) -> list[tuple[int, int, int, str]]:
    H, F, E = cfg.hidden_size, cfg.inter_size, cfg.expert_num
    shapes = [(1, F, H, "w1")]
    if E > 1:
        shapes += [(E, F, H, "w1"), (E, H, F, "w2")]
    return shapes
