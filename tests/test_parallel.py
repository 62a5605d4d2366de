"""Tensor, expert and pipeline parallelism on the CPU (gloo): every layout gives the logits
(fp32, relative error < 1e-5) and the greedy tokens of one process, for prompts of different
lengths, prefill and 16 decode steps; bad layouts and dead ranks are clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from ftmoe.cli import main
from ftmoe.convert import convert
from ftmoe.errors import FtmoeError
from ftmoe.kv_cache import KVCache
from ftmoe.llm import LLM
from ftmoe.loader import load_model
from ftmoe.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2, 99], [7, 8, 200, 31, 4, 4, 9, 100, 12, 300, 77], [42, 1]]
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(tiny_ckpt_fp32, tmp_path_factory) -> dict[int, str]:
    out = str(tmp_path_factory.mktemp("par_models"))
    return {tp: convert(tiny_ckpt_fp32, out, tp=tp, dtype="fp32", progress=False) for tp in (1, 2)}


@pytest.fixture(scope="module")
def single(folders):
    """One process: the reference logits and greedy tokens."""
    model = load_model(folders[1])
    with LLM(folders[1]) as llm:
        tokens = [o.output_ids for o in llm.generate(PROMPTS, GREEDY)]
    return model, tokens


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _compare_steps(runner, cache, ref, seed: int, steps: int, tol: float, last_only_prefill: bool) -> None:
    """Prefill PROMPTS then `steps` random decode tokens through `runner` and a one-process reference
    with its own cache; every call's logits must agree within `tol`. Frees the sequences."""
    g = torch.Generator().manual_seed(seed)
    lens = [len(p) for p in PROMPTS]
    seqs = [1000 + seed * 10 + i for i in range(len(PROMPTS))]
    ref_cache = KVCache.for_model(ref.config, 512, block_size=cache.block_size)
    for s in seqs:
        cache.add(s)
        ref_cache.add(s)
    batch = torch.zeros(len(PROMPTS), max(lens), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        batch[i, :len(p)] = torch.tensor(p)
    got = runner(batch, cache.prepare(seqs, lens), cache, last_only=last_only_prefill)   # prefill
    want = ref(batch, ref_cache.prepare(seqs, lens), ref_cache, last_only=last_only_prefill)
    for i, n in enumerate(lens):
        assert rel(got[i] if last_only_prefill else got[i, :n], want[i] if last_only_prefill else want[i, :n]) < tol
    for step in range(steps):                                                          # decode
        tok = torch.randint(0, ref.config.vocab_size, (len(seqs), 1), generator=g)
        got = runner(tok, cache.prepare(seqs, [1] * len(seqs)), cache, last_only=True)
        want = ref(tok, ref_cache.prepare(seqs, [1] * len(seqs)), ref_cache, last_only=True)
        assert rel(got, want) < tol, step
    for s in seqs:
        cache.free(s)


@pytest.mark.parametrize("tp,ep,pp", [(2, 1, 1), (4, 1, 1), (1, 1, 2), (1, 2, 1), (1, 4, 1), (2, 1, 2), (2, 2, 1)])
def test_parallel_equals_one_process(folders, single, tp, ep, pp):
    ref, want_tokens = single
    folder = folders[2] if tp == 2 else folders[1]        # TP=2 reads its own .r files; TP=4 slices a 1-gpu folder
    with LLM(folder, tp=tp, ep=ep, pp=pp, timeout_s=60) as llm:
        _compare_steps(llm.generator.model, llm.generator.cache, ref, tp * 100 + ep * 10 + pp, 16, 1e-5, False)
        tokens = [o.output_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert tokens == want_tokens
        beam = llm.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4, beam_width=3))   # mirrored block copies
        assert len(beam[0].output_ids) == 3


def test_micro_batches_override(folders, single):
    _, want_tokens = single
    with LLM(folders[1], pp=2, micro_batches=3, timeout_s=60) as llm:
        assert llm.generator.model._chunks(3) == [(0, 1), (1, 2), (2, 3)]
        assert llm.generator.model._chunks(8) == [(0, 3), (3, 6), (6, 8)]
        assert [o.output_ids for o in llm.generate(PROMPTS, GREEDY)] == want_tokens


