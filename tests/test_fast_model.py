"""The kernel path (FastGPTMoE) equals the reference model: prefill, decode, ragged batches.

Runs compiled on a GPU, or through Triton's interpreter on the CPU (fp32, tiny model).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
from ftmoe import kernels  # noqa: E402

if not kernels.available():
    pytest.skip("Triton cannot run here", allow_module_level=True)

from ftmoe.fast_model import FastGPTMoE  # noqa: E402
from ftmoe.kv_cache import KVCache  # noqa: E402
from ftmoe.loader import load_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("fewer_attention_splits")


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    ref = load_model(tiny_model_dir, dtype="float32", device=DEV)
    return ref, FastGPTMoE(ref)


@pytest.mark.parametrize("lens", [[7], [5, 11, 1], [4, 4]])
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_then_decode_matches_reference(models, lens, block_size):
    # enough steps for a row to cross a KV block boundary: every case at block size 4, 11 + 6 at 16
    _prefill_then_decode(*models, lens, block_size, steps=4 if block_size == 4 else 6, seed=sum(lens) + block_size)


def _prefill_then_decode(ref, fast, lens, block_size, steps, seed):
    """Prompts of `lens` tokens prefilled in one right-padded batch, then `steps` decode steps:
    every call's last-token logits equal the reference's full forward at that position."""
    g = torch.Generator().manual_seed(seed)
    V = ref.config.vocab_size
    seqs = [torch.randint(0, V, (n + steps,), generator=g).to(DEV) for n in lens]
    full = [ref(s[None])[0] for s in seqs]
    cache = KVCache.for_model(ref.config, 256, block_size=block_size, dtype=torch.float32, device=DEV)
    ids = list(range(len(lens)))
    for i in ids:
        cache.add(i)
    batch = torch.zeros(len(lens), max(lens), dtype=torch.long, device=DEV)
    for i, n in enumerate(lens):
        batch[i, :n] = seqs[i][:n]
    out = fast(batch, cache.prepare(ids, lens), cache, last_only=True)
    for i, n in enumerate(lens):
        assert rel(out[i], full[i][n - 1]) < 1e-4
    for step in range(steps):
        tok = torch.stack([s[n + step] for s, n in zip(seqs, lens)])[:, None]
        out = fast(tok, cache.prepare(ids, [1] * len(ids)), cache, last_only=True)
        for i, n in enumerate(lens):
            assert rel(out[i], full[i][n + step]) < 1e-4, (i, step)


def test_generation_through_graphs_with_host_metadata(models):
    """With graphs enabled the cache keeps its metadata on the host and the model takes ids and
    metadata from there (prefill through a prefill graph bucket, decode through `step_host`,
    one batch with rows of different lengths); logits equal the reference's."""
    ref, fast = models
    lens = [5, 11, 1]
    g = torch.Generator().manual_seed(7)
    V = ref.config.vocab_size
    seqs = [torch.randint(0, V, (n + 3,), generator=g) for n in lens]
    full = [ref(s[None].to(DEV))[0] for s in seqs]
    cache = KVCache.for_model(ref.config, 256, block_size=4, dtype=torch.float32, device=DEV)
    fast.enable_cuda_graphs(cache)
    try:
        assert cache.meta_device == "cpu"
        ids = list(range(len(lens)))
        for i in ids:
            cache.add(i)
        batch = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, n in enumerate(lens):
            batch[i, :n] = seqs[i][:n]
        meta = cache.prepare(ids, lens)
        assert meta.positions.device.type == "cpu"
        out = fast(batch, meta, cache, last_only=True)
        assert all(rel(out[i], full[i][n - 1]) < 1e-4 for i, n in enumerate(lens))
        for step in range(3):
            tok = torch.stack([s[n + step] for s, n in zip(seqs, lens)])[:, None]
            out = fast(tok, cache.prepare(ids, [1] * len(ids)), cache, last_only=True)
            for i, n in enumerate(lens):
                assert rel(out[i], full[i][n + step]) < 1e-4, (i, step)
        # the decode steps went through step_host: a staging copy, or (batch <= 8) the graph's host fetch
        assert fast.graphs.graphs and all("host" in s for _, s, _ in fast.graphs.graphs.values())
    finally:
        fast.graphs = fast.prefill_graphs = None


def test_greedy_chunk_equals_greedy_steps(models, logprobs=True):
    """A greedy chunk (steps replayed back to back, each argmax fed back on the device, rows moved
    on by the advance kernel, one block boundary crossed), here queued as two, the second continuing
    from the first's last tokens before the first is read, gives the tokens that single steps with
    a host argmax give, and log-softmax log probs; 3 rows in bucket 4 (one padding row)."""
    from ftmoe.cuda_graphs import DecodeGraphs

    ref, fast = models
    lens, steps = [5, 2, 7], 4
    g = torch.Generator().manual_seed(11 + logprobs)
    prompt = torch.randint(0, ref.config.vocab_size, (3, max(lens)), generator=g)
    got = {}
    for mode in ("chunk", "steps"):
        cache = KVCache.for_model(ref.config, 256, block_size=4, dtype=torch.float32, device=DEV)
        cache.meta_device = "cpu"
        graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=8, buckets=(1, 4))
        seqs = [0, 1, 2]
        for q in seqs:
            cache.add(q)
        first = fast(prompt.to(DEV), cache.prepare(seqs, lens).to(DEV), cache, last_only=True).argmax(-1).cpu()
        if mode == "chunk":       # 2 steps, then 3 queued behind them from their last tokens, then both read
            c1 = graphs.greedy_chunk_start(first, cache.prepare_chunk(seqs, 2), 2, logprobs)
            c2 = graphs.greedy_chunk_start(None, cache.prepare_chunk(seqs, steps - 2), steps - 2, logprobs, after=c1)
            (t1, l1), (t2, l2) = graphs.greedy_chunk_result(c1), graphs.greedy_chunk_result(c2)
            got[mode] = (torch.cat([t1, t2]), torch.cat([l1, l2]))
            assert [cache.length(q) for q in seqs] == [n + steps for n in lens]
            with pytest.raises(ValueError, match="must follow the last chunk queued"):
                graphs.greedy_chunk_start(None, cache.prepare_chunk(seqs, 2), 2, logprobs, after=c1)
            with pytest.raises(ValueError, match="needs token ids unless it continues"):
                graphs.greedy_chunk_start(None, cache.prepare_chunk(seqs, 2), 2, logprobs)
        else:
            tok, toks, lps = first, [], []
            for _ in range(steps):
                logits = graphs.step_host(tok, cache.prepare(seqs, [1] * 3))
                tok = logits.argmax(-1).cpu()
                toks.append(tok)
                lps.append(torch.log_softmax(logits, -1).gather(1, tok[:, None].to(DEV))[:, 0].cpu())
            got[mode] = (torch.stack(toks), torch.stack(lps))
    assert torch.equal(got["chunk"][0], got["steps"][0])
    assert torch.allclose(got["chunk"][1], got["steps"][1], atol=1e-5)
    with pytest.raises(ValueError, match="a greedy chunk takes 1..32 steps, got 33"):
        graphs.greedy_chunk(first, cache.prepare_chunk([0, 1, 2], 1), 33)


