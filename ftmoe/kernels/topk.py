"""The gate's softmax and top-k selection as Triton device functions, shared by the top-k kernel
(`routing.softmax_topk`) and the first expert GEMM that routes its own slots from the gate logits
(`fused_moe(..., gate=...)`), so both give the same probabilities and ids bit for bit;
`softmax_topk_store` (both, stored) is shared by the top-k kernel and the LN2 + gate kernel's
top-k (`norm.add_layernorm_gate(..., topk=k)`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gate_softmax(logits, em, real, HAS_REAL: tl.constexpr):
    """Softmax over the valid columns (em [1, BLOCK_E]) of fp32 logits [BLOCK_M, BLOCK_E]. With
    HAS_REAL, rows not `real` [BLOCK_M] (padding: their hidden state may hold anything) get zero
    logits first, so no NaN reaches the softmax and the argmax."""
    if HAS_REAL:
        logits = tl.where(real[:, None], logits, 0.0)
    logits = tl.where(em, logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    return ex / tl.sum(ex, axis=1)[:, None]


@triton.jit
def topk_next(p, es):
    """The largest remaining probability of each row of p [BLOCK_M, BLOCK_E] (ties to the lower
    column es [1, BLOCK_E]): (prob [BLOCK_M], id [BLOCK_M] int32, p with that column taken out)."""
    idx = tl.argmax(p, axis=1, tie_break_left=True)
    sel = es == idx[:, None]
    pj = tl.sum(tl.where(sel, p, 0.0), axis=1)
    return pj, idx.to(tl.int32), tl.where(sel, -1.0, p)


@triton.jit
def softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Softmax over the E valid columns of fp32 logits [BLOCK_M, BLOCK_E], then the top K_TOP
    (ties to the lower id) stored for rows `rows` (mask rm); rows whose KV slot is < 0 get -1, 0."""
    real = rm
    if HAS_SLOTS:   # rows without a KV slot are padding: no expert (id -1), so no expert weights are read
        real = tl.load(SLOTS + rows, mask=rm, other=-1) >= 0
    p = gate_softmax(logits, em[None, :], real, HAS_SLOTS)
    for j in tl.static_range(K_TOP):
        pj, idj, p = topk_next(p, es[None, :])
        if HAS_SLOTS:
            pj = tl.where(real, pj, 0.0)
            idj = tl.where(real, idj, -1)
        tl.store(PROBS + rows * K_TOP + j, pj, mask=rm)
        tl.store(IDS + rows * K_TOP + j, idj, mask=rm)
