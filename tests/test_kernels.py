"""Every Triton kernel against its pure-torch twin on fresh random inputs.

On a machine without a GPU the kernels run in Triton's interpreter (fp32/fp16, small
shapes, large blocks); on a GPU the same tests run compiled, plus bf16 at larger sizes.
Outputs are poisoned (NaN) before each call so an unwritten element fails the check.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from ftmoe import kernels  # noqa: E402

if not kernels.available():
    pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)", allow_module_level=True)

from ftmoe.kernels import reference as ref  # noqa: E402
from ftmoe.kernels.attention import decode_attention, write_kv  # noqa: E402
from ftmoe.kernels import fused_moe as fused_moe_mod  # noqa: E402
from ftmoe.kernels.fused_moe import fused_moe  # noqa: E402
from ftmoe.kernels.norm import add_layernorm, embed_layernorm  # noqa: E402
from ftmoe.kernels.routing import gate_topk, moe_align, softmax_topk  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, b):
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) or NaN output"
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def rnd(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEV)


@pytest.fixture()
def gen(request):
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h", [(1, 64), (3, 100), (17, 256)])
@pytest.mark.parametrize("mode", ["plain", "add", "add+bias"])
def test_add_layernorm(gen, dtype, n, h, mode):
    x, w, b = rnd(n, h, dtype=dtype, gen=gen), rnd(h, dtype=dtype, gen=gen) + 1, rnd(h, dtype=dtype, gen=gen)
    add = rnd(n, h, dtype=dtype, gen=gen) if mode != "plain" else None
    ab = rnd(h, dtype=dtype, gen=gen) if mode == "add+bias" else None
    res_out = torch.full_like(x, float("nan"))
    y_out = torch.full_like(x, float("nan"))
    res, y = add_layernorm(x, w, b, 1e-5, add=add, add_bias=ab, res_out=res_out, y_out=y_out)
    want_res, want_y = ref.add_layernorm_ref(x, w, b, 1e-5, add, ab)
    assert rel(y, want_y) < TOL[dtype]
    assert rel(res, want_res) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,h", [(1, 64), (5, 100)])
def test_ln_weights_before_the_wait_change_nothing(gen, dtype, n, h, monkeypatch):
    """FTMOE_LN_PRELOAD=1 (the LN weight and bias, and the gate's columns, loaded before the PDL
    wait): add_layernorm (split-K partials + bias, fp32 copy), add_layernorm_gate and
    embed_layernorm give exactly what they give with the loads after the row's statistics."""
    from ftmoe.kernels.norm import add_layernorm_gate

    x, w, b = rnd(n, h, dtype=dtype, gen=gen), rnd(h, dtype=dtype, gen=gen) + 1, rnd(h, dtype=dtype, gen=gen)
    parts, ab = rnd(4, n, h, gen=gen), rnd(h, dtype=dtype, gen=gen)
    wg = rnd(h, 12, gen=gen, scale=h ** -0.5)
    wte, wpe = rnd(50, h, dtype=dtype, gen=gen), rnd(40, h, dtype=dtype, gen=gen)
    ids, pos = torch.randint(0, 50, (n,), generator=gen).to(DEV), torch.randint(0, 40, (n,), generator=gen).to(DEV)
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FTMOE_LN_PRELOAD", flag)
        got[flag] = (*add_layernorm(x, w, b, 1e-5, add=parts, add_bias=ab, want_fp32=True),
                     *add_layernorm_gate(x, w, b, 1e-5, wg, add=parts, add_bias=ab, cols=8),
                     *embed_layernorm(wte, wpe, ids, pos, w, b, 1e-5))
    assert len(got["1"]) == 8 and all(torch.equal(a, c) for a, c in zip(got["0"], got["1"]))
    want_res, want_y = ref.add_layernorm_ref(x, w, b, 1e-5, parts.sum(0).to(dtype) if dtype == torch.float32 else None,
                                             ab if dtype == torch.float32 else None)
    if dtype == torch.float32:
        assert rel(got["1"][1], want_y) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,h", [((1,), 64), ((5,), 96), ((2, 7), 64)])
def test_embed_layernorm(gen, dtype, shape, h):
    """Token + position embedding gathers, their sum (rounded to the model dtype, as torch adds)
    and LN1 in one kernel, against the gathers, the add and the LayerNorm twin; ids/positions of
    any shape become rows."""
    V, P = 50, 40
    wte, wpe = rnd(V, h, dtype=dtype, gen=gen), rnd(P, h, dtype=dtype, gen=gen)
    w, b = rnd(h, dtype=dtype, gen=gen) + 1, rnd(h, dtype=dtype, gen=gen)
    ids = torch.randint(0, V, shape, generator=gen).to(DEV)
    pos = torch.randint(0, P, (*shape, 2), generator=gen).to(DEV)[..., 1]     # strided, like a row slice
    res, y = embed_layernorm(wte, wpe, ids, pos, w, b, 1e-5)
    x = (wte[ids] + wpe[pos]).reshape(-1, h)
    want_res, want_y = ref.add_layernorm_ref(x, w, b, 1e-5)
    assert res.shape == y.shape == (ids.numel(), h) and res.dtype == y.dtype == dtype
    assert torch.equal(res, x) and rel(y, want_y) < TOL[dtype]


@pytest.mark.parametrize("backend", ["cublas", "triton"])    # the gate GEMM on cuBLAS or the fused-MoE kernel
@pytest.mark.parametrize("n,h,e,k", [(1, 64, 8, 1), (5, 96, 64, 1), (33, 64, 6, 2), (16, 32, 4, 4), (3, 100, 64, 2),
                                     (70, 1024, 64, 1), (3, 1024, 64, 2)])
def test_gate_topk(gen, n, h, e, k, backend):
    """Split-K partials (16, 8 or 4 of them, at most one per 64-wide slice of H) summed by the
    top-k kernel; H shorter than one slice; a last slice cut short."""
    u, wg = rnd(n, h, dtype=torch.float16, gen=gen), rnd(h, e, dtype=torch.float16, gen=gen, scale=0.2)
    probs, ids = gate_topk(u, wg.float(), k, backend=backend)
    want_p, want_i = ref.gate_topk_ref(u, wg, k)
    assert torch.equal(ids.cpu(), want_i.cpu())
    assert rel(probs, want_p) < 1e-5


@pytest.mark.parametrize("backend", ["cublas", "triton"])
@pytest.mark.parametrize("k", [1, 2])
def test_gate_topk_padding_rows_get_no_expert(gen, k, backend):
    """Rows with a negative KV slot (graph-bucket padding, prompt padding) get id -1, prob 0."""
    u, wg = rnd(37, 64, dtype=torch.float16, gen=gen), rnd(64, 16, dtype=torch.float16, gen=gen, scale=0.2)
    slots = torch.randint(-1, 100, (37,), generator=gen).to(DEV)
    slots[0] = -1
    probs, ids = gate_topk(u, wg.float(), k, slots=slots, backend=backend)
    want_p, want_i = ref.gate_topk_ref(u, wg, k, slots)
    assert torch.equal(ids.cpu(), want_i.cpu()) and bool((ids[slots < 0] == -1).all())
    assert rel(probs, want_p) < 1e-5 and bool((probs[slots < 0] == 0).all())


@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_gate_topk_ties_go_to_lower_id(backend):
    u = torch.zeros(3, 16, device=DEV)
    u[:, 0] = 1.0
    wg = torch.zeros(16, 8, device=DEV)
    wg[0, 2] = wg[0, 5] = 3.0     # experts 2 and 5 tie for every token
    probs, ids = gate_topk(u, wg, 2, backend=backend)
    assert ids.tolist() == [[2, 5]] * 3


def test_gate_split_k_never_exceeds_the_slices_of_h():
    from ftmoe.kernels.routing import gate_gemm_config

    assert [gate_gemm_config(n, h)[1] for n, h in ((1, 1024), (40, 1024), (70, 1024), (1, 64), (1, 100), (70, 32))] \
        == [16, 8, 4, 1, 2, 1]


def test_gate_splits_override(gen, monkeypatch):
    """FTMOE_GATE_SPLITS sets the Triton gate's split count (still capped by H's slices) and leaves
    the routing as it was; a malformed value names the switch."""
    from ftmoe.kernels.routing import gate_gemm_config

    u, wg = rnd(40, 256, gen=gen), rnd(256, 16, gen=gen)
    want_p, want_i = gate_topk(u, wg, 2, backend="triton")
    monkeypatch.setenv("FTMOE_GATE_SPLITS", "2")
    assert gate_gemm_config(40, 1024)[1] == 2 and gate_gemm_config(1, 64)[1] == 1
    probs, ids = gate_topk(u, wg, 2, backend="triton")
    assert torch.equal(ids, want_i) and rel(probs, want_p) < 1e-5
    monkeypatch.setenv("FTMOE_GATE_SPLITS", "0")
    with pytest.raises(ValueError, match="FTMOE_GATE_SPLITS: expected a whole number >= 1, found '0'"):
        gate_gemm_config(40, 1024)