def test_serving_engine_decodes_greedy_chunks(models, monkeypatch):
    """The serving engine over the fast path with graphs on its cache runs plain-greedy decodes in
    chunks (`FastGPTMoE.greedy_chunk`), and streams the tokens and log probs that one step at a
    time gives; every block is freed."""
    from ftmoe.engine import LLMEngine
    from ftmoe.sampling import SamplingParams

    ref, fast = models
    reqs = [("a", [5, 9, 2, 7], SamplingParams(max_new_tokens=7, return_log_probs=True)),
            ("b", [3], SamplingParams(max_new_tokens=7, return_log_probs=True))]
    got = {}
    for chunk in (4, 1):
        eng = LLMEngine(fast, kv_cache_tokens=256, block_size=4, decode_chunk=chunk)
        fast.enable_cuda_graphs(eng.cache, prefill=False)
        if chunk > 1:       # as `ftmoe serve` does at start-up: every bucket up to max_num_seqs first
            assert fast.graphs.capture_upto(3, greedy=True) == [1, 2, 4]
            assert sorted(fast.graphs.graphs) == [1, 2, 4]
            assert {k[:2] for k in fast.graphs.greedy} == {(1, False), (2, False), (4, False)}   # (+ short contexts')
        calls, continued = [], []
        real = fast.graphs.greedy_chunk_start

        def start(ids, meta, steps, logprobs=False, after=None):
            calls.append(steps)
            continued.append(after is not None)
            return real(ids, meta, steps, logprobs, after)

        monkeypatch.setattr(fast.graphs, "greedy_chunk_start", start)
        try:
            for rid, prompt, p in reqs:
                eng.add_request(rid, prompt, p)
            evs = []
            while eng.has_unfinished():
                evs += eng.step()
        finally:
            fast.graphs = fast.prefill_graphs = None
        got[chunk] = {rid: [(e.token_id, e.logprob) for e in evs if e.request_id == rid] for rid, _, _ in reqs}
        assert (calls == []) == (chunk == 1) and all(2 <= s <= 4 for s in calls)
        assert (True in continued) == (chunk > 1)          # queued behind the last, fed on the device
        assert eng.cache.num_free_blocks == eng.cache.num_blocks
    for rid, _, p in reqs:
        assert [t for t, _ in got[4][rid]] == [t for t, _ in got[1][rid]] and len(got[1][rid]) == p.max_new_tokens
        assert [lp for _, lp in got[4][rid]] == pytest.approx([lp for _, lp in got[1][rid]], abs=1e-5)


def test_tune_in_step_refines_the_entries_a_step_uses(models, monkeypatch):
    """`ftmoe tune --in-step` on the CPU (interpreter, a fake timer): the entries batch 2's step
    resolves get their own M = 2 entries, a variant that times faster replaces only its entry (a
    cuBLAS choice can become a Triton tile), the input table stays untouched, and every variant
    ran as a real step."""
    from ftmoe.kernels import configs
    from ftmoe.tune_step import StepRig, refine_in_step

    monkeypatch.setenv("FTMOE_GEMV", "0")          # batch 2's dense GEMMs through the tuned table
    ref, fast = models
    cfg = ref.config
    H, F, E = cfg.hidden_size, cfg.inter_size, cfg.expert_num
    tile = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    w1, w2, mlp = (configs.shape_key(E, F, H, "fp32"), configs.shape_key(E, H, F, "fp32"),
                   configs.shape_key(1, F, H, "fp32"))
    qkv, wo = configs.dense_key(3 * H, H, "fp32"), configs.dense_key(H, H, "fp32")
    table = {w1: {"1": tile}, w2: {"1": tile}, mlp: {"8": dict(tile, num_stages=2)},
             qkv: {"1": dict(tile, backend="triton", split_k=1)}, wo: {"1": {"backend": "cublas"}}}
    saved = json.dumps(table, sort_keys=True)
    ran, lines, steps = [], [], []

    def timer(fn, B, key, v):
        ran.append((key, v))
        if key == wo:                              # the cuBLAS choice loses to its Triton candidate
            return 0.9 if "num_stages" in v else 1.0
        return 0.5 if key == w1 and v == dict(tile, BLOCK_K=32) else 1.0

    rig = StepRig(fast, [2], ctx=6, block_size=4)
    real = rig.step_fn
    rig.step_fn = lambda *a, **kw: steps.append(1) or real(*a, **kw)
    saved_tables = []
    got = refine_in_step(rig, table, rounds=1, stages=(), log=lines.append, timer=timer,   # BLOCK_K 32, 128
                         save=saved_tables.append)
    assert saved_tables == [got]                   # written after the (one) batch
    assert json.dumps(table, sort_keys=True) == saved
    k = cfg.moe_k
    assert got[w1][str(2 * k)] == dict(tile, BLOCK_K=32) and got[w1]["1"] == tile
    assert got[w2][str(2 * k)] == tile and got[mlp] == {"8": dict(tile, num_stages=2), "2": dict(tile, num_stages=2)}
    assert got[qkv]["2"] == dict(tile, backend="triton", split_k=1)
    assert got[wo] == {"1": {"backend": "cublas"}, "2": dict(configs.default_config(2), backend="triton", split_k=1)}
    assert any("BK 64 stages 3 -> BM 16 BN 32 BK 32 stages 3" in line and w1 in line for line in lines)
    assert any("cuBLAS -> BM 16" in line and wo in line for line in lines)
    assert len(ran) == 4 * 3 + 2                   # 4 Triton entries x (base, BK 32, BK 128); cuBLAS + 1 tile
    assert len(steps) == 1 + 4 * 3 + 2             # the recording step, then one real step per trial