def test_bad_layouts_fail_before_starting(folders, capsys):
    with pytest.raises(FtmoeError, match="--tp 3 does not divide head_num=8"):
        LLM(folders[1], tp=3)
    with pytest.raises(FtmoeError, match="--ep 3 does not divide expert_num=8"):
        LLM(folders[1], ep=3)
    with pytest.raises(FtmoeError, match="--pp 5 is more than num_layer=4"):
        LLM(folders[1], pp=5)
    assert main(["generate", "--model", folders[1], "--prompt-ids", "1,2", "--tp", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not divide head_num" in err


def test_dead_rank_is_an_error_not_a_hang(folders):
    llm = LLM(folders[1], tp=2, timeout_s=10)
    try:
        llm._procs[0].kill()
        llm._procs[0].join(10)
        t0 = time.time()
        with pytest.raises(FtmoeError, match="worker rank died or timed out"):
            llm.generate(PROMPTS, GREEDY)
        assert time.time() - t0 < 60
    finally:
        llm.close()


def test_torchrun_launch(folders, single):
    """The same CLI under torchrun: one process per rank, rank 0 prints."""
    _, want_tokens = single
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ftmoe.cli", "generate", "--model", folders[2], "--prompt-ids", ",".join(map(str, PROMPTS[1])),
           "--max-new-tokens", "16", "--json", "--tp", "2", "--timeout", "60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1                                   # only rank 0 prints
    assert lines[0]["output_ids"] == want_tokens[1]          # the tiny model has no end id in its vocab


def test_engine_serves_a_parallel_model(folders, single):
    """Continuous batching over TP=2 x EP=2 workers (rank 0 schedules, workers follow) with a small
    cache (preemptions): the same tokens as one process."""
    from ftmoe.engine import LLMEngine

    _, want_tokens = single
    with LLM(folders[2], tp=2, ep=2, timeout_s=60) as llm:
        eng = LLMEngine(llm.generator.model, kv_cache_tokens=48, block_size=4, max_num_batched_tokens=128)
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"r{i}", p, GREEDY)
        out: dict[str, list[int]] = {f"r{i}": list(p) for i, p in enumerate(PROMPTS)}
        for _ in range(500):
            if not eng.has_unfinished():
                break
            for ev in eng.step():
                if ev.token_id is not None:
                    out[ev.request_id].append(ev.token_id)
        assert [out[f"r{i}"] for i in range(len(PROMPTS))] == want_tokens
        stats = eng.stats()
        assert stats["kv_blocks_used"] == 0 and stats["preemptions"] > 0, stats


@pytest.mark.parametrize("tp,ep,pp", [(2, 1, 1), (1, 1, 2), (1, 2, 1), (2, 2, 1)])
@pytest.mark.usefixtures("fewer_attention_splits")      # the spawned ranks inherit it
def test_fast_path_sharded_equals_one_process(folders, single, tp, ep, pp):
    """The Triton path on a sharded model (TP all-reduces inside it; PP hands residuals on; EP
    all-gathers tokens and reduce-scatters expert outputs, rows padded to equal counts):
    prefill and decode logits match one reference process; greedy tokens are the same.
    (On the CPU the kernels run in Triton's interpreter.)"""
    pytest.importorskip("triton")
    from ftmoe import kernels

    if not kernels.available():
        pytest.skip("Triton cannot run here")
    ref, want_tokens = single
    with LLM(folders[1], tp=tp, ep=ep, pp=pp, fast=True, timeout_s=120) as llm:
        assert llm.generator.model.fast is not None
        _compare_steps(llm.generator.model, llm.generator.cache, ref, 7, 4, 1e-4, True)
        short = SamplingParams(max_new_tokens=6, ignore_eos=True)
        assert [o.output_ids for o in llm.generate(PROMPTS, short)] == [t[:len(p) + 6] for t, p in
                                                                         zip(want_tokens, PROMPTS)]
        if ep > 1:   # the last decode step's slots, counted on the ranks that served them (padding excluded)
            load = llm.generator.model.moe_load()
            assert len(load) == len(ref.config.moe_layers)
            assert all(len(r) == ep and sum(r) == len(PROMPTS) * ref.config.moe_k for r in load), load


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
@pytest.mark.usefixtures("fewer_attention_splits")
def test_greedy_chunks_on_a_sharded_model(folders, single, monkeypatch, tp, ep):
    """Greedy chunks over the ranks (FTMOE_CUDA_GRAPHS=1: the graphs' static-buffer procedure on
    the CPU): every rank replays its greedy graph, TP ranks merging their vocabulary slices'
    argmax, EP ranks their rows (3 prompts over 2 EP ranks: one rank pads a row), and rank 0
    gathers the tokens once a chunk. The generator takes chunks and gives the one-process tokens;
    under TP the log probs equal one process's, and the engine queues chunks behind the last
    (continued on the devices) with the same tokens. A continued chunk must follow the last.
    The graphs are captured first on every rank (`capture_graphs`, as `ftmoe serve` does)."""
    pytest.importorskip("triton")
    from ftmoe import kernels
    from ftmoe.engine import LLMEngine

    if not kernels.available():
        pytest.skip("Triton cannot run here")
    monkeypatch.setenv("FTMOE_CUDA_GRAPHS", "1")
    _, want_tokens = single
    n_new = 5
    want = [t[:len(q) + n_new] for t, q in zip(want_tokens, PROMPTS)]
    with LLM(folders[tp], tp=tp, ep=ep, fast=True, timeout_s=120) as llm:
        runner, cache = llm.generator.model, llm.generator.cache
        assert runner.fast.graphs is not None and runner.can_greedy_chunk(cache, 3)
        # as `ftmoe serve` does first: every rank captures the buckets of up to 3 rows (2 per EP rank)
        assert runner.capture_graphs(3, greedy=True) == [1, 2]
        assert {k[:2] for k in runner.fast.graphs.greedy} == {(1, False), (2, False)}
        assert runner.fast.prefill_graphs is not None and runner.fast.prefill_graphs.graphs
        calls, real = [], runner.greedy_chunk_start

        def start(ids, meta, cache, steps, logprobs=False, after=None):
            calls.append((steps, logprobs, after is not None))
            return real(ids, meta, cache, steps, logprobs, after)

        runner.greedy_chunk_start = start
        llm.generator.decode_chunk = 3
        p = SamplingParams(max_new_tokens=n_new, ignore_eos=True, return_log_probs=tp > 1)
        chunked = llm.generate(PROMPTS, p)
        assert [o.output_ids for o in chunked] == want
        assert calls and all(2 <= st <= 3 and lp == (tp > 1) for st, lp, _ in calls), calls
        cache.add(77)
        cache.prepare([77], [3])
        first = real(torch.tensor([1]), cache.prepare_chunk([77], 2), cache, 2)
        assert runner.greedy_chunk_result(first)[0].shape == (2, 1)
        with pytest.raises(ValueError, match="must follow the last chunk queued"):
            real(None, cache.prepare_chunk([77], 2), cache, 2, after=types.SimpleNamespace(rows=1, logprobs=False))
        cache.free(77)
        if tp == 1:
            return
        with LLM(folders[1]) as one:                     # one process, the reference path
            for a, b in zip(chunked, one.generate(PROMPTS, p)):
                assert len(a.output_log_probs) == n_new
                assert a.output_log_probs == pytest.approx(b.output_log_probs, abs=1e-4)
        n_calls = len(calls)
        eng = LLMEngine(runner, kv_cache_tokens=128, block_size=4, decode_chunk=2)
        for i, q in enumerate(PROMPTS):
            eng.add_request(f"r{i}", q, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
        out = {f"r{i}": list(q) for i, q in enumerate(PROMPTS)}
        while eng.has_unfinished():
            for ev in eng.step():
                if ev.token_id is not None:
                    out[ev.request_id].append(ev.token_id)
        assert [out[f"r{i}"] for i in range(len(PROMPTS))] == want
        assert any(cont for _, _, cont in calls[n_calls:]), calls


def test_distributed_prefill_graph_buckets(folders, single, monkeypatch):
    """Per-rank prefill graphs (the default): every rank prefills through the same (batch, length) bucket
    (padding rows and columns, the key-padding variant on every rank; captured on GPUs, the same
    static-buffer procedure here) and the logits still match one process (TP=2 x EP=2)."""
    pytest.importorskip("triton")
    from ftmoe import kernels

    if not kernels.available():
        pytest.skip("Triton cannot run here")
    ref, _ = single
    monkeypatch.setenv("FTMOE_DIST_PREFILL_GRAPHS", "1")
    with LLM(folders[2], tp=2, ep=2, fast=True, timeout_s=120) as llm:
        runner = llm.generator.model
        assert runner.fast.prefill_graphs is not None
        _compare_steps(runner, llm.generator.cache, ref, 9, 2, 1e-4, True)
        assert list(runner.fast.prefill_graphs.graphs) == [(2, 16, False)]   # 2 rows per EP rank, T 11 -> 16


def test_parallel_bench_smoke(tmp_path):
    """`ftmoe bench --tp 2 --ep 2` machinery on the CPU: rows per batch and the EP load report."""
    from ftmoe.bench_parallel import run_parallel_bench
    from ftmoe.distributed import ParallelConfig

    out = tmp_path / "b.json"
    r = run_parallel_bench(ParallelConfig(tp=2, ep=2), "tiny", dtype="float32", device="cpu", batches=(1, 8),
                           ctx=16, iters=2, json_path=str(out), log=lambda *_: None, timeout_s=60, prefill=(3, 8))
    assert [(row["phase"], row["batch"]) for row in r["rows"]] == [("prefill", 3), ("decode", 1), ("decode", 8)]
    assert r["rows"][0]["in_len"] == 8 and r["rows"][0]["ms"] > 0
    for row in r["rows"][1:]:
        assert row["ms"] > 0 and row["ep"] == 2 and 0 < row["host_ms"] <= row["ms"]
        load = row["ep_tokens_per_rank"]
        assert len(load) == 2 and all(len(x) == 2 for x in load)            # 2 MoE layers x 2 EP ranks
        assert all(sum(x) == row["batch"] for x in load)                      # every token served once (top-1)
    assert json.loads(out.read_text())["parallel"] == {"tp": 2, "ep": 2, "pp": 1}


@pytest.mark.usefixtures("fewer_attention_splits")
def test_parallel_bench_times_greedy_chunks(monkeypatch):
    """`ftmoe bench --tp 2` with decode graphs (FTMOE_CUDA_GRAPHS=1 on the CPU: the static-buffer
    procedure) adds a greedy-chunk row per batch beside the step row, and leaves the cache as it
    found it (the bench's contexts stay at ctx)."""
    pytest.importorskip("triton")
    from ftmoe import kernels
    from ftmoe.bench_parallel import run_parallel_bench
    from ftmoe.distributed import ParallelConfig

    if not kernels.available():
        pytest.skip("Triton cannot run here")
    monkeypatch.setenv("FTMOE_CUDA_GRAPHS", "1")
    r = run_parallel_bench(ParallelConfig(tp=2), "tiny", dtype="float32", device="cpu", batches=(3,), ctx=8,
                           iters=2, log=lambda *_: None, timeout_s=120, greedy_chunk=2, fast=True)
    assert [(row["phase"], row["batch"], row.get("variant")) for row in r["rows"]] == \
        [("decode", 3, None), ("decode", 3, "greedy-chunk-2")]
    step, chunk = r["rows"]
    # host_ms: until the chunk was queued (on a GPU well under ms; on the CPU everything runs then)
    assert chunk["ms"] > 0 and 0 < chunk["host_ms"] < 1.5 * chunk["ms"] and chunk["cuda_graphs"]
    assert chunk["tokens_per_s"] == pytest.approx(3 / chunk["ms"] * 1e3)


@pytest.mark.usefixtures("fewer_attention_splits")
def test_parallel_bench_counts_the_experts_a_one_rank_step_reads():
    """The distributed bench's one-GPU floor on one rank counts the experts the step routes to
    (an eager fast-path step's trace, as `ftmoe bench` does), leaving the contexts at ctx; on
    several ranks it cannot (None: the bound of min(B*k, E) experts is used and labelled)."""
    pytest.importorskip("triton")
    from ftmoe import kernels, launch
    from ftmoe.bench_parallel import _touched
    from ftmoe.distributed import ParallelConfig

    if not kernels.available():
        pytest.skip("Triton cannot run here")
    runner, procs = launch.start(ParallelConfig(), None, torch.float32, "cpu", random_preset="tiny", fast=True)
    try:
        cfg = runner.config
        cache = runner.make_cache(256, 16)
        seqs = [0, 1, 2]
        for q in seqs:
            cache.add(q)
            cache.prepare([q], [5])
        tok = torch.randint(0, cfg.vocab_size, (3, 1), generator=torch.Generator().manual_seed(3))
        got = _touched(runner, cache, seqs, tok, 5)
        assert len(got) == len(cfg.moe_layers) and all(1 <= n <= min(3 * cfg.moe_k, cfg.expert_num) for n in got)
        assert [cache.length(q) for q in seqs] == [5, 5, 5]
    finally:
        launch.stop(runner, procs)


def test_bench_greedy_chunk_out_of_range_is_one_line(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--greedy-chunk", "33"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--greedy-chunk must be 0..32 steps, found 33" in err and len(err.splitlines()) == 1


def test_bench_distributed_one_rank_cli(tmp_path, capsys):
    """`ftmoe bench --distributed` at tp=ep=pp=1: the scaling table's one-GPU row, same harness."""
    out = tmp_path / "one.json"
    assert main(["bench", "--distributed", "--preset", "tiny", "--dtype", "fp32", "--device", "cpu", "--batches", "2",
                 "--ctx", "8", "--prefill", "2x8", "--iters", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["parallel"] == {"tp": 1, "ep": 1, "pp": 1}
    assert [(row["phase"], row["batch"]) for row in r["rows"]] == [("prefill", 2), ("decode", 2)]
    assert "decode tp=1 ep=1 pp=1 B=2" in capsys.readouterr().out


def test_forward_steps_are_not_pickled(folders, single, monkeypatch):
    """A forward step is one tensor broadcast (header + packed metadata); only set-up commands
    go through broadcast_object_list. Counted on rank 0 (this process) over a whole generate."""
    from ftmoe import parallel_runner

    ref, want_tokens = single
    with LLM(folders[2], tp=2, timeout_s=60) as llm:
        calls = []
        real = parallel_runner.dist.broadcast_object_list
        monkeypatch.setattr(parallel_runner.dist, "broadcast_object_list",
                            lambda objs, src=0, **kw: (calls.append(objs[0][0]), real(objs, src=src, **kw))[1])
        assert [o.output_ids for o in llm.generate(PROMPTS, GREEDY)] == want_tokens
        assert "forward" not in calls and len(calls) <= 1, calls        # at most the cache set-up


def test_large_step_takes_a_second_broadcast(folders, monkeypatch):
    """A step whose packed metadata overflows the fixed first message (64 prompts of 100 tokens)
    sends the rest in a second broadcast and still gives one process's logits; a decode step of
    the same rows takes one broadcast. TP=2 x EP=2: the gather to rank 0 pads rows and vocab."""
    from ftmoe import parallel_runner

    one = load_model(folders[1])
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, one.config.vocab_size, (64, 100), generator=g)
    with LLM(folders[2], tp=2, ep=2, timeout_s=120, max_batch_tokens=64 * 112) as llm:
        runner, cache = llm.generator.model, llm.generator.cache
        seqs = list(range(9000, 9064))
        for s_ in seqs:
            cache.add(s_)
        sizes = []
        real = parallel_runner.dist.broadcast
        monkeypatch.setattr(parallel_runner.dist, "broadcast",
                            lambda t, src=0, **kw: (sizes.append(t.numel()), real(t, src=src, **kw))[1])
        got = runner(batch, cache.prepare(seqs, [100] * 64), cache, last_only=True)
        assert len(sizes) == 2 and sizes[0] == parallel_runner._MESSAGE, sizes
        nxt = got.argmax(-1, keepdim=True)
        got2 = runner(nxt, cache.prepare(seqs, [1] * 64), cache, last_only=True)
        assert len(sizes) == 3, sizes
    want = one(batch)[:, -1]
    want2 = one(torch.cat([batch, nxt], 1))[:, -1]
    assert rel(got, want) < 1e-5 and rel(got2, want2) < 1e-5


def test_bf16_logits_travel_in_bf16(folders):
    """16-bit models send their logits to rank 0 in 16 bits (lossless: the head is a bf16 GEMM);
    TP=2 in bf16 matches one bf16 process within bf16 rounding."""
    one = load_model(folders[1], dtype="bfloat16")
    with LLM(folders[2], tp=2, dtype="bfloat16", timeout_s=60) as llm:
        runner, cache = llm.generator.model, llm.generator.cache
        lens = [len(p) for p in PROMPTS]
        batch = torch.zeros(len(PROMPTS), max(lens), dtype=torch.long)
        for i, p in enumerate(PROMPTS):
            batch[i, :len(p)] = torch.tensor(p)
        seqs = [7000 + i for i in range(len(PROMPTS))]
        for s in seqs:
            cache.add(s)
        got = runner(batch, cache.prepare(seqs, lens), cache, last_only=True)
        want = torch.stack([one(torch.tensor([p]))[0, -1] for p in PROMPTS])
        assert got.dtype == torch.float32 and torch.equal(got, got.bfloat16().float())
        assert rel(got, want) < 3e-2


def test_gpu_ranks_use_one_host_thread(monkeypatch):
    """GPU-driving processes cap torch's host thread pool (FTMOE_HOST_THREADS, default 1) unless
    OMP_NUM_THREADS is set; CPU ranks keep torch's default."""
    from ftmoe.launch import limit_host_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("FTMOE_HOST_THREADS", "3")
        assert limit_host_threads("cpu") is None and torch.get_num_threads() == before
        assert limit_host_threads("cuda") == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("FTMOE_HOST_THREADS")
        assert limit_host_threads(torch.device("cuda", 0)) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert limit_host_threads("cuda") is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
