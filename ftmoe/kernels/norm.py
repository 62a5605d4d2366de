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
