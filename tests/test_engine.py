"""Tests for ftmoe.engine: continuous batching, preemption, abort, limits, the asyncio front.

In:  the tiny random GPT-MoE (vocab 512, 128 positions, conftest's `tiny_model_dir`) on the
     CPU with one torch thread; token-id prompts of mixed lengths and SamplingParams.
Out: the engine's token streams equal `Generator.generate`'s outputs (greedy and seeded
     sampling, penalties, min_length, end_id, stop words, the context limit) however requests
     are batched, admitted or preempted; every request gets exactly one finished event; blocks
     are freed on finish and on abort; the token budget and the two-call step shape hold;
     errors name the problem; AsyncEngine streams, aborts, drains and exports metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
from collections import defaultdict

import pytest

from ftmoe.engine import AsyncEngine, LLMEngine, QueueFullError, TokenEvent
from ftmoe.errors import FtmoeError, RequestError
from ftmoe.generation import Generator
from ftmoe.sampling import SamplingParams
from tests.oracles.stepwise_chunks import StepwiseChunks



@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from ftmoe.loader import load_model
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def gen(model) -> Generator:
    return Generator(model)


def _requests(gen, n: int, seed: int = 0) -> list[tuple[str, list[int], SamplingParams]]:
    """n requests of mixed prompt lengths and params; some stop on end_id or a stop word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.choice([1, 2, 3, 5, 8, 13, 21, 30, 40]) if i != 7 else 120     # #7 hits the context limit
        prompt = [rng.randrange(512) for _ in range(L)]
        m = rng.randint(1, 14) if i != 7 else 14
        p = [SamplingParams(max_new_tokens=m, return_log_probs=True),
             SamplingParams(max_new_tokens=m, temperature=1.3, top_k=40, seed=i),
             SamplingParams(max_new_tokens=m, top_p=0.9, seed=1000 + i),
             SamplingParams(max_new_tokens=m, repetition_penalty=1.5, temperature=0.8, top_p=1.0, seed=i),
             SamplingParams(max_new_tokens=12, presence_penalty=2.0, min_length=2),
             SamplingParams(max_new_tokens=12)][i % 6]
        out.append((f"r{i}", prompt, p))
    # greedy ones with a stop that fires: end_id / a 2-token stop word taken from their own output
    for i in range(4, n, 6):
        rid, prompt, p = out[i]
        g = gen.generate([prompt], p)[0].generated_ids
        p.end_id = g[3]
        j = i + 1
        if j < n:
            g2 = gen.generate([out[j][1]], out[j][2])[0].generated_ids
            out[j][2].stop_words = [[g2[4], g2[5]], [511, 510, 509]]
    return out


def _reference(gen, reqs):
    outs = gen.generate([p for _, p, _ in reqs], [s for _, _, s in reqs])
    return {rid: o for (rid, _, _), o in zip(reqs, outs)}


def _drive(engine: LLMEngine, arrivals: dict[int, list], max_steps: int = 5000) -> dict[str, list[TokenEvent]]:
    """Add arrivals[k] before step k; step until idle. Returns each request's events in order."""
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for rid, prompt, p in arrivals.get(step, []):
            engine.add_request(rid, prompt, p)
        for ev in engine.step():
            events[ev.request_id].append(ev)
        step += 1
        assert step < max_steps
    return events


def _check_stream(evs: list[TokenEvent], prompt_length: int) -> None:
    """Exactly one finished event, last; num_generated counts 1, 2, ... with no repeats."""
    assert [e.finished for e in evs] == [False] * (len(evs) - 1) + [True]
    toks = [e for e in evs if e.token_id is not None]
    assert [e.num_generated for e in toks] == list(range(1, len(toks) + 1))
    assert all(e.prompt_length == prompt_length for e in evs)


