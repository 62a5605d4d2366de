"""The GPU fast path: the same GPTMoE weights run through fused Triton kernels.

In:  a loaded `GPTMoE` on a CUDA device (or the CPU under TRITON_INTERPRET=1, for tests)
     and a `KVCache`.
Out: `FastGPTMoE(input_ids, meta, cache, last_only)` with GPTMoE's call signature, so the
     generator can use either; `decode_step(...)` is the fixed-shape step that CUDA graphs
     capture (see `cuda_graphs.py`).

Per block in a decode step: QKV GEMM + bias -> paged decode attention (writes K/V) ->
Wo GEMM -> add+LayerNorm (bo, residual) -> MLP -> the next block's add+LayerNorm takes the
MLP output, its bias and the residual. The dense GEMMs run on cuBLAS or, where `ftmoe tune`
found it faster (small batches), on the Triton kernel with split-K partials summed by the LN.
Dense MLP: Triton GEMM with bias+GELU, then the second dense GEMM.
MoE: add+LayerNorm (and its fp32 copy) -> fp32 gate GEMM (cuBLAS, or the fused-MoE kernel with
FTMOE_GATE=triton) + softmax/top-k -> (align, past 32 slots) -> grouped GEMM W1 (+b1, GELU) -> grouped GEMM
W2 (+b2, x prob). The first block's LN also gathers and sums the embeddings. Steps of at most
`pdl.MAX_ROWS` rows launch the Triton kernels with programmatic dependent launch (Hopper).
Prefill uses torch SDPA (flash) for attention and the same MoE kernels with large tiles.
"""
from __future__ import annotations

import math
import os
import types

import torch

from .kernels import pdl, size_switch
from .kernels.attention import decode_attention, write_kv
from .kernels.configs import get_config, get_dense_choice
from .kernels.fused_moe import fused_moe
from .kernels.gemv import MAX_ROWS as GEMV_ROWS, experts_fit, gemv, gemv_experts, tma_eligible, tma_on
from .kernels.norm import add_layernorm, add_layernorm_gate, embed_layernorm
from .kernels.routing import gate_logits, gate_topk, ln_gate, moe_align, softmax_topk_align
from .kv_cache import AttnMetadata, KVCache
from .model import GPTMoE

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: up to this many routed slots, MoE GEMMs run one program row per slot without sorting
SMALL_BATCH_SLOTS = 32
#: decode steps of at most this many rows run the dense GEMMs (QKV, Wo, the dense MLP) on
#: `kernels.gemv`, whose weight loads overlap the kernels before them, and hand on fp32 split-K
#: partials (summed by attention, the next GEMV or add_layernorm), with the bounded PDL cascade
#: (`pdl.feed_on`); FTMOE_GEMV=0 / 1 forces it off / on (up to gemv's 16 rows). Whole decode steps
#: on an H100 against the tuned cuBLAS / Triton path (scripts/ab_decode.py, 2026-12-06): -6.2 % at
#: batch 1, -4.6 % at 2, -0.7 % at 4, -0.9 % at 8, +3.1 % at 16; without the cascade +-1 %. With
#: the GEMV's TMA tiles (2026-12-07): x0.992 at 16 (x1.033 with the register tiles), x0.973 at 12.
GEMV_MAX_ROWS = 16
#: FTMOE_GEMV_HEAD does the same for the tied head's logits (+0.8 % at batch 1: off by default)
GEMV_HEAD_MAX_ROWS = 0
#: decode steps (on the GEMV path) of at most this many routed slots run the MoE layer's expert
#: GEMMs on `gemv.gemv_experts` (TMA tiles; W2 loads its expert's tiles while W1 runs); FTMOE_GEMV_EXPERTS=0 / 1
#: forces it off / on (up to gemv's 16 rows). Whole steps on one H100 against the fused-MoE kernel
#: (2026-12-07, scripts/ab_decode.py, one process): x0.985 / 0.978 / 1.016 / 1.099 / 1.141 at 1 / 2 /
#: 4 / 8 / 16 slots (with the Wo splits and LN warps below: x0.972 at 1, x0.980 at 2); x0.981 at 1
#: timed alone. Past 2 slots each slot's program grid reads its own expert in a wave of its own
GEMV_EXPERTS_MAX_SLOTS = 2
#: the Wo GEMV's K splits on the GEMV path: 4 [256, 128] tiles a column block (32 programs at H =
#: 1024) rather than `gemv.plan`'s 16, so the LN after it sums 4 partials; its tiles still load
#: during attention. On one H100 (2026-12-07, one process): x0.977 / 0.967 / 0.975 / 0.980 at
#: batches 1 / 2 / 4 / 8, x0.968 at 16 with 16 LN warps (8 splits: x0.959-0.979 with 8 warps)
WO_SPLITS = 4
#: the dense W2 GEMV's TMA tiles [BLOCK_K = 256, BLOCK_N = 64], two a K split, both loaded before
#: the PDL wait (`_w2_tiles`): 8 splits at K = 4096, so the LN after it sums 8 partials where
#: gemv.plan's [256, 128] tiles make 16. On one H100 (2026-12-07, scripts/ab_decode.py, one
#: process): x0.984 / 0.997 / 0.997 / 0.995 at batches 1 / 2 / 4 / 8
W2_TILE = (64, 256)


