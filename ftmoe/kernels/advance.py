"""Greedy chunks: the step-to-step update that lets decode steps run back to back on the GPU.

After a decode step, one kernel (`greedy_advance`) takes the argmax of the step's logits (and
its log-softmax), records the tokens (and log probs) at row CTR of the chunk's outputs, feeds
the tokens back as the next step's ids, and moves every live row (slot >= 0) one position on:
position and context + 1, and the slot of the new position looked up in the row's block table.
Padding rows (slot -1) stay padding.

[B, SPLIT] programs each reduce a slice of a row's vocabulary to (max, first index of it, sum
of exp(x - max)); the last program to finish (an atomic counter, which it resets) merges the
slices of every row and does the update for all rows, so it alone reads CTR and writes CTR + 1.
The tokens are torch.argmax's (first index on ties; logits must not hold NaN), the log prob is
-log(sum exp(x - max)), the chosen token's log-softmax. Against torch's argmax + log-softmax +
a separate update kernel on an H100 (2026-12-07, scripts/critical_path.py --greedy): a batch-1
greedy step 692.4 against 702.5 us, batch 8 1140.6 against 1149.0 (torch's argmax alone was a
14 us reduction over one row of 51,200).

In:  logits [B, V] (any float dtype), the chunk's outputs toks/lps [MAX_STEPS, B], and the graph
     bucket's static inputs (ids, positions, ctx, slots [B], tables [B, nb], ctr [1], int32).
     Out: those inputs updated in place; outputs row CTR written (none past MAX_STEPS).
`greedy_advance_ref` (torch's argmax and log_softmax, then `advance_decode_ref`) is the twin.

Under tensor parallelism each rank holds its vocabulary slice's logits: the same kernel stores
each row's (max, first index, sum) of the slice instead of the update (`part=`), the ranks
all-gather those [3, B] partials, and `greedy_merge` (one program) combines them in vocabulary
order with the same merge and does the update, identically on every rank. Twins:
`greedy_partials_ref`, `greedy_merge_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_start


def step_inputs(packed: torch.Tensor, B: int, nb: int) -> dict:
    """Views of one int32 buffer [(4 + nb) * B + 1] as a decode graph bucket's static inputs, in
    its layout: ids, positions, ctx, slots [B] each, tables [B, nb], the chunk step counter ctr [1]."""
    return {"ids": packed[:B], "positions": packed[B:2 * B], "ctx": packed[2 * B:3 * B],
            "slots": packed[3 * B:4 * B], "tables": packed[4 * B:(4 + nb) * B].view(B, nb), "ctr": packed[-1:]}


@triton.jit
def _advance_rows(tok, lp, r, m, c, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, B, NB, MAX_STEPS,
                  BS: tl.constexpr, HAS_LP: tl.constexpr):
    keep = m & ((r * 0 + c) < MAX_STEPS)
    tl.store(OUT_TOK + c * B + r, tok, mask=keep)
    if HAS_LP:
        tl.store(OUT_LP + c * B + r, lp, mask=keep)
    tl.store(IDS + r, tok.to(tl.int32), mask=m)
    slot = tl.load(SLOTS + r, mask=m, other=-1)
    live = m & (slot >= 0)
    pos = tl.load(POS + r, mask=m, other=0) + 1
    col = pos // BS
    blk = tl.load(TABLES + r.to(tl.int64) * NB + col, mask=live & (col < NB), other=0)
    tl.store(POS + r, pos, mask=live)
    tl.store(CTX + r, tl.load(CTX + r, mask=m, other=0) + 1, mask=live)
    tl.store(SLOTS + r, blk * BS + pos % BS, mask=live)


def advance_decode_ref(tok: torch.Tensor, lp: torch.Tensor | None, toks: torch.Tensor, lps: torch.Tensor | None,
                       s: dict, block_size: int) -> None:
    c = int(s["ctr"][0])
    if c < toks.shape[0]:
        toks[c] = tok
        if lp is not None:
            lps[c] = lp
    s["ids"].copy_(tok)
    live = s["slots"] >= 0
    pos = s["positions"].long() + 1
    nb = s["tables"].shape[1]
    col = pos // block_size
    blk = torch.where(col < nb, s["tables"].long().gather(1, col.clamp(max=nb - 1)[:, None])[:, 0], 0)
    s["positions"].copy_(torch.where(live, pos, s["positions"].long()))
    s["ctx"].copy_(torch.where(live, s["ctx"].long() + 1, s["ctx"].long()))
    s["slots"].copy_(torch.where(live, blk * block_size + pos % block_size, s["slots"].long()))
    s["ctr"] += 1


@triton.jit
def _merge_parts(PM, PI, PS, r, m, k, km, SR, SK, V, HAS_LP: tl.constexpr, PI_BITS: tl.constexpr):
    """Rows r (mask m) over their parts k (mask km), each a (max, first index of it, sum of
    exp(x - max)) at PM / PI / PS + r * SR + k * SK: the row's max, the first index of it (parts
    ascend in the vocabulary, so the smallest index of an equal maximum), the sum over the parts
    rescaled to the row's max (1 without HAS_LP). PI_BITS: the indices are int32 stored in fp32 bits."""
    pm2 = m[:, None] & km[None, :]
    at = r[:, None] * SR + k[None, :] * SK
    pm = tl.load(PM + at, mask=pm2, other=-float("inf"), cache_modifier=".cg")
    if PI_BITS:
        pi = tl.load(PI + at, mask=pm2, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
    else:
        pi = tl.load(PI + at, mask=pm2, other=0, cache_modifier=".cg")
    top = tl.where(m, tl.max(pm, 1), 0.0)          # (rows past B: finite, so no NaN below)
    tok = tl.min(tl.where(pm == top[:, None], pi, V), 1).to(tl.int64)
    tot = top * 0.0 + 1.0                          # (without HAS_LP: unused)
    if HAS_LP:
        ps = tl.load(PS + at, mask=pm2, other=0.0, cache_modifier=".cg")
        tot = tl.sum(ps * tl.exp(pm - top[:, None]), 1)
    return tok, top, tot


@triton.jit
def _greedy_kernel(LOGITS, stride_l, V, PM, PI, PS, COUNT, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, CTR,
                   PART, VOFF, B, NB, MAX_STEPS, SPLIT, TILES, BS: tl.constexpr, HAS_LP: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PARTIAL: tl.constexpr = False,
                   USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    sp = tl.program_id(1)
    v = tl.arange(0, BLOCK_V)
    best = -float("inf")
    idx = 0
    tot = 0.0
    for t in range(TILES):
        off = (sp * TILES + t) * BLOCK_V + v
        x = tl.load(LOGITS + row.to(tl.int64) * stride_l + off, mask=off < V, other=-float("inf")).to(tl.float32)
        tm = tl.max(x, 0)
        ti = tl.argmax(x, 0, tie_break_left=True) + (sp * TILES + t) * BLOCK_V
        new = tl.maximum(best, tm)
        if HAS_LP:
            tot = tot * tl.exp(best - new) + tl.sum(tl.exp(x - new), 0)
        idx = tl.where(tm > best, ti, idx)    # tiles ascend: a later equal maximum keeps the first
        best = new
    tl.store(PM + row * SPLIT + sp, best)
    tl.store(PI + row * SPLIT + sp, idx)
    if HAS_LP:
        tl.store(PS + row * SPLIT + sp, tot)
    tl.debug_barrier()                        # every thread's stores made before the release below
    done = tl.atomic_add(COUNT, 1)            # acq_rel: the slices stored above are seen by the last
    if done == B * SPLIT - 1:
        r = tl.arange(0, BLOCK_B)
        m = r < B
        k = tl.arange(0, BLOCK_S)
        tok, top, sums = _merge_parts(PM, PI, PS, r, m, k, k < SPLIT, SPLIT, 1, V, HAS_LP, False)
        if PARTIAL:   # this rank's vocabulary slice: [3, B] (max, index + VOFF in fp32 bits, sum) for the TP merge
            tl.store(PART + r, top, mask=m)
            tl.store(PART + B + r, (tok + VOFF).to(tl.int32).to(tl.float32, bitcast=True), mask=m)
            tl.store(PART + 2 * B + r, sums, mask=m)
        else:
            lp = -tl.log(sums + tl.where(m, 0.0, 1.0))
            c = tl.load(CTR)
            _advance_rows(tok, lp, r, m, c, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, B, NB, MAX_STEPS, BS,
                          HAS_LP)
            tl.store(CTR, c + 1)
        tl.store(COUNT, 0)


@triton.jit
def _greedy_merge_kernel(PARTS, NP, V, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, CTR, B, NB, MAX_STEPS,
                         BS: tl.constexpr, HAS_LP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    """One program: the NP tensor-parallel ranks' [3, B] partials (`_greedy_kernel` PARTIAL) merged
    per row, then the rows advanced as `_greedy_kernel` does."""
    pdl_start(USE_PDL)
    r = tl.arange(0, BLOCK_B)
    m = r < B
    k = tl.arange(0, BLOCK_P)
    tok, top, tot = _merge_parts(PARTS, PARTS + B, PARTS + 2 * B, r, m, k, k < NP, 1, 3 * B, V, HAS_LP, True)
    lp = -tl.log(tot + tl.where(m, 0.0, 1.0))
    c = tl.load(CTR)
    _advance_rows(tok, lp, r, m, c, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, B, NB, MAX_STEPS, BS, HAS_LP)
    tl.store(CTR, c + 1)


class GreedyWork:
    """The per-slice partials and the counter of `greedy_advance` for B rows of V logits (the
    counter starts at 0 and the kernel leaves it there)."""

    BLOCK_V = 2048

    def __init__(self, B: int, V: int, device):
        tiles = triton.cdiv(V, self.BLOCK_V)
        # about two programs per SM at batch 1..8, one row's vocabulary per program past 256 rows
        self.split = max(1, min(tiles, 256 // max(B, 1)))
        self.tiles = triton.cdiv(tiles, self.split)
        self.split = triton.cdiv(tiles, self.tiles)           # no program with only empty tiles
        n = B * self.split
        self.pm = torch.empty(n, dtype=torch.float32, device=device)
        self.pi = torch.empty(n, dtype=torch.int32, device=device)
        self.ps = torch.empty(n, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        self.B, self.V = B, V


def greedy_advance(logits: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor | None, s: dict, block_size: int,
                   work: GreedyWork, part: torch.Tensor | None = None, vocab_start: int = 0) -> None:
    """The argmax of logits [B, V] (with lps: its log-softmax too) recorded at row CTR of toks
    (and lps), fed back as the next ids, every live row moved one position on, in one launch.
    part [3, B] fp32 (a tensor-parallel rank's vocabulary slice, from vocab_start): instead of
    the update, each row's (max, first index of it + vocab_start as int32 bits, sum of
    exp(x - max)) is stored there for `greedy_merge` to combine over the ranks."""
    B, V = logits.shape
    tables = s["tables"]
    assert logits.stride(1) == 1 and (work.B, work.V) == (B, V) and toks.shape[1] == B
    assert tables.stride(1) == 1 and tables.stride(0) == tables.shape[1]
    assert part is None or (part.dtype == torch.float32 and part.is_contiguous() and part.numel() == 3 * B)
    _greedy_kernel[(B, work.split)](
        logits, logits.stride(0), V, work.pm, work.pi, work.ps, work.count, toks, lps if lps is not None else work.ps,
        s["ids"], s["positions"], s["ctx"], s["slots"], tables, s["ctr"], part if part is not None else work.ps,
        vocab_start, B, tables.shape[1], toks.shape[0], work.split, work.tiles, BS=block_size,
        HAS_LP=lps is not None, BLOCK_V=work.BLOCK_V, BLOCK_B=triton.next_power_of_2(B),
        BLOCK_S=triton.next_power_of_2(work.split), PARTIAL=part is not None, num_warps=8, **launch_kwargs(logits))


def greedy_merge(parts: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor | None, s: dict, block_size: int,
                 vocab_size: int) -> None:
    """The tensor-parallel ranks' partials parts [TP, 3, B] (each `greedy_advance(part=)` of its
    vocabulary slice, the slices in vocabulary order) merged per row into the token and log prob
    of the whole vocabulary (first index on ties, as torch.argmax over the full logits), then
    recorded, fed back and the rows moved on as `greedy_advance` does; one program."""
    P, three, B = parts.shape
    tables = s["tables"]
    assert three == 3 and parts.dtype == torch.float32 and parts.is_contiguous() and toks.shape[1] == B
    assert tables.stride(1) == 1 and tables.stride(0) == tables.shape[1]
    _greedy_merge_kernel[(1,)](
        parts, P, vocab_size, toks, lps if lps is not None else parts, s["ids"], s["positions"], s["ctx"], s["slots"],
        tables, s["ctr"], B, tables.shape[1], toks.shape[0], BS=block_size, HAS_LP=lps is not None,
        BLOCK_B=triton.next_power_of_2(B), BLOCK_P=triton.next_power_of_2(P), num_warps=4, **launch_kwargs(parts))


def greedy_advance_ref(logits: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor | None, s: dict,
                       block_size: int, work: GreedyWork | None = None) -> None:
    tok = torch.argmax(logits, dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None])[:, 0] if lps is not None else None
    advance_decode_ref(tok, lp, toks, lps, s, block_size)


def greedy_partials_ref(logits: torch.Tensor, part: torch.Tensor, vocab_start: int) -> None:
    """`greedy_advance(part=)`'s twin: per row (max, first index + vocab_start in int32 bits, sum of exp(x - max))."""
    x = logits.float()
    top = x.max(-1).values
    idx = torch.argmax(x, dim=-1)          # the first index of the maximum
    part[0].copy_(top)
    part[1].copy_((idx + vocab_start).to(torch.int32).view(torch.float32))
    part[2].copy_(torch.exp(x - top[:, None]).sum(-1))


def greedy_merge_ref(parts: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor | None, s: dict,
                     block_size: int, vocab_size: int | None = None) -> None:
    """`greedy_merge`'s twin."""
    pm, pi, ps = parts[:, 0], parts[:, 1].contiguous().view(torch.int32).long(), parts[:, 2]
    top = pm.max(0).values
    tok = torch.where(pm == top, pi, torch.iinfo(torch.int64).max).min(0).values
    lp = -torch.log((ps * torch.exp(pm - top)).sum(0)) if lps is not None else None
    advance_decode_ref(tok, lp, toks, lps, s, block_size)
