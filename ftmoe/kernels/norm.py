"""Fused residual add + LayerNorm.

In:  x [N, H], optional add [N, H] (or [P, N*k, H] partials) and add_bias [H] (the previous GEMM's output and bias),
     LN weight/bias [H]. Out: (res = x + add + add_bias, y = LN(res)), both [N, H] in x.dtype.
One program per row; statistics in fp32. Replaces three kernels (bias add, residual add,
LayerNorm) between the GEMMs of a block. `add_layernorm_gate` also computes the MoE gate's fp32
logits from the LN output (several programs per row). `embed_layernorm` does the same for the first
block: token and position embedding gathers, their sum, LN1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import auto_switch, warps_switch
from .pdl import launch_kwargs, pdl_start


@triton.jit
def _row_input(X, ADD, ADD_BIAS, row, cols, m, stride_x, stride_add, stride_add_part, HAS_ADD: tl.constexpr,
               ADD_PARTS: tl.constexpr, ADD_ROWS: tl.constexpr, HAS_ADD_BIAS: tl.constexpr):
    """x + add + add_bias of one row, fp32. add is [ADD_PARTS, rows * ADD_ROWS, H]: split-K
    partials x top-k slots, all summed here."""
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        for p in tl.static_range(ADD_PARTS):
            for j in tl.static_range(ADD_ROWS):
                x += tl.load(ADD + p * stride_add_part + (row * ADD_ROWS + j) * stride_add + cols, mask=m,
                             other=0.0).to(tl.float32)
    if HAS_ADD_BIAS:
        x += tl.load(ADD_BIAS + cols, mask=m, other=0.0).to(tl.float32)
    return x


def add_layout(add: torch.Tensor | None, N: int) -> tuple[int, int, int, int]:
    """(parts P, rows per token k, row stride, part stride) of an add [N, H] or [P, N*k, H]
    (zeros without one), as the kernels that sum it take them."""
    if add is None:
        return 1, 1, 0, 0
    a3 = add if add.dim() == 3 else add.unsqueeze(0)
    parts, rows = a3.shape[0], a3.shape[1] // N
    assert a3.shape[1] == N * rows and a3.stride(2) == 1
    return parts, rows, a3.stride(1), a3.stride(0)


@triton.jit
def _add_layernorm_kernel(X, ADD, ADD_BIAS, W, B, RES, Y, Y32, H, eps, stride_x, stride_add, stride_add_part,
                          stride_res, stride_y, HAS_ADD: tl.constexpr, ADD_PARTS: tl.constexpr,
                          ADD_ROWS: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, WRITE_RES: tl.constexpr,
                          WRITE_Y32: tl.constexpr, BLOCK: tl.constexpr, PRE_W: tl.constexpr = False,
                          USE_PDL: tl.constexpr = False):
    cols = tl.arange(0, BLOCK)
    m = cols < H
    w, b = _ln_params(W, B, cols, m, PRE_W)
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x = _row_input(X, ADD, ADD_BIAS, row, cols, m, stride_x, stride_add, stride_add_part, HAS_ADD, ADD_PARTS,
                   ADD_ROWS, HAS_ADD_BIAS)
    if WRITE_RES:
        tl.store(RES + row * stride_res + cols, x.to(RES.dtype.element_ty), mask=m)
    _layernorm_store(x, row, cols, m, W, B, Y, Y32, H, eps, stride_y, WRITE_Y32, w, b, PRE_W)


@triton.jit
def _ln_params(W, B, cols, m, LOAD: tl.constexpr):
    """The LN weight and bias of one row's columns in fp32 where LOAD; else placeholders. Kernels
    call it with PRE_W before their PDL wait (parameters, which no kernel of the step writes);
    without PRE_W `_layernorm` loads them after the row's statistics."""
    if LOAD:
        return tl.load(W + cols, mask=m, other=0.0).to(tl.float32), tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    else:
        return 0.0, 0.0


@triton.jit
def _gate_columns(WG, cols, m, e, E):
    """The fp32 gate weights [H, COLS] of experts e (mask e < E)."""
    return tl.load(WG + cols[:, None] * E + e[None, :], mask=m[:, None] & (e < E)[None, :], other=0.0)


