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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_start


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
def _greedy_kernel(LOGITS, stride_l, V, PM, PI, PS, COUNT, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, CTR,
                   B, NB, MAX_STEPS, SPLIT, TILES, BS: tl.constexpr, HAS_LP: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr = False):
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
        pm2 = m[:, None] & (k[None, :] < SPLIT)
        at = r[:, None] * SPLIT + k[None, :]
        pm = tl.load(PM + at, mask=pm2, other=-float("inf"), cache_modifier=".cg")
        pi = tl.load(PI + at, mask=pm2, other=0, cache_modifier=".cg")
        top = tl.where(m, tl.max(pm, 1), 0.0)          # (rows past B: finite, so no NaN below)
        tok = tl.min(tl.where(pm == top[:, None], pi, V), 1).to(tl.int64)
        lp = tok.to(tl.float32)
        if HAS_LP:
            ps = tl.load(PS + at, mask=pm2, other=0.0, cache_modifier=".cg")
            lp = -tl.log(tl.sum(ps * tl.exp(pm - top[:, None]), 1) + tl.where(m, 0.0, 1.0))
        c = tl.load(CTR)
        _advance_rows(tok, lp, r, m, c, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, B, NB, MAX_STEPS, BS, HAS_LP)
        tl.store(CTR, c + 1)
        tl.store(COUNT, 0)


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
                   work: GreedyWork) -> None:
    """The argmax of logits [B, V] (with lps: its log-softmax too) recorded at row CTR of toks
    (and lps), fed back as the next ids, every live row moved one position on, in one launch."""
    B, V = logits.shape
    tables = s["tables"]
    assert logits.stride(1) == 1 and (work.B, work.V) == (B, V) and toks.shape[1] == B
    assert tables.stride(1) == 1 and tables.stride(0) == tables.shape[1]
    _greedy_kernel[(B, work.split)](
        logits, logits.stride(0), V, work.pm, work.pi, work.ps, work.count, toks, lps if lps is not None else work.ps,
        s["ids"], s["positions"], s["ctx"], s["slots"], tables, s["ctr"], B, tables.shape[1], toks.shape[0],
        work.split, work.tiles, BS=block_size, HAS_LP=lps is not None, BLOCK_V=work.BLOCK_V,
        BLOCK_B=triton.next_power_of_2(B), BLOCK_S=triton.next_power_of_2(work.split),
        num_warps=8, **launch_kwargs(logits))


def greedy_advance_ref(logits: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor | None, s: dict,
                       block_size: int, work: GreedyWork | None = None) -> None:
    tok = torch.argmax(logits, dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None])[:, 0] if lps is not None else None
    advance_decode_ref(tok, lp, toks, lps, s, block_size)
