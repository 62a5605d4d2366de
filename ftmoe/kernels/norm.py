"""Fused residual add + LayerNorm.

In:  x [N, H], optional add [N, H] and add_bias [H] (the previous GEMM's output and bias),
     LN weight/bias [H]. Out: (res = x + add + add_bias, y = LN(res)), both [N, H] in x.dtype.
One program per row; statistics in fp32. Replaces three kernels (bias add, residual add,
LayerNorm) between the GEMMs of a block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layernorm_kernel(X, ADD, ADD_BIAS, W, B, RES, Y, H, eps, stride_x, stride_add, stride_res, stride_y,
                          HAS_ADD: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, WRITE_RES: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD + row * stride_add + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD_BIAS:
        x += tl.load(ADD_BIAS + cols, mask=m, other=0.0).to(tl.float32)
    if WRITE_RES:
        tl.store(RES + row * stride_res + cols, x.to(RES.dtype.element_ty), mask=m)
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(m, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=m)


def add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  add: torch.Tensor | None = None, add_bias: torch.Tensor | None = None,
                  res_out: torch.Tensor | None = None, y_out: torch.Tensor | None = None):
    """Returns (res, y). `res_out` may alias `x` (in-place residual update)."""
    N, H = x.shape
    write_res = add is not None or add_bias is not None
    res = (res_out if res_out is not None else torch.empty_like(x)) if write_res else x
    y = y_out if y_out is not None else torch.empty_like(x)
    _add_layernorm_kernel[(N,)](
        x, add if add is not None else x, add_bias if add_bias is not None else weight, weight, bias, res, y,
        H, eps, x.stride(0), add.stride(0) if add is not None else 0, res.stride(0), y.stride(0),
        HAS_ADD=add is not None, HAS_ADD_BIAS=add_bias is not None, WRITE_RES=write_res,
        BLOCK=triton.next_power_of_2(H), num_warps=4 if H <= 2048 else 8)
    return res, y


@triton.jit
def _add_layernorm_gate_kernel(X, ADD, ADD_BIAS, W, B, RES, Y, WG, PROBS, IDS, H, E, eps,
                               stride_x, stride_add, stride_res, stride_y,
                               HAS_ADD: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, K_TOP: tl.constexpr,
                               BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD + row * stride_add + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD_BIAS:
        x += tl.load(ADD_BIAS + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(RES + row * stride_res + cols, x.to(RES.dtype.element_ty), mask=m)
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(m, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=m)
    tl.debug_barrier()                                  # y is re-read below in chunks, by other threads
    es = tl.arange(0, BLOCK_E)
    em = es < E
    logits = tl.zeros([BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):                     # gate in fp32 on the rounded LN output
        hs = h0 + tl.arange(0, BLOCK_H)
        hm = hs < H
        yc = tl.load(Y + row * stride_y + hs, mask=hm, other=0.0).to(tl.float32)
        wg = tl.load(WG + hs[:, None] * E + es[None, :], mask=hm[:, None] & em[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(yc[:, None] * wg, axis=0)
    logits = tl.where(em, logits, float("-inf"))
    ex = tl.exp(logits - tl.max(logits, axis=0))
    p = ex / tl.sum(ex, axis=0)
    for j in tl.static_range(K_TOP):
        idx = tl.argmax(p, axis=0, tie_break_left=True)
        sel = es == idx
        tl.store(PROBS + row * K_TOP + j, tl.sum(tl.where(sel, p, 0.0), axis=0))
        tl.store(IDS + row * K_TOP + j, idx.to(tl.int32))
        p = tl.where(sel, -1.0, p)


def add_layernorm_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       gate_w: torch.Tensor, k: int, add: torch.Tensor | None = None,
                       add_bias: torch.Tensor | None = None, res_out: torch.Tensor | None = None):
    """add_layernorm followed by the MoE gate on its output, in one kernel.
    Returns (res, y, probs [N, k] fp32, ids [N, k] int32)."""
    N, H = x.shape
    E = gate_w.shape[1]
    res = res_out if res_out is not None else torch.empty_like(x)
    y = torch.empty_like(x)
    probs = torch.empty(N, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(N, k, dtype=torch.int32, device=x.device)
    BLOCK_E = triton.next_power_of_2(E)
    _add_layernorm_gate_kernel[(N,)](
        x, add if add is not None else x, add_bias if add_bias is not None else weight, weight, bias, res, y,
        gate_w, probs, ids, H, E, eps, x.stride(0), add.stride(0) if add is not None else 0, res.stride(0),
        y.stride(0), HAS_ADD=add is not None, HAS_ADD_BIAS=add_bias is not None, K_TOP=k,
        BLOCK=triton.next_power_of_2(H), BLOCK_H=max(16, min(128, 4096 // BLOCK_E)), BLOCK_E=BLOCK_E,
        num_warps=4 if H <= 2048 else 8)
    return res, y, probs, ids