def test_gate_backend_choice(monkeypatch):
    """Default (auto): Triton for 1-64 rows only; FTMOE_GATE=cublas always cuBLAS; =triton up
    to TRITON_GATE_MAX_ROWS rows; a bad value is an error naming the variable."""
    from ftmoe.kernels import routing

    monkeypatch.delenv("FTMOE_GATE", raising=False)
    assert [routing.gate_backend(n) for n in (1, 16, 64, 65, 256, 4096)] == \
        ["triton", "triton", "triton", "cublas", "cublas", "cublas"]
    monkeypatch.setenv("FTMOE_GATE", "cublas")
    assert routing.gate_backend(32) == "cublas"
    monkeypatch.setenv("FTMOE_GATE", "triton")
    assert routing.gate_backend(1) == routing.gate_backend(routing.TRITON_GATE_MAX_ROWS) == "triton"
    assert routing.gate_backend(routing.TRITON_GATE_MAX_ROWS + 1) == "cublas"
    monkeypatch.setenv("FTMOE_GATE", "fast")
    with pytest.raises(ValueError, match="FTMOE_GATE"):
        routing.gate_backend(1)


def test_softmax_topk_padding_rows_with_nan_logits():
    """A padding row (KV slot -1) may carry NaN or inf (its hidden state is never cleaned): it
    still gets id -1 and prob 0, and the real rows beside it are unaffected."""
    logits = torch.randn(4, 8)
    logits[1] = float("nan")
    logits[3, :4] = float("inf")
    slots = torch.tensor([5, -1, 7, -1])
    probs, ids = softmax_topk(logits.to(DEV), 2, slots=slots.to(DEV))
    want_p, want_i = torch.softmax(logits[[0, 2]], -1).topk(2, dim=-1)
    assert ids[[1, 3]].tolist() == [[-1, -1]] * 2 and probs[[1, 3]].tolist() == [[0.0, 0.0]] * 2
    assert torch.equal(ids[[0, 2]].cpu(), want_i.int()) and rel(probs[[0, 2]], want_p.to(DEV)) < 1e-6


def test_softmax_topk_sums_partials(gen):
    """[P, N, E] partials give the result of their sum."""
    parts = rnd(3, 9, 64, dtype=torch.float32, gen=gen)
    probs, ids = softmax_topk(parts, 2)
    want_p, want_i = softmax_topk(parts.sum(0), 2)
    assert torch.equal(ids, want_i) and rel(probs, want_p) < 1e-6


def _assert_align_equal(got, want):
    """The whole outputs: placed slots, group padding and the tail past num_post (sentinel), and
    every block's expert (clamped to E - 1 past the end)."""
    assert int(got[2]) == int(want[2])
    assert torch.equal(got[0].cpu(), want[0].cpu())
    assert torch.equal(got[1].cpu(), want[1].cpu())


@pytest.mark.parametrize("n,k,e,bm", [(1, 1, 64, 16), (7, 1, 8, 16), (40, 2, 8, 16), (256, 1, 64, 16),
                                      (300, 1, 64, 64), (257, 1, 4, 32), (1000, 2, 64, 64), (4096, 1, 64, 128),
                                      (5000, 2, 64, 16)])
def test_moe_align(gen, n, k, e, bm):
    """One program up to 64 slots; count + place over 64-slot chunks above (2 to 64 programs
    here; 10000 slots: 53 programs of 3 chunks each)."""
    ids = torch.randint(0, e, (n, k), generator=gen, dtype=torch.int32).to(DEV)
    if n > 100:
        ids[: n // 2] = 3          # skewed: one expert gets half the tokens, many get none
    _assert_align_equal(moe_align(ids, e, bm), ref.moe_align_ref(ids, e, bm))


@pytest.mark.parametrize("warps", ["1", "2", "16"])
def test_moe_align_one_program_warps(gen, monkeypatch, warps):
    """FTMOE_ALIGN_WARPS changes the one-program align's launch, not its result (64 slots, skewed);
    a malformed value names the switch."""
    from ftmoe.kernels import routing

    ids = torch.randint(0, 64, (64, 1), generator=gen, dtype=torch.int32).to(DEV)
    ids[:20] = 7
    monkeypatch.setenv("FTMOE_ALIGN_WARPS", warps)
    _assert_align_equal(moe_align(ids, 64, 16), ref.moe_align_ref(ids, 64, 16))
    monkeypatch.setenv("FTMOE_ALIGN_WARPS", "3")
    with pytest.raises(ValueError, match="FTMOE_ALIGN_WARPS: expected a power of two from 1 to 32, found '3'"):
        routing.align_warps()


@pytest.mark.parametrize("n,k,e,parts,bm", [(1, 1, 64, 1, 16), (33, 1, 64, 8, 16), (64, 1, 64, 8, 16),
                                            (21, 3, 10, 2, 32), (64, 1, 64, 1, 64)])
def test_softmax_topk_align_one_kernel(gen, monkeypatch, n, k, e, parts, bm):
    """The one-kernel top-k + alignment (FTMOE_TOPK_ALIGN=1) gives the top-k kernel's ids and
    `moe_align`'s routing of them, and its probs to a few ulps (the same code on another tile: a
    GPU sums a row's exponentials in another order; on an H100, 2026-12-08, one input in a few
    runs differed in the last bit), padding rows (KV slot -1, NaN logits, prob 0) included;
    outputs are NaN / -7 poisoned by the allocator hook below, so an unwritten element fails."""
    from ftmoe.kernels import routing

    logits = rnd(parts, n, e, dtype=torch.float32, gen=gen)
    logits[:, ::2, 3] += 2.0                          # skewed: many rows share expert 3
    slots = torch.arange(n, dtype=torch.int64, device=DEV)
    slots[1::5] = -1
    logits[:, 1::5] = float("nan")                    # padding rows
    want_p, want_i = softmax_topk(logits, k, slots=slots)
    want_r = moe_align(want_i, e, bm)
    empty = torch.empty

    def poisoned(*size, dtype=None, device=None):
        t = empty(*size, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(routing.torch, "empty", poisoned)
    monkeypatch.setenv("FTMOE_TOPK_ALIGN", "1")
    assert routing.topk_align_fused(n, k)
    probs, ids, got_r = routing.softmax_topk_align(logits, k, bm, slots=slots)
    monkeypatch.undo()
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(probs, want_p, rtol=1e-6, atol=0)
    assert torch.equal(probs[1::5], want_p[1::5]) and (probs[1::5] == 0).all()
    _assert_align_equal(got_r, want_r)


def test_softmax_topk_align_rule(monkeypatch):
    """auto follows TOPK_ALIGN_MAX_SLOTS; 1 still needs one program's worth of slots; block_m None
    aligns nothing; a malformed value names the switch."""
    from ftmoe.kernels import routing

    monkeypatch.setattr(routing, "TOPK_ALIGN_MAX_SLOTS", 64)
    assert routing.topk_align_fused(64, 1) and routing.topk_align_fused(32, 2) and not routing.topk_align_fused(65, 1)
    monkeypatch.setenv("FTMOE_TOPK_ALIGN", "0")
    assert not routing.topk_align_fused(64, 1)
    monkeypatch.setenv("FTMOE_TOPK_ALIGN", "1")
    assert routing.topk_align_fused(64, 1) and not routing.topk_align_fused(128, 1)
    assert routing.softmax_topk_align(torch.randn(4, 8, device=DEV), 1, None)[2] is None
    monkeypatch.setenv("FTMOE_TOPK_ALIGN", "yes")
    with pytest.raises(ValueError, match="FTMOE_TOPK_ALIGN: expected auto, 0 or 1, found 'yes'"):
        routing.topk_align_fused(8, 1)


def _routing(n, k, e, gen):
    logits = torch.randn(n, e, generator=gen)
    p = torch.softmax(logits, -1)
    probs, ids = p.topk(k, dim=-1)
    return probs.to(DEV), ids.to(torch.int32).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,e,K,N", [(1, 1, 8, 64, 96), (3, 1, 8, 64, 64), (37, 2, 4, 96, 80), (64, 1, 16, 64, 64)])
@pytest.mark.parametrize("stage", ["w1_gelu", "w2_prob"])
def test_fused_moe(gen, dtype, n, k, e, K, N, stage):
    probs, ids = _routing(n, k, e, gen)
    if n == 64:
        ids[:] = 5                 # every token on one expert; the others get none
    w = rnd(e, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = rnd(e, N, dtype=dtype, gen=gen, scale=0.1)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
    routing = moe_align(ids, e, cfg["BLOCK_M"])
    a_per_slot = stage == "w2_prob"
    a = rnd(n * k if a_per_slot else n, K, dtype=dtype, gen=gen)
    out = torch.full((n * k, N), float("nan"), dtype=dtype, device=DEV)
    fused_moe(a, w, bias, n * k, topk=k, routing=routing, probs=probs, a_per_slot=a_per_slot,
              gelu=stage == "w1_gelu", mul_prob=stage == "w2_prob", out=out, config=cfg)
    want = ref.fused_moe_ref(a, w, bias, ids, probs, k, a_per_slot=a_per_slot, gelu=stage == "w1_gelu",
                             mul_prob=stage == "w2_prob")
    assert rel(out, want) < TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,K,N", [(1, 64, 64), (5, 96, 130), (33, 64, 64)])
def test_fused_moe_dense_mode(gen, dtype, m, K, N):
    a, w, bias = rnd(m, K, dtype=dtype, gen=gen), rnd(1, K, N, dtype=dtype, gen=gen, scale=K ** -0.5), \
        rnd(1, N, dtype=dtype, gen=gen)
    out = torch.full((m, N), float("nan"), dtype=dtype, device=DEV)
    fused_moe(a, w, bias, m, gelu=True, out=out, config={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64})
    want = ref.gelu_tanh_ref(a.float() @ w[0].float() + bias[0].float())
    assert rel(out, want) < TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,n,k,e,split_k", [("dense", 1, 1, 1, 1), ("dense", 33, 1, 1, 3), ("per_slot", 5, 2, 4, 1),
                                                ("per_slot", 7, 1, 8, 3), ("aligned", 37, 2, 4, 1), ("aligned", 64, 1, 8, 1)])
def test_fused_moe_preload_equals_plain(gen, monkeypatch, dtype, mode, n, k, e, split_k):
    """The first weight tile loaded before the PDL wait (FTMOE_MOE_PRELOAD=1) gives the plain
    kernel's results bit for bit: dense, per-slot (split-K partials too) and aligned second
    GEMMs, skipped slots (-1) still unwritten; an odd K leaves the first tile partly masked."""
    K, N = 80, 96
    probs, ids = _routing(n, k, e, gen)
    if mode != "dense":
        ids[::3, 0] = -1
    w = rnd(e, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = rnd(e, N, dtype=dtype, gen=gen, scale=0.1)
    a = rnd(n * k, K, dtype=dtype, gen=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    routing = {"dense": None, "per_slot": ids.view(-1), "aligned": moe_align(ids, e, cfg["BLOCK_M"])}[mode]
    outs = []
    for v in ("0", "1"):
        monkeypatch.setenv("FTMOE_MOE_PRELOAD", v)
        assert fused_moe_mod.preloads(mode == "dense", True, 0) == (v == "1")
        shape = (split_k, n * k, N) if split_k > 1 else (n * k, N)
        out = torch.full(shape, float("nan"), dtype=torch.float32 if split_k > 1 else dtype, device=DEV)
        fused_moe(a, w, bias, n * k, topk=k, routing=routing, probs=probs, a_per_slot=True, mul_prob=mode != "dense",
                  out=out, config=cfg, split_k=split_k, routing_ready=True)
        outs.append(out)
    assert torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0))
    if mode != "dense":
        skipped = (ids.view(-1) < 0).to(DEV)
        assert bool(outs[1][..., skipped, :].isnan().all()) and not bool(outs[1][..., ~skipped, :].isnan().any())
    want = ref.fused_moe_ref(a, w, bias, torch.zeros_like(ids) if mode == "dense" else ids, probs, k,
                             a_per_slot=True, mul_prob=mode != "dense")
    got = outs[1].sum(0) if split_k > 1 else outs[1]
    keep = (ids.view(-1) >= 0).to(DEV)
    assert rel(got[keep], want[keep]) < TOL[dtype] * 2


def test_fused_moe_preload_falls_back_when_shared_memory_runs_out(gen, monkeypatch):
    """A preloading tile that needs more shared memory than the card has (seen on an H100 at 256
    rows with FTMOE_MOE_PRELOAD=1) is launched again without the preload, same result."""
    from triton.runtime.errors import OutOfResources

    a, w = rnd(9, 64, dtype=torch.float32, gen=gen), rnd(1, 64, 48, dtype=torch.float32, gen=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    real, seen = fused_moe_mod._fused_moe_kernel, []

    class Tight:
        def __getitem__(self, grid):
            def launch(*args, PRELOAD, **kw):
                seen.append(PRELOAD)
                if PRELOAD:
                    raise OutOfResources(245760, 232448, "shared memory")
                return real[grid](*args, PRELOAD=PRELOAD, **kw)
            return launch

    monkeypatch.setenv("FTMOE_MOE_PRELOAD", "1")
    monkeypatch.setattr(fused_moe_mod, "_fused_moe_kernel", Tight())
    got = fused_moe(a, w, None, 9, config=cfg)
    assert seen == [True, False]
    assert rel(got, a @ w[0]) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage,n,k,e,programs", [("w1_gelu", 37, 2, 4, 3), ("w1_gelu", 64, 1, 8, 1),
                                                  ("w2_prob", 64, 1, 8, 5), ("w2_prob", 1, 1, 4, 1000),
                                                  ("w2_prob", 40, 1, 16, 2)])
