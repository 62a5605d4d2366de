"""Grouped GEMM over experts (vLLM-style fused MoE) with fused epilogues.

In:  a [rows, K]; w [E, K, N] (FT's expert layout, N contiguous); bias [E, N]; routing as
     produced by `routing.moe_align` (slots grouped by expert, padded to BLOCK_M).
Out: c [N_slots, N]: c[s] = act(a[row(s)] @ w[e(s)] + bias[e(s)]) (* prob[s]), where row(s)
     is the token s // k (first GEMM) or the slot s itself (second GEMM).

One launch covers every expert: each program owns one BLOCK_M x BLOCK_N tile of one
expert's group, so an expert's weights are read once per N-tile per M-block, and experts
with no tokens cost nothing. `dense=True` is the one-expert case (a plain MLP GEMM with
the same epilogues) and needs no routing.

Under programmatic dependent launch a program may load its first weight tile before it waits
for the kernel before (`PRELOAD`): weights are constant, and the expert of a second GEMM comes
from routing that was complete before the first GEMM passed its own wait (so before this kernel
could launch); it is read past the L1 (`.cg`), since an earlier layer's kernel on the same SM may
have cached the buffer. The first GEMM's routing is written by the kernel just before it: it
never preloads. By default a launch preloads under the early trigger only (`preloads`), where
the kernel before lets it launch early; `FTMOE_MOE_PRELOAD` (auto; 0; 1) switches it.

`FTMOE_MOE_PERSISTENT=1` runs the aligned mode on a grid of resident programs that loop over the
routed tiles (`_fused_moe_persistent_kernel`): the plain grid covers the worst case's row-blocks
(every slot in its own expert: 64 blocks of 16 for 64 slots of 64 experts), so at batch 64 W1
launches 2,048 programs of which only the routed experts' (~26-40 experts: ~850-1,300) hold
slots; the rest start after them only to read NUM_POST and exit. Off by default until timed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import auto_switch, sm_count
from .pdl import EARLY, FEED, launch_kwargs, pdl_start

#: the PDL launch modes under which `preloads` says yes by default: the early trigger, where the
#: kernel before lets this one launch right after its own wait. Whole decode steps on one H100
#: (2026-12-08, scripts/ab_decode.py, one process, FTMOE_MOE_PRELOAD=1 against the default then,
#: off): x0.987 / 0.991 at batch 4, x0.999 at 8, x0.991 / 0.985 at 16, x0.990 / 0.983 at 64
#: (early trigger); x1.029 / 1.028 at 32, x1.010 at 128 (trigger at exit)
PRELOAD_MODES = (EARLY, FEED)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(z)) == x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3)
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def _mma(acc, a, w, IEEE: tl.constexpr):
    """acc + a @ w in fp32 (fp32 inputs in IEEE precision: no silent tf32)."""
    if IEEE:
        return acc + tl.dot(a, w, input_precision="ieee")
    return acc + tl.dot(a, w)


@triton.jit
def _aligned_block(SORTED, BLOCK_EXPERT, pid_m, BLOCK_M: tl.constexpr):
    """The slots and the expert of aligned row-block pid_m (read past the L1: see the module's note)."""
    slots = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M), cache_modifier=".cg")
    return slots, tl.load(BLOCK_EXPERT + pid_m, cache_modifier=".cg").to(tl.int64)


@triton.jit
def _slot_rows(slots, NUM_SLOTS, TOPK: tl.constexpr, A_PER_SLOT: tl.constexpr):
    """(which slots are real, the rows of A they read: the slot itself or its token)."""
    smask = slots < NUM_SLOTS
    if A_PER_SLOT:
        rows = slots
    else:
        rows = slots // TOPK
    return smask, tl.where(smask, rows, 0).to(tl.int64)