def test_padding_rows_write_nothing(models):
    """Rows with slot -1 (graph-bucket padding) write no KV and route to no expert; a real row
    beside them is unaffected."""
    ref, fast = models
    cache = KVCache.for_model(ref.config, 64, block_size=4, dtype=torch.float32, device=DEV)
    cache.k.normal_()
    before_k = cache.k.clone()
    ids = torch.tensor([3, 9, 4], device=DEV)
    zeros = torch.zeros(3, dtype=torch.int32, device=DEV)
    tables = torch.ones(3, 1, dtype=torch.int32, device=DEV)               # block 1
    slots = torch.tensor([-1, 4, -1], dtype=torch.int32, device=DEV)      # only row 1 is real: block 1, offset 0
    fast.trace = []
    logits = fast.decode_step(ids, zeros.long(), tables, zeros, slots, cache)
    trace, fast.trace = fast.trace, None
    changed = (cache.k != before_k).any(dim=(0, 2, 4))                     # [blocks, offsets]
    assert changed.nonzero().tolist() == [[1, 0]]
    assert all(t[0].tolist() == [-1] * t.shape[1] and t[2].tolist() == [-1] * t.shape[1] for t in trace)
    want = ref(ids[1:2, None])[:, 0]
    assert rel(logits[1:2], want) < 1e-4


def test_triton_gate_decode_equals_cublas_gate(models, monkeypatch):
    """FTMOE_GATE=triton (the gate GEMM on the fused-MoE kernel, split-K partials summed by the
    top-k kernel) and FTMOE_LN_GATE=1 (the logits from the LN2 kernel) route every token to the
    same experts as the cuBLAS gate, same logits."""
    ref, fast = models
    ids = torch.tensor([3, 9, 4, 17, 250], device=DEV)
    B = ids.shape[0]
    zeros = torch.zeros(B, dtype=torch.int32, device=DEV)
    tables = torch.arange(B, dtype=torch.int32, device=DEV)[:, None]
    slots = (tables[:, 0] * 4).int()
    out = {}
    for flag in ("cublas", "triton", "ln"):    # ln: the logits from the LN2 kernel (FTMOE_LN_GATE)
        monkeypatch.setenv("FTMOE_GATE", "cublas" if flag == "ln" else flag)
        monkeypatch.setenv("FTMOE_LN_GATE", "1" if flag == "ln" else "0")
        cache = KVCache.for_model(ref.config, 64, block_size=4, dtype=torch.float32, device=DEV)
        fast.trace = []
        logits = fast.decode_step(ids, zeros.long(), tables, zeros, slots, cache)
        out[flag] = (logits, [t.clone() for t in fast.trace])
        fast.trace = None
    for other in ("triton", "ln"):
        assert len(out[other][1]) == len(out["cublas"][1]) > 0
        assert all(torch.equal(a, b) for a, b in zip(out["cublas"][1], out[other][1]))
        assert rel(out[other][0], out["cublas"][0]) < 1e-5
    assert rel(out["triton"][0], ref(ids[:, None])[:, 0]) < 1e-4


@pytest.mark.parametrize("fetch", [False, True])
@pytest.mark.parametrize("B", [1, 3, 8] if DEV == "cuda" else [3])     # the CPU runs the padded bucket only
def test_cuda_graph_replay_equals_eager(models, monkeypatch, B, fetch):
    """A decode graph's replay (on the CPU: the same static buffers, run eagerly) equals the eager
    step, fed from device tensors field by field (`step`) or from the host in one packed copy
    (`step_host`); B = 3 replays bucket 4 with a padding row. The packed layout is checked by
    what it feeds: ids, positions, tables, context lengths and slots all change the logits.
    fetch (FTMOE_GRAPH_FETCH=1): `step_host`'s inputs are read from pinned host memory by the
    graph's first kernel; a `step` after a `step_host` must not take the stale host inputs."""
    from ftmoe.cuda_graphs import DecodeGraphs
    from ftmoe.kv_cache import AttnMetadata

    monkeypatch.setenv("FTMOE_GRAPH_FETCH", "1" if fetch else "0")
    ref, fast = models
    cache = KVCache.for_model(ref.config, 512, block_size=8, dtype=torch.float32, device=DEV)
    seqs = list(range(B))
    g = torch.Generator().manual_seed(B)
    lens = torch.randint(1, 20, (B,), generator=g).tolist()
    for s in seqs:
        cache.add(s)
    prompt = torch.randint(0, ref.config.vocab_size, (B, max(lens)), generator=g).to(DEV)
    fast(prompt, cache.prepare(seqs, lens), cache, last_only=True)
    graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=8, buckets=(1, 4, 8))
    for step in range(2):
        tok = torch.randint(0, ref.config.vocab_size, (B,), generator=g)
        meta = cache.prepare(seqs, [1] * B)
        host = AttnMetadata(*(t.cpu() for t in meta.fields))
        args = (tok.to(DEV), meta.positions[:, 0], meta.block_tables.int(), meta.context_lens.int(),
                meta.slot_mapping[:, 0].int())
        k_before, v_before = cache.k.clone(), cache.v.clone()
        eager = fast.decode_step(*args, cache)
        k_after = cache.k.clone()
        for run in (lambda: graphs.step(*args), lambda: graphs.step_host(tok[:, None], host)):
            cache.k.copy_(k_before)
            cache.v.copy_(v_before)
            graphed = run()
            assert graphed.shape == eager.shape
            assert torch.allclose(graphed, eager, rtol=1e-5, atol=1e-5), step
            # the new K landed in the same slots (bit-equal up to the GEMM's rounding at another M)
            assert torch.allclose(cache.k, k_after, rtol=1e-5, atol=1e-5)
            assert not torch.equal(cache.k, k_before)
    assert ("host" in graphs.graphs[graphs.bucket_for(B)][1]) == fetch and bool(graphs._stage) != fetch
    if B == 3:                                               # the padding row of bucket 4
        staged = (graphs.graphs[4][1]["host"] if fetch else graphs._stage[4][0][0])[:16].view(4, 4)
        assert staged[3, 3] == -1 and staged[2, 3] == 0      # ids, positions, ctx, slots