def test_fused_moe_persistent_equals_plain(gen, monkeypatch, dtype, stage, n, k, e, programs):
    """The aligned mode on resident programs looping over the routed tiles (FTMOE_MOE_PERSISTENT=1)
    gives the plain kernel's results bit for bit, with 1, a few or more programs than tiles; both
    GEMMs' epilogues; skipped slots (-1) stay unwritten; odd K and N leave tiles partly masked;
    one case routes every token to one expert (its row-blocks follow each other in one program)."""
    K, N = 80, 96
    probs, ids = _routing(n, k, e, gen)
    ids[::3, 0] = -1
    if n == 40:
        ids[1:, 0] = 3
    w = rnd(e, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = rnd(e, N, dtype=dtype, gen=gen, scale=0.1)
    w1 = stage == "w1_gelu"
    a = rnd(n if w1 else n * k, K, dtype=dtype, gen=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    routing = moe_align(ids, e, cfg["BLOCK_M"])
    launched = []
    real = fused_moe_mod.resident_programs
    monkeypatch.setattr(fused_moe_mod, "resident_programs",
                        lambda *args: launched.append(real(*args)) or programs)
    monkeypatch.setenv("FTMOE_MOE_PRELOAD", "0")
    outs = []
    for v in ("0", "1"):
        monkeypatch.setenv("FTMOE_MOE_PERSISTENT", v)
        out = torch.full((n * k, N), float("nan"), dtype=dtype, device=DEV)
        fused_moe(a, w, bias, n * k, topk=k, routing=routing, probs=probs, a_per_slot=not w1, gelu=w1,
                  mul_prob=not w1, out=out, config=cfg)
        outs.append(out)
    assert len(launched) == 1 and launched[0] >= 1                # only the persistent launch asks
    assert torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0))
    skipped = (ids.view(-1) < 0).to(DEV)
    assert bool(outs[1][skipped].isnan().all()) and not bool(outs[1][~skipped].isnan().any())
    want = ref.fused_moe_ref(a, w, bias, ids, probs, k, a_per_slot=not w1, gelu=w1, mul_prob=not w1)
    assert rel(outs[1][~skipped], want[~skipped]) < TOL[dtype] * 2


def test_programs_per_sm():
    """An H100 SM (64K registers, 228 KB of shared memory, 2048 threads) holds 3 of the persistent
    W1 tile at batch 64 (80 registers, 75,776 bytes, 4 warps: shared memory decides), 2 at 230
    registers (registers decide), 16 of a tiny 4-warp kernel (threads decide), and one of a
    program too large for two."""
    from types import SimpleNamespace

    h100 = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                           max_threads_per_multi_processor=2048)
    per_sm = fused_moe_mod.programs_per_sm
    assert per_sm(80, 75776, 4, h100) == 3
    assert per_sm(230, 40960, 4, h100) == 2          # 232 registers a thread: 7424 a warp -> 8 warps
    assert per_sm(32, 0, 4, h100) == 16
    assert per_sm(112, 151552, 8, h100) == 1 and per_sm(255, 200000, 8, h100) == 1
    assert per_sm(80, 75776, 4, SimpleNamespace()) == 3   # properties torch lacks: the H100's


