"""MoE routing on the GPU, without host synchronisation.

`gate_topk`: u [N, H] @ wg [H, E] in fp32, softmax over all experts, top-k (ties to the
lower id) -> probs [N, k] fp32, ids [N, k] int32. One kernel.
`moe_align`: ids [N, k] -> slots grouped by expert, each group padded to BLOCK_M (the
sentinel N*k marks padding), the expert of every block and the padded total. One
single-program kernel, so it is cheap at decode batch sizes and graph-capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_topk_kernel(U, WG, PROBS, IDS, N, H, E, stride_u, K_TOP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    es = tl.arange(0, BLOCK_E)
    em = es < E
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hm = hs < H
        u = tl.load(U + rows[:, None].to(tl.int64) * stride_u + hs[None, :], mask=rm[:, None] & hm[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(WG + hs[:, None] * E + es[None, :], mask=hm[:, None] & em[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(u, w, input_precision="ieee")                  # exact fp32 (no tf32)
    logits = tl.where(em[None, :], acc, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    for j in tl.static_range(K_TOP):
        idx = tl.argmax(p, axis=1, tie_break_left=True)
        sel = es[None, :] == idx[:, None]
        pj = tl.sum(tl.where(sel, p, 0.0), axis=1)
        tl.store(PROBS + rows * K_TOP + j, pj, mask=rm)
        tl.store(IDS + rows * K_TOP + j, idx.to(tl.int32), mask=rm)
        p = tl.where(sel, -1.0, p)


def gate_topk(u: torch.Tensor, wg: torch.Tensor, k: int, probs_out=None, ids_out=None):
    N, H = u.shape
    E = wg.shape[1]
    probs = probs_out if probs_out is not None else torch.empty(N, k, dtype=torch.float32, device=u.device)
    ids = ids_out if ids_out is not None else torch.empty(N, k, dtype=torch.int32, device=u.device)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_M = 16                                     # tl.dot needs >= 16 rows; extra rows are masked
    BLOCK_H = 64
    _gate_topk_kernel[(triton.cdiv(N, BLOCK_M),)](u, wg, probs, ids, N, H, E, u.stride(0), K_TOP=k,
                                                  BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, BLOCK_E=BLOCK_E)
    return probs, ids


@triton.jit
def _moe_align_kernel(IDS, SORTED, BLOCK_EXPERT, NUM_POST, NK, E, MAX_LEN, MAX_BLOCKS,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    es = tl.arange(0, BLOCK_E)
    em = es < E
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c in range(0, NK, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(IDS + offs, mask=offs < NK, other=-1)
        counts += tl.sum((e[:, None] == es[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(NUM_POST, total)
    for c in range(0, MAX_LEN, CHUNK):                              # sentinel everywhere first
        offs = c + tl.arange(0, CHUNK)
        tl.store(SORTED + offs, tl.zeros([CHUNK], dtype=tl.int32) + NK, mask=offs < MAX_LEN)
    tl.debug_barrier()
    running = starts
    for c in range(0, NK, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        om = offs < NK
        e = tl.load(IDS + offs, mask=om, other=-1)
        onehot = (e[:, None] == es[None, :]).to(tl.int32)            # [CHUNK, BLOCK_E]
        rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)
        base = tl.sum(onehot * running[None, :], axis=1)
        tl.store(SORTED + base + rank, offs.to(tl.int32), mask=om)
        running += tl.sum(onehot, axis=0)
    for b0 in range(0, MAX_BLOCKS, CHUNK):
        bs = b0 + tl.arange(0, CHUNK)
        start = bs * BLOCK_M
        owner = tl.sum(((ends[None, :] <= start[:, None]) & em[None, :]).to(tl.int32), axis=1)
        tl.store(BLOCK_EXPERT + bs, tl.minimum(owner, E - 1), mask=bs < MAX_BLOCKS)


def align_sizes(nk: int, num_experts: int, block_m: int) -> tuple[int, int]:
    max_len = nk + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_len, block_m)
    return max_blocks * block_m, max_blocks


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, out=None):
    """ids [N, k] int32 -> (sorted_slots [max_blocks*BM], block_expert [max_blocks], num_post [1])."""
    nk = ids.numel()
    max_len, max_blocks = align_sizes(nk, num_experts, block_m)
    if out is None:
        out = (torch.empty(max_len, dtype=torch.int32, device=ids.device),
               torch.empty(max_blocks, dtype=torch.int32, device=ids.device),
               torch.empty(1, dtype=torch.int32, device=ids.device))
    sorted_slots, block_expert, num_post = out
    _moe_align_kernel[(1,)](ids, sorted_slots, block_expert, num_post, nk, num_experts, max_len, max_blocks,
                            BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=128, num_warps=4)
    return sorted_slots, block_expert, num_post