def _gemv_on(var: str, rows: int, limit: int) -> bool:
    """Whether a decode step of `rows` rows runs `var`'s GEMMs on `gemv`: by default up to `limit`
    rows, never past gemv's own."""
    return rows <= GEMV_ROWS and size_switch(var, rows, limit)


def _wo_splits(K: int) -> int | None:
    """The Wo GEMV's K splits: `WO_SPLITS` (FTMOE_GEMV_WO_SPLITS=S overrides; 0, returned as None:
    `gemv.plan`'s, which takes 16 at K = 1024 to fill one wave of programs)."""
    v = os.environ.get("FTMOE_GEMV_WO_SPLITS", str(WO_SPLITS))
    if not v.isdigit() or not int(v) <= K:
        raise ValueError(f"FTMOE_GEMV_WO_SPLITS: expected a split count from 0 to {K}, found {v!r}")
    return int(v) or None


def _w2_tiles(w: torch.Tensor) -> dict | None:
    """The dense W2 GEMV's tiles for w [K, N]: `W2_TILE` with two tiles a K split (K / 512 splits)
    where w loads by TMA and K is whole pairs of tiles, else `gemv.plan`'s (None).
    FTMOE_GEMV_W2_TILES=BNxBKxS forces BLOCK_N x BLOCK_K tiles in S K splits, =0 the plan's."""
    v = os.environ.get("FTMOE_GEMV_W2_TILES")
    if v == "0":
        return None
    if v:
        try:
            bn, bk, splits = (int(x) for x in v.split("x"))
        except ValueError:
            raise ValueError(f"FTMOE_GEMV_W2_TILES: expected BLOCK_NxBLOCK_KxSPLITS (e.g. 64x256x8) or 0, "
                             f"found {v!r}") from None
        return {"BLOCK_N": bn, "BLOCK_K": bk, "S": splits}
    bn, bk = W2_TILE
    if not tma_eligible(w) or w.shape[0] % (2 * bk):
        return None
    return {"BLOCK_N": bn, "BLOCK_K": bk, "S": w.shape[0] // (2 * bk)}


def small_batch_split_k(N: int, K: int) -> int:
    """Split-K factor of the second expert GEMM on the small-batch path: few N tiles, long K."""
    return 4 if K >= 2048 and N <= 2048 else 1


class FastGPTMoE:
    def __init__(self, model: GPTMoE):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        cfg = self.config
        tp = model.par.tp
        self.H, self.heads, self.D = cfg.hidden_size, cfg.head_num // tp, cfg.size_per_head   # this rank's heads
        self.HL = self.heads * self.D                                                          # H / tp
        self.scale = 1.0 / math.sqrt(self.D)
        self.device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
        self.layers = []
        for blk in model.blocks():
            L = {"ln1": blk.input_layernorm, "ln2": blk.post_attention_layernorm,
                 "wqkv": blk.attention.query_key_value.weight.reshape(self.H, 3 * self.HL),
                 "bqkv": blk.attention.query_key_value.bias.reshape(3 * self.HL),
                 "wo": blk.attention.dense.weight, "bo": blk.attention.dense.bias, "moe": blk.is_moe}
            if blk.is_moe:
                moe = blk.mlp.moe
                L.update(wg=moe.gate.wg.weight, w1=moe.experts.dense_h_to_4h.weight,
                         b1=moe.experts.dense_h_to_4h.bias, w2=moe.experts.dense_4h_to_h.weight,
                         b2=moe.experts.dense_4h_to_h.bias, k=moe.options.top_k,
                         wg32=moe.gate.wg.weight.float())
                if moe.options.capacity_factor is not None:
                    raise ValueError("the fast path is dropless; capacity mode runs on the reference model")
            else:
                L.update(w1=blk.mlp.dense_h_to_4h.weight.unsqueeze(0), b1=blk.mlp.dense_h_to_4h.bias.unsqueeze(0),
                         w2=blk.mlp.dense_4h_to_h.weight, b2=blk.mlp.dense_4h_to_h.bias)
            self.layers.append(L)
        par = self.par = model.par
        # expert parallelism: slots each EP rank's experts served in the last step, per MoE layer
        self.ep_counts = torch.zeros(len(self.layers), dtype=torch.int32, device=model.device) if par.ep > 1 else None
        if par.is_last_stage:
            self.final_ln = model.final_layernorm
        else:  # a stage that hands its residual on: the last add+LayerNorm's output is not used
            self.final_ln = types.SimpleNamespace(weight=torch.ones(self.H, dtype=model.dtype, device=model.device),
                                                  bias=torch.zeros(self.H, dtype=model.dtype, device=model.device))
        self.trace: list | None = None   # set to [] to record each MoE layer's expert ids
        self.graphs = None
        self.prefill_graphs = None

    def enable_cuda_graphs(self, cache: KVCache, prefill: bool | None = None) -> None:
        """Decode steps on `cache` replay CUDA graphs (one per batch-size bucket); the cache's
        metadata then stays on the host (`__call__` packs it). prefill: fresh
        prompts too (one graph per (batch, length) bucket, captured on first use; default on,
        FTMOE_PREFILL_GRAPHS=0 turns them off: 8 x 512 prefill on an H200 took 9.3 ms replayed
        against 21.3 ms launched eagerly)."""
        from .cuda_graphs import DecodeGraphs, PrefillGraphs

        self.graphs = DecodeGraphs(self, cache, max_blocks_per_seq=cache.blocks_for(self.config.max_pos_seq_len))
        cache.meta_device = "cpu"      # callers pass ids and metadata on the host: one copy per decode step
        if prefill is None:
            prefill = os.environ.get("FTMOE_PREFILL_GRAPHS", "1") != "0"
        self.prefill_graphs = PrefillGraphs(self, cache) if prefill else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _cfg(self, E: int, N: int, K: int, M: int) -> dict:
        return get_config(E, N, K, _DT.get(self.dtype, "fp32"), M, self.device_name)

    def _dense(self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, parts_ok: bool) -> torch.Tensor:
        """a [M, K] @ w [K, N] (+ bias): cuBLAS, or the Triton kernel where `ftmoe tune` found it
        faster for this shape and M (small-batch GEMVs). With parts_ok the Triton path may return
        fp32 split-K partials [S, M, N] (bias in the first): the consumer, add_layernorm, sums them."""
        M, K = a.shape
        N = w.shape[1]
        choice = get_dense_choice(N, K, _DT.get(self.dtype, "fp32"), M, self.device_name)
        if choice is None:
            return torch.addmm(bias, a, w) if bias is not None else a @ w
        cfg = dict(choice)
        split_k = cfg.pop("split_k", 1)
        return fused_moe(a, w.unsqueeze(0), None if bias is None else bias.unsqueeze(0), M, config=cfg,
                         split_k=split_k if parts_ok else 1)

    # ---- post-attention LN and the MLP, shared by decode and prefill ----------
    def _ln2_mlp(self, L: dict, res: torch.Tensor, o: torch.Tensor, slots: torch.Tensor | None = None, li: int = 0,
                 zero_padding: bool = False, use_gemv: bool = False, feed: bool = False):
        """res += o + bo; u = LN2(res); returns (res, y, bias of y still to add or None).
        slots [N]: each token's KV slot; tokens without one (-1: padding rows of a graph bucket or
        of a right-padded prompt) are routed to no expert, so they cost no expert weight reads.
        zero_padding (prefill): their expert output is zero rather than left unwritten, because a
        prompt's padding tokens share attention kernels with its real tokens (masked, but a NaN
        left in a masked key could still spread); decode padding rows are independent rows.
        use_gemv (decode, few rows): the dense MLP on `gemv`, its hidden layer left as W1's fp32
        partials that W2 sums (+ b1, GELU) as it loads them. feed (with use_gemv): the bounded
        PDL cascade (`pdl.feed_on`): LN2 lets W1 launch before its wait, W1 lets W2 launch first,
        W2 triggers after its wait."""
        eps = self.config.layernorm_eps
        o = self.par.tp_all_reduce(o)                    # row-parallel attention output (TP)
        if not L["moe"]:
            N, F = res.shape[0], L["w1"].shape[2]
            with pdl.feeding(feed):
                res, u = add_layernorm(res, L["ln2"].weight, L["ln2"].bias, eps, add=o, add_bias=L["bo"])
            if use_gemv:
                h = gemv(u, L["w1"][0], L["b1"][0], parts=True)
                y = gemv(h, L["w2"], None, parts=True, gelu_a=True, trigger_first=not feed,
                         config=_w2_tiles(L["w2"]))
                return res, self.par.tp_all_reduce(y), L["b2"]
            h = fused_moe(u, L["w1"], L["b1"], N, gelu=True, config=self._cfg(1, F, self.H, N))
            return res, self.par.tp_all_reduce(self._dense(h, L["w2"], None, parts_ok=True)), L["b2"]
        if self.par.ep > 1:
            return self._ln2_moe_ep(L, res, o, slots >= 0, li)
        if ln_gate(res.shape[0]):     # few rows: the gate logits from the LN kernel, then the top-k kernel
            res, u, logits = add_layernorm_gate(res, L["ln2"].weight, L["ln2"].bias, eps, L["wg32"], add=o,
                                                add_bias=L["bo"])
        else:
            res, u, u32 = add_layernorm(res, L["ln2"].weight, L["ln2"].bias, eps, add=o, add_bias=L["bo"],
                                        want_fp32=True)
            logits = gate_logits(u32, L["wg32"])         # fp32 gate GEMM (no TF32)
        probs, ids, routing = softmax_topk_align(logits, L["k"], self._align_m(L, u.shape[0]), slots=slots)
        if self.trace is not None:
            self.trace.append(ids)
        y = self._experts(L, u, probs, ids, split_k_ok=True, zero_out=zero_padding, use_gemv=use_gemv,
                          routing=routing)
        return res, self.par.tp_all_reduce(y), None          # [split_k,] N*k rows: the next add_layernorm sums partials and slots

    def _align_m(self, L: dict, rows: int) -> int | None:
        """The BLOCK_M to which `_experts` aligns the slots of `rows` rows; None: per-slot routing."""
        S = rows * L["k"]
        return None if S <= SMALL_BATCH_SLOTS else self._cfg(L["w1"].shape[0], L["w1"].shape[2], self.H, S)["BLOCK_M"]

    def _experts(self, L: dict, u: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, split_k_ok: bool,
                 zero_out: bool, use_gemv: bool = False, routing=None) -> torch.Tensor:
        """gelu(u W1 + b1) W2 (+ b2 on TP rank 0) x prob for each routed slot of u's rows: [N*k, H], or
        fp32 split-K partials [S, N*k, H] for small batches when split_k_ok. ids are indices into
        this rank's experts; slots with id -1 read no weights and stay unwritten (zeros with zero_out).
        use_gemv (a decode step on the GEMV path): few slots run on `gemv_experts` (partials out).
        routing: `moe_align(ids, E, self._align_m(L, rows))` if already computed (aligned slots only)."""
        k, E, F = L["k"], L["w1"].shape[0], L["w1"].shape[2]
        S = u.shape[0] * k
        b2 = L["b2"] if self.par.t == 0 else None       # b2 once: only TP rank 0 adds it before the reduce
        if (use_gemv and split_k_ok and not zero_out and S <= GEMV_ROWS and u.dtype == L["w1"].dtype
                and size_switch("FTMOE_GEMV_EXPERTS", S, GEMV_EXPERTS_MAX_SLOTS) and tma_on()
                and experts_fit(L["w1"]) and experts_fit(L["w2"])):
            slots = ids.view(-1)
            h = gemv_experts(u, L["w1"], L["b1"], slots, a_div=k)                  # W1's fp32 partials
            return gemv_experts(h, L["w2"], b2, slots, probs=probs.view(-1), gelu_a=True, ids_ready=True)
        c1 = self._cfg(E, F, self.H, S)
        c2 = self._cfg(E, self.H, F, S)
        split_k = 1
        if S <= SMALL_BATCH_SLOTS:
            routing = ids.view(-1)                       # one program row per slot, no sorting
            if split_k_ok:
                split_k = small_batch_split_k(self.H, F)  # W2 has few N tiles: spread K over programs
        else:
            c2 = dict(c2, BLOCK_M=c1["BLOCK_M"])         # both GEMMs share one alignment
            if routing is None:
                routing = moe_align(ids, E, c1["BLOCK_M"])
        h = fused_moe(u, L["w1"], L["b1"], S, topk=k, routing=routing, gelu=True, config=c1)
        out = None
        if zero_out:
            out = torch.zeros(*((split_k,) if split_k > 1 else ()), S, self.H, device=u.device,
                              dtype=torch.float32 if split_k > 1 else u.dtype)
        return fused_moe(h, L["w2"], b2, S, topk=k, routing=routing, probs=probs, a_per_slot=True,
                         mul_prob=True, config=c2, split_k=split_k, out=out, routing_ready=True)

    def _ln2_moe_ep(self, L: dict, res: torch.Tensor, o: torch.Tensor, real: torch.Tensor, li: int):
        """The MoE layer under expert parallelism, with fixed shapes (graph-capturable, no host sync).

        Every EP rank holds the same number N of token rows (the runner pads). The LN2 output and a
        'real token' flag are all-gathered over the EP group ([ep*N, H+8]); every rank runs the
        gate on all ep*N tokens (the same fp32 GEMM on the same bf16-rounded inputs as one GPU)
        and computes the slots that its E/ep experts own (the others get id -1 and are skipped);
        a reduce-scatter then sums each token's expert output back to the rank that owns the token
        (one non-zero contributor per slot, so the sum is exact)."""
        par, H, eps = self.par, self.H, self.config.layernorm_eps
        k = L["k"]
        EL = L["w1"].shape[0]                                        # this rank's experts
        N = res.shape[0]
        W = H + 8                                                    # rows stay 16-byte aligned
        mine = torch.empty(N, W, dtype=res.dtype, device=res.device)
        res, _ = add_layernorm(res, L["ln2"].weight, L["ln2"].bias, eps, add=o, add_bias=L["bo"], y_out=mine[:, :H])
        mine[:, H] = real
        every = torch.empty(par.ep * N, W, dtype=res.dtype, device=res.device)
        par.ep_all_gather(every, mine)
        u = every[:, :H]
        probs, ids = gate_topk(u, L["wg32"], k)
        local = ids - par.d * EL
        local = torch.where((local >= 0) & (local < EL) & (every[:, H:H + 1] > 0), local, -1).to(torch.int32)
        self.ep_counts[li] = (local >= 0).sum()
        if self.trace is not None:
            self.trace.append(ids[(every[:, H] > 0)])
        y = self._experts(L, u, probs, local, split_k_ok=False, zero_out=True)   # other ranks' slots stay zero
        back = torch.empty(N * k, H, dtype=res.dtype, device=res.device)
        par.ep_reduce_scatter(back, y)
        return res, par.tp_all_reduce(back), None

    # ---- decode: one token per row, fixed shapes (graph-capturable) -----------
    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                    max_ctx: int | None = None, fp32_logits: bool = True) -> torch.Tensor:
        """ids/positions/context_lens/slots [B] (slots -1: padding row), tables [B, nb] -> logits [B, V] fp32
        (fp32_logits=False: in the model's dtype, the same values unconverted, for a consumer that
        reads them as they are, as the greedy chunks' argmax does).
        A later pipeline stage takes the residual [B, H] instead of ids; a stage before the last
        returns its residual [B, H]; under TP the logits are this rank's vocabulary slice.
        max_ctx: no row has more cached tokens (known to the caller; None: any), so that attention
        may run in one pass (`attention.one_pass_tile`; a longer row stays correct, only slower)."""
        B = ids.shape[0]
        with pdl.allowed(pdl.mode_for(B)):
            return self._decode_step(ids, positions, block_tables, context_lens, slots, cache, max_ctx, fp32_logits)

    def _decode_step(self, ids, positions, block_tables, context_lens, slots, cache, max_ctx=None, fp32_logits=True):
        B = ids.shape[0]
        eps = self.config.layernorm_eps
        g = _gemv_on("FTMOE_GEMV", B, GEMV_MAX_ROWS) and cache.k.dtype == self.dtype
        gemv_head = self.par.is_last_stage and _gemv_on("FTMOE_GEMV_HEAD", B, GEMV_HEAD_MAX_ROWS)
        feed = g and pdl.feed_on()       # the bounded cascade: each kernel before a GEMV feeds it
        with pdl.feeding(feed):
            res, a = self._first_ln(ids, positions)                                # [B, H] each
        for i, L in enumerate(self.layers):
            if g:   # fp32 partials [S, B, 3, h, D]: attention sums them
                qkv = gemv(a, L["wqkv"], L["bqkv"], parts=True, trigger_first=not feed)
                qkv = qkv.view(-1, B, 3, self.heads, self.D)
            else:
                qkv = self._dense(a, L["wqkv"], L["bqkv"], parts_ok=True)   # split-K partials: attention sums them
                qkv = qkv.view(*qkv.shape[:-2], B, 3, self.heads, self.D)
            o = self._attention_wo(L, qkv, cache.k[i], cache.v[i], block_tables, context_lens, slots, g, feed,
                                   max_ctx)
            res, y, y_bias = self._ln2_mlp(L, res, o, slots, i, use_gemv=g, feed=feed)
            last = i + 1 == len(self.layers)
            nxt = self.final_ln if last else self.layers[i + 1]["ln1"]
            with pdl.feeding(feed and (gemv_head or not last)):
                res, a = add_layernorm(res, nxt.weight, nxt.bias, eps, add=y, add_bias=y_bias)
        if not self.par.is_last_stage:
            return res
        if gemv_head:
            m = self.model   # logits rounded to the model's dtype (as the GEMM's), stored as fp32
            return gemv(a, m.wte[m.vocab_start:m.vocab_end].t(), out_dtype=torch.float32 if fp32_logits else None,
                        trigger_first=not feed)
        return self._head(a, fp32_logits)

    def _attention_wo(self, L: dict, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                      use_gemv: bool = False, feed: bool = False, max_ctx: int | None = None) -> torch.Tensor:
        """Decode attention, then its output GEMM Wo (no bias: added with the residual).
        use_gemv: qkv is the QKV GEMV's partials and Wo runs on `gemv` (fp32 partials out);
        feed: attention lets Wo launch before its wait, Wo triggers after its own; max_ctx as in
        `decode_step`."""
        B = qkv.shape[-4]
        with pdl.feeding(feed):
            ctx = decode_attention(qkv, k_cache, v_cache, block_tables, context_lens, slots, self.scale, max_ctx=max_ctx)
        if use_gemv:
            return gemv(ctx.view(B, self.HL), L["wo"], None, parts=True, trigger_first=not feed,
                        splits=_wo_splits(self.HL))
        return self._dense(ctx.view(B, self.HL), L["wo"], None, parts_ok=True)

    def _first_ln(self, x: torch.Tensor, positions: torch.Tensor):
        """(residual, LN1 of it) of the first local layer: from token ids (embeddings gathered and
        summed in the same kernel) on the first stage, from the received residual [N, H] after."""
        ln = self.layers[0]["ln1"]
        if self.par.is_first_stage:
            m = self.model
            return embed_layernorm(m.wte, m.wpe, x, positions, ln.weight, ln.bias, self.config.layernorm_eps)
        return add_layernorm(x, ln.weight, ln.bias, self.config.layernorm_eps)

    def _head(self, a: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        m = self.model
        logits = a @ m.wte[m.vocab_start:m.vocab_end].t()
        return logits.float() if fp32 else logits

    # ---- prefill: fresh prompts, right-padded [B, T] --------------------------
    def prefill(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache,
                last_only: bool = True, ragged: bool | None = None) -> torch.Tensor:
        """ids [B, T] (a later pipeline stage: the residual [B*T, H]) -> logits [B, (T,) V] fp32, or
        the residual [B*T, H] on a stage before the last. ragged: whether some row is shorter than
        T (None: find out, a host sync; a CUDA graph passes it)."""
        with pdl.allowed(pdl.mode_for(meta.positions.numel())):
            return self._prefill(input_ids, meta, cache, last_only, ragged)

    def _prefill(self, input_ids, meta, cache, last_only, ragged):
        B, T = meta.positions.shape
        H, h, D = self.H, self.heads, self.D
        dev = meta.positions.device
        valid = torch.arange(T, device=dev)[None, :] < meta.seq_lens[:, None]                 # [B, T]
        if ragged is None:
            ragged = bool((meta.seq_lens != T).any())
        res, a = self._first_ln(input_ids, meta.positions)                         # [B*T, H] each
        slots = meta.slot_mapping.reshape(-1).contiguous()
        mask = None
        if ragged:  # causal and key-padding: query t of row b sees keys j <= t (< seq_len)
            j = torch.arange(T, device=dev)
            mask = (j[None, :] <= j[:, None])[None, None] & valid[:, None, None, :]
        for i, L in enumerate(self.layers):
            qkv = self._dense(a, L["wqkv"], L["bqkv"], parts_ok=False).view(B, T, 3, h, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))                     # [B, h, T, D]
            write_kv(qkv.view(B * T, 3, h, D), cache.k[i], cache.v[i], slots)   # padding slots (-1) skipped
            if mask is None:
                ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            o = self._dense(ctx.transpose(1, 2).reshape(B * T, self.HL), L["wo"], None, parts_ok=True)
            res, y, y_bias = self._ln2_mlp(L, res, o, slots, i, zero_padding=True)
            nxt = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.final_ln
            res, a = add_layernorm(res, nxt.weight, nxt.bias, self.config.layernorm_eps, add=y, add_bias=y_bias)
        if not self.par.is_last_stage:
            return res
        a = a.view(B, T, H)
        if last_only:
            a = a[torch.arange(B, device=a.device), meta.seq_lens - 1]
        return self._head(a)

    def run_prefill(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache, last_only: bool,
                    causal_only: bool | None = None) -> torch.Tensor:
        """Fresh prompts: replayed from a prefill graph when they are enabled for `cache`, only the
        last tokens' logits are wanted and a bucket fits (causal_only as in `PrefillGraphs.step`);
        launched eagerly otherwise. causal_only=True: every row is T long (known on the host),
        None: find out (a host sync)."""
        pg = self.prefill_graphs
        if pg is not None and pg.cache is cache and last_only:
            out = pg.step(input_ids, meta, causal_only)
            if out is not None:
                return out
        return self.prefill(input_ids, meta, cache, last_only, ragged=None if causal_only is None else not causal_only)

    def greedy_chunk(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache, steps: int,
                     logprobs: bool = False):
        """`steps` greedy decode steps run back to back on the GPU (`DecodeGraphs.greedy_chunk`;
        meta from `cache.prepare_chunk`, on the host), or None where this model cannot: no graphs
        for `cache`, a batch past the largest bucket, or a sharded model."""
        chunk = self.greedy_chunk_start(input_ids, meta, cache, steps, logprobs)
        return None if chunk is None else self.greedy_chunk_result(chunk)

    def greedy_chunk_start(self, input_ids: torch.Tensor | None, meta: AttnMetadata, cache: KVCache, steps: int,
                           logprobs: bool = False, after=None):
        """`greedy_chunk` queued without the wait (`DecodeGraphs.greedy_chunk_start`; after: the
        chunk it continues on the device, ids None), or None where this model cannot."""
        B = meta.positions.shape[0]
        if not self.can_greedy_chunk(cache, B) or meta.positions.device.type != "cpu":
            return None
        return self.graphs.greedy_chunk_start(input_ids, meta, steps, logprobs, after)

    def greedy_chunk_result(self, chunk):
        """A started chunk's (tokens [steps, B], log probs or None) on the host, once it has run."""
        return self.graphs.greedy_chunk_result(chunk)

    def can_greedy_chunk(self, cache: KVCache, batch: int) -> bool:
        """Whether `greedy_chunk` runs for `batch` rows on `cache` (checked before its metadata is built)."""
        g, par = self.graphs, self.par
        return (g is not None and g.serves(cache, batch) and par.tp == 1 and par.ep == 1
                and par.is_first_stage and par.is_last_stage)

    # ---- GPTMoE-compatible entry point ----------------------------------------
    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        """input_ids and meta on the model's device, or both on the CPU (a cache whose
        `meta_device` is "cpu", as `enable_cuda_graphs` sets it): a decode step then reaches the
        GPU in one copy. One new token per row is a decode step (rows with no new token have no
        slot: padding); fresh prompts are a prefill; anything else runs on the reference path."""
        if meta is None or cache is None:
            return self.model(input_ids, meta, cache, last_only)
        B, T = input_ids.shape
        on_host = meta.positions.device.type == "cpu"
        graphs = self.graphs
        if T == 1 and graphs is not None and graphs.serves(cache, B):
            if on_host and input_ids.device.type == "cpu":
                out = graphs.step_host(input_ids, meta)
            else:
                out = graphs.step(input_ids[:, 0], meta.positions[:, 0], meta.block_tables, meta.context_lens,
                                  meta.slot_mapping[:, 0])
            return out if last_only else out[:, None]
        fresh = T > 1 and bool((meta.context_lens == 0).all())
        causal_only = bool((meta.seq_lens == T).all()) if on_host and fresh else None   # free on the host
        input_ids, meta = input_ids.to(self.device), meta.to(self.device)
        if T == 1:
            out = self.decode_step(input_ids[:, 0], meta.positions[:, 0], meta.block_tables, meta.context_lens,
                                   meta.slot_mapping[:, 0], cache)
            return out if last_only else out[:, None]
        if fresh:
            return self.run_prefill(input_ids, meta, cache, last_only, causal_only)
        return self.model(input_ids, meta, cache, last_only)  # chunked prefill: reference path for now