def test_graph_fetch_default_rule(models, monkeypatch):
    """By default buckets of up to 256 rows take step_host's inputs through the graph's host fetch,
    larger ones through the staging copy; FTMOE_GRAPH_FETCH=0 / 1 forces either."""
    from ftmoe import cuda_graphs

    ref, fast = models
    cache = KVCache.for_model(ref.config, 64, block_size=8, dtype=torch.float32, device=DEV)
    lo, hi = cuda_graphs.FETCH_MAX_ROWS, 2 * cuda_graphs.FETCH_MAX_ROWS
    for env, want in ((None, {lo: True, hi: False}), ("0", {lo: False, hi: False}), ("1", {lo: True, hi: True})):
        if env is None:
            monkeypatch.delenv("FTMOE_GRAPH_FETCH", raising=False)
        else:
            monkeypatch.setenv("FTMOE_GRAPH_FETCH", env)
        graphs = cuda_graphs.DecodeGraphs(fast, cache, max_blocks_per_seq=4, buckets=(lo, hi))
        for b in (lo, hi):
            graphs.capture(b)
        assert {b: "host" in graphs.graphs[b][1] for b in (lo, hi)} == want, env
    assert cuda_graphs.FETCH_MAX_ROWS == 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_fast_generation_follows_fp32_reference(tiny_model_dir):
    """Greedy generation, 64 tokens: bf16 fast path (kernels + CUDA graphs) vs the fp32 reference.
    Tokens must agree until the reference's top-2 margin is within bf16 noise; logits teacher-forced
    on the reference's output agree within bf16 tolerance."""
    from ftmoe.llm import LLM
    from ftmoe.sampling import SamplingParams

    ref = LLM(tiny_model_dir, dtype="float32", device="cuda", fast=False)
    fast = LLM(tiny_model_dir, dtype="bfloat16", device="cuda")
    assert fast.generator.model.graphs is not None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    want = ref.generate(prompts, params)
    got = fast.generate(prompts, params)
    for w, o in zip(want, got):
        seq = torch.tensor(w.output_ids, device="cuda")
        logits = ref.model(seq[None])[0]                         # [T, V] fp32 reference
        top2 = logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]) / logits.abs().max()
        for t in range(w.prompt_length, len(w.output_ids)):
            if o.output_ids[t] != w.output_ids[t]:
                assert margin[t - 1] < 2e-2, f"diverged at {t} with a clear margin {float(margin[t - 1]):.3g}"
                break
        runner = fast.generator.model                            # FastGPTMoE: kernels, bf16
        cache = KVCache.for_model(runner.config, 256, dtype=torch.bfloat16, device="cuda")
        cache.add(0)
        fast_logits = runner(seq[None], cache.prepare([0], [len(seq)]), cache, last_only=False)[0]
        # bf16 noise on this random model is large: the kernel path must be no worse than plain
        # bf16 PyTorch (the reference model with bf16 weights) against the fp32 reference
        bf16_ref = fast.model(seq[None])[0]
        err_fast = float((fast_logits - logits).norm() / logits.norm())
        err_bf16 = float((bf16_ref - logits).norm() / logits.norm())
        assert err_fast < 1.5 * err_bf16 + 1e-3, (err_fast, err_bf16)


def test_bench_procedure_smoke(tmp_path, monkeypatch):
    """`ftmoe bench` end to end on a tiny preset (the CPU: interpreter, no graphs, no floors; a GPU:
    graphs and floors): decode rows per batch (single steps and greedy chunks), prefill, the
    FT-style latency rows, JSON with the FTMOE_* switches the run saw."""
    from ftmoe.bench import run_bench

    monkeypatch.setenv("FTMOE_GATE", "triton")

    out = tmp_path / "bench.json"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = run_bench("tiny", dtype="float32", batches=(1, 2), ctx=8, prefill=(2, 4), eager=True, latency=True,
                  iters=1, json_path=str(out), log=lambda *_: None, device=dev, latency_batches=(2,),
                  latency_shapes=((4, 2),), prefill_graphs=True, greedy_chunk=2)
    phases = [(row["phase"], row["batch"]) for row in r["rows"]]
    assert phases[:6] == [("decode", 1)] * 2 + [("decode", 2)] * 2 + [("prefill", 2), ("prefill", 2)]
    assert [row["variant"] for row in r["rows"][:6]] == [None, "greedy-chunk-2"] * 2 + [None, "cuda-graph"]
    assert [b for p, b in phases if p == "latency"] == [2]
    for row in r["rows"]:
        assert row["ms"] > 0 and row["tokens_per_s"] > 0
        assert (row["floor_ms"] is not None) == (dev == "cuda" and row["phase"] != "latency")
        # routing measured for single steps and for each chunk's own tokens (top-1: 1..B experts per layer)
        assert (row["experts_touched"] is not None) == (row["phase"] == "decode")
        if row["phase"] == "decode":
            assert 1 <= row["experts_touched"] <= row["batch"]
    import json
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["phase"] == "decode" and saved["env"]["FTMOE_GATE"] == "triton"


@pytest.mark.parametrize("lens", [[5, 11, 1], [16, 16]])
def test_prefill_graphs_equal_eager_prefill(models, lens):
    """Bucketed prefill (padding rows and columns with no KV slot; on a GPU a captured graph,
    replayed for a second batch) gives the eager prefill's last-token logits and writes the
    same KV at the real tokens' slots, nothing elsewhere."""
    from ftmoe.cuda_graphs import PrefillGraphs

    ref, fast = models
    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(sum(lens))
    pg = None
    for trial in range(2):
        caches = [KVCache.for_model(ref.config, 256, block_size=4, dtype=torch.float32, device=DEV) for _ in range(2)]
        for c in caches:
            c.k.normal_(generator=None)
        caches[1].k.copy_(caches[0].k)
        caches[1].v.copy_(caches[0].v)
        before = caches[0].k.clone()
        if pg is None:
            pg = PrefillGraphs(fast, caches[0], t_buckets=(8, 16), b_buckets=(2, 4))
        pg.reset(caches[0])                   # a graph bakes in its cache: capture again for the new one
        if trial:                             # as `ftmoe serve` starts: every bucket first (writing no KV)
            assert pg.capture_all() == [(2, 8, False), (4, 8, False), (2, 16, False), (4, 16, False),
                                        (2, 8, True), (2, 16, True)]
            assert len(pg.graphs) == 6
        batch = torch.randint(0, V, (len(lens), max(lens)), generator=g).to(DEV)
        metas = []
        for c in caches:
            for i in range(len(lens)):
                c.add(i)
            metas.append(c.prepare(list(range(len(lens))), lens))
        got = pg.step(batch, metas[0])
        want = fast.prefill(batch, metas[1], caches[1], last_only=True)
        assert got.shape == want.shape and rel(got, want) < 1e-4
        assert bucket_keys_ok(pg, len(lens), max(lens))
        slots = metas[0].slot_mapping[metas[0].slot_mapping >= 0]
        blk, off = slots // 4, slots % 4
        assert rel(caches[0].k[:, blk, :, off], caches[1].k[:, blk, :, off]) < 1e-4
        untouched = torch.ones(caches[0].k.shape[1], 4, dtype=torch.bool, device=DEV)
        untouched[blk, off] = False
        assert torch.equal(caches[0].k.permute(1, 3, 0, 2, 4)[untouched], before.permute(1, 3, 0, 2, 4)[untouched])


