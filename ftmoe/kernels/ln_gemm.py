"""Residual add + LayerNorm folded into the GEMM that consumes it, for steps of few rows.

In:  x [M, H] (the residual), optional add [M, H] or [P, M*k, H] (the previous GEMM's output or
     its split-K partials of top-k rows) and add_bias [H], the LN's weight and bias, and a dense
     GEMM w [H, N] (+ bias [N], optional tanh-GELU).
Out: (res = x + add + add_bias [M, H], c = act(LN(res) @ w + bias) [M, N]).

Every program covers all M rows (M <= BLOCK_M) and BLOCK_N columns: it sums the LN's inputs
once for the rows' statistics (one pass: sum and sum of squares, fp32), then again, tile by
tile, to normalise the A operand in registers. The first program also stores res. So the
LN kernel and the round trip of its output disappear from a decode step (its inputs come from
L2); the LN is the same function as `norm.add_layernorm`'s, up to fp32 rounding of the
statistics. `ln_gemm_ref` is the torch twin.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fused_moe import _gelu_tanh
from .norm import add_layout
from .pdl import launch_kwargs, pdl_start

#: steps of at most this many rows fold the LN into the next GEMM when FTMOE_LN_FOLD=1. Off by
#: default: written and CPU-tested in the sixth session, not yet run or timed on a GPU
#: (`scripts/ab_decode.py --variants base lnfold=1` is the measurement to make).
MAX_ROWS = 16
DEFAULT_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def enabled(M: int) -> bool:
    v = os.environ.get("FTMOE_LN_FOLD", "0")
    if v not in ("0", "1"):
        raise ValueError(f"FTMOE_LN_FOLD: expected 0 or 1, found {v!r}")
    return v == "1" and M <= MAX_ROWS


@triton.jit
def _ln_input(X, ADD, ADD_BIAS, rows, rmask, offs_k, K, stride_x, stride_add, stride_add_part,
              HAS_ADD: tl.constexpr, ADD_PARTS: tl.constexpr, ADD_ROWS: tl.constexpr, HAS_ADD_BIAS: tl.constexpr):
    """x + add + add_bias for rows x columns offs_k, fp32 (0 outside)."""
    m = rmask[:, None] & (offs_k < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        for p in tl.static_range(ADD_PARTS):
            for j in tl.static_range(ADD_ROWS):
                x += tl.load(ADD + p * stride_add_part + (rows * ADD_ROWS + j)[:, None] * stride_add + offs_k[None, :],
                             mask=m, other=0.0).to(tl.float32)
    if HAS_ADD_BIAS:
        x += tl.load(ADD_BIAS + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    return x


@triton.jit
def _ln_gemm_kernel(X, ADD, ADD_BIAS, LNW, LNB, RES, W, BIAS, C, M, N, K, eps,
                    stride_x, stride_add, stride_add_part, stride_res, stride_wk, stride_cm,
                    HAS_ADD: tl.constexpr, ADD_PARTS: tl.constexpr, ADD_ROWS: tl.constexpr,
                    HAS_ADD_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    offs_k = tl.arange(0, BLOCK_K)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _ln_input(X, ADD, ADD_BIAS, rows, rmask, k0 + offs_k, K, stride_x, stride_add, stride_add_part,
                      HAS_ADD, ADD_PARTS, ADD_ROWS, HAS_ADD_BIAS)
        s1 += tl.sum(x, axis=1)
        s2 += tl.sum(x * x, axis=1)
        if pid_n == 0:
            tl.store(RES + rows[:, None] * stride_res + (k0 + offs_k)[None, :], x.to(RES.dtype.element_ty),
                     mask=rmask[:, None] & ((k0 + offs_k) < K)[None, :])
    mean = s1 / K
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = _ln_input(X, ADD, ADD_BIAS, rows, rmask, kk, K, stride_x, stride_add, stride_add_part,
                      HAS_ADD, ADD_PARTS, ADD_ROWS, HAS_ADD_BIAS)
        lw = tl.load(LNW + kk, mask=kk < K, other=0.0).to(tl.float32)
        lb = tl.load(LNB + kk, mask=kk < K, other=0.0).to(tl.float32)
        a = tl.where(rmask[:, None], (x - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :], 0.0)
        a = a.to(W.dtype.element_ty)
        w = tl.load(W + kk[:, None] * stride_wk + offs_n[None, :], mask=(kk < K)[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")   # fp32 inputs: no silent tf32
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(C + rows[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def ln_gemm(x: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w: torch.Tensor,
            bias: torch.Tensor | None, add: torch.Tensor | None = None, add_bias: torch.Tensor | None = None,
            gelu: bool = False, tile: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(res, act(LN(res) @ w + bias)) for x [M, H] with M <= 16; see the module docstring. tile:
    a GEMM config (a fused-MoE or dense-table entry); its BLOCK_N, BLOCK_K and launch sizes."""
    M, K = x.shape
    N = w.shape[1]
    assert M <= MAX_ROWS and w.shape[0] == K and w.stride(1) == 1 and x.stride(1) == 1
    t = dict(DEFAULT_TILE, **{k: v for k, v in (tile or {}).items() if k in DEFAULT_TILE})
    # the A side is 1 + P (split-K partials) fp32 tiles per K step: keep the pipeline's shared
    # memory in bounds for P up to 8 (a dense W2's split-K) whatever the GEMM's own tile asked for
    t["BLOCK_K"], t["num_stages"] = min(t["BLOCK_K"], 128), min(t["num_stages"], 2)
    res = torch.empty_like(x)
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    parts, rows, stride_add, stride_part = add_layout(add, M)
    _ln_gemm_kernel[(triton.cdiv(N, t["BLOCK_N"]),)](
        x, add if add is not None else x, add_bias if add_bias is not None else weight, weight, ln_bias, res, w,
        bias if bias is not None else w, c, M, N, K, eps, x.stride(0), stride_add, stride_part, res.stride(0),
        w.stride(0), c.stride(0),
        HAS_ADD=add is not None, ADD_PARTS=parts, ADD_ROWS=rows, HAS_ADD_BIAS=add_bias is not None,
        HAS_BIAS=bias is not None, GELU=gelu, IEEE=x.dtype == torch.float32, BLOCK_M=16, BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"],
        num_warps=t["num_warps"], num_stages=t["num_stages"], **launch_kwargs(x))
    return res, c


def ln_gemm_ref(x, weight, ln_bias, eps, w, bias, add=None, add_bias=None, gelu=False):
    from .reference import add_layernorm_ref, gelu_tanh_ref

    if add is not None and add.dim() == 3:      # [P, M*k, H] partials of top-k rows: summed per row
        add = add.float().sum(0).view(x.shape[0], -1, x.shape[1]).sum(1)
    res, y = add_layernorm_ref(x, weight, ln_bias, eps, add, add_bias)
    c = y.float() @ w.float() + (bias.float() if bias is not None else 0.0)
    return res, (gelu_tanh_ref(c) if gelu else c).to(x.dtype)