def _assert_same_as_generator(events, reqs, ref):
    assert set(events) == {rid for rid, _, _ in reqs}
    for rid, prompt, p in reqs:
        evs, out = events[rid], ref[rid]
        _check_stream(evs, len(prompt))
        assert [e.token_id for e in evs] == out.generated_ids, rid
        assert evs[-1].finish_reason == out.finish_reason, rid
        if p.return_log_probs:
            assert [e.logprob for e in evs] == pytest.approx(out.output_log_probs, abs=2e-4)


def _staggered(reqs, per_step: int = 3) -> dict[int, list]:
    arrivals = defaultdict(list)
    for i, r in enumerate(reqs):
        arrivals[i // per_step].append(r)
    return arrivals


# ---- continuous batching = offline generation ------------------------------------
def test_continuous_batching_matches_generator(model, gen):
    reqs = _requests(gen, 32)
    ref = _reference(gen, reqs)
    assert {o.finish_reason for o in ref.values()} == {"stop", "length"}
    assert ref["r7"].sequence_length == 128                          # stopped by the context
    eng = LLMEngine(model, kv_cache_tokens=4096)
    events = _drive(eng, _staggered(reqs))
    _assert_same_as_generator(events, reqs, ref)
    s = eng.stats()
    assert s["preemptions"] == 0 and s["finished"] == 32 and s["aborted"] == 0
    assert s["generated_tokens"] == sum(len(o.generated_ids) for o in ref.values())
    assert (s["waiting"], s["running"], s["kv_blocks_used"]) == (0, 0, 0)


def test_small_cache_preempts_and_keeps_outputs(model, gen):
    reqs = [(rid, prompt, p if p.greedy else dataclasses.replace(p, max_new_tokens=16, temperature=2.0))
            for rid, prompt, p in _requests(gen, 32, seed=1)]      # long, diverse samples: a lost draw shows
    ref = _reference(gen, reqs)
    eng = LLMEngine(model, kv_cache_tokens=136, block_size=4)          # 34 blocks; r7 alone needs 32
    victims = []
    preempt = eng.scheduler._preempt
    eng.scheduler._preempt = lambda r: (victims.append(r.request_id), preempt(r))
    events = _drive(eng, _staggered(reqs, per_step=8))
    _assert_same_as_generator(events, reqs, ref)
    s = eng.stats()
    assert s["preemptions"] == len(victims) >= 3 and s["finished"] == 32
    sampled = {rid for rid, _, p in reqs if not p.greedy}
    assert sampled & set(victims) and set(victims) - sampled     # seeded sampling and greedy ones recomputed
    assert (s["waiting"], s["running"], s["kv_blocks_used"]) == (0, 0, 0)


class _Recording:
    """A model wrapper that records each call's shape and metadata (and can fail one call)."""

    def __init__(self, model, fail_call: int | None = None):
        self.model, self.config, self.dtype, self.device = model, model.config, model.dtype, model.device
        self.calls: list[dict] = []
        self.fail_call = fail_call

    def __call__(self, ids, meta, cache, last_only=False):
        self.calls.append({"shape": tuple(ids.shape), "ctx": meta.context_lens.tolist(),
                           "lens": meta.seq_lens.tolist()})
        if len(self.calls) == self.fail_call:
            raise RuntimeError("boom")
        return self.model(ids, meta, cache, last_only)


def test_token_budget_and_two_calls_per_step(model, gen):
    rng = random.Random(5)
    reqs = [(f"b{i}", [rng.randrange(512) for _ in range(rng.randint(10, 60))], SamplingParams(max_new_tokens=6))
            for i in range(16)]
    ref = _reference(gen, reqs)
    rec = _Recording(model)
    eng = LLMEngine(rec, kv_cache_tokens=2048, max_num_batched_tokens=128, max_num_seqs=6)
    for r in reqs:
        eng.add_request(*r)
    events, prefills = defaultdict(list), 0
    while eng.has_unfinished():
        n = len(rec.calls)
        for ev in eng.step():
            events[ev.request_id].append(ev)
        calls = rec.calls[n:]
        pre = [c for c in calls if all(x == 0 for x in c["ctx"])]
        dec = [c for c in calls if c not in pre]
        assert len(pre) <= 1 and len(dec) <= 1
        assert all(c["shape"][1] == 1 and set(c["lens"]) == {1} and min(c["ctx"]) > 0 for c in dec)
        assert sum(c["shape"][0] * c["shape"][1] for c in calls) <= 128          # padded tokens
        assert sum(c["shape"][0] for c in calls) <= 6
        prefills += len(pre)
    assert prefills > 2                      # the budget split the prompts over several steps
    _assert_same_as_generator(events, reqs, ref)
    with pytest.raises(FtmoeError, match="max_num_batched_tokens must be an integer >= 128"):
        LLMEngine(model, max_num_batched_tokens=100)


# ---- abort, failures, limits, errors ---------------------------------------------
def test_abort_frees_blocks_at_once_and_ends_with_an_abort_event(model):
    eng = LLMEngine(model, kv_cache_tokens=1024, max_num_seqs=2)
    p = SamplingParams(max_new_tokens=10)
    for rid in "abc":
        eng.add_request(rid, [3] * 40, p)
    first = eng.step()
    assert sorted(e.request_id for e in first) == ["a", "b"] and eng.stats()["waiting"] == 1
    used = eng.stats()["kv_blocks_used"]
    eng.abort("a")
    assert eng.stats()["kv_blocks_used"] == used - 3 and eng.stats()["running"] == 1
    eng.abort("c")                        # still waiting
    eng.abort("nope")                     # unknown: ignored
    assert eng.stats()["waiting"] == 0
    evs = {e.request_id: e for e in eng.step()}
    assert set(evs) == {"a", "b", "c"}
    assert (evs["a"].token_id, evs["a"].logprob, evs["a"].finished, evs["a"].finish_reason) == (None, None, True, "abort")
    assert (evs["a"].num_generated, evs["c"].num_generated, evs["c"].prompt_length) == (1, 0, 40)
    rest = _drive(eng, {})
    assert set(rest) == {"b"} and rest["b"][-1].finish_reason == "length"
    eng.abort("b")                        # finished: ignored
    assert eng.step() == [] and not eng.has_unfinished()
    s = eng.stats()
    assert (s["aborted"], s["finished"], s["kv_blocks_used"]) == (2, 1, 0)


def test_a_failing_model_call_aborts_only_its_requests(model, gen):
    reqs = [(f"f{i}", [5 + i] * (3 + i), SamplingParams(max_new_tokens=5)) for i in range(4)]
    ref = _reference(gen, reqs)
    rec = _Recording(model, fail_call=3)      # call 1: prefill f0,f1; 2: decode; 3: prefill f2,f3
    eng = LLMEngine(rec, kv_cache_tokens=1024)
    events = _drive(eng, {0: reqs[:2], 2: reqs[2:]})
    for rid in ("f2", "f3"):
        assert [(e.token_id, e.finish_reason) for e in events[rid]] == [(None, "abort")]
        assert str(eng.pop_error(rid)) == "boom"
    _assert_same_as_generator({k: events[k] for k in ("f0", "f1")}, reqs[:2], ref)
    assert eng.stats()["kv_blocks_used"] == 0 and eng.pop_error("f0") is None


# ---- greedy chunks (multi-step decoding) ------------------------------------------------
class _WatchedChunks(StepwiseChunks):
    """Chunks on the CPU that also record how many requests waited when each chunk ran."""

    def __init__(self, model):
        super().__init__(model)
        self.engine = None
        self.waiting = []

    def greedy_chunk(self, *a, **kw):
        self.waiting.append(len(self.engine.scheduler.waiting))
        return super().greedy_chunk(*a, **kw)


def _greedy_requests(gen, n: int, seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    """Plain-greedy requests; some end inside a chunk (end id, stop word, odd max_new_tokens)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(512) for _ in range(rng.choice([1, 3, 8, 21]))]
        p = SamplingParams(max_new_tokens=rng.randint(2, 15), return_log_probs=i % 2 == 0)
        g = gen.generate([prompt], SamplingParams(max_new_tokens=8))[0].generated_ids
        if i % 4 == 1:
            p.end_id = g[5]
        elif i % 4 == 2:
            p.stop_words = [[g[2], g[3]]]
        reqs.append((f"g{i}", prompt, p))
    return reqs


@pytest.mark.parametrize("overlap", ["1", "0"])
@pytest.mark.parametrize("kv_tokens", [4096, 64])     # 64: chunks shrink to the free blocks, preemption
def test_greedy_chunks_serve_what_single_steps_do(model, gen, kv_tokens, overlap, monkeypatch):
    """With only plain-greedy decodes running and nobody waiting, the engine runs up to
    decode_chunk steps per engine step; streams, tokens, log probs and finish reasons equal
    single steps' (the Generator), no chunk runs while a request waits, and every block is freed.
    With overlap (the default) each chunk is queued before the last one's tokens are read, and
    continues from them on the device."""
    monkeypatch.setenv("FTMOE_CHUNK_OVERLAP", overlap)
    reqs = _greedy_requests(gen, 12, seed=kv_tokens)
    ref = _reference(gen, reqs)
    chunked = _WatchedChunks(model)
    eng = LLMEngine(chunked, kv_cache_tokens=kv_tokens, block_size=8, decode_chunk=4)
    chunked.engine = eng
    events = _drive(eng, _staggered(reqs, per_step=2))
    _assert_same_as_generator(events, reqs, ref)
    assert chunked.chunks and all(2 <= steps <= 4 for _, steps in chunked.chunks)
    assert set(chunked.waiting) == {0}
    assert bool(chunked.started) == (overlap == "1")       # queued chunks, or each one waited for
    s = eng.stats()
    assert s["finished"] == 12 and s["kv_blocks_used"] == 0
    assert s["generated_tokens"] == sum(len(o.generated_ids) for o in ref.values())
    if kv_tokens == 64:
        assert s["preemptions"] > 0


def test_overlapped_chunks_continue_on_the_device(model, gen):
    """Requests that run together for many chunks: each chunk after the first continues the one
    before (its last tokens fed on the device, its tokens read after the next is queued); one
    that stops early (end id inside a chunk, a smaller budget) or is aborted ends the run of
    continued chunks, and the tokens still equal single steps'. Every block is freed."""
    reqs = [(f"c{i}", [3 + i, 7, 11 * i + 1], SamplingParams(max_new_tokens=n, return_log_probs=i == 1))
            for i, n in enumerate([23, 30, 17])]
    ref = _reference(gen, reqs)
    chunked = _WatchedChunks(model)
    eng = LLMEngine(chunked, kv_cache_tokens=4096, block_size=8, decode_chunk=4)
    chunked.engine = eng
    _assert_same_as_generator(_drive(eng, {0: reqs}), reqs, ref)
    assert chunked.started[0] is False and chunked.started.count(True) >= 3
    assert eng.stats()["kv_blocks_used"] == 0 and eng._pending is None
    eng = LLMEngine(chunked, kv_cache_tokens=4096, block_size=8, decode_chunk=4)   # an abort while one runs
    chunked.engine = eng
    for rid, prompt, p in reqs:
        eng.add_request(rid, prompt, p)
    events = defaultdict(list)
    while eng.has_unfinished():
        if eng._pending is not None and "c0" in eng._reqs and len(events["c0"]) >= 6:
            eng.abort("c0")
        for ev in eng.step():
            events[ev.request_id].append(ev)
    assert events["c0"][-1].finish_reason == "abort" and len(events["c0"]) < 23
    for rid, prompt, p in reqs[1:]:
        assert [e.token_id for e in events[rid]] == ref[rid].generated_ids
    assert eng.stats()["kv_blocks_used"] == 0


def test_sampled_rows_are_sampled_together_as_alone(model, gen, monkeypatch):
    """Rows that sample with temperature / top-k / top-p alone are sampled in one batch per
    temperature (`generation.decide_together` -> `sampling.sample_rows`), each from its own seeded
    generator: the tokens and log probs are those drawn row by row (the Generator with batching
    turned off); rows with a penalty still take the per-row path."""
    from ftmoe import generation

    reqs = [("t07a", [5, 6, 7], SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=1,
                                              return_log_probs=True)),
            ("t1k", [9], SamplingParams(max_new_tokens=7, top_k=20, seed=2, return_log_probs=True)),
            ("t07b", [300, 2], SamplingParams(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.5, seed=3)),
            ("t13", [44, 45, 46, 47], SamplingParams(max_new_tokens=6, temperature=1.3, top_k=0, top_p=0.95, seed=4)),
            ("pen", [8, 8], SamplingParams(max_new_tokens=6, top_k=8, repetition_penalty=1.2, seed=5)),
            ("greedy", [1, 2], SamplingParams(max_new_tokens=5))]
    with monkeypatch.context() as m:
        m.setattr(generation, "decide_together", lambda *a: {})          # every row on its own
        ref = _reference(gen, reqs)
    batches = []
    real = generation.sample_rows
    monkeypatch.setattr(generation, "sample_rows", lambda lg, ps, gs: batches.append(len(ps)) or real(lg, ps, gs))
    eng = LLMEngine(model, kv_cache_tokens=2048, block_size=8, decode_chunk=1)
    _assert_same_as_generator(_drive(eng, {0: reqs}), reqs, ref)
    assert max(batches) == 2 and sum(batches) == sum(len(ref[rid].generated_ids) for rid, _, _ in reqs[:4])
    monkeypatch.setenv("FTMOE_BATCH_SAMPLING", "0")          # the A/B switch: every sampled row on its own
    n = len(batches)
    _assert_same_as_generator(_drive(LLMEngine(model, kv_cache_tokens=2048, block_size=8, decode_chunk=1),
                                     {0: reqs}), reqs, ref)
    assert len(batches) == n


def test_greedy_chunks_only_for_plain_greedy_batches(model, gen):
    """A running request that samples keeps the engine on single steps; decode_chunk=1 turns
    chunks off; a bad decode_chunk is named."""
    reqs = [("a", [5, 6, 7], SamplingParams(max_new_tokens=8)),
            ("b", [9], SamplingParams(max_new_tokens=8, temperature=1.2, top_k=20, seed=4))]
    ref = _reference(gen, reqs)
    chunked = _WatchedChunks(model)
    eng = LLMEngine(chunked, kv_cache_tokens=1024, decode_chunk=8)
    chunked.engine = eng
    _assert_same_as_generator(_drive(eng, {0: reqs}), reqs, ref)
    assert not chunked.chunks
    eng = LLMEngine(chunked, kv_cache_tokens=1024, decode_chunk=1)
    chunked.engine = eng
    _assert_same_as_generator(_drive(eng, {0: reqs[:1]}), reqs[:1], ref)
    assert not chunked.chunks
    with pytest.raises(FtmoeError, match="engine option decode_chunk must be an integer 1..32, found 0"):
        LLMEngine(model, kv_cache_tokens=1024, decode_chunk=0)


def test_queue_full(model):
    eng = LLMEngine(model, max_queue=2)
    eng.add_request("q1", [1, 2], SamplingParams(max_new_tokens=2))
    eng.add_request("q2", [1, 2], SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.add_request("q3", [1, 2], SamplingParams(max_new_tokens=2))
    assert isinstance(QueueFullError("x"), FtmoeError)
    eng.step()                            # both admitted: the queue is empty again
    eng.add_request("q3", [1, 2], SamplingParams(max_new_tokens=2))
    assert set(_drive(eng, {})) == {"q1", "q2", "q3"}


def test_validation_errors(model):
    eng = LLMEngine(model, kv_cache_tokens=64)          # 4 blocks of 16
    p = SamplingParams(max_new_tokens=4)
    eng.add_request("a", [1, 2, 3], p)
    cases = [
        (("a", [1], p), "request id 'a' is already in use"),
        (("e", [], p), "prompt is empty"),
        (("l", [3] * 128, p), "prompt has 128 tokens; the model's context is 128"),
        (("k", [1] * 60, SamplingParams(max_new_tokens=10)),
         r"needs 80 KV-cache tokens \(prompt 60 \+ 10 new\); the engine's cache holds 64 \(raise kv_cache_tokens\)"),
        (("t", [1], SamplingParams(top_k=600)), "'top_k' must be an integer in 0..512"),
        (("w", [1], SamplingParams(beam_width=2)), "beam_width 2 is not served by the engine"),
        (("v", [1, 512], p), "token id 512 outside the vocabulary"),
        (("s", "hello", p), "list of token ids"),
        (("x", [1], SamplingParams(stop_words=["hi"])), "need a tokenizer"),
        (("", [1], p), "non-empty string"),
    ]
    for args, msg in cases:
        with pytest.raises(RequestError, match=msg):
            eng.add_request(*args)
    bad = SamplingParams()
    bad.temperature = -1.0                              # changed after construction
    with pytest.raises(RequestError, match="'temperature'"):
        eng.add_request("z", [1], bad)
    assert eng.stats()["waiting"] == 1
    assert set(_drive(eng, {})) == {"a"}
    eng.add_request("a", [1, 2, 3], p)                  # a finished id can be used again
    assert set(_drive(eng, {})) == {"a"}


# ---- AsyncEngine -----------------------------------------------------------------------
async def _collect(agen) -> list[TokenEvent]:
    return [ev async for ev in agen]


async def _until(cond, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_async_concurrent_generate_matches_generator(model, gen):
    reqs = _requests(gen, 10, seed=2)
    ref = _reference(gen, reqs)

    async def main():
        ae = AsyncEngine(LLMEngine(model, kv_cache_tokens=256, block_size=8))
        ae.start()
        results = await asyncio.gather(*(_collect(ae.generate(*r)) for r in reqs))
        await ae.shutdown()
        return dict(zip([r[0] for r in reqs], results)), ae.stats()

    events, stats = asyncio.run(main())
    _assert_same_as_generator(events, reqs, ref)
    assert stats["finished"] == 10 and stats["kv_blocks_used"] == 0


def test_async_errors_on_first_anext_and_early_exit_aborts(model):
    async def main():
        ae = AsyncEngine(LLMEngine(model, kv_cache_tokens=1024))
        agen = ae.generate("bad", [], SamplingParams())                 # nothing raised yet
        with pytest.raises(RequestError, match="prompt is empty"):
            await agen.__anext__()
        with pytest.raises(RequestError, match="beam_width"):
            await ae.generate("bw", [1], SamplingParams(beam_width=2)).__anext__()
        long = SamplingParams(max_new_tokens=100)
        n = 0
        async for _ in ae.generate("x", [1, 2, 3], long):              # a client that disconnects
            n += 1
            if n == 2:
                break
        await _until(lambda: ae.stats()["aborted"] == 1)
        assert ae.stats()["kv_blocks_used"] == 0 and ae.stats()["running"] == 0
        first = asyncio.Event()
        keep = ae.generate("d", [4, 5], long)

        async def consume():
            async for _ in keep:
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        with pytest.raises(RequestError, match="already in use"):
            await ae.generate("d", [1], long).__anext__()
        task.cancel()                                                   # CancelledError in the consumer
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until(lambda: ae.stats()["aborted"] == 2)
        assert ae.stats()["kv_blocks_used"] == 0 and ae.stats()["finished"] == 0
        await ae.shutdown(drain=False)
        with pytest.raises(QueueFullError):
            await AsyncEngine(LLMEngine(model, max_queue=0)).generate("q", [1], long).__anext__()

    asyncio.run(main())


def test_async_model_failure_raises_in_its_consumer_only(model):
    async def main():
        ae = AsyncEngine(LLMEngine(_Recording(model, fail_call=1), kv_cache_tokens=1024))
        with pytest.raises(RuntimeError, match="boom"):
            await _collect(ae.generate("f", [1, 2], SamplingParams(max_new_tokens=4)))
        evs = await _collect(ae.generate("ok", [1, 2], SamplingParams(max_new_tokens=4)))
        await ae.shutdown()
        return evs, ae.stats()

    evs, stats = asyncio.run(main())
    assert len(evs) == 4 and evs[-1].finish_reason == "length"
    assert (stats["aborted"], stats["finished"], stats["kv_blocks_used"]) == (1, 1, 0)


@pytest.mark.parametrize("drain", [True, False])
def test_async_shutdown(model, drain):
    async def main():
        ae = AsyncEngine(LLMEngine(model, kv_cache_tokens=1024))
        p = SamplingParams(max_new_tokens=8 if drain else 100)
        tasks = [asyncio.create_task(_collect(ae.generate(f"s{i}", [7 + i] * (5 + i), p))) for i in range(3)]
        await _until(lambda: ae.stats()["running"] + ae.stats()["finished"] == 3)
        await ae.shutdown(drain=drain)
        with pytest.raises(RequestError, match="shutting down"):
            await ae.generate("late", [1], p).__anext__()
        return await asyncio.gather(*tasks), ae.stats()

    results, stats = asyncio.run(main())
    for evs in results:
        _check_stream(evs, evs[0].prompt_length)
        if drain:
            assert len(evs) == 8 and evs[-1].finish_reason == "length"
        else:
            assert evs[-1].finish_reason == "abort" and evs[-1].token_id is None and len(evs) < 100
    assert stats["kv_blocks_used"] == 0 and stats["aborted"] == (0 if drain else 3)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]\w*="[^"]*"(?:,[a-zA-Z_]\w*="[^"]*")*\})? (\S+)$')