def bucket_keys_ok(pg, B, T):
    bb, tb = pg.bucket_for(B, T)
    return bb >= B and tb >= T and any(k[:2] == (bb, tb) for k in pg.graphs)


def test_prefill_graphs_decline_what_no_bucket_fits(models):
    from ftmoe.cuda_graphs import PrefillGraphs

    ref, fast = models
    cache = KVCache.for_model(ref.config, 64, block_size=4, dtype=torch.float32, device=DEV)
    pg = PrefillGraphs(fast, cache, t_buckets=(8,), b_buckets=(2,), max_tokens=16)
    assert pg.bucket_for(3, 8) is None and pg.bucket_for(2, 9) is None and pg.bucket_for(2, 8) == (2, 8)
    cache.add(0)
    ids = torch.zeros(1, 9, dtype=torch.long, device=DEV)
    assert pg.step(ids, cache.prepare([0], [9])) is None


def test_triton_dense_gemms_with_split_k_match_reference(models, monkeypatch):
    """Where the tuned table picks the Triton kernel for the dense GEMMs (QKV, Wo, dense W2), with
    split-K partials summed by add+LayerNorm (decode's QKV partials by attention), prefill and
    decode still equal the reference."""
    from ftmoe import fast_model

    picked = []
    monkeypatch.setenv("FTMOE_GEMV", "0")            # decode's dense GEMMs through _dense too

    def choice(N, K, dtype, M, device_name=""):
        picked.append((N, K))
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2,
                "split_k": 3}

    monkeypatch.setattr(fast_model, "get_dense_choice", choice)
    qkv_dims = []
    real_attn = fast_model.decode_attention
    monkeypatch.setattr(fast_model, "decode_attention", lambda qkv, *a, **k: qkv_dims.append(qkv.dim()) or
                        real_attn(qkv, *a, **k))
    ref, fast = models
    H, F = ref.config.hidden_size, ref.config.inter_size
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, ref.config.vocab_size, (9,), generator=g).to(DEV)
    full = ref(seq[None])[0]
    cache = KVCache.for_model(ref.config, 64, block_size=4, dtype=torch.float32, device=DEV)
    cache.add(0)
    out = fast(seq[None, :6], cache.prepare([0], [6]), cache, last_only=True)
    assert rel(out[0], full[5]) < 1e-4
    for t in range(6, 9):
        out = fast(seq[None, t:t + 1], cache.prepare([0], [1]), cache, last_only=True)
        assert rel(out[0], full[t]) < 1e-4
    assert {(3 * H, H), (H, H), (H, F)} <= set(picked)     # QKV, Wo, dense W2
    assert qkv_dims and set(qkv_dims) == {5}               # decode's QKV as partials [3, B, 3, h, D]


def test_pdl_launch_arguments(monkeypatch):
    """Programmatic dependent launch only on a Hopper-or-later GPU, never in the interpreter,
    with FTMOE_PDL=0 or inside allowed(False) (the model's steps of more than MAX_ROWS rows)."""
    from ftmoe.kernels import pdl

    assert pdl.launch_kwargs(torch.zeros(1)) == {}
    monkeypatch.setattr(pdl, "MAX_ROWS", 16)
    monkeypatch.setattr(pdl, "EXIT_MAX_ROWS", 256)
    monkeypatch.setattr(pdl, "EARLY_ALSO", (33, 64))
    assert [pdl.mode_for(r) for r in (1, 16, 17, 32, 33, 64, 65, 256, 257)] == \
        [pdl.EARLY] * 2 + [pdl.AT_EXIT] * 2 + [pdl.EARLY] * 2 + [pdl.AT_EXIT] * 2 + [pdl.OFF]
    monkeypatch.setattr(pdl, "EARLY_ALSO", None)
    assert pdl.mode_for(64) == pdl.AT_EXIT
    import triton

    newer = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 3)
    assert pdl._triton_supports_pdl() == newer   # Triton < 3.3 lacks griddepcontrol: PDL stays off
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        pdl._enabled.cache_clear()
        monkeypatch.setenv("FTMOE_PDL", "0")
        assert pdl.launch_kwargs(x) == {}
        pdl._enabled.cache_clear()
        monkeypatch.setenv("FTMOE_PDL", "1")
        want = torch.cuda.get_device_capability()[0] >= 9
        assert bool(pdl.launch_kwargs(x)) == want
        with pdl.allowed(False):
            assert pdl.launch_kwargs(x) == {}
            with pdl.allowed(True):
                assert bool(pdl.launch_kwargs(x)) == want
            with pdl.allowed(pdl.AT_EXIT):
                assert pdl.launch_kwargs(x).get("USE_PDL") == (pdl.AT_EXIT if want else None)
                with pdl.feeding():                  # feeding only turns EARLY into FEED
                    assert pdl.launch_kwargs(x).get("USE_PDL") == (pdl.AT_EXIT if want else None)
            with pdl.allowed(True), pdl.feeding():
                assert pdl.launch_kwargs(x).get("USE_PDL") == (pdl.FEED if want else None)
                with pdl.feeding(False):
                    assert pdl.launch_kwargs(x).get("USE_PDL") == (pdl.EARLY if want else None)
        assert bool(pdl.launch_kwargs(x)) == want
        pdl._enabled.cache_clear()
    else:
        with pdl.allowed(True):
            assert pdl.launch_kwargs(torch.zeros(1)) == {}


def test_pdl_feed_switch(monkeypatch):
    from ftmoe.kernels import pdl

    monkeypatch.delenv("FTMOE_PDL_FEED", raising=False)
    assert pdl.feed_on()                                 # on by default
    for v, want in (("0", False), ("1", True)):
        monkeypatch.setenv("FTMOE_PDL_FEED", v)
        assert pdl.feed_on() == want
    monkeypatch.setenv("FTMOE_PDL_FEED", "on")
    with pytest.raises(ValueError, match="FTMOE_PDL_FEED: expected 0 or 1, found 'on'"):
        pdl.feed_on()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("B", [1, 2, 8])
