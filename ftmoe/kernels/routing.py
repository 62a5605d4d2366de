"""MoE routing on the GPU, without host synchronisation.

`softmax_topk`: fp32 gate logits [N, E] -> softmax over all experts, top-k (ties to the
lower id) -> probs [N, k] fp32, ids [N, k] int32, in one kernel; `gate_topk` puts the fp32
gate GEMM (cuBLAS) in front of it, or (opt-in, small batches) runs the whole gate in one kernel.
`moe_align`: ids [N, k] -> slots grouped by expert, each group padded to BLOCK_M (the
sentinel N*k marks padding), the expert of every block and the padded total. Negative ids
(another rank's experts under expert parallelism, padding rows) are left out. One
single-program kernel, so it is cheap at decode batch sizes and graph-capturable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Softmax over the E valid columns of fp32 logits [BLOCK_M, BLOCK_E], then the top K_TOP
    (ties to the lower id) stored for rows `rows` (mask rm); rows whose KV slot is < 0 get -1, 0."""
    logits = tl.where(em[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    if HAS_SLOTS:   # rows without a KV slot are padding: no expert (id -1), so no expert weights are read
        real = tl.load(SLOTS + rows, mask=rm, other=-1) >= 0
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
def _softmax_topk_kernel(LOGITS, PROBS, IDS, SLOTS, N, E, stride_l, K_TOP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_E: tl.constexpr, HAS_SLOTS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    es = tl.arange(0, BLOCK_E)
    em = es < E
    logits = tl.load(LOGITS + rows[:, None].to(tl.int64) * stride_l + es[None, :], mask=rm[:, None] & em[None, :],
                     other=0.0).to(tl.float32)                 # padding rows stay finite
    _softmax_topk_store(logits, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP, HAS_SLOTS)


@triton.jit
def _gate_topk_kernel(U, WG, PROBS, IDS, SLOTS, N, H, E, stride_u, stride_w, K_TOP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """The whole gate for BLOCK_M rows: fp32 logits u @ wg (u converted to fp32 on load, products
    and sums in fp32, no tensor cores), softmax and top-k. For small batches: one launch instead
    of a cuBLAS GEMV (two kernels at M = 1) and the top-k kernel."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    es = tl.arange(0, BLOCK_E)
    em = es < E
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < H
        a = tl.load(U + rows[:, None].to(tl.int64) * stride_u + ks[None, :], mask=rm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(WG + ks[:, None] * stride_w + es[None, :], mask=km[:, None] & em[None, :], other=0.0)
        acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
    _softmax_topk_store(acc, rows, rm, es, em, PROBS, IDS, SLOTS, K_TOP, HAS_SLOTS)


def softmax_topk(logits: torch.Tensor, k: int, probs_out=None, ids_out=None, slots: torch.Tensor | None = None):
    """logits [N, E] fp32 -> (probs [N, k] fp32: softmax over all E, ids [N, k] int32; ties to the lower id).
    slots [N] (optional, any int dtype): rows with a negative KV slot are padding and get id -1, prob 0."""
    N, E = logits.shape
    probs = probs_out if probs_out is not None else torch.empty(N, k, dtype=torch.float32, device=logits.device)
    ids = ids_out if ids_out is not None else torch.empty(N, k, dtype=torch.int32, device=logits.device)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_M = max(1, min(16, 4096 // BLOCK_E))
    if slots is not None:
        assert slots.shape == (N,) and slots.stride(0) == 1
    _softmax_topk_kernel[(triton.cdiv(N, BLOCK_M),)](logits, probs, ids, slots if slots is not None else ids, N, E,
                                                     logits.stride(0), K_TOP=k, BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E,
                                                     HAS_SLOTS=slots is not None)
    return probs, ids


#: rows up to which `gate_topk` runs the one-kernel gate when FTMOE_FUSED_GATE=1 (off by default
#: until measured on a GPU against cuBLAS + the top-k kernel)
FUSED_GATE_MAX_ROWS = 64


def _fused_gate_default(N: int) -> bool:
    return N <= FUSED_GATE_MAX_ROWS and os.environ.get("FTMOE_FUSED_GATE", "0") == "1"


def gate_topk(u: torch.Tensor, wg32: torch.Tensor, k: int, slots: torch.Tensor | None = None,
              fused: bool | None = None):
    """The MoE gate: fp32 logits then softmax + top-k. u [N, H] (any float dtype; fp32 avoids a
    cast), wg32 [H, E] fp32; slots as in `softmax_topk`. fused=False: cuBLAS (no TF32) then the
    top-k kernel; fused=True: one Triton kernel for all of it (default: FTMOE_FUSED_GATE=1 and
    N <= FUSED_GATE_MAX_ROWS)."""
    N, H = u.shape
    if fused is None:
        fused = _fused_gate_default(N)
    if not fused:
        return softmax_topk(u.float() @ wg32, k, slots=slots)
    E = wg32.shape[1]
    assert u.stride(1) == 1 and wg32.stride(1) == 1 and wg32.dtype == torch.float32
    probs = torch.empty(N, k, dtype=torch.float32, device=u.device)
    ids = torch.empty(N, k, dtype=torch.int32, device=u.device)
    if slots is not None:
        assert slots.shape == (N,) and slots.stride(0) == 1
    BLOCK_E = triton.next_power_of_2(E)
    _gate_topk_kernel[(N,)](u, wg32, probs, ids, slots if slots is not None else ids, N, H, E, u.stride(0),
                            wg32.stride(0), K_TOP=k, BLOCK_M=1, BLOCK_K=max(16, min(64, 4096 // BLOCK_E)),
                            BLOCK_E=BLOCK_E, HAS_SLOTS=slots is not None, num_warps=4)
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
        placed = om & (tl.sum(onehot, axis=1) > 0)                   # ids outside [0, E) are left out
        tl.store(SORTED + base + rank, offs.to(tl.int32), mask=placed)
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
    """ids [N, k] int32 -> (sorted_slots [max_blocks*BM], block_expert [max_blocks], num_post [1]).
    One program for small batches; above 256 slots, sort-based torch ops (still no host sync)."""
    nk = ids.numel()
    if nk > 256 and out is None:
        return _moe_align_sorted(ids, num_experts, block_m)
    max_len, max_blocks = align_sizes(nk, num_experts, block_m)
    if out is None:
        out = (torch.empty(max_len, dtype=torch.int32, device=ids.device),
               torch.empty(max_blocks, dtype=torch.int32, device=ids.device),
               torch.empty(1, dtype=torch.int32, device=ids.device))
    sorted_slots, block_expert, num_post = out
    _moe_align_kernel[(1,)](ids, sorted_slots, block_expert, num_post, nk, num_experts, max_len, max_blocks,
                            BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=128, num_warps=4)
    return sorted_slots, block_expert, num_post


def _moe_align_sorted(ids: torch.Tensor, num_experts: int, block_m: int):
    """moe_align for many slots through a stable sort: same outputs, parallel on the GPU.
    Only tensor ops with tensor or scalar operands (no item assignment, which copies from the
    host): it runs inside CUDA-graph capture."""
    E = num_experts
    flat = ids.reshape(-1).long()
    nk = flat.numel()
    max_len, max_blocks = align_sizes(nk, E, block_m)
    flat = torch.where(flat >= 0, flat, E)                               # negative ids: a last, dropped group
    counts = torch.zeros(E + 1, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices                        # slots grouped by expert, in order
    sorted_e = flat[order]
    e = sorted_e.clamp(max=E - 1)
    first = torch.cumsum(counts, 0) - counts                             # unpadded group starts
    dest = (ends - padded)[e] + torch.arange(nk, device=ids.device) - first[e]
    dest = torch.where(sorted_e < E, dest, max_len)                      # the dropped group lands past the end
    out = torch.full((max_len + 1,), nk, dtype=torch.int32, device=ids.device)
    out.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(max_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=E - 1).to(torch.int32)
    return out[:max_len], block_expert, ends[-1:].to(torch.int32)
