"""MoE routing on the GPU, without host synchronisation.

`softmax_topk`: fp32 gate logits [N, E] (or split-K partials of them) -> softmax over all
experts, top-k (ties to the lower id) -> probs [N, k] fp32, ids [N, k] int32, in one kernel;
`gate_topk` puts the fp32 gate GEMM in front of it (cuBLAS, or the fused-MoE kernel in fp32 with
split-K: by default for up to 64 rows, where it measured faster; FTMOE_GATE chooses).
`moe_align`: ids [N, k] -> slots grouped by expert, each group padded to BLOCK_M (the
sentinel N*k marks padding), the expert of every block and the padded total. Negative ids
(another rank's experts under expert parallelism, padding rows) are left out. One program up
to 64 slots, a count kernel and a place kernel over 64-slot chunks above (batch 256: 4
programs; at most 64, each taking several chunks for very long prompts);
graph-capturable. `softmax_topk_align`: both in one program for up to 64 slots (the decode
bucket of 64 rows: one launch fewer a MoE layer).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import size_switch, warps_switch
from .fused_moe import fused_moe
from .pdl import launch_kwargs, pdl_start


@triton.jit
def _softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Softmax over the E valid columns of fp32 logits [BLOCK_M, BLOCK_E], then the top K_TOP
    (ties to the lower id) stored for rows `rows` (mask rm); rows whose KV slot is < 0 get -1, 0."""
    if HAS_SLOTS:   # rows without a KV slot are padding: no expert (id -1), so no expert weights are read
        real = tl.load(SLOTS + rows, mask=rm, other=-1) >= 0
        # a padding row's hidden state may hold anything (its expert outputs are never written):
        # give it finite logits, so no NaN reaches the softmax and argmax
        logits = tl.where(real[:, None], logits, 0.0)
    logits = tl.where(em[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    for j in tl.static_range(K_TOP):
        idx = tl.argmax(p, axis=1, tie_break_left=True)
        sel = es[None, :] == idx[:, None]
        pj = tl.sum(tl.where(sel, p, 0.0), axis=1)
        idj = idx.to(tl.int32)
        if HAS_SLOTS:
            pj = tl.where(real, pj, 0.0)
            idj = tl.where(real, idj, -1)
        tl.store(PROBS + rows * K_TOP + j, pj, mask=rm)
        tl.store(IDS + rows * K_TOP + j, idj, mask=rm)
        p = tl.where(sel, -1.0, p)


@triton.jit
def _softmax_topk_kernel(LOGITS, PROBS, IDS, SLOTS, N, E, stride_l, stride_p, K_TOP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HAS_SLOTS: tl.constexpr, PARTS: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    es = tl.arange(0, BLOCK_E)
    em = es < E
    logits = _gate_logits(LOGITS, rows, rm, es, em, stride_l, stride_p, BLOCK_M, BLOCK_E, PARTS)
    _softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP, HAS_SLOTS)   # padding rows stay finite


@triton.jit
def _gate_logits(LOGITS, rows, rm, es, em, stride_l, stride_p, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                 PARTS: tl.constexpr):
    """fp32 gate logits [BLOCK_M, BLOCK_E] of rows `rows`: the sum of PARTS split-K partials, in order."""
    ptrs = LOGITS + rows[:, None].to(tl.int64) * stride_l + es[None, :]
    logits = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for p in tl.static_range(PARTS):
        logits += tl.load(ptrs + p * stride_p, mask=rm[:, None] & em[None, :], other=0.0).to(tl.float32)
    return logits


def softmax_topk(logits: torch.Tensor, k: int, probs_out=None, ids_out=None, slots: torch.Tensor | None = None):
    """logits [N, E] fp32, or split-K partials [P, N, E] (summed here) -> (probs [N, k] fp32: softmax
    over all E, ids [N, k] int32; ties to the lower id). slots [N] (optional, any int dtype): rows
    with a negative KV slot are padding and get id -1, prob 0."""
    parts = logits if logits.dim() == 3 else logits.unsqueeze(0)
    P, N, E = parts.shape
    assert parts.stride(2) == 1
    probs = probs_out if probs_out is not None else torch.empty(N, k, dtype=torch.float32, device=logits.device)
    ids = ids_out if ids_out is not None else torch.empty(N, k, dtype=torch.int32, device=logits.device)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_M = max(1, min(16, 4096 // BLOCK_E))
    if slots is not None:
        assert slots.shape == (N,) and slots.stride(0) == 1
    _softmax_topk_kernel[(triton.cdiv(N, BLOCK_M),)](parts, probs, ids, slots if slots is not None else ids, N, E,
                                                     parts.stride(1), parts.stride(0), K_TOP=k, BLOCK_M=BLOCK_M,
                                                     BLOCK_E=BLOCK_E, HAS_SLOTS=slots is not None, PARTS=P,
                                                     **launch_kwargs(logits))
    return probs, ids


#: rows up to which FTMOE_GATE=triton runs the gate GEMM on the Triton kernel (decode batches);
#: more rows (prefill) always take cuBLAS
TRITON_GATE_MAX_ROWS = 256
#: the rows for which the default ("auto") takes the Triton gate: where it measured faster on one
#: H200, in one process with every variant's graphs replayed in turn (scripts/ab_decode.py,
#: 2026-11-28): batch 1 -1.5%, 8 -2.1%, 32 -0.3%, 64 -0.6%, but 128 +0.5% and 256 +0.3%
#: (benchmarks/results/2026-11-28-h200-ab-decode.txt)
AUTO_TRITON_GATE_ROWS = range(1, 65)


def gate_backend(N: int) -> str:
    """"cublas" or "triton" for an N-row gate. FTMOE_GATE: auto (default: triton for
    AUTO_TRITON_GATE_ROWS rows), cublas, or triton (up to TRITON_GATE_MAX_ROWS rows)."""
    want = os.environ.get("FTMOE_GATE", "auto")
    if want not in ("auto", "cublas", "triton"):
        raise ValueError(f"FTMOE_GATE: expected 'auto', 'cublas' or 'triton', found {want!r}")
    if want == "auto":
        return "triton" if N in AUTO_TRITON_GATE_ROWS else "cublas"
    return "triton" if want == "triton" and N <= TRITON_GATE_MAX_ROWS else "cublas"


def gate_gemm_config(N: int, H: int) -> tuple[dict, int]:
    """(tile config, split-K) of the fp32 gate GEMM [N, H] x [H, E] on the Triton kernel: few rows
    spread K over more programs (the 256 KB fp32 weight of a 1024 x 64 gate is read by 16), but
    never more splits than H has BLOCK_K slices (a split past them would only store zeros).
    FTMOE_GATE_SPLITS=N sets the split count at every size (for A/Bs; the same cap applies)."""
    cfg = {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    slices = triton.cdiv(H, cfg["BLOCK_K"])
    want = os.environ.get("FTMOE_GATE_SPLITS")     # an A/B override of the split count
    if want is not None and not (want.isdigit() and int(want) >= 1):
        raise ValueError(f"FTMOE_GATE_SPLITS: expected a whole number >= 1, found {want!r}")
    if N <= 16:
        cfg, split = dict(cfg, BLOCK_M=16), 16
    elif N <= 64:
        cfg, split = dict(cfg, BLOCK_M=16), 8
    else:
        cfg, split = dict(cfg, BLOCK_M=32), 4
    return cfg, min(int(want) if want is not None else split, slices)


#: steps of at most this many rows compute the gate logits in the LN2 kernel (`add_layernorm_gate`).
#: Whole decode steps on an H200 against a separate gate GEMM (scripts/ab_decode.py, sixth session):
#: -6.4 % at batch 1, -6.2 % at 2, -5.3 % at 4, -3.7 % at 8, -3.1 % at 16, -2.1 % at 32, -0.7 % at 64.
#: On one H100 (2026-12-07, same script) the separate gate is x1.016 at 32 but x0.992 at 64 (cuBLAS;
#: x0.991 with FTMOE_GATE=triton): 64 rows x 8 programs each re-read the row's Wo partials and a
#: 32 KB gate slice from L2 (7.9 us a launch)
LN_GATE_MAX_ROWS = 32


def ln_gate(N: int) -> bool:
    """Whether a step of N rows takes the gate logits from the LN2 kernel. FTMOE_LN_GATE: auto
    (default: up to LN_GATE_MAX_ROWS rows), 0 (never), 1 (always)."""
    return size_switch("FTMOE_LN_GATE", N, LN_GATE_MAX_ROWS)


def gate_topk(u: torch.Tensor, wg32: torch.Tensor, k: int, slots: torch.Tensor | None = None,
              backend: str | None = None):
    """The MoE gate: fp32 logits then softmax + top-k. u [N, H] (any float dtype; fp32 avoids a
    cast), wg32 [H, E] fp32; slots as in `softmax_topk`. backend "cublas": the GEMM on cuBLAS (no
    TF32), then the top-k kernel; "triton": the GEMM on the fused-MoE kernel in fp32 (IEEE
    products, split-K partials) and the top-k kernel sums the partials, two Triton launches that
    chain under programmatic dependent launch. Default: `gate_backend(N)`."""
    return softmax_topk(gate_logits(u, wg32, backend), k, slots=slots)


def gate_logits(u: torch.Tensor, wg32: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The gate GEMM of `gate_topk`: fp32 logits [N, E] (cuBLAS) or split-K partials [P, N, E]
    (Triton), for `softmax_topk` / `softmax_topk_align`."""
    N = u.shape[0]
    backend = backend or gate_backend(N)
    if backend == "cublas":
        return u.float() @ wg32
    cfg, split_k = gate_gemm_config(N, u.shape[1])
    assert wg32.dtype == torch.float32 and wg32.stride(1) == 1
    return fused_moe(u.float(), wg32.unsqueeze(0), None, N, config=cfg, split_k=split_k)


@triton.jit
def _align_count_kernel(IDS, CNT, NK, SPAN, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    """Program p: how many of slots [p*SPAN, (p+1)*SPAN) each expert got -> CNT[p, :]."""
    pdl_start(USE_PDL)
    p = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c in range(0, SPAN, CHUNK):
        offs = p * SPAN + c + tl.arange(0, CHUNK)
        e = tl.load(IDS + offs, mask=offs < NK, other=-1)
        counts += tl.sum((e[:, None] == es[None, :]).to(tl.int32), axis=0)
    tl.store(CNT + p * BLOCK_E + es, counts)


@triton.jit
def _align_place_kernel(IDS, CNT, SORTED, BLOCK_EXPERT, NUM_POST, NK, E, MAX_LEN, MAX_BLOCKS, SPAN,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                        COUNTED: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    _align_place(IDS, CNT, SORTED, BLOCK_EXPERT, NUM_POST, NK, E, MAX_LEN, MAX_BLOCKS, SPAN, tl.program_id(0),
                 tl.num_programs(0), BLOCK_M, BLOCK_E, CHUNK, BLOCK_P, COUNTED)


@triton.jit
def _align_place(IDS, CNT, SORTED, BLOCK_EXPERT, NUM_POST, NK, E, MAX_LEN, MAX_BLOCKS, SPAN, p, P,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                 COUNTED: tl.constexpr):
    """Program p of P places the slots of its span [p*SPAN, (p+1)*SPAN), CHUNK at a time. It reads
    every program's expert counts (COUNTED: from `_align_count_kernel`; else P = 1, SPAN = CHUNK
    and it counts its own slots), so it knows each expert's padded group [start, start + padded)
    and where its span's slots of that expert begin; a slot's rank among its chunk's slots of the
    same expert is a count over [CHUNK, CHUNK], and a running count carries it across chunks.
    The sentinel goes where no slot is placed (group padding: expert e % P == p; the tail past
    the last group and the block-to-expert map: a 1/P share each), so no two programs write
    one element and none needs a barrier."""
    es = tl.arange(0, BLOCK_E)
    em = es < E
    if COUNTED:
        ps = tl.arange(0, BLOCK_P)
        cnt = tl.load(CNT + ps[:, None] * BLOCK_E + es[None, :], mask=(ps < P)[:, None], other=0)
        counts = tl.sum(cnt, axis=0)
        before = tl.sum(tl.where((ps < p)[:, None], cnt, 0), axis=0)  # this expert's slots in earlier spans
    else:
        e = tl.load(IDS + tl.arange(0, CHUNK), mask=tl.arange(0, CHUNK) < NK, other=-1)
        counts = tl.sum((e[:, None] == es[None, :]).to(tl.int32), axis=0)
        before = counts * 0
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    i = tl.arange(0, CHUNK)
    for c in range(0, SPAN, CHUNK):
        offs = p * SPAN + c + i
        om = offs < NK
        e = tl.load(IDS + offs, mask=om, other=-1)
        onehot = (e[:, None] == es[None, :]).to(tl.int32)            # [CHUNK, BLOCK_E]; ids outside [0, E) match none
        rank = tl.sum(((e[:, None] == e[None, :]) & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
        base = tl.sum(onehot * (starts + before)[None, :], axis=1)
        tl.store(SORTED + base + rank, offs.to(tl.int32), mask=om & (tl.sum(onehot, axis=1) > 0))
        before += tl.sum(onehot, axis=0)
    j = tl.arange(0, BLOCK_M)
    pad_at = (starts + counts)[:, None] + j[None, :]                # [BLOCK_E, BLOCK_M]
    pad_m = (j[None, :] < (padded - counts)[:, None]) & (em & (es % P == p))[:, None]
    tl.store(SORTED + pad_at, tl.zeros([BLOCK_E, BLOCK_M], dtype=tl.int32) + NK, mask=pad_m)
    tail = tl.cdiv(MAX_LEN - total, P)
    for c in range(0, tail, CHUNK):                                  # [total, MAX_LEN): the tail, a share each
        t = c + i
        at = total + p * tail + t
        tl.store(SORTED + at, tl.zeros([CHUNK], dtype=tl.int32) + NK, mask=(t < tail) & (at < MAX_LEN))
    if p == 0:
        tl.store(NUM_POST, total)
    nb = tl.cdiv(MAX_BLOCKS, P)
    for c in range(0, nb, CHUNK):
        bs = p * nb + c + i
        owner = tl.sum(((ends[None, :] <= (bs * BLOCK_M)[:, None]) & em[None, :]).to(tl.int32), axis=1)
        tl.store(BLOCK_EXPERT + bs, tl.minimum(owner, E - 1), mask=(bs < MAX_BLOCKS) & (bs < (p + 1) * nb))


@triton.jit
def _topk_align_kernel(LOGITS, PROBS, IDS, SLOTS, SORTED, BLOCK_EXPERT, NUM_POST, N, E, stride_l, stride_p,
                       MAX_LEN, MAX_BLOCKS, K_TOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                       HAS_SLOTS: tl.constexpr, PARTS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                       USE_PDL: tl.constexpr = False):
    """One program: the softmax + top-k of all N rows (as `_softmax_topk_kernel`), then their
    slots aligned (as the one-program `_align_place_kernel`), which reads the ids just stored
    after a barrier (a CTA's global stores are visible to its threads past bar.sync)."""
    pdl_start(USE_PDL)
    rows = tl.arange(0, BLOCK_R)
    rm = rows < N
    es = tl.arange(0, BLOCK_E)
    em = es < E
    logits = _gate_logits(LOGITS, rows, rm, es, em, stride_l, stride_p, BLOCK_R, BLOCK_E, PARTS)
    _softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP, HAS_SLOTS)
    tl.debug_barrier()
    _align_place(IDS, IDS, SORTED, BLOCK_EXPERT, NUM_POST, N * K_TOP, E, MAX_LEN, MAX_BLOCKS, CHUNK, 0, 1,
                 BLOCK_M, BLOCK_E, CHUNK, 1, False)


def align_sizes(nk: int, num_experts: int, block_m: int) -> tuple[int, int]:
    max_len = nk + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_len, block_m)
    return max_blocks * block_m, max_blocks


def _align_outputs(nk: int, num_experts: int, block_m: int, dev):
    """Empty (sorted_slots [max_len], block_expert [max_blocks], num_post [1]) for nk slots."""
    max_len, max_blocks = align_sizes(nk, num_experts, block_m)
    return (torch.empty(max_len, dtype=torch.int32, device=dev), torch.empty(max_blocks, dtype=torch.int32, device=dev),
            torch.empty(1, dtype=torch.int32, device=dev))


#: up to this many slots one program aligns them all (one launch); above, spans of whole
#: ALIGN_CHUNK-slot chunks are counted and placed by one program each (two launches), at most
#: ALIGN_MAX_PROGRAMS programs (longer spans past that: each program's count table row stays
#: small). On an H200 one program took 12.8 us for 256 slots (a [256, 64] cumulative sum), a
#: 128-slot-chunk place kernel 12.6 us, 64-slot chunks 3.7 us (+1.1 us counting).
ALIGN_ONE_PROGRAM = 64
ALIGN_CHUNK = 64
ALIGN_MAX_PROGRAMS = 64


#: warps of the one-program align: 8. Whole decode steps on one H100 (2026-12-07, scripts/ab_decode.py,
#: one process) against 4: x0.991 at batch 64 (64 slots, 5.1 us a launch with 4 warps), level at 32
#: and 128 (those take the per-slot path and the two-kernel align); 16: x0.993 at 64
ALIGN_WARPS = 8


def align_warps() -> int:
    """Warps of the one-program align (up to ALIGN_ONE_PROGRAM slots): `ALIGN_WARPS`;
    FTMOE_ALIGN_WARPS overrides."""
    return warps_switch("FTMOE_ALIGN_WARPS", ALIGN_WARPS)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [N, k] int32 -> (sorted_slots [max_blocks*BM], block_expert [max_blocks], num_post [1]).
    Slots grouped by expert in slot order, each group padded to BM with the sentinel N*k (as is
    everything past num_post); negative ids are left out. No host synchronisation (graph-capturable)."""
    ids = ids.reshape(-1).contiguous()
    nk = ids.numel()
    dev = ids.device
    sorted_slots, block_expert, num_post = _align_outputs(nk, num_experts, block_m, dev)
    max_len, max_blocks = sorted_slots.numel(), block_expert.numel()
    BLOCK_E = triton.next_power_of_2(num_experts)
    kw = launch_kwargs(ids)
    if nk <= ALIGN_ONE_PROGRAM:
        chunk = max(16, triton.next_power_of_2(nk))
        _align_place_kernel[(1,)](ids, ids, sorted_slots, block_expert, num_post, nk, num_experts, max_len,
                                  max_blocks, chunk, BLOCK_M=block_m, BLOCK_E=BLOCK_E, CHUNK=chunk, BLOCK_P=1,
                                  COUNTED=False, num_warps=align_warps(), **kw)
        return sorted_slots, block_expert, num_post
    chunks = triton.cdiv(nk, ALIGN_CHUNK)
    span = triton.cdiv(chunks, min(chunks, ALIGN_MAX_PROGRAMS)) * ALIGN_CHUNK
    P = triton.cdiv(nk, span)
    cnt = torch.empty(P, BLOCK_E, dtype=torch.int32, device=dev)
    _align_count_kernel[(P,)](ids, cnt, nk, span, CHUNK=ALIGN_CHUNK, BLOCK_E=BLOCK_E, num_warps=4, **kw)
    _align_place_kernel[(P,)](ids, cnt, sorted_slots, block_expert, num_post, nk, num_experts, max_len, max_blocks,
                              span, BLOCK_M=block_m, BLOCK_E=BLOCK_E, CHUNK=ALIGN_CHUNK,
                              BLOCK_P=triton.next_power_of_2(P), COUNTED=True, num_warps=4, **kw)
    return sorted_slots, block_expert, num_post


#: steps of up to this many slots take their top-k and alignment from one kernel
#: (`softmax_topk_align`) when they fit one program (ALIGN_ONE_PROGRAM slots; aligned routing
#: runs past fast_model.SMALL_BATCH_SLOTS, so the decode bucket of 64 rows). Whole decode steps at
#: batch 64 on one H100 (2026-12-08, scripts/ab_decode.py, one process) against two kernels:
#: x0.990 / 0.989; with the fused-MoE preload x0.973 / 0.983 / 0.982 (the preload alone x0.990 /
#: 0.983); 16 warps instead of ALIGN_WARPS' 8 x1.001
TOPK_ALIGN_MAX_SLOTS = 64


def topk_align_fused(rows: int, k: int) -> bool:
    """Whether `softmax_topk_align` runs one kernel for rows x k slots. FTMOE_TOPK_ALIGN: auto (the
    default: up to TOPK_ALIGN_MAX_SLOTS slots), 0 (never), 1 (whenever they fit one program)."""
    nk = rows * k
    return nk <= ALIGN_ONE_PROGRAM and size_switch("FTMOE_TOPK_ALIGN", nk, TOPK_ALIGN_MAX_SLOTS)


def softmax_topk_align(logits: torch.Tensor, k: int, block_m: int | None, slots: torch.Tensor | None = None):
    """`softmax_topk` then `moe_align(ids, E, block_m)` over all E experts of the logits ->
    (probs, ids, routing): in one kernel where `topk_align_fused`, else in their own kernels;
    block_m None: no alignment (routing None)."""
    parts = logits if logits.dim() == 3 else logits.unsqueeze(0)
    P, N, E = parts.shape
    if block_m is None or not topk_align_fused(N, k):
        probs, ids = softmax_topk(logits, k, slots=slots)
        return probs, ids, None if block_m is None else moe_align(ids, E, block_m)
    assert parts.stride(2) == 1
    dev = logits.device
    probs = torch.empty(N, k, dtype=torch.float32, device=dev)
    ids = torch.empty(N, k, dtype=torch.int32, device=dev)
    sorted_slots, block_expert, num_post = _align_outputs(N * k, E, block_m, dev)
    if slots is not None:
        assert slots.shape == (N,) and slots.stride(0) == 1
    _topk_align_kernel[(1,)](parts, probs, ids, slots if slots is not None else ids, sorted_slots, block_expert,
                             num_post, N, E, parts.stride(1), parts.stride(0), sorted_slots.numel(),
                             block_expert.numel(), K_TOP=k,
                             BLOCK_R=triton.next_power_of_2(N), BLOCK_E=triton.next_power_of_2(E),
                             HAS_SLOTS=slots is not None, PARTS=P, BLOCK_M=block_m,
                             CHUNK=max(16, triton.next_power_of_2(N * k)), num_warps=align_warps(),
                             **launch_kwargs(logits))
    return probs, ids, (sorted_slots, block_expert, num_post)