@pytest.mark.parametrize("gemv", ["0", "1", "feed"])  # 1: weights loaded before the wait (kernels/gemv.py)
def test_pdl_graph_replay_equals_plain_launches(models, monkeypatch, B, gemv):
    """Decode steps replayed from graphs whose kernels overlap their launch with the previous
    kernel give bit-identical logits and caches to plain stream order, over several steps (a
    missing wait would read stale activations)."""
    from ftmoe.cuda_graphs import DecodeGraphs
    from ftmoe.kernels import pdl

    ref, fast = models
    g = torch.Generator().manual_seed(100 + B)
    lens = torch.randint(1, 20, (B,), generator=g).tolist()
    prompt = torch.randint(0, ref.config.vocab_size, (B, max(lens)), generator=g).to(DEV)
    toks = [torch.randint(0, ref.config.vocab_size, (B,), generator=g).to(DEV) for _ in range(4)]
    results = []
    monkeypatch.setenv("FTMOE_GEMV", "0" if gemv == "0" else "1")
    monkeypatch.setenv("FTMOE_GEMV_HEAD", "0" if gemv == "0" else "1")
    monkeypatch.setenv("FTMOE_PDL_FEED", "1" if gemv == "feed" else "0")       # the bounded cascade
    for flag in ("0", "1", "exit"):   # off, early trigger, trigger at exit
        monkeypatch.setenv("FTMOE_PDL", "0" if flag == "0" else "1")
        if flag == "exit":
            monkeypatch.setattr(pdl, "MAX_ROWS", 0)
            monkeypatch.setattr(pdl, "EARLY_ALSO", None)
            monkeypatch.setattr(pdl, "EXIT_MAX_ROWS", 4096)
        pdl._enabled.cache_clear()
        cache = KVCache.for_model(ref.config, 512, block_size=8, dtype=torch.float32, device=DEV)
        seqs = list(range(B))
        for s in seqs:
            cache.add(s)
        fast(prompt, cache.prepare(seqs, lens), cache, last_only=True)
        graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=8, buckets=(1, 2, 16))
        outs = []
        for tok in toks:
            meta = cache.prepare(seqs, [1] * B)
            outs.append(graphs.step(tok, meta.positions[:, 0], meta.block_tables.int(), meta.context_lens.int(),
                                    meta.slot_mapping[:, 0].int()).clone())
        results.append((torch.stack(outs), cache.k.clone(), cache.v.clone()))
    pdl._enabled.cache_clear()
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def _decode_rows(pos):
    """Block tables [B, 2] (row b owns blocks 2b and 2b + 1, block size 4) and the KV slots of
    decode rows at positions pos."""
    B = pos.shape[0]
    tables = torch.arange(2 * B, dtype=torch.int32, device=DEV).view(B, 2)
    return tables, (tables[:, 0] * 4 + pos.int()).int()


def _random_cache(config, dtype, seed):
    """A 64-token cache (16 blocks of 4: `_decode_rows` of up to 8 rows) whose K / V are seeded
    random values, not zeros."""
    cache = KVCache.for_model(config, 64, block_size=4, dtype=dtype, device=DEV)
    cache.k.normal_(generator=torch.Generator(DEV).manual_seed(seed))
    cache.v.normal_(generator=torch.Generator(DEV).manual_seed(seed + 1))
    return cache


