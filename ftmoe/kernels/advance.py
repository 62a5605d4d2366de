"""Greedy chunks: the step-to-step update that lets decode steps run back to back on the GPU.

After a decode step's argmax, one small kernel records the step's tokens (and log probs) at
row CTR of the chunk's outputs, feeds the tokens back as the next step's ids, and moves every
live row (slot >= 0) one position on: position and context + 1, and the slot of the new
position looked up in the row's block table. Padding rows (slot -1) stay padding. One program
does all rows, so it can read CTR and write CTR + 1 with no race.

In:  tok [B] (int64), optionally lp [B] fp32, the chunk's outputs toks/lps [MAX_STEPS, B], and
     the graph bucket's static inputs (ids, positions, ctx, slots [B], tables [B, nb], ctr [1],
     int32). Out: those inputs updated in place; outputs row CTR written (none past MAX_STEPS).
`advance_decode_ref` is the pure-torch twin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _advance_kernel(TOK, LP, OUT_TOK, OUT_LP, IDS, POS, CTX, SLOTS, TABLES, CTR, B, NB, MAX_STEPS,
                    BS: tl.constexpr, HAS_LP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    m = r < B
    c = tl.load(CTR)
    tok = tl.load(TOK + r, mask=m, other=0)
    keep = m & ((r * 0 + c) < MAX_STEPS)
    tl.store(OUT_TOK + c * B + r, tok, mask=keep)
    if HAS_LP:
        tl.store(OUT_LP + c * B + r, tl.load(LP + r, mask=m, other=0.0), mask=keep)
    tl.store(IDS + r, tok.to(tl.int32), mask=m)
    slot = tl.load(SLOTS + r, mask=m, other=-1)
    live = m & (slot >= 0)
    pos = tl.load(POS + r, mask=m, other=0) + 1
    col = pos // BS
    blk = tl.load(TABLES + r.to(tl.int64) * NB + col, mask=live & (col < NB), other=0)
    tl.store(POS + r, pos, mask=live)
    tl.store(CTX + r, tl.load(CTX + r, mask=m, other=0) + 1, mask=live)
    tl.store(SLOTS + r, blk * BS + pos % BS, mask=live)
    tl.store(CTR, c + 1)


def advance_decode(tok: torch.Tensor, lp: torch.Tensor | None, toks: torch.Tensor, lps: torch.Tensor | None,
                   s: dict, block_size: int) -> None:
    B = tok.shape[0]
    tables = s["tables"]
    assert tables.stride(1) == 1 and tables.stride(0) == tables.shape[1] and toks.shape[1] == B
    _advance_kernel[(1,)](tok, lp if lp is not None else toks, toks, lps if lps is not None else toks, s["ids"],
                          s["positions"], s["ctx"], s["slots"], tables, s["ctr"], B, tables.shape[1], toks.shape[0],
                          BS=block_size, HAS_LP=lp is not None, BLOCK=triton.next_power_of_2(B), num_warps=4)


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