@triton.jit
def _store_tile(acc, C, BIAS, PROBS, expert, slots, smask, offs_n, nmask, stride_be, stride_cm, add_bias,
                HAS_BIAS: tl.constexpr, GELU: tl.constexpr, MUL_PROB: tl.constexpr):
    """The epilogue: + bias (where add_bias: once, in the first K split), GELU, x prob, stored."""
    if HAS_BIAS:
        bias = tl.load(BIAS + expert * stride_be + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += bias[None, :] * tl.where(add_bias, 1.0, 0.0)
    if GELU:
        acc = _gelu_tanh(acc)
    if MUL_PROB:
        acc *= tl.load(PROBS + slots, mask=smask, other=0.0)[:, None]
    c_ptrs = C + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=smask[:, None] & nmask[None, :])


@triton.jit
def _fused_moe_kernel(A, W, BIAS, C, PROBS, SORTED, BLOCK_EXPERT, NUM_POST,
                      N, K, NUM_SLOTS, stride_am, stride_we, stride_wk, stride_be, stride_cm, stride_cs,
                      TOPK: tl.constexpr, A_PER_SLOT: tl.constexpr, DENSE: tl.constexpr, PER_SLOT: tl.constexpr,
                      HAS_BIAS: tl.constexpr,
                      GELU: tl.constexpr, MUL_PROB: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      PRELOAD: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    # grouped ordering: GROUP_M row-blocks share each column sweep (L2 reuse of the weight tiles)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    if not PRELOAD:
        pdl_start(USE_PDL)     # the routing may come from the kernel just before: read it after the wait
    skip = False
    if DENSE:
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        expert = 0
    elif PER_SLOT:
        # small batches: program row-block m serves slot m alone (no sorting); rows 1.. are padding
        r = tl.arange(0, BLOCK_M)
        slots = tl.where(r == 0, pid_m, NUM_SLOTS)
        expert = tl.load(SORTED + pid_m, cache_modifier=".cg").to(tl.int64)   # the expert id of every slot
        # a negative id: the slot belongs to another rank's expert (expert parallelism) or is padding
        slots = tl.where(expert >= 0, slots, NUM_SLOTS)
        skip = expert < 0
        expert = tl.maximum(expert, 0)
    else:
        if pid_m * BLOCK_M >= tl.load(NUM_POST, cache_modifier=".cg"):
            return
        slots, expert = _aligned_block(SORTED, BLOCK_EXPERT, pid_m, BLOCK_M)
    smask, rows = _slot_rows(slots, NUM_SLOTS, TOPK, A_PER_SLOT)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    # split-K: program (., ks) covers K rows [ks * k_per, (ks + 1) * k_per) and writes partial ks
    ks = tl.program_id(1)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = ks * k_per
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + (k_lo + offs_k)[None, :]
    w_ptrs = W + expert * stride_we + (k_lo + offs_k)[:, None] * stride_wk + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_hi = tl.where(skip, k_lo, tl.minimum(K, k_lo + k_per))   # a skipped slot reads no weights
    k_start = k_lo
    if PRELOAD:   # the first weight tile before the wait (none for a skipped slot)
        kmask = offs_k < k_hi - k_lo
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        pdl_start(USE_PDL)
        acc = _mma(acc, tl.load(a_ptrs, mask=smask[:, None] & kmask[None, :], other=0.0), w, IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        kmask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=smask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(acc, a, w, IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    _store_tile(acc, C + ks.to(tl.int64) * stride_cs, BIAS, PROBS, expert, slots, smask, offs_n, nmask, stride_be,
                stride_cm, ks == 0, HAS_BIAS, GELU, MUL_PROB)


@triton.jit
def _fused_moe_persistent_kernel(A, W, BIAS, C, PROBS, SORTED, BLOCK_EXPERT, NUM_POST,
                                 N, K, NUM_SLOTS, stride_am, stride_we, stride_wk, stride_be, stride_cm,
                                 TOPK: tl.constexpr, A_PER_SLOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 GELU: tl.constexpr, MUL_PROB: tl.constexpr, IEEE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 USE_PDL: tl.constexpr = False):
    """The aligned mode on a grid of resident programs: program p takes tiles p, p + G, ... of the
    NUM_POST / BLOCK_M x cdiv(N, BLOCK_N) tiles that hold slots (m-major), in one loop that the
    compiler flattens, so the next tile's first loads are issued while this one's last K steps
    run. No program starts only to find its row-block empty (the grid covers the routed blocks of
    the worst case, every slot in its own expert)."""
    pdl_start(USE_PDL)         # the routing may come from the kernel just before
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.load(NUM_POST, cache_modifier=".cg") // BLOCK_M * num_n
    offs_k = tl.arange(0, BLOCK_K)
    for t in tl.range(pid, tiles, tl.num_programs(0), flatten=True):
        pid_m = t // num_n
        slots, expert = _aligned_block(SORTED, BLOCK_EXPERT, pid_m, BLOCK_M)
        smask, rows = _slot_rows(slots, NUM_SLOTS, TOPK, A_PER_SLOT)
        offs_n = (t % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # the columns again here, made to depend on k0 (min(k0, 0) is 0) so that they are not
            # hoisted: a tensor carried through the flattened loop loses its contiguity, and the
            # weight loads then go one element at a time, unpipelined (triton 3.6, sm_90: 130
            # ld.global.b16 and 230 registers at W1's batch-64 tile, against cp.async and 80)
            cols = (t % num_n) * BLOCK_N + tl.minimum(k0, 0) + tl.arange(0, BLOCK_N)
            kmask = offs_k < K - k0
            a = tl.load(A + rows[:, None] * stride_am + (k0 + offs_k)[None, :], mask=smask[:, None] & kmask[None, :],
                        other=0.0)
            w = tl.load(W + expert * stride_we + (k0 + offs_k)[:, None] * stride_wk + cols[None, :],
                        mask=kmask[:, None] & (cols < N)[None, :], other=0.0)
            acc = _mma(acc, a, w, IEEE)
        _store_tile(acc, C, BIAS, PROBS, expert, slots, smask, offs_n, nmask, stride_be, stride_cm, True,
                    HAS_BIAS, GELU, MUL_PROB)


DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def preloads(dense: bool, routing_ready: bool, pdl_mode: int) -> bool:
    """Whether a launch in PDL mode `pdl_mode` (0: none) loads its first weight tile before its
    wait: a dense GEMM or one whose routing was ready before the kernel just before it, under
    PRELOAD_MODES (`FTMOE_MOE_PRELOAD`: auto, 0 never, 1 always where it may: with PDL off too,
    where it changes nothing but the code path, which the CPU tests check)."""
    v = auto_switch("FTMOE_MOE_PRELOAD")
    return (dense or routing_ready) and (v == "1" or (v == "auto" and pdl_mode in PRELOAD_MODES))


def persistent_on(aligned: bool, split_k: int) -> bool:
    """Whether an aligned launch (one K split) runs on `_fused_moe_persistent_kernel`:
    `FTMOE_MOE_PERSISTENT` auto (off: not yet timed on a GPU), 0, 1."""
    return aligned and split_k == 1 and auto_switch("FTMOE_MOE_PERSISTENT") == "1"


_RESIDENT: dict = {}


def resident_programs(kernel, args: tuple, consts: dict, device: torch.device) -> int:
    """How many programs of this launch the GPU holds at once: SMs x programs per SM by registers,
    shared memory and threads of the compiled kernel (the CPU interpreter: `sm_count`'s 4)."""
    if device.type != "cuda":
        return sm_count(device)
    key = (kernel, device.index, tuple(sorted(consts.items())),
           tuple(x.dtype for x in args if isinstance(x, torch.Tensor)))
    if key not in _RESIDENT:
        k = kernel.warmup(*args, grid=(1,), **consts)
        k._init_handles()
        per_sm = programs_per_sm(k.n_regs, k.metadata.shared, consts.get("num_warps", 4),
                                 torch.cuda.get_device_properties(device))
        _RESIDENT[key] = sm_count(device) * per_sm
    return _RESIDENT[key]


def programs_per_sm(regs: int, shared: int, warps: int, props) -> int:
    """Programs of `warps` warps using `regs` registers a thread and `shared` bytes of shared
    memory that one SM of `props` (a torch device-properties object) holds at once (at least 1):
    registers go to a warp in 256s, each program's shared memory has 1 KB reserved beside it."""
    warp_regs = -(-regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // warp_regs // warps
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))


def fused_moe(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, num_slots: int, *,
              topk: int = 1, routing=None, probs: torch.Tensor | None = None, a_per_slot: bool = False,
              gelu: bool = False, mul_prob: bool = False, out: torch.Tensor | None = None,
              config: dict | None = None, split_k: int = 1, routing_ready: bool = False) -> torch.Tensor:
    """c [num_slots, N]. `routing` = (sorted_slots, block_expert, num_post) from moe_align with
    the same BLOCK_M as `config`; or an int32 tensor of expert ids [num_slots] (small batches: one
    program row per slot, no sorting); None means dense (one expert, slot = row).
    Slots with a negative expert id (both routed modes) are skipped: their rows of c are not
    written (pass a zeroed `out` where they must read as zeros).
    split_k > 1 (small batches, long K): returns fp32 partials [split_k, num_slots, N] whose sum
    is the result (summed deterministically by the consumer, `add_layernorm`).
    routing_ready: the routing was complete before the kernel just before this one started (the
    second GEMM's): with the dense case, this launch may load its first weight tile before its
    PDL wait (`preloads`)."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    E, K, N = w.shape
    assert a.shape[1] == K
    assert w.stride(2) == 1 and a.stride(1) == 1
    assert split_k == 1 or not gelu, "GELU is not linear: it cannot be split over K"
    if split_k > 1:
        c = out if out is not None else torch.empty(split_k, num_slots, N, dtype=torch.float32, device=a.device)
    else:
        c = out if out is not None else torch.empty(num_slots, N, dtype=a.dtype, device=a.device)
    dense = routing is None
    per_slot = isinstance(routing, torch.Tensor)
    if dense:
        num_m = triton.cdiv(num_slots, cfg["BLOCK_M"])
        sorted_slots = block_expert = num_post = c  # unused
    elif per_slot:
        num_m = num_slots
        sorted_slots, block_expert, num_post = routing, c, c
    else:
        sorted_slots, block_expert, num_post = routing
        num_m = block_expert.numel()
    grid = (num_m * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    kw = launch_kwargs(a)
    args = (a, w, bias if bias is not None else w, c, probs if probs is not None else a,
            sorted_slots, block_expert, num_post, N, K, num_slots,
            a.stride(0), w.stride(0), w.stride(1), bias.stride(0) if bias is not None and bias.dim() == 2 else 0,
            c.stride(-2), c.stride(0) if split_k > 1 else 0)
    consts = dict(TOPK=topk, A_PER_SLOT=a_per_slot, DENSE=dense, PER_SLOT=per_slot, HAS_BIAS=bias is not None,
                  GELU=gelu, MUL_PROB=mul_prob, IEEE=a.dtype == torch.float32, SPLIT_K=split_k,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **kw)
    if persistent_on(not (dense or per_slot), split_k):
        pargs = args[:-1]                               # no partial stride
        pconsts = {k: v for k, v in consts.items() if k not in ("DENSE", "PER_SLOT", "SPLIT_K", "GROUP_M")}
        try:
            G = min(grid[0], resident_programs(_fused_moe_persistent_kernel, pargs, pconsts, a.device))
            _fused_moe_persistent_kernel[(G,)](*pargs, **pconsts)
            return c
        except OutOfResources:
            pass    # a flattened loop that needs more shared memory than the plain kernel: launch that
    if preloads(dense, routing_ready, kw.get("USE_PDL", 0)):
        try:
            _fused_moe_kernel[grid](*args, PRELOAD=True, **consts)
            return c
        except OutOfResources:
            pass    # the peeled tile needs one more shared-memory buffer: a tile sized to the limit (256 rows)
    _fused_moe_kernel[grid](*args, PRELOAD=False, **consts)
    return c