def test_gemv_tma_decode_equals_register_tiles(tiny_model_dir, monkeypatch):
    """A 16-bit model's decode step with the GEMVs' weight tiles loaded by TMA (FTMOE_GEMV_TMA=1,
    the swapped wgmma form) equals the register-tile form, and every GEMV of the step takes it;
    with FTMOE_GEMV_EXPERTS=1 the expert GEMMs run on the routed form (a padding row included)."""
    from ftmoe.kernels import gemv as gemv_mod

    dt = torch.float16 if DEV == "cpu" else torch.bfloat16         # the interpreter's bf16 is broken
    ref = load_model(tiny_model_dir, dtype="float16" if dt == torch.float16 else "bfloat16", device=DEV)
    fast = FastGPTMoE(ref)
    descs = []
    real = gemv_mod.TensorDescriptor
    monkeypatch.setattr(gemv_mod, "TensorDescriptor", lambda *a: descs.append(a[3]) or real(*a))
    monkeypatch.setenv("FTMOE_GEMV", "1")
    ids, pos = torch.tensor([3, 9, 250, 0], device=DEV), torch.tensor([0, 2, 5, 0], device=DEV)
    tables, slots = _decode_rows(pos)
    slots[3] = -1                                                  # a padding row: no expert, no KV
    out = {}
    for flag in ("0", "1", "experts", "w2tiles"):   # experts: the MoE layers' GEMMs on gemv_experts too
        monkeypatch.setenv("FTMOE_GEMV_TMA", "0" if flag == "0" else "1")
        monkeypatch.setenv("FTMOE_GEMV_EXPERTS", "1" if flag == "experts" else "0")
        if flag == "w2tiles":                 # the dense W2's splits each load two TMA tiles before the wait
            monkeypatch.setenv("FTMOE_GEMV_W2_TILES", f"16x{ref.config.inter_size // 4}x2")
        cache = _random_cache(ref.config, dt, seed=1)
        descs.clear()
        out[flag] = (fast.decode_step(ids, pos, tables, pos.int(), slots, cache)[:3].float(), len(descs))
    dense = sum(not L["moe"] for L in fast.layers)
    n = ref.config.num_layer
    assert out["0"][1] == 0 and out["1"][1] == 2 * n + 2 * dense   # QKV, Wo, dense W1 + W2
    assert out["experts"][1] == 2 * n + 2 * dense + 2 * (n - dense) > out["1"][1]   # + expert W1 + W2
    tol = 1e-3 if dt == torch.float16 else 1.6e-2                  # other MMA instructions, another sum order
    assert rel(out["1"][0], out["0"][0]) < tol
    assert rel(out["experts"][0], out["0"][0]) < tol
    assert out["w2tiles"][1] == out["1"][1] and rel(out["w2tiles"][0], out["0"][0]) < tol
    assert [ref.config.inter_size // 4, 16] in [list(b) for b in descs]       # [BLOCK_K, BLOCK_N] boxes


@pytest.mark.parametrize("gemv_head", ["0", "1"])
def test_model_dtype_logits_are_the_fp32_logits_unconverted(tiny_model_dir, monkeypatch, gemv_head):
    """decode_step(fp32_logits=False), the greedy chunks' step, returns the 16-bit model's logits
    in its own dtype, and they are exactly the fp32 logits (which are those values converted),
    from the head GEMM and from the head GEMV."""
    dt = torch.float16 if DEV == "cpu" else torch.bfloat16         # the interpreter's bf16 is broken
    ref = load_model(tiny_model_dir, dtype="float16" if dt == torch.float16 else "bfloat16", device=DEV)
    fast = FastGPTMoE(ref)
    monkeypatch.setenv("FTMOE_GEMV_HEAD", gemv_head)
    ids, pos = torch.tensor([3, 9, 250], device=DEV), torch.tensor([0, 2, 5], device=DEV)
    tables, slots = _decode_rows(pos)
    out = {}
    for fp32 in (True, False):
        cache = _random_cache(ref.config, dt, seed=3)
        out[fp32] = fast.decode_step(ids, pos, tables, pos.int(), slots, cache, fp32_logits=fp32)
    assert out[True].dtype == torch.float32 and out[False].dtype == dt
    assert out[True].shape == out[False].shape == (3, ref.config.vocab_size)
    assert out[True].abs().max() > 0 and torch.equal(out[False].float(), out[True])


def test_persistent_expert_gemms_keep_the_model(models, monkeypatch):
    """FTMOE_MOE_PERSISTENT=1 (aligned expert GEMMs on resident programs): a prefill of 37 slots,
    aligned after the one-kernel top-k + align, still follows the reference, through the
    persistent kernel (two launches per MoE layer; the decode steps of 2 rows are per-slot). The
    kernel against the plain one, bit for bit: `test_fused_moe_persistent_equals_plain`."""
    from ftmoe.kernels import fused_moe as fused_moe_mod

    ref, fast = models
    asked = []
    real = fused_moe_mod.resident_programs
    monkeypatch.setattr(fused_moe_mod, "resident_programs", lambda *a: asked.append(1) or real(*a))
    monkeypatch.setenv("FTMOE_MOE_PERSISTENT", "1")
    _prefill_then_decode(ref, fast, [20, 17], 4, steps=1, seed=11)
    assert len(asked) == 2 * sum(L["moe"] for L in fast.layers) > 0


def test_ab_switches_keep_the_step(models, monkeypatch):
    """FTMOE_GEMV_WO_SPLITS (Wo's K splits: the default 4, 0 for gemv.plan's, 3) and FTMOE_LN_WARPS
    (add_layernorm's warps) change launches, not results; a malformed value names the switch."""
    from ftmoe import fast_model
    from ftmoe.kernels import norm

    ref, fast = models
    monkeypatch.setenv("FTMOE_GEMV", "1")
    ids, pos = torch.tensor([5, 77], device=DEV), torch.tensor([1, 3], device=DEV)
    tables, slots = _decode_rows(pos)
    out = []
    for env in ({}, {"FTMOE_GEMV_WO_SPLITS": "0"},
                {"FTMOE_GEMV_WO_SPLITS": "3", "FTMOE_LN_WARPS": "8", "FTMOE_GEMV_W2_TILES": "16x32x2"}):
        for k in ("FTMOE_GEMV_WO_SPLITS", "FTMOE_LN_WARPS", "FTMOE_GEMV_W2_TILES"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cache = _random_cache(ref.config, torch.float32, seed=3)
        out.append(fast.decode_step(ids, pos, tables, pos.int(), slots, cache))
    assert rel(out[1], out[0]) < 1e-5 and rel(out[2], out[0]) < 1e-5
    monkeypatch.setenv("FTMOE_GEMV_WO_SPLITS", "x")
    with pytest.raises(ValueError, match="FTMOE_GEMV_WO_SPLITS: expected a split count from 0 to 64, found 'x'"):
        fast_model._wo_splits(64)
    monkeypatch.setenv("FTMOE_LN_WARPS", "3")
    with pytest.raises(ValueError, match="FTMOE_LN_WARPS: expected a power of two from 1 to 32, found '3'"):
        norm.ln_warps(1024)
    w2 = torch.empty(4096, 1024, dtype=torch.float16)
    monkeypatch.setenv("FTMOE_GEMV_W2_TILES", "64x256")
    with pytest.raises(ValueError, match="FTMOE_GEMV_W2_TILES: expected BLOCK_NxBLOCK_KxSPLITS"):
        fast_model._w2_tiles(w2)
    monkeypatch.setenv("FTMOE_GEMV_W2_TILES", "0")
    assert fast_model._w2_tiles(w2) is None                      # gemv.plan's tiles
    monkeypatch.delenv("FTMOE_GEMV_W2_TILES")
    assert fast_model._w2_tiles(w2) == {"BLOCK_N": 64, "BLOCK_K": 256, "S": 8}   # two TMA tiles a split
    assert fast_model._w2_tiles(w2.float()) is None               # fp32: the register form, plan's tiles
    assert fast_model._w2_tiles(w2[:1000]) is None                # K not whole pairs of 256-row tiles


def test_gemv_decode_equals_tuned_dense_path(models, monkeypatch):
    """Decode steps of few rows on `kernels.gemv` (QKV partials summed by attention, Wo and the
    dense MLP's partials, the head's logits) equal the cuBLAS / fused-MoE path and the reference;
    FTMOE_GEMV=0 and FTMOE_GEMV_HEAD=0 turn it off, and every dense GEMM of the step goes through it."""
    from ftmoe import fast_model

    ref, fast = models
    calls = []
    real = fast_model.gemv
    monkeypatch.setattr(fast_model, "gemv", lambda a, w, *args, **kw: calls.append(tuple(w.shape)) or real(a, w, *args, **kw))
    ids = torch.tensor([3, 9, 250], device=DEV)
    B = ids.shape[0]
    pos = torch.tensor([0, 2, 5], device=DEV)
    tables, slots = _decode_rows(pos)
    ctx = pos.int()
    out = {}
    for flag in ("0", "1", "feed"):     # feed: the bounded cascade (launch order only: the same results)
        monkeypatch.setenv("FTMOE_GEMV", "0" if flag == "0" else "1")
        monkeypatch.setenv("FTMOE_GEMV_HEAD", "0" if flag == "0" else "1")
        monkeypatch.setenv("FTMOE_PDL_FEED", "1" if flag == "feed" else "0")
        cache = _random_cache(ref.config, torch.float32, seed=1)
        calls.clear()
        out[flag] = (fast.decode_step(ids, pos, tables, ctx, slots, cache), cache.k.clone(), cache.v.clone(),
                     list(calls))
    cfg = ref.config
    H, F, n = cfg.hidden_size, cfg.inter_size, cfg.num_layer
    assert out["0"][3] == []
    dense = sum(not L["moe"] for L in fast.layers)
    assert len(out["1"][3]) == 2 * n + 2 * dense + 1                  # QKV, Wo per layer, dense W1 + W2, head
    assert out["1"][3].count((H, 3 * H)) == n and out["1"][3][-1] == (H, cfg.vocab_size)
    assert dense > 0 and out["1"][3].count((F, H)) == dense
    assert rel(out["1"][0], out["0"][0]) < 1e-5
    assert rel(out["1"][1], out["0"][1]) < 1e-5 and rel(out["1"][2], out["0"][2]) < 1e-5
    assert out["1"][0].dtype == torch.float32 and out["1"][0].shape == (B, cfg.vocab_size)
    assert out["feed"][3] == out["1"][3]
    for i in range(3):
        assert torch.equal(out["feed"][i], out["1"][i])


def test_short_context_graphs(models, monkeypatch):
    """Decode graphs of buckets whose attention runs in one pass for short contexts
    (`attention.one_pass_differs`) keep a step graph and a greedy-chunk graph per context limit of
    `attention.ONE_PASS_TILES`, on the same inputs: a step from the host replays the smallest limit
    that every row is within (a chunk: up to its last step), the split graph past them; logits
    equal the reference's either way, and a chunk's tokens equal single steps'."""
    from ftmoe.cuda_graphs import DecodeGraphs
    from ftmoe.kernels import attention

    monkeypatch.delenv("FTMOE_ATTN_SPLIT", raising=False)   # the default rule (the CPU fixture forces 2 splits)
    monkeypatch.setattr(attention, "ONE_PASS_TILES", ((5, 8), (6, 16)))
    kernels = []                                            # per step on the CPU: split (S) or one pass (its tile)
    real_split, real_one = attention._split_partials, attention._decode_attention_kernel
    monkeypatch.setattr(attention, "_split_partials", lambda *a, **k: kernels.append("S") or real_split(*a, **k))

    class OnePass:
        def __getitem__(self, grid):
            def launch(*a, **k):
                kernels.append(k["BLOCK_N"])
                return real_one[grid](*a, **k)
            return launch
    monkeypatch.setattr(attention, "_decode_attention_kernel", OnePass())
    ref, fast = models
    lens, steps = [3, 5], 4                     # the longest row caches 5, 6, 7, 8 tokens before each step
    g = torch.Generator().manual_seed(17)
    seqs = [torch.randint(0, ref.config.vocab_size, (n + steps,), generator=g) for n in lens]
    full = [ref(s[None].to(DEV))[0] for s in seqs]
    prompt = torch.zeros(2, max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        prompt[i, :n] = seqs[i][:n]
    rows = [0, 1]

    def setup():
        cache = KVCache.for_model(ref.config, 256, block_size=4, dtype=torch.float32, device=DEV)
        cache.meta_device = "cpu"
        for q in rows:
            cache.add(q)
        first = fast(prompt.to(DEV), cache.prepare(rows, lens).to(DEV), cache, last_only=True).argmax(-1).cpu()
        return cache, DecodeGraphs(fast, cache, max_blocks_per_seq=8, buckets=(2,)), first

    cache, graphs, _ = setup()
    graphs.capture(2)
    assert graphs.has_short(2) and set(graphs.short) == {(2, 5), (2, 6)}
    replayed = []
    real_replay = graphs._replay
    monkeypatch.setattr(graphs, "_replay", lambda b, B, short=0: replayed.append(short) or real_replay(b, B, short))
    for step in range(steps):
        meta = cache.prepare(rows, [1, 1])
        kernels.clear()
        tok = torch.stack([s[n + step] for s, n in zip(seqs, lens)])[:, None]
        out = graphs.step_host(tok, meta)
        for i, n in enumerate(lens):
            assert rel(out[i], full[i][n + step]) < 1e-4, (i, step)
        if DEV == "cpu":                        # eager: this step's attention kernels
            assert set(kernels) == [{8}, {16}, {"S"}, {"S"}][step], (step, kernels)
    assert replayed == [5, 6, 0, 0]
    got = {}
    for mode in ("chunk", "steps"):
        cache, graphs, first = setup()
        if mode == "chunk":    # 2 steps (the last at 6 cached tokens: limit 6), then 2 more (7, 8: split)
            c1 = graphs.greedy_chunk_start(first, cache.prepare_chunk(rows, 2), 2)
            c2 = graphs.greedy_chunk_start(None, cache.prepare_chunk(rows, 2), 2, after=c1)
            assert set(graphs.greedy) == {(2, False, 6), (2, False, 0)}
            got[mode] = torch.cat([graphs.greedy_chunk_result(c1)[0], graphs.greedy_chunk_result(c2)[0]])
        else:
            tok, toks = first, []
            for _ in range(steps):
                tok = graphs.step_host(tok, cache.prepare(rows, [1, 1])).argmax(-1).cpu()
                toks.append(tok)
            got[mode] = torch.stack(toks)
    assert torch.equal(got["chunk"], got["steps"])


def test_greedy_capture_keeps_the_static_inputs(models):
    """Capturing a bucket's greedy-chunk graph (its warm-up steps run on padding and feed their
    tokens back) leaves the bucket's static inputs as they were: a chunk continued on the device
    into a graph captured only then reads the ids the last chunk fed back."""
    from ftmoe.cuda_graphs import DecodeGraphs

    ref, fast = models
    cache = KVCache.for_model(ref.config, 64, block_size=4, dtype=torch.float32, device=DEV)
    graphs = DecodeGraphs(fast, cache, max_blocks_per_seq=4, buckets=(2,))
    graphs.capture(2)
    packed = graphs.graphs[2][1]["packed"]
    with torch.inference_mode():                 # (the graphs' buffers are inference tensors)
        packed.copy_(torch.randint(0, 16, packed.shape, generator=torch.Generator().manual_seed(3)).to(packed))
        before = packed.clone()
    graphs.capture_greedy(2, False)
    assert (2, False, 0) in graphs.greedy and torch.equal(packed, before)