@triton.jit
def _layernorm(x, cols, m, W, B, Y, H, eps, w, b, PRE_W: tl.constexpr):
    """LayerNorm of one fp32 row x (statistics in fp32), rounded to Y's dtype; w, b: `_ln_params`'s."""
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(m, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    if not PRE_W:
        w, b = _ln_params(W, B, cols, m, True)
    return (xc * rstd * w + b).to(Y.dtype.element_ty)


@triton.jit
def _layernorm_store(x, row, cols, m, W, B, Y, Y32, H, eps, stride_y, WRITE_Y32: tl.constexpr, w, b,
                     PRE_W: tl.constexpr):
    """`_layernorm` of one fp32 row x stored to Y (and to Y32 in fp32)."""
    y = _layernorm(x, cols, m, W, B, Y, H, eps, w, b, PRE_W)
    tl.store(Y + row * stride_y + cols, y, mask=m)
    if WRITE_Y32:  # the rounded output again in fp32, for the fp32 MoE gate GEMM
        tl.store(Y32 + row * H + cols, y.to(tl.float32), mask=m)


@triton.jit
def _add_layernorm_gate_kernel(X, ADD, ADD_BIAS, W, B, RES, Y, WG, LOGITS, H, E, eps, stride_x, stride_add,
                               stride_add_part, stride_res, stride_y, HAS_ADD: tl.constexpr, ADD_PARTS: tl.constexpr,
                               ADD_ROWS: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                               COLS: tl.constexpr, PRE_W: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """Program (row, g): the row's add + LayerNorm (every program of the row the same, program 0
    stores res and y), then the fp32 gate logits of experts [g*COLS, (g+1)*COLS) from the rounded
    LN output: LOGITS[row, cols] = float(y) @ WG[:, cols]. PRE_W: the LN weight and bias and this
    program's gate columns loaded before the PDL wait."""
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    e = g * COLS + tl.arange(0, COLS)
    w, b = _ln_params(W, B, cols, m, PRE_W)
    if PRE_W:
        wg = _gate_columns(WG, cols, m, e, E)
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x = _row_input(X, ADD, ADD_BIAS, row, cols, m, stride_x, stride_add, stride_add_part, HAS_ADD, ADD_PARTS,
                   ADD_ROWS, HAS_ADD_BIAS)
    y = _layernorm(x, cols, m, W, B, Y, H, eps, w, b, PRE_W)
    if g == 0:
        tl.store(RES + row * stride_res + cols, x.to(RES.dtype.element_ty), mask=m)
        tl.store(Y + row * stride_y + cols, y, mask=m)
    if not PRE_W:
        wg = _gate_columns(WG, cols, m, e, E)
    logits = tl.sum(y.to(tl.float32)[:, None] * wg, axis=0)
    tl.store(LOGITS + row * E + e, logits, mask=e < E)


def add_layernorm_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, wg32: torch.Tensor,
                       add: torch.Tensor | None = None, add_bias: torch.Tensor | None = None, cols: int = 8):
    """`add_layernorm` (res, y: the same values) and the MoE gate's fp32 logits [N, E] =
    y.float() @ wg32 in one kernel: E / cols programs per row each recompute the row's LN (from L2)
    and take `cols` experts, so the gate needs no kernel of its own (the top-k kernel follows)."""
    N, H = x.shape
    E = wg32.shape[1]
    assert wg32.dtype == torch.float32 and wg32.is_contiguous() and wg32.shape[0] == H
    res, y = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    parts, rows, stride_add, stride_part = add_layout(add, N)
    _add_layernorm_gate_kernel[(N, triton.cdiv(E, cols))](
        x, add if add is not None else x, add_bias if add_bias is not None else weight, weight, bias, res, y, wg32,
        logits, H, E, eps, x.stride(0), stride_add, stride_part, res.stride(0), y.stride(0),
        HAS_ADD=add is not None, ADD_PARTS=parts, ADD_ROWS=rows,
        HAS_ADD_BIAS=add_bias is not None, BLOCK=triton.next_power_of_2(H), COLS=cols, PRE_W=pre_weights(),
        num_warps=4 if H <= 2048 else 8, **launch_kwargs(x))
    return res, y, logits


@triton.jit
def _embed_layernorm_kernel(IDS, POS, WTE, WPE, W, B, RES, Y, H, eps, stride_te, stride_pe, stride_res, stride_y,
                            BLOCK: tl.constexpr, PRE_W: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    cols = tl.arange(0, BLOCK)
    m = cols < H
    w, b = _ln_params(W, B, cols, m, PRE_W)
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    tok = tl.load(IDS + row).to(tl.int64)
    pos = tl.load(POS + row).to(tl.int64)
    x = tl.load(WTE + tok * stride_te + cols, mask=m, other=0.0).to(tl.float32) \
        + tl.load(WPE + pos * stride_pe + cols, mask=m, other=0.0).to(tl.float32)
    x = x.to(RES.dtype.element_ty)              # the embedding sum in the model's dtype, as torch adds it
    tl.store(RES + row * stride_res + cols, x, mask=m)
    _layernorm_store(x.to(tl.float32), row, cols, m, W, B, Y, Y, H, eps, stride_y, False, w, b, PRE_W)


def add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  add: torch.Tensor | None = None, add_bias: torch.Tensor | None = None,
                  res_out: torch.Tensor | None = None, y_out: torch.Tensor | None = None,
                  want_fp32: bool = False):
    """Returns (res, y), or (res, y, y.float()) with want_fp32. `res_out` may alias `x`.

    `add` may be [N, H], or [P, N*k, H]: P split-K partials of k rows per token (a top-k MoE
    output), all summed into the residual here."""
    N, H = x.shape
    write_res = add is not None or add_bias is not None
    res = (res_out if res_out is not None else torch.empty_like(x)) if write_res else x
    y = y_out if y_out is not None else torch.empty_like(x)
    y32 = torch.empty(N, H, dtype=torch.float32, device=x.device) if want_fp32 else y
    parts, rows, stride_add, stride_part = add_layout(add, N)
    _add_layernorm_kernel[(N,)](
        x, add if add is not None else x, add_bias if add_bias is not None else weight, weight, bias, res, y, y32,
        H, eps, x.stride(0), stride_add, stride_part, res.stride(0), y.stride(0), HAS_ADD=add is not None,
        ADD_PARTS=parts, ADD_ROWS=rows,
        HAS_ADD_BIAS=add_bias is not None, WRITE_RES=write_res, WRITE_Y32=want_fp32,
        BLOCK=triton.next_power_of_2(H), PRE_W=pre_weights(), num_warps=ln_warps(H), **launch_kwargs(x))
    return (res, y, y32) if want_fp32 else (res, y)


def pre_weights() -> bool:
    """Whether the LayerNorm kernels load their weight and bias (the LN2 + gate kernel its gate
    columns too) before the PDL wait, so those loads overlap the wait rather than follow the
    row's statistics (compiled for sm_90 they otherwise issue after the reductions' four
    barriers, on the critical path of each of a step's ~49 LNs): FTMOE_LN_PRELOAD auto (on), 0
    or 1, read at launch (so at graph capture). Whole decode steps on one H100 (2026-12-08,
    scripts/ab_decode.py, one process, against 0): x0.975 / 0.974 / 0.975 / 0.983 at batches
    1 / 2 / 4 / 8 (x0.978 / 0.981 at 1 / 8 in another round; timed alone x0.979 / 0.986),
    x0.992 at 16, x0.993 at 64, x0.999 at 256."""
    return auto_switch("FTMOE_LN_PRELOAD") != "0"


def ln_warps(H: int) -> int:
    """Warps of an add_layernorm program (one row): H / 64, from 4 to 16 (16 at H = 1024: 2
    elements a thread); FTMOE_LN_WARPS overrides. Whole decode steps on one H100 (2026-12-07,
    `scripts/ab_decode.py`, one process) against the earlier 4 warps at H = 1024: x0.962 at
    batch 1, x0.986 at 16, x0.996 at 64, x0.999 at 256 (8 warps: x0.973 / 0.995 / 0.998 / 0.998;
    32: x0.969 at 1): the one-row LN of a small step waits on its loads, more warps keep more
    of them in flight."""
    return warps_switch("FTMOE_LN_WARPS", max(4, min(16, H // 64)))


def embed_layernorm(wte: torch.Tensor, wpe: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(res = wte[ids] + wpe[positions], y = LN(res)) for ids/positions of any shape (flattened
    to N rows): the embedding gathers, their sum and the first LayerNorm in one kernel."""
    ids, positions = ids.reshape(-1).contiguous(), positions.reshape(-1).contiguous()   # row r reads element r
    N, H = ids.shape[0], wte.shape[1]
    assert wte.stride(1) == 1 and wpe.stride(1) == 1 and positions.shape[0] == N
    res = torch.empty(N, H, dtype=wte.dtype, device=wte.device)
    y = torch.empty_like(res)
    if N:
        _embed_layernorm_kernel[(N,)](ids, positions, wte, wpe, weight, bias, res, y, H, eps, wte.stride(0),
                                      wpe.stride(0), res.stride(0), y.stride(0), BLOCK=triton.next_power_of_2(H),
                                      PRE_W=pre_weights(), num_warps=4 if H <= 2048 else 8, **launch_kwargs(wte))
    return res, y