def _parse_prometheus(text: str) -> dict[str, float]:
    types, helps, samples = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in {"gauge", "counter", "histogram"}
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            name = m.group(1)
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types and family in helps, line
            samples[name + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_async_metrics_text_is_prometheus_and_moves(model):
    async def main():
        ae = AsyncEngine(LLMEngine(model, kv_cache_tokens=1024))
        before = _parse_prometheus(ae.metrics_text())
        evs = await _collect(ae.generate("m", [1, 2, 3], SamplingParams(max_new_tokens=6)))
        after = _parse_prometheus(ae.metrics_text())
        await ae.shutdown()
        return before, after, evs

    before, after, evs = asyncio.run(main())
    assert len(evs) == 6
    for name in ("ftmoe_queue_length", "ftmoe_running_requests", "ftmoe_kv_blocks_used", "ftmoe_kv_blocks_total",
                 "ftmoe_generation_tokens_per_second"):
        assert name in after
    assert after["ftmoe_kv_blocks_total"] == 64
    assert after["ftmoe_generated_tokens_total"] - before["ftmoe_generated_tokens_total"] == 6
    assert after['ftmoe_requests_total{finish_reason="length"}'] == before['ftmoe_requests_total{finish_reason="length"}'] + 1
    assert after["ftmoe_time_to_first_token_seconds_count"] == 1
    assert after['ftmoe_time_to_first_token_seconds_bucket{le="+Inf"}'] == 1
    assert after["ftmoe_inter_token_latency_seconds_count"] == 5
    assert after["ftmoe_generation_tokens_per_second"] > 0