def test_fused_moe_persistent_rule(gen, monkeypatch):
    """Only aligned launches of one K split go persistent, only with FTMOE_MOE_PERSISTENT=1 (auto
    is off until timed); per-slot and dense launches keep the plain kernel; a malformed value
    names the switch; a flattened loop out of shared memory is launched on the plain kernel."""
    from triton.runtime.errors import OutOfResources

    on = fused_moe_mod.persistent_on
    monkeypatch.delenv("FTMOE_MOE_PERSISTENT", raising=False)
    assert not on(True, 1)
    monkeypatch.setenv("FTMOE_MOE_PERSISTENT", "1")
    assert on(True, 1) and not on(True, 2) and not on(False, 1)
    probs, ids = _routing(9, 1, 4, gen)
    a, w = rnd(9, 64, dtype=torch.float32, gen=gen), rnd(4, 64, 48, dtype=torch.float32, gen=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}

    class Tight:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise OutOfResources(245760, 232448, "shared memory")
            return launch

    monkeypatch.setattr(fused_moe_mod, "_fused_moe_persistent_kernel", Tight())
    monkeypatch.setattr(fused_moe_mod, "resident_programs", lambda *args: 2)
    got = fused_moe(a, w, None, 9, routing=moe_align(ids, 4, 16), config=cfg)
    want = ref.fused_moe_ref(a, w, None, ids, probs, 1)
    assert rel(got, want) < TOL[torch.float32]
    monkeypatch.setenv("FTMOE_MOE_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="FTMOE_MOE_PERSISTENT: expected auto, 0 or 1, found 'yes'"):
        on(True, 1)


def test_fused_moe_preload_rule(monkeypatch):
    """auto: under the early trigger (PRELOAD_MODES) only, not at exit or without PDL; never for a
    first GEMM, whose routing the kernel just before writes; 1: wherever it may."""
    from ftmoe.kernels import pdl

    pre = fused_moe_mod.preloads
    monkeypatch.delenv("FTMOE_MOE_PRELOAD", raising=False)
    for mode in (pdl.EARLY, pdl.FEED):
        assert pre(True, False, mode) and pre(False, True, mode) and not pre(False, False, mode)
    assert not pre(True, False, pdl.AT_EXIT) and not pre(False, True, pdl.OFF)
    monkeypatch.setenv("FTMOE_MOE_PRELOAD", "0")
    assert not pre(True, True, pdl.EARLY)
    monkeypatch.setenv("FTMOE_MOE_PRELOAD", "1")
    assert pre(True, False, pdl.AT_EXIT) and pre(False, True, pdl.OFF) and not pre(False, False, pdl.EARLY)
    monkeypatch.setenv("FTMOE_MOE_PRELOAD", "on")
    with pytest.raises(ValueError, match="FTMOE_MOE_PRELOAD: expected auto, 0 or 1, found 'on'"):
        pre(True, False, pdl.EARLY)


def _decode_case(gen, dtype, ctx: list[int], h: int, D: int, bs: int):
    """A decode-attention case: qkv [B, 3, h, D], random K/V caches, shuffled block tables with
    room for each row's context + 1, the context lengths and the new tokens' slots."""
    B = len(ctx)
    nb_per = max(1, -(-(max(ctx) + 1) // bs))
    NB = B * nb_per + 1
    kc, vc = rnd(NB, h, bs, D, dtype=dtype, gen=gen), rnd(NB, h, bs, D, dtype=dtype, gen=gen)
    perm = torch.randperm(NB - 1, generator=gen)[: B * nb_per].view(B, nb_per).to(torch.int32).to(DEV)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    pos = ctx_t.long()
    slots = (perm.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs).to(torch.int32)
    return rnd(B, 3, h, D, dtype=dtype, gen=gen), kc, vc, perm, ctx_t, slots


def test_attention_launch_override(monkeypatch):
    """FTMOE_ATTN_LAUNCH=FROM:BLOCK_NxWARPS replaces the rule's config from FROM programs on and
    names itself when malformed."""
    from ftmoe.kernels.attention import launch_config

    monkeypatch.delenv("FTMOE_ATTN_LAUNCH", raising=False)
    rule = {p: launch_config(p) for p in (16, 1024, 4096)}
    assert launch_config(512) == (64, 1) and rule[1024] == launch_config(2048) == (32, 1)   # the rule's steps
    assert rule[4096] == launch_config(2049) == (16, 1)
    monkeypatch.setenv("FTMOE_ATTN_LAUNCH", "257:64x2")
    assert launch_config(16) == rule[16] and launch_config(1024) == launch_config(4096) == (64, 2)
    for bad in ("64x1", "257:64", "a:64x1"):
        monkeypatch.setenv("FTMOE_ATTN_LAUNCH", bad)
        with pytest.raises(ValueError, match="FTMOE_ATTN_LAUNCH: expected FROM:BLOCK_NxWARPS"):
            launch_config(1024)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx", [[0], [5, 0, 70], [130, 1]])
@pytest.mark.parametrize("launch", [(16, 4, 1), (16, 1, 1), (32, 1, 1), (128, 8, 1), (None, None, 1),   # one pass per row
                                    (None, None, None),        # None: launch_config's / num_splits' choice
                                    (16, 1, 3), (8, 2, 16)])   # context split over 3 / 16 programs, then merged
def test_decode_attention(gen, dtype, ctx, launch):
    """Against the torch twin: one pass per row, and the context split over S programs (S larger
    than the blocks of a row: empty splits must weigh nothing), for empty, short and long rows."""
    B, h, D, bs = len(ctx), 4, 16, 8
    qkv, kc, vc, perm, ctx_t, slots = _decode_case(gen, dtype, ctx, h, D, bs)
    kc2, vc2 = kc.clone(), vc.clone()
    out = torch.full((B, h, D), float("nan"), dtype=dtype, device=DEV)
    decode_attention(qkv, kc, vc, perm, ctx_t, slots, 1 / math.sqrt(D), out=out, block_n=launch[0], num_warps=launch[1],
                     splits=launch[2])
    want = ref.decode_attention_ref(qkv, kc2, vc2, perm, ctx_t, slots, 1 / math.sqrt(D))
    assert rel(out, want) < TOL[dtype] * 2
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)   # the new K/V landed in the same slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx,splits", [([0], 1), ([5, 0, 70], 3), ([130, 1], 8), ([17], None)])
@pytest.mark.parametrize("parts", [3])
def test_decode_attention_sums_qkv_partials(gen, dtype, ctx, splits, parts):
    """qkv as the QKV GEMV's fp32 split-K partials [P, B, 3, h, D]: the same output and K/V writes
    as attention over their sum rounded to the cache's dtype (one pass, and split + merge)."""
    B, h, D, bs = len(ctx), 4, 16, 8
    _, kc, vc, perm, ctx_t, slots = _decode_case(gen, dtype, ctx, h, D, bs)
    qkv_parts = rnd(parts, B, 3, h, D, gen=gen)
    qkv = qkv_parts.sum(0).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    out = torch.full((B, h, D), float("nan"), dtype=dtype, device=DEV)
    got = decode_attention(qkv_parts, kc, vc, perm, ctx_t, slots, 1 / math.sqrt(D), out=out, splits=splits)
    want = decode_attention(qkv, kc2, vc2, perm, ctx_t, slots, 1 / math.sqrt(D), splits=splits)
    assert got.dtype == dtype and rel(got, want) < TOL[dtype]
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_attention_splits_choice(monkeypatch):
    """Up to SPLIT_MAX_PROGRAMS (row, head) programs split the context, except short contexts up to
    ONE_PASS_MAX_PROGRAMS; FTMOE_ATTN_SPLIT forces a count (0 = one pass) and a bad value is an
    error naming the variable."""
    from ftmoe.kernels import attention

    monkeypatch.delenv("FTMOE_ATTN_SPLIT", raising=False)
    S = attention.SPLITS
    assert S > 1
    assert [attention.num_splits(p) for p in (1, 16, 256, 257, 4096)] == [S, S, S, 1, 1]
    one, (c1, t1), (c2, t2) = attention.ONE_PASS_MAX_PROGRAMS, *attention.ONE_PASS_TILES   # short contexts
    assert [attention.one_pass_tile(p, c1) for p in (1, one, one + 1)] == [t1, t1, None]
    assert [attention.one_pass_tile(16, c) for c in (0, c1, c1 + 1, c2, c2 + 1, None)] == [t1, t1, t2, t2, None, None]
    assert [attention.one_pass_differs(p) for p in (1, one, one + 1, 4096)] == [True, True, False, False]
    monkeypatch.setenv("FTMOE_ATTN_SPLIT", "0")
    assert attention.num_splits(16) == 1
    monkeypatch.setenv("FTMOE_ATTN_SPLIT", "4")
    assert attention.num_splits(4096) == 4 and attention.one_pass_tile(1, 1) is None
    assert not attention.one_pass_differs(1)          # forced: the same kernels whatever the context
    monkeypatch.setenv("FTMOE_ATTN_SPLIT", "many")
    with pytest.raises(ValueError, match="FTMOE_ATTN_SPLIT"):
        attention.num_splits(16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parts,rows", [(1, 2), (4, 1), (3, 2)])
def test_add_layernorm_sums_partials_and_slots_and_gives_fp32(gen, dtype, parts, rows):
    n, h = 5, 96
    x, w, b = rnd(n, h, dtype=dtype, gen=gen), rnd(h, dtype=dtype, gen=gen) + 1, rnd(h, dtype=dtype, gen=gen)
    add = rnd(parts, n * rows, h, dtype=torch.float32, gen=gen)
    res, y, y32 = add_layernorm(x, w, b, 1e-5, add=add, want_fp32=True)
    total = add.sum(0).view(n, rows, h).sum(1)
    want_res, want_y = ref.add_layernorm_ref(x, w, b, 1e-5, total)
    assert rel(res, want_res) < TOL[dtype] and rel(y, want_y) < TOL[dtype]
    assert y32.dtype == torch.float32 and torch.equal(y32, y.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,e", [(1, 1, 8), (5, 2, 4), (7, 1, 64)])
@pytest.mark.parametrize("stage", ["w1_gelu", "w2_prob"])
@pytest.mark.parametrize("block_n", [16, 32])     # 16: the thinnest GEMV tiles `ftmoe tune` tries
def test_fused_moe_per_slot_mode(gen, dtype, n, k, e, stage, block_n):
    K, N = 64, 96
    probs, ids = _routing(n, k, e, gen)
    w = rnd(e, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = rnd(e, N, dtype=dtype, gen=gen, scale=0.1)
    a_per_slot = stage == "w2_prob"
    a = rnd(n * k if a_per_slot else n, K, dtype=dtype, gen=gen)
    out = torch.full((n * k, N), float("nan"), dtype=dtype, device=DEV)
    fused_moe(a, w, bias, n * k, topk=k, routing=ids.view(-1), probs=probs, a_per_slot=a_per_slot,
              gelu=stage == "w1_gelu", mul_prob=stage == "w2_prob", out=out,
              config={"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 16})
    want = ref.fused_moe_ref(a, w, bias, ids, probs, k, a_per_slot=a_per_slot, gelu=stage == "w1_gelu",
                             mul_prob=stage == "w2_prob")
    assert rel(out, want) < TOL[dtype] * 2
    if stage == "w2_prob":   # split-K partials (bias once, prob in each) sum to the same result
        parts = fused_moe(a, w, bias, n * k, topk=k, routing=ids.view(-1), probs=probs, a_per_slot=True,
                          mul_prob=True, config={"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 16}, split_k=3)
        assert parts.shape == (3, n * k, N) and parts.dtype == torch.float32
        assert rel(parts.sum(0), want) < TOL[dtype] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv(gen, dtype):
    N, h, D, bs, NB = 11, 4, 16, 8, 5
    qkv = rnd(N, 3, h, D, dtype=dtype, gen=gen)
    slots = torch.randperm(NB * bs, generator=gen)[:N].to(torch.int32)
    slots[3] = slots[7] = -1                                  # padding rows are skipped
    slots = slots.to(DEV)
    kc, vc = rnd(NB, h, bs, D, dtype=dtype, gen=gen), rnd(NB, h, bs, D, dtype=dtype, gen=gen)
    want_k, want_v = kc.clone(), vc.clone()
    keep = (slots >= 0).cpu()
    s = slots.cpu()[keep].long()
    want_k[s // bs, :, s % bs] = qkv[keep.to(DEV), 1]
    want_v[s // bs, :, s % bs] = qkv[keep.to(DEV), 2]
    write_kv(qkv, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("n,k,e,bm", [(5, 1, 8, 16), (40, 2, 8, 16), (300, 1, 16, 32), (700, 2, 64, 16)])
def test_moe_align_leaves_out_negative_ids(gen, n, k, e, bm):
    """Expert parallelism marks slots of other ranks' experts (and padding rows) with -1."""
    ids = torch.randint(-1, e, (n, k), generator=gen, dtype=torch.int32)
    ids[0, 0] = -1
    ids = ids.to(DEV)
    want = ref.moe_align_ref(ids, e, bm)
    total = int(want[2])
    assert total == sum(-(-int((ids == x).sum()) // bm) * bm for x in range(e))
    got = moe_align(ids, e, bm)
    _assert_align_equal(got, want)
    placed = got[0][:total]
    assert not bool(torch.isin(placed, (ids.view(-1) < 0).nonzero().view(-1).int()).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,e,mode", [(1, 1, 8, "per_slot"), (6, 2, 4, "per_slot"), (37, 2, 4, "aligned"),
                                        (64, 1, 8, "aligned")])
def test_fused_moe_skips_negative_expert_ids(gen, dtype, n, k, e, mode):
    """Slots with expert id -1 are not computed and their output rows are not written."""
    K, N = 64, 96
    probs, ids = _routing(n, k, e, gen)
    ids[::2, 0] = -1
    w = rnd(e, K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = rnd(e, N, dtype=dtype, gen=gen, scale=0.1)
    a = rnd(n * k, K, dtype=dtype, gen=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    routing = ids.view(-1) if mode == "per_slot" else moe_align(ids, e, cfg["BLOCK_M"])
    out = torch.full((n * k, N), float("nan"), dtype=dtype, device=DEV)
    fused_moe(a, w, bias, n * k, topk=k, routing=routing, probs=probs, a_per_slot=True, mul_prob=True,
              out=out, config=cfg)
    skipped = (ids.view(-1) < 0).cpu()
    assert bool(out.cpu()[skipped].isnan().all())
    want = ref.fused_moe_ref(a, w, bias, ids, probs, k, a_per_slot=True, mul_prob=True)
    assert rel(out[~skipped.to(DEV)], want[~skipped.to(DEV)]) < TOL[dtype] * 2
    assert bool((want.cpu()[skipped] == 0).all())


def test_tuned_config_lookup_and_expert_parallel_fallback():
    """Configs are found by (E, N, K, dtype) then nearest M; an EP rank's E/ep experts use the
    table of the same GEMM with the nearest E; no table at all gives the heuristic."""
    import json

    from ftmoe.kernels import configs

    path = os.path.join(configs.CONFIG_DIR, "NVIDIA_H200.json")
    table = json.load(open(path))
    e64 = table["E=64,N=1024,K=4096,dtype=bf16"]
    assert configs.get_config(64, 1024, 4096, "bf16", 64, "NVIDIA H200") == e64["64"]
    assert configs.get_config(64, 1024, 4096, "bf16", 70, "NVIDIA H200") == e64["64"]       # nearest M
    assert configs.get_config(16, 1024, 4096, "bf16", 256, "NVIDIA H200") == e64["256"]     # EP=4 rank
    assert configs.get_config(1, 1024, 4096, "bf16", 8, "NVIDIA H200") == configs.default_config(8, 1)
    assert configs.get_config(16, 1024, 4096, "bf16", 8, "no such GPU") == configs.default_config(8, 16)
    # a Hopper card without its own table uses a tuned sibling's (an H200 NVL gets the H200's tiles)
    assert configs.get_config(64, 1024, 4096, "bf16", 64, "NVIDIA H200 NVL") == e64["64"]


def test_sibling_table_prefers_the_same_model(tmp_path, monkeypatch):
    """A card without its own table takes a sibling of the same model first (H100 PCIe -> the H100
    SXM's table), then any tuned card of its architecture; another architecture gets none."""
    import json

    from ftmoe.kernels import configs

    for name in ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200", "NVIDIA_A100_SXM4_80GB"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"card": name}))
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    configs._file_table.cache_clear()
    try:
        got = {d: configs._file_table(d).get("card") for d in
               ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA H800", "NVIDIA L4",
                "NVIDIA H100 80GB HBM3")}
    finally:
        configs._file_table.cache_clear()
    assert got == {"NVIDIA H100 PCIe": "NVIDIA_H100_80GB_HBM3", "NVIDIA H200 NVL": "NVIDIA_H200",
                   "NVIDIA GH200 480GB": "NVIDIA_H200", "NVIDIA H800": "NVIDIA_H100_80GB_HBM3",
                   "NVIDIA L4": None, "NVIDIA H100 80GB HBM3": "NVIDIA_H100_80GB_HBM3"}


def test_using_table_overrides_and_records_lookups():
    """Inside `using_table` lookups read the given table and, with a record, log (key, M asked,
    M of the entry used); outside they read the card's file again."""
    from ftmoe.kernels import configs

    moe = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    dense = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 5,
             "split_k": 2, "backend": "triton"}
    k1, k2 = configs.shape_key(64, 1024, 4096, "bf16"), configs.dense_key(3072, 1024, "bf16")
    before = configs.get_config(64, 1024, 4096, "bf16", 2, "NVIDIA H200")
    before_dense = configs.get_dense_choice(3072, 1024, "bf16", 1, "NVIDIA H200")
    assert before != moe and before_dense["split_k"] != 2
    used = []
    with configs.using_table({k1: {"1": moe, "8": dict(moe, num_stages=3)}, k2: {"2": dense}}, record=used):
        assert configs.get_config(64, 1024, 4096, "bf16", 2, "NVIDIA H200") == moe
        assert configs.get_config(16, 1024, 4096, "bf16", 7, "NVIDIA H200")["num_stages"] == 3   # EP fallback
        assert configs.get_dense_choice(3072, 1024, "bf16", 1, "NVIDIA H200")["split_k"] == 2
        assert configs.get_dense_choice(1024, 1024, "bf16", 1, "NVIDIA H200") is None
    assert used == [(k1, 2, "1"), (k1, 7, "8"), (k2, 1, "2")]
    assert configs.get_config(64, 1024, 4096, "bf16", 2, "NVIDIA H200") == before
    assert configs.get_dense_choice(3072, 1024, "bf16", 1, "NVIDIA H200") == before_dense


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_moe_align_is_graph_capturable_at_large_batches(gen):
    """Decode at batch 1024 captures the chunked alignment in a CUDA graph: no host copies."""
    ids = torch.randint(-1, 64, (1024, 1), generator=gen, dtype=torch.int32).to(DEV)
    want = ref.moe_align_ref(ids, 64, 64)
    moe_align(ids, 64, 64)                                   # warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = moe_align(ids, 64, 64)
    g.replay()
    total = int(want[2])
    assert int(got[2]) == total and torch.equal(got[0][:total].cpu(), want[0][:total].cpu())


@pytest.mark.parametrize("M", [20, 40])
def test_tune_shape_routes_as_the_model(monkeypatch, M):
    """`ftmoe tune` times the expert GEMMs in the routing the model uses for M slots (one program
    row a slot up to 32, aligned past) and keeps the fastest config."""
    from ftmoe import tune

    seen = []
    real = tune.fused_moe
    monkeypatch.setattr(tune, "fused_moe", lambda *a, **kw: seen.append(type(kw["routing"])) or real(*a, **kw))
    cands = [dict(c, BLOCK_K=32) for c in tune.candidate_configs(M)[:3]]
    monkeypatch.setattr(tune, "candidate_configs", lambda M: cands)

    def fake_time(fn, n_sets, iters=10):
        fn(0)
        fake_time.calls += 1
        return 2.0 if fake_time.calls == 2 else 3.0
    fake_time.calls = 0
    monkeypatch.setattr(tune, "_time", fake_time)
    best, ms = tune.tune_shape(4, 32, 32, M, torch.float32, "w2", n_sets=1, dev=DEV)
    assert best == cands[1] and ms == 2.0
    assert seen == [torch.Tensor if M <= 32 else tuple] * 3


def test_dense_gemm_choice_tuning_and_lookup(monkeypatch):
    """`ftmoe tune` keeps cuBLAS unless a Triton config (split-K only where partials are allowed)
    is faster; the runtime reads that choice by (N, K, dtype) and nearest M, cuBLAS past 2x the
    largest tuned M or with FTMOE_DENSE_GEMM=cublas."""
    from ftmoe import tune
    from ftmoe.kernels import configs

    def fake_time(fn, n_sets, iters=10):        # cuBLAS is the first timed call: 5.0; Triton 4.0, or 3.0 at split-K 4
        fake_time.calls += 1
        if fake_time.calls == 1:
            return 5.0
        return 3.0 if fn.__defaults__[1] == 4 else 4.0

    monkeypatch.setattr(tune, "_time", fake_time)
    fake_time.calls = 0
    choice, tri, cub = tune.tune_dense(64, 32, 1, torch.float32, parts_ok=True, bias=False, dev="cpu")
    assert choice["backend"] == "triton" and choice["split_k"] == 4 and (tri, cub) == (3.0, 5.0)
    fake_time.calls = 0
    choice, tri, cub = tune.tune_dense(64, 32, 1, torch.float32, parts_ok=False, bias=True, dev="cpu")
    assert choice["backend"] == "triton" and choice["split_k"] == 1 and tri == 4.0
    monkeypatch.setattr(tune, "_time", lambda fn, n_sets, iters=10: 1.0)      # ties keep cuBLAS
    assert tune.tune_dense(64, 32, 1, torch.float32, True, False, dev="cpu")[0] == {"backend": "cublas"}

    moe = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    table = {configs.dense_key(3072, 1024, "bf16"): {"1": dict(choice, backend="triton"), "8": {"backend": "cublas"}},
             configs.shape_key(64, 1024, 4096, "bf16"): {"8": moe}}
    monkeypatch.setattr(configs, "_table", lambda name: table)
    assert configs.get_config(16, 1024, 4096, "bf16", 8, "GPU") == moe      # EP fallback past the dense entries
    configs.get_dense_choice.cache_clear()
    got = configs.get_dense_choice(3072, 1024, "bf16", 1, "GPU")
    assert got["split_k"] == 1 and "backend" not in got
    assert configs.get_dense_choice(3072, 1024, "bf16", 8, "GPU") is None             # cuBLAS won there
    assert configs.get_dense_choice(3072, 1024, "bf16", 17, "GPU") is None            # past 2 x 8
    assert configs.get_dense_choice(1024, 1024, "bf16", 1, "GPU") is None             # not tuned
    monkeypatch.setenv("FTMOE_DENSE_GEMM", "cublas")
    configs.get_dense_choice.cache_clear()
    assert configs.get_dense_choice(3072, 1024, "bf16", 1, "GPU") is None
    configs.get_dense_choice.cache_clear()


@pytest.mark.parametrize("n", [1, 133, 2500])
def test_fetch_from_host(gen, n):
    """A graph's inputs from pinned host memory (`kernels.hostfetch`): copied where the flag after
    them is set, the device buffer left as it is where not."""
    from ftmoe.kernels.hostfetch import fetch_from_host

    host = torch.randint(-5, 1 << 20, (n + 1,), generator=gen, dtype=torch.int32).pin_memory() if GPU else \
        torch.randint(-5, 1 << 20, (n + 1,), generator=gen, dtype=torch.int32)
    dst = torch.full((n,), 7, dtype=torch.int32, device=DEV)
    host[-1] = 0
    fetch_from_host(host, dst)
    assert (dst == 7).all()
    host[-1] = 1
    fetch_from_host(host, dst)
    assert torch.equal(dst.cpu(), host[:-1])
    host[:-1] += 1                                           # the host changes them: the next fetch sees it
    fetch_from_host(host, dst)
    assert torch.equal(dst.cpu(), host[:-1])
    with pytest.raises(AssertionError, match="expected int32"):
        fetch_from_host(host[:-1], dst)


@pytest.mark.parametrize("B,V", [(1, 5000), (3, 2048), (37, 4099)])
@pytest.mark.parametrize("with_lp", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ctr", [2, 7])
def test_greedy_advance_matches_twin(B, V, with_lp, dtype, ctr):
    """Argmax + log-softmax + the greedy-chunk update in one kernel, launched twice, against
    torch's argmax and log_softmax and the update's twin: vocabularies split over several
    programs (one not a multiple of the slice), ties inside a slice and across slices (first
    index wins); tokens recorded at row ctr (none past the buffer's 8 rows), fed back as ids,
    live rows (slot >= 0) one position on with the slot of the new position from their table
    (a block boundary crossed), padding rows untouched, the counter left at 0."""
    from ftmoe.kernels.advance import GreedyWork, greedy_advance, greedy_advance_ref, step_inputs

    g = torch.Generator().manual_seed(B * 7 + V + with_lp + ctr)
    bs, nb, steps = 4, 6, 8
    pos = torch.randint(0, nb * bs - 2, (B,), generator=g)
    pos[0] = bs - 1                                                    # the next position opens a new block
    tables = torch.randint(0, 500, (B, nb), generator=g)
    slots = tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    slots[torch.rand(B, generator=g) < 0.3] = -1                       # padding rows
    packed = torch.zeros((4 + nb) * B + 1, dtype=torch.int32)

    def static(p):
        return step_inputs(p, B, nb)
    s0 = static(packed)
    s0["ids"].copy_(torch.randint(0, 1000, (B,), generator=g))
    s0["positions"].copy_(pos)
    s0["ctx"].copy_(pos)
    s0["slots"].copy_(slots)
    s0["tables"].copy_(tables)
    s0["ctr"].fill_(ctr)
    logits = [(torch.randn(B, V, generator=g) * 3).to(dtype) for _ in range(2)]
    top = logits[0].float().max(1).values
    logits[0][0, V - 1] = top[0]             # a tie in the last (partial) slice: the first index wins
    logits[0][-1, 0] = logits[0][-1, V // 2] = top[-1] + 1      # a tie across slices
    out = {}
    for name, fn in (("kernel", greedy_advance), ("twin", greedy_advance_ref)):
        p = packed.clone().to(DEV)
        toks = torch.full((steps, B), -7, dtype=torch.long, device=DEV)
        lps = torch.full((steps, B), float("nan"), device=DEV) if with_lp else None
        work = GreedyWork(B, V, DEV)
        for lg in logits:
            fn(lg.to(DEV), toks, lps, static(p), bs, work)
        assert int(work.count[0]) == 0
        out[name] = (p.cpu(), toks.cpu(), lps.cpu() if with_lp else None)
    if B == 1:
        assert work.split > 1
    (pk, tk, lk), (pt, tt, lt) = out["kernel"], out["twin"]
    assert torch.equal(tk, tt) and torch.equal(pk, pt)
    want = [lg.float().argmax(1) for lg in logits]
    assert int(want[0][-1]) == 0
    s = static(pk)
    live = slots >= 0
    assert int(s["ctr"][0]) == ctr + 2 and torch.equal(s["ids"].long(), want[1])
    assert torch.equal(s["positions"][live].long(), pos[live] + 2) and torch.equal(s["positions"][~live].long(), pos[~live])
    if bool(live[0]):
        assert int(s["slots"][0]) == int(tables[0, 1]) * bs + 1        # block 1, offset 1
    assert (s["slots"][~live] == -1).all()
    for j in range(min(2, steps - ctr)):                             # rows past the buffer: none stored
        assert torch.equal(tk[ctr + j], want[j])
    assert (tk[:ctr] == -7).all() and (tk[ctr + 2:] == -7).all()
    if with_lp:
        n = min(ctr + 2, steps)
        assert torch.allclose(lk[ctr:n], lt[ctr:n], atol=1e-5, rtol=1e-5) and lk[:ctr].isnan().all()


@pytest.mark.parametrize("B,V,tp", [(1, 5000, 2), (3, 4099, 3), (6, 2048, 4)])
@pytest.mark.parametrize("with_lp", [False, True])
def test_greedy_tensor_parallel_merge_equals_one_vocabulary(B, V, tp, with_lp):
    """Tensor-parallel greedy chunks: each rank's slice of the logits (uneven slices, one split
    over several programs) reduced to per-row partials (`greedy_advance(part=)`, against
    `greedy_partials_ref`), the partials merged by `greedy_merge` (against `greedy_merge_ref`),
    give what `greedy_advance_ref` gives on the whole vocabulary: the tokens (ties inside a
    slice and across slices: the first index wins), the update of the rows (padding rows
    untouched), the log probs; twice in a row (the counter and partials reused)."""
    from ftmoe.kernels.advance import (GreedyWork, greedy_advance, greedy_advance_ref, greedy_merge, greedy_merge_ref,
                                       greedy_partials_ref, step_inputs)

    g = torch.Generator().manual_seed(B * 11 + V + tp + with_lp)
    bs, nb, steps = 4, 6, 8
    pos = torch.randint(0, nb * bs - 2, (B,), generator=g)
    tables = torch.randint(0, 500, (B, nb), generator=g)
    slots = tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    slots[torch.rand(B, generator=g) < 0.3] = -1
    packed = torch.zeros((4 + nb) * B + 1, dtype=torch.int32)

    def static(p):
        return step_inputs(p, B, nb)
    s0 = static(packed)
    s0["positions"].copy_(pos)
    s0["ctx"].copy_(pos)
    s0["slots"].copy_(slots)
    s0["tables"].copy_(tables)
    s0["ctr"].fill_(3)
    bounds = [len(c) for c in torch.tensor_split(torch.arange(V), tp)]
    starts = [sum(bounds[:t]) for t in range(tp)]
    logits = [(torch.randn(B, V, generator=g) * 3).to(torch.float16) for _ in range(2)]
    top = logits[0].float().max(1).values + 1
    logits[0][0, starts[1] + 5] = logits[0][0, starts[-1] + bounds[-1] - 1] = top[0]   # across slices: the first
    if B > 1:
        logits[0][-1, 7] = logits[0][-1, 9] = top[-1]                                   # inside a slice
    out = {}
    for name in ("kernel", "twin", "whole"):
        p = packed.clone().to(DEV)
        toks = torch.full((steps, B), -7, dtype=torch.long, device=DEV)
        lps = torch.full((steps, B), float("nan"), device=DEV) if with_lp else None
        works = [GreedyWork(B, n, DEV) for n in bounds]
        for lg in logits:
            lg = lg.to(DEV)
            if name == "whole":
                greedy_advance_ref(lg, toks, lps, static(p), bs)
                continue
            parts = torch.full((tp, 3, B), float("nan"), device=DEV)
            for t in range(tp):
                sl = lg[:, starts[t]:starts[t] + bounds[t]].contiguous()
                if name == "kernel":
                    greedy_advance(sl, toks, lps, static(p), bs, works[t], part=parts[t], vocab_start=starts[t])
                    want = torch.empty(3, B, device=DEV)
                    greedy_partials_ref(sl, want, starts[t])
                    assert torch.equal(parts[t, :2], want[:2]), t
                    if with_lp:
                        assert torch.allclose(parts[t, 2], want[2], rtol=1e-5), t
                else:
                    greedy_partials_ref(sl, parts[t], starts[t])
            (greedy_merge if name == "kernel" else greedy_merge_ref)(parts, toks, lps, static(p), bs, V)
        assert all(int(w.count[0]) == 0 for w in works)
        out[name] = (p.cpu(), toks.cpu(), lps.cpu() if with_lp else None)
    assert GreedyWork(B, bounds[0], DEV).split > 1 or B > 1
    for name in ("kernel", "twin"):
        assert torch.equal(out[name][0], out["whole"][0]) and torch.equal(out[name][1], out["whole"][1]), name
        if with_lp:
            assert torch.allclose(out[name][2][3:5], out["whole"][2][3:5], atol=1e-5, rtol=1e-5), name
    tk = out["kernel"][1]
    assert int(tk[3, 0]) == starts[1] + 5 and (B == 1 or int(tk[3, -1]) == 7)
    assert (tk[:3] == -7).all() and (tk[5:] == -7).all()
    st = static(out["kernel"][0])
    live = slots >= 0
    assert int(st["ctr"][0]) == 5 and torch.equal(st["positions"][live].long(), pos[live] + 2)
    assert torch.equal(st["positions"][~live].long(), pos[~live]) and (st["slots"][~live] == -1).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,E,parts,rows", [(1, 64, 16, 1, 1), (3, 96, 24, 4, 1), (5, 64, 64, 2, 2)])
def test_add_layernorm_gate(gen, dtype, N, H, E, parts, rows):
    """The LN2 + gate kernel: res and y equal add_layernorm's bit for bit (same arithmetic, stored
    by one program of the row), the logits equal the fp32 gate GEMM on the rounded y; E not a
    multiple of the column slice; the add as split-K partials of top-k rows."""
    from ftmoe.kernels.norm import add_layernorm_gate

    x = rnd(N, H, dtype=dtype, gen=gen)
    add = rnd(parts, N * rows, H, gen=gen) if parts > 1 or rows > 1 else rnd(N, H, dtype=dtype, gen=gen)
    bias, w, b = rnd(H, dtype=dtype, gen=gen), 1 + rnd(H, dtype=dtype, gen=gen, scale=0.1), rnd(H, dtype=dtype, gen=gen)
    wg = rnd(H, E, gen=gen, scale=H ** -0.5)
    res, y, logits = add_layernorm_gate(x, w, b, 1e-5, wg, add=add, add_bias=bias, cols=8)
    want_res, want_y = add_layernorm(x, w, b, 1e-5, add=add, add_bias=bias)
    assert torch.equal(res, want_res) and torch.equal(y, want_y)
    assert rel(logits, y.float() @ wg) < 1e-5


@pytest.mark.parametrize("module,fn,limit,var", [
    ("attention", "preload", "PRELOAD_MAX_PROGRAMS", "FTMOE_ATTN_PRELOAD"),   # first K/V tile before the PDL wait
    ("routing", "ln_gate", "LN_GATE_MAX_ROWS", "FTMOE_LN_GATE")])             # gate logits in the LN2 kernel
def test_size_switches(monkeypatch, module, fn, limit, var):
    """auto (default): on up to the measured limit; 0 never; 1 always; anything else is named."""
    import importlib

    mod = importlib.import_module(f"ftmoe.kernels.{module}")
    choose, n = getattr(mod, fn), getattr(mod, limit)
    monkeypatch.delenv(var, raising=False)
    assert choose(n) and not choose(n + 1)
    monkeypatch.setenv(var, "0")
    assert not choose(1)
    monkeypatch.setenv(var, "1")
    assert choose(10 ** 6)
    monkeypatch.setenv(var, "yes")
    with pytest.raises(ValueError, match=f"{var}: expected auto, 0 or 1, found 'yes'"):
        choose(1)


# ---- dense GEMV of few rows (kernels/gemv.py) -----------------------------------------------
from ftmoe.kernels import gemv as gemv_mod  # noqa: E402


def _gemv_out(M, N, K, w, parts, config=None, out_dtype=None):
    """A NaN-poisoned output of the shape gemv will use."""
    cfg = dict(gemv_mod.plan(N, K, w.element_size(), gemv_mod.sm_count(w.device), parts), **(config or {}))
    shape = (cfg["S"], M, N) if parts else (M, N)
    return torch.full(shape, float("nan"), dtype=torch.float32 if parts else (out_dtype or w.dtype), device=DEV)


#: (dtype, tma): the register-tile form for every dtype, the TMA form (16-bit weights only)
GEMV_FORMS = [(d, False) for d in DTYPES] + [(d, True) for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype,tma", GEMV_FORMS)
@pytest.mark.parametrize("m,K,N", [(1, 64, 64), (3, 77, 104), (16, 256, 48), (5, 1024, 200)])
@pytest.mark.parametrize("mode", ["parts", "bias", "bias+gelu", "parts_in_gelu", "transposed_w"])
def test_gemv(gen, dtype, tma, m, K, N, mode):
    if tma and mode == "transposed_w":
        pytest.skip("TMA reads rows of w that are contiguous (the tied head is not)")
    w = rnd(K, N, dtype=dtype, gen=gen, scale=K ** -0.5)
    if mode == "transposed_w":                       # the tied head: w = wte.t(), strides (1, K)
        w = rnd(N, K, dtype=dtype, gen=gen, scale=K ** -0.5).t()
    bias = rnd(N, dtype=dtype, gen=gen) if mode != "transposed_w" else None
    parts = mode in ("parts", "parts_in_gelu")
    if mode == "parts_in_gelu":                      # a is an earlier GEMV's fp32 partials
        a = rnd(3, m, K, gen=gen)
    else:
        a = rnd(m, K, dtype=dtype, gen=gen)
    gelu = mode == "bias+gelu"
    out = _gemv_out(m, N, K, w, parts)
    c = gemv_mod.gemv(a, w, bias, parts=parts, gelu=gelu, gelu_a=mode == "parts_in_gelu", out=out, tma=tma)
    assert c.data_ptr() == out.data_ptr()
    want = ref.gemv_ref(a, w, bias, gelu=gelu, gelu_a=mode == "parts_in_gelu")
    got = c.sum(0) if parts else c
    assert got.dtype == (torch.float32 if parts else dtype)
    assert rel(got, want) < TOL[dtype]
    if parts:                                        # the bias sits in the first partial only
        assert c.shape[0] > 1 or K < 2 * gemv_mod.MIN_SPLIT_K
        if bias is not None and c.shape[0] > 1:
            no_bias = gemv_mod.gemv(a, w, None, parts=True, gelu_a=mode == "parts_in_gelu", tma=tma)
            assert rel(c[0] - no_bias[0], bias.float().expand(m, N)) < TOL[dtype]
            assert torch.equal(c[1:], no_bias[1:])


@pytest.mark.parametrize("dtype,tma", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
@pytest.mark.parametrize("cfg", [{"S": 3, "BLOCK_K": 16, "BLOCK_N": 32, "num_warps": 4},    # 3 splits x 2 K steps
                                 {"S": 8, "BLOCK_K": 16, "BLOCK_N": 16, "num_warps": 1}])   # empty last splits
def test_gemv_k_loop_and_uneven_splits(gen, dtype, tma, cfg):
    m, K, N = 2, 90, 40
    w, a, bias = rnd(K, N, dtype=dtype, gen=gen, scale=0.1), rnd(m, K, dtype=dtype, gen=gen), rnd(N, dtype=dtype, gen=gen)
    out = _gemv_out(m, N, K, w, True, cfg)
    c = gemv_mod.gemv(a, w, bias, parts=True, config=cfg, out=out, tma=tma)
    assert c.shape == (cfg["S"], m, N)
    assert rel(c.sum(0), ref.gemv_ref(a, w, bias)) < TOL[dtype]
    fp32_out = gemv_mod.gemv(a, w, bias, out_dtype=torch.float32, config=cfg, tma=tma)   # the head's logits: rounded, then fp32
    assert fp32_out.dtype == torch.float32
    assert torch.equal(fp32_out, fp32_out.to(dtype).float())
    assert rel(fp32_out, ref.gemv_ref(a, w, bias)) < TOL[dtype]


def test_gemv_plan_at_the_model_shapes():
    """One wave of programs on a 132-SM card, whole weight tiles of <= 64 KB in one K step."""
    for (N, K), (s, bk) in {(3072, 1024): (4, 256), (4096, 1024): (4, 256), (1024, 4096): (16, 256),
                            (1024, 1024): (16, 64)}.items():
        p = gemv_mod.plan(N, K, 2, 132, parts=True)
        assert (p["S"], p["BLOCK_K"], p["ITERS"], p["BLOCK_N"]) == (s, bk, 1, 128), (N, K, p)
        assert N // 128 * p["S"] <= 132
    head = gemv_mod.plan(51200, 1024, 2, 132, parts=False)      # many N tiles: no split, a K loop
    assert (head["S"], head["BLOCK_K"], head["ITERS"]) == (1, 256, 4)
    assert gemv_mod.plan(4096, 1024, 4, 132, parts=True)["BLOCK_K"] == 128   # fp32: half the tile


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("S,k,E,K,N", [(1, 1, 4, 256, 128), (3, 1, 5, 512, 200), (4, 2, 3, 128, 64), (8, 1, 6, 64, 48)])
def test_gemv_experts(gen, dtype, S, k, E, K, N):
    """The routed GEMV, W1 then W2 as the MoE layer chains them: W1's partials of a[s // k] @ w1[ids[s]]
    + b1, W2 summing them through GELU, + b2, times the slot's probability; a slot without an expert
    (-1) is not written (the NaN poison stays), whatever the expert ids (repeats included)."""
    F = 2 * K
    w1 = rnd(E, K, F, dtype=dtype, gen=gen, scale=K ** -0.5)
    w2 = rnd(E, F, N, dtype=dtype, gen=gen, scale=F ** -0.5)
    b1, b2 = rnd(E, F, dtype=dtype, gen=gen), rnd(E, N, dtype=dtype, gen=gen)
    u = rnd(S // k + (S % k > 0), K, dtype=dtype, gen=gen)
    ids = torch.randint(0, E, (S,), generator=gen).int().to(DEV)
    if S > 2:
        ids[1] = -1
        ids[2] = ids[0]                                          # two slots on one expert
    probs = torch.rand(S, generator=gen).to(DEV)
    P1 = gemv_mod.plan(F, K, w1.element_size(), gemv_mod.sm_count(w1.device), True)["S"]
    h = gemv_mod.gemv_experts(u, w1, b1, ids, a_div=k, out=torch.full((P1, S, F), float("nan"), device=DEV))
    want_h = ref.gemv_experts_ref(u, w1, b1, ids, a_div=k)
    real = ids >= 0
    assert h.shape[0] == P1 and rel(h.sum(0)[real], want_h[real]) < TOL[dtype]
    assert torch.isnan(h[:, ~real]).all()
    y = gemv_mod.gemv_experts(h, w2, b2, ids, probs=probs, gelu_a=True, ids_ready=True)
    want_y = ref.gemv_experts_ref(h[:, real], w2, b2, ids[real], probs=probs[real], gelu_a=True)
    assert rel(y.sum(0)[real], want_y) < TOL[dtype]
    if S > 2:                                                # the shared expert: the same weights, its own row
        assert not torch.equal(y[:, 0], y[:, 2])


def test_gemv_experts_rejects_bad_input(gen):
    w = rnd(2, 64, 32, dtype=torch.float16, gen=gen)
    ids = torch.zeros(1, dtype=torch.int32, device=DEV)
    with pytest.raises(AssertionError, match="contiguous 16-bit w"):
        gemv_mod.gemv_experts(rnd(1, 64, gen=gen), w.float(), None, ids)
    with pytest.raises(AssertionError, match="K = 48"):
        gemv_mod.gemv_experts(rnd(1, 48, dtype=torch.float16, gen=gen), w, None, ids)
    with pytest.raises(AssertionError, match="whole tiles"):
        gemv_mod.gemv_experts(rnd(1, 90, dtype=torch.float16, gen=gen), rnd(2, 90, 32, dtype=torch.float16, gen=gen),
                              None, ids)


def test_gemv_tma_switch_and_layouts(gen, monkeypatch):
    """FTMOE_GEMV_TMA picks the form; TMA only for 16-bit weights whose rows are contiguous and
    16-byte aligned; forcing it on another layout is refused, not silently wrong."""
    w = rnd(64, 48, dtype=torch.float16, gen=gen)
    for v, want in (("0", False), ("1", True), ("auto", gemv_mod.TMA_DEFAULT)):
        monkeypatch.setenv("FTMOE_GEMV_TMA", v)
        assert gemv_mod.tma_eligible(w) == want
    monkeypatch.setenv("FTMOE_GEMV_TMA", "yes")
    with pytest.raises(ValueError, match="FTMOE_GEMV_TMA: expected auto, 0 or 1, found 'yes'"):
        gemv_mod.tma_on()
    assert gemv_mod.tma_fits(w)
    assert not gemv_mod.tma_fits(w.float())                        # fp32: the register form (IEEE dot)
    assert not gemv_mod.tma_fits(rnd(48, 64, dtype=torch.float16, gen=gen).t())   # the tied head's wte.t()
    assert not gemv_mod.tma_fits(rnd(64, 44, dtype=torch.float16, gen=gen))     # rows of 88 bytes
    with pytest.raises(AssertionError, match="TMA needs a 16-bit w"):
        gemv_mod.gemv(rnd(2, 64, gen=gen), w.float(), tma=True)


def test_gemv_rejects_bad_shapes(gen):
    w = rnd(64, 32, gen=gen)
    with pytest.raises(AssertionError, match="K = 48"):
        gemv_mod.gemv(rnd(2, 48, gen=gen), w)
    with pytest.raises(AssertionError, match="at most 16 rows"):
        gemv_mod.gemv(rnd(17, 64, gen=gen), w)
    with pytest.raises(AssertionError, match="GELU"):
        gemv_mod.gemv(rnd(2, 64, gen=gen), w, gelu=True, parts=True)
