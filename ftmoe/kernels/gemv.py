"""Dense GEMV for decode steps of few rows (at most 16): c = a @ w (+ bias), weights streamed at
full bandwidth while the kernel before is still running.

In:  a [M, K] in w's dtype, or fp32 split-K partials [P, M, K] of an earlier GEMV (summed as they
     are loaded, optionally through tanh-GELU, then rounded to w's dtype: the dense MLP's hidden
     layer never exists as a tensor); w [K, N] with any strides (the tied head is wte.t());
     bias [N].
Out: parts=True: fp32 partials [S, M, N] whose sum is a @ w + bias (bias in partial 0), for a
     consumer that sums them (add_layernorm, decode attention, the next GEMV); parts=False:
     [M, N] = act(a @ w + bias) rounded to w's dtype, stored in `out_dtype` (default w's).

Each program owns one [BLOCK_K, BLOCK_N] weight tile per K step of one K split (grid (N tiles,
S)). Under programmatic dependent launch (EARLY mode) it first lets the next kernel launch, then
loads its first weight tile, then waits for the kernel before (griddepcontrol.wait) and only then
reads `a`: weights are never written by a step, so the tile's loads overlap the previous kernels'
work, and the next GEMV of the chain does the same behind this one. Every other kernel of the
step waits before it lets its dependents launch, so the chain of waits stays that of plain
stream order. With `trigger_first=False` (the bounded cascade of `pdl.feed_on`) the next kernel
launches only after the wait; the kernel before a GEMV then lets the GEMV launch before its own
wait (`pdl.feeding`), so the weights stream during that kernel too, yet no more than ~4 kernels
are ever in flight (the unbounded cascade, every kernel triggering first, was 2-17 % slower).

Measured on one H100 (2026-12-05, `scripts/stream_probe.py`, 100 kernels back to back in a CUDA
graph): [16, 1024] x [1024, 4096] bf16 with [256, 128] tiles and 4 K splits took 2.95-3.07 us in
this order against 4.8-6.8 us waiting first (today's order of the other kernels) and 3.9-4.6 us
loading, then waiting and triggering; a plain 8.4 MB read in the same order 2.65-2.8 us.

Two forms of the weight tile (`tma`). The TMA form (the default for 16-bit weights whose rows
are contiguous and 16-byte aligned, on Hopper; `FTMOE_GEMV_TMA=0` turns it off) loads the whole
tile with one TMA copy into shared memory before the wait and computes c^T = w^T a^T on wgmma
(the [BLOCK_N, 16] tile: w^T is read from shared memory, `a` is the 16-column operand), so a
program holds 42-72 registers and 72 KB of shared memory: three programs per SM, and the next
GEMV's tiles land while this one still runs. The register form (fp32 weights, the tied head's
wte.t(), odd strides) fills its tile 16 bytes at a time through registers: the dense W2 (partials
summed as loaded) holds it in 190 registers, one program per SM, and the QKV / dense-W1 tiles
go to shared memory four 16-byte loads at a time (ptxas keeps them at 36 registers), so their
fill takes several round trips. Whole decode steps on one H100 (2026-12-07, `scripts/ab_decode.py
--variants base gemvtma=1`, one process): x0.955 / 0.963 / 0.946 / 0.960 at batches 1 / 2 / 4 / 8
back to back, x0.953 / 0.965 at 1 / 8 timed alone; the dense GEMVs' advance of the step at
batch 1 went from 2.81 to 1.62 us each (`scripts/critical_path.py`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import auto_switch, sm_count
from .fused_moe import _gelu_tanh
from .pdl import EARLY, FEED, launch_kwargs

#: the most rows one launch serves (BLOCK_M of the tl.dot)
MAX_ROWS = 16
#: a program's weight tile in bytes at most (it is held in registers while the program waits)
MAX_TILE_BYTES = 64 * 1024
#: a K split covers at least this many rows of w
MIN_SPLIT_K = 64
#: whether a 16-bit weight's tiles load with TMA by default (FTMOE_GEMV_TMA overrides)
TMA_DEFAULT = True
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _w_tile(W, k0, n0, offs_k, offs_n, nmask, K, stride_wk, stride_wn, TMA: tl.constexpr):
    """w[k0 + offs_k, offs_n] ([BLOCK_K, BLOCK_N]): loaded into registers, or with TMA (W a tensor
    descriptor) into shared memory, zero past w's edges."""
    if TMA:
        w = W.load([k0, n0])
    else:
        k = k0 + offs_k
        ptrs = W + k.to(tl.int64)[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
        w = tl.load(ptrs, mask=(k < K)[:, None] & nmask[None, :], other=0.0)
    return w


@triton.jit
def _a_tile(A, k0, offs_k, rows, rmask, K, stride_ap, stride_am, A_PARTS: tl.constexpr, GELU_A: tl.constexpr,
            DTYPE: tl.constexpr):
    """a[rows, k0 + offs_k] in DTYPE: loaded, or the sum of A_PARTS fp32 partials (then GELU)."""
    k = k0 + offs_k
    ptrs = A + rows[:, None] * stride_am + k[None, :]
    mask = rmask[:, None] & (k < K)[None, :]
    a = tl.load(ptrs, mask=mask, other=0.0)
    for p in tl.static_range(1, A_PARTS):
        a += tl.load(ptrs + p * stride_ap, mask=mask, other=0.0)
    if GELU_A:
        a = _gelu_tanh(a)
    return a.to(DTYPE)


@triton.jit
def _gemv_kernel(A, W, BIAS, C, IDS, PROBS, M, N, K, E, stride_ap, stride_am, stride_wk, stride_wn, stride_be,
                 stride_cs, stride_cm, HAS_BIAS: tl.constexpr, A_PARTS: tl.constexpr, GELU_A: tl.constexpr,
                 GELU: tl.constexpr, PARTS: tl.constexpr, IEEE: tl.constexpr, ITERS: tl.constexpr, TMA: tl.constexpr,
                 DTYPE: tl.constexpr, ROUTED: tl.constexpr, A_DIV: tl.constexpr, MUL_PROB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    ks = tl.program_id(1)
    if USE_PDL == 3:                               # FEED (pdl.pdl_start)
        tl.extra.cuda.gdc_launch_dependents()      # the next kernel may launch and load its weights now
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = ks * (ITERS * BLOCK_K)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    w_row = 0
    if ROUTED:   # program (., ., s) serves routed slot s: expert IDS[s] (-1: none), a row s // A_DIV
        if ROUTED == 1:                            # the ids come from the kernel just before
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
            if USE_PDL == 1:                       # the next GEMV may load its tiles during this one's
                tl.extra.cuda.gdc_launch_dependents()
        s = tl.program_id(2)
        e = tl.load(IDS + s, cache_modifier=".cg").to(tl.int32)
        w_row = tl.where(e >= 0, e * K, E * K)     # no expert: a tile wholly past w's end, no reads
        rmask = rmask & (rows * 0 + e >= 0)        # (a vector: the interpreter's & takes no scalar bool)
        A += (s // A_DIV).to(tl.int64) * stride_am
        C += s.to(tl.int64) * stride_cm
        BIAS += tl.maximum(e, 0).to(tl.int64) * stride_be
    w = _w_tile(W, w_row + k_lo, n0, offs_k, offs_n, nmask, K, stride_wk, stride_wn, TMA)   # weights are constant
    w_next = w
    if TMA and ITERS == 2:     # both TMA tiles of the split before the wait (2 x 32 KB: [256, 64] tiles)
        w_next = _w_tile(W, w_row + k_lo + BLOCK_K, n0, offs_k, offs_n, nmask, K, stride_wk, stride_wn, TMA)
    if ROUTED != 1:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()               # the kernel before has finished: `a` is complete
    if USE_PDL == 1 and ROUTED != 1:               # EARLY: the next kernel launches once `a` is ready
        tl.extra.cuda.gdc_launch_dependents()
    if TMA:   # c^T = w^T a^T: the [BLOCK_N, BLOCK_M] tile on wgmma, w^T read from shared memory
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in tl.static_range(ITERS):
        k0 = k_lo + it * BLOCK_K
        if it > 0:
            if TMA and ITERS == 2:
                w = w_next
            else:
                w = _w_tile(W, w_row + k0, n0, offs_k, offs_n, nmask, K, stride_wk, stride_wn, TMA)
        a = _a_tile(A, k0, offs_k, rows, rmask, K, stride_ap, stride_am, A_PARTS, GELU_A, DTYPE)
        if TMA:
            acc_t = tl.dot(tl.trans(w), tl.trans(a), acc_t)
        elif IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")    # fp32 weights: no silent tf32
        else:
            acc = tl.dot(a, w, acc)
    if TMA:
        acc = tl.trans(acc_t)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += bias[None, :] * tl.where(ks == 0, 1.0, 0.0)       # once: in the first K split
    if GELU:
        acc = _gelu_tanh(acc)
    if MUL_PROB:
        acc *= tl.load(PROBS + tl.program_id(2)).to(tl.float32)
    if PARTS:
        out = acc
    else:
        out = acc.to(DTYPE).to(C.dtype.element_ty)  # the GEMM's rounding, then the store's type
    c_ptrs = C + ks * stride_cs + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out, mask=rmask[:, None] & nmask[None, :])


def plan(N: int, K: int, elem_bytes: int, sms: int, parts: bool, splits: int | None = None) -> dict:
    """Tiles of one launch: BLOCK_N up to 128 columns; with `parts`, K split into `splits`, or by
    default into the most powers of two S that keep N tiles x S within one wave of `sms` programs
    and each split >= MIN_SPLIT_K rows; BLOCK_K the split's K rounded up to a power of two, capped
    so that a weight tile stays within MAX_TILE_BYTES (the split then loops ITERS tiles); 8 warps
    for tiles of >= 32K elements. Returns {BLOCK_N, BLOCK_K, ITERS, S, num_warps, tma_warps (the
    TMA form: one warpgroup)}."""
    bn = min(128, max(16, triton.next_power_of_2(N)))
    tiles = triton.cdiv(N, bn)
    s = splits if parts and splits else 1
    while parts and not splits and tiles * s * 2 <= sms and triton.cdiv(K, s * 2) >= MIN_SPLIT_K:
        s *= 2
    per = triton.cdiv(K, s)
    cap = max(16, triton.next_power_of_2(MAX_TILE_BYTES // (bn * elem_bytes) + 1) // 2)
    bk = min(max(16, triton.next_power_of_2(per)), cap)
    return {"BLOCK_N": bn, "BLOCK_K": bk, "ITERS": triton.cdiv(per, bk), "S": s,
            "num_warps": 8 if bk * bn >= 32768 else 4, "tma_warps": 4}


def gemv(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, parts: bool = False,
         gelu: bool = False, gelu_a: bool = False, out_dtype: torch.dtype | None = None,
         out: torch.Tensor | None = None, config: dict | None = None, trigger_first: bool = True,
         tma: bool | None = None, splits: int | None = None) -> torch.Tensor:
    """See the module docstring. a [M, K] or fp32 partials [P, M, K] (gelu_a: GELU of their sum);
    M <= MAX_ROWS. out: the result's tensor (its shape and dtype as they would be allocated);
    config overrides `plan`'s keys (tests, tuning). trigger_first (under PDL's EARLY mode): let
    the next kernel launch before this one's weight loads (another GEMV follows, or the chain of
    waits is left as it is); False: after the wait, once `a` is complete (`pdl.feed_on`).
    tma: load the weight tiles with TMA (None: where `tma_eligible`). splits (with parts): K in
    that many splits (None: `plan`'s)."""
    M, K = a.shape[-2:]
    Kw, N = w.shape
    assert K == Kw, f"a has K = {K}, w has {Kw} rows"
    assert M <= MAX_ROWS, f"gemv serves at most {MAX_ROWS} rows, got {M}"
    assert a.stride(-1) == 1, "a must be contiguous along K"
    assert not (gelu and parts), "GELU is not linear: it cannot be split over K"
    a_parts = a.shape[0] if a.dim() == 3 else 0
    assert a_parts or not gelu_a, "gelu_a applies to the sum of partials"
    assert a_parts or a.dtype == w.dtype, f"a is {a.dtype}, w is {w.dtype}"
    assert not a_parts or a.dtype == torch.float32, "partials are fp32"
    cfg = dict(plan(N, K, w.element_size(), sm_count(a.device), parts, splits), **(config or {}))
    S = cfg["S"] if parts else 1
    iters = triton.cdiv(triton.cdiv(K, S), cfg["BLOCK_K"])
    shape, dtype = ((S, M, N), torch.float32) if parts else ((M, N), out_dtype or w.dtype)
    c = out if out is not None else torch.empty(shape, dtype=dtype, device=a.device)
    assert c.shape == shape and c.dtype == dtype and c.is_contiguous(), \
        f"out is {tuple(c.shape)} {c.dtype}, expected {shape} {dtype}"
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), S)
    kw = launch_kwargs(a)
    if trigger_first and kw.get("USE_PDL") == EARLY:
        kw["USE_PDL"] = FEED
    use_tma = tma_eligible(w) if tma is None else tma
    assert not use_tma or tma_fits(w), f"TMA needs a 16-bit w with aligned contiguous rows, got {w.dtype} {w.stride()}"
    wt = TensorDescriptor(w, list(w.shape), list(w.stride()), [cfg["BLOCK_K"], cfg["BLOCK_N"]]) if use_tma else w
    _gemv_kernel[grid](
        a, wt, bias if bias is not None else w, c, w, w, M, N, K, 0, a.stride(0) if a_parts else 0, a.stride(-2),
        w.stride(0), w.stride(1), 0, c.stride(0) if parts else 0, c.stride(-2),
        HAS_BIAS=bias is not None, A_PARTS=a_parts, GELU_A=gelu_a, GELU=gelu, PARTS=parts,
        IEEE=w.dtype == torch.float32, ITERS=iters, TMA=use_tma, DTYPE=_TL_DTYPE[w.dtype], ROUTED=0, A_DIV=1,
        MUL_PROB=False, BLOCK_M=MAX_ROWS, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["tma_warps"] if use_tma else cfg["num_warps"], num_stages=1, **kw)
    return c


def gemv_experts(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, *,
                 probs: torch.Tensor | None = None, a_div: int = 1, gelu_a: bool = False, ids_ready: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed form, for the MoE layer of a decode step of few rows: for every slot s of ids
    [S] (int32 expert ids, -1: none), fp32 split-K partials c [P, S, N] whose sum is
    act(a[s // a_div]) @ w[ids[s]] + bias[ids[s]] (bias in partial 0), times probs[s] if given.
    a [T, K] in w's dtype, or fp32 partials [Q, S, K] (gelu_a: GELU of their sum, as W2 reads W1's);
    w [E, K, N] contiguous, 16-bit (TMA tiles only), bias [E, N]. A slot without an expert reads
    no weights and its rows of c are not written.
    ids_ready=False: the ids are written by the kernel just before (W1 after the top-k): each
    program waits for it, then reads its slot's id and weights, and lets the next kernel launch.
    ids_ready=True: they were written before the kernel just before had passed its wait (W2 after
    a W1 launched with ids_ready=False): the id and the weight tile load before the wait, while
    that kernel still runs."""
    E, K, N = w.shape
    S = ids.shape[0]
    assert experts_readable(w), f"gemv_experts needs a contiguous 16-bit w, got {w.dtype} {w.stride()}"
    cfg = _experts_plan(w)
    assert _whole_tiles(cfg, K), f"an expert's K = {K} must be whole tiles of the plan ({cfg})"
    assert ids.dtype == torch.int32 and ids.is_contiguous()
    a_parts = a.shape[0] if a.dim() == 3 else 0
    assert a.shape[-1] == K and a.stride(-1) == 1, f"a has K = {a.shape[-1]}, w has {K} rows per expert"
    assert not a_parts or (a.dtype == torch.float32 and a.shape[1] == S), "partials are fp32 [Q, S, K]"
    assert a_parts or a.dtype == w.dtype, f"a is {a.dtype}, w is {w.dtype}"
    P, bk, iters = cfg["S"], cfg["BLOCK_K"], cfg["ITERS"]
    c = out if out is not None else torch.empty(P, S, N, dtype=torch.float32, device=a.device)
    assert c.shape == (P, S, N) and c.dtype == torch.float32 and c.is_contiguous()
    wt = TensorDescriptor(w.view(E * K, N), [E * K, N], [N, 1], [bk, cfg["BLOCK_N"]])   # experts stacked
    kw = launch_kwargs(a)
    if kw.get("USE_PDL") == FEED:     # never let the next kernel launch before this one's wait (its ids)
        kw["USE_PDL"] = EARLY
    _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), P, S)](
        a, wt, bias if bias is not None else w, c, ids, probs if probs is not None else ids, 1, N, K, E,
        a.stride(0) if a_parts else 0, a.stride(-2), N, 1, bias.stride(0) if bias is not None else 0,
        c.stride(0), c.stride(1), HAS_BIAS=bias is not None, A_PARTS=a_parts, GELU_A=gelu_a, GELU=False,
        PARTS=True, IEEE=False, ITERS=iters, TMA=True, DTYPE=_TL_DTYPE[w.dtype], ROUTED=2 if ids_ready else 1,
        A_DIV=a_div, MUL_PROB=probs is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        num_warps=cfg["tma_warps"], num_stages=1, **kw)
    return c


def tma_on() -> bool:
    """FTMOE_GEMV_TMA: auto (the default: `TMA_DEFAULT`), 0 or 1."""
    v = auto_switch("FTMOE_GEMV_TMA")
    return v == "1" or (v == "auto" and TMA_DEFAULT)


def tma_eligible(w: torch.Tensor) -> bool:
    """Whether `gemv` loads w's tiles with TMA by default: `tma_on()` and `tma_fits(w)`."""
    return tma_on() and tma_fits(w)


def tma_fits(w: torch.Tensor) -> bool:
    """Whether w can be read with TMA: 16-bit, rows contiguous and 16-byte aligned, on a Hopper or
    later GPU (or the CPU interpreter)."""
    if w.dtype not in (torch.float16, torch.bfloat16) or w.stride(1) != 1:
        return False
    if w.data_ptr() % 16 or (w.stride(0) * w.element_size()) % 16:
        return False
    return w.device.type != "cuda" or torch.cuda.get_device_capability(w.device)[0] >= 9


def _experts_plan(w: torch.Tensor) -> dict:
    E, K, N = w.shape
    return plan(N, K, w.element_size(), sm_count(w.device), parts=True)


def experts_readable(w: torch.Tensor) -> bool:
    """w [E, K, N] contiguous and, as the stacked [E * K, N], TMA-readable."""
    E, K, N = w.shape
    return w.is_contiguous() and tma_fits(w.view(E * K, N))


def _whole_tiles(p: dict, K: int) -> bool:
    """The plan's splits x tiles cover K exactly: no tile reaches into the next expert's rows."""
    return p["S"] * p["ITERS"] * p["BLOCK_K"] == K


def experts_fit(w: torch.Tensor) -> bool:
    """Whether `gemv_experts` takes the experts w [E, K, N]: contiguous, TMA-readable, and each
    expert's K whole tiles of its plan."""
    return experts_readable(w) and _whole_tiles(_experts_plan(w), w.shape[1])
