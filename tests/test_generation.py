"""Tests for ftmoe.generation, ftmoe.beam_search and ftmoe.llm on tiny random models.

In:  a tiny GPT-MoE (vocab 512, 128 positions) and a tinier one (vocab 16) for exhaustive
     beam-search checks, both built once per module; token-id prompts.
Out: every generation option checked against a reference computed WITHOUT the cache:
     `model(full_ids)` logits at each generated position (greedy = argmax, log probs =
     log_softmax, penalties by hand); batching, waves, streaming and cache hygiene.
"""
from __future__ import annotations

import importlib.util
import dataclasses

import pytest
import torch

from ftmoe.errors import RequestError
from ftmoe.generation import Generator, StreamEvent
from ftmoe.sampling import SamplingParams
from tests.oracles.stepwise_chunks import StepwiseChunks



def _build(tmp_path_factory, name, spec=None) -> str:
    from ftmoe.convert import convert
    from ftmoe.synthetic import PRESETS, save_megatron_checkpoint

    d = tmp_path_factory.mktemp(name)
    ck = save_megatron_checkpoint(str(d / "ck"), spec or PRESETS["tiny"], dtype=torch.float32)
    return convert(ck, str(d / "out"), tp=1, dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return _build(tmp_path_factory, "gen_model")


@pytest.fixture(scope="module")
def model(model_dir):
    from ftmoe.loader import load_model
    return load_model(model_dir)


@pytest.fixture(scope="module")
def gen(model) -> Generator:
    return Generator(model)


@pytest.fixture(scope="module")
def small_gen(tmp_path_factory) -> Generator:
    from ftmoe.loader import load_model
    from ftmoe.synthetic import SyntheticSpec
    spec = SyntheticSpec(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                         num_experts=4, vocab_size=16, max_position_embeddings=32)
    return Generator(load_model(_build(tmp_path_factory, "gen_small", spec)), max_batch_tokens=512, block_size=4)


PROMPTS = [[5, 17, 42], [300, 2, 9, 9, 81, 7, 150, 33, 12, 404], [77], list(range(100, 125))]


def ref_logits(model, ids) -> torch.Tensor:
    """[len(ids), V] fp32 logits of a full forward without the KV cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def steps(model, out):
    """(reference logits predicting generated token i, token i, the ids before it) per step."""
    ref = ref_logits(model, out.output_ids)
    P = out.prompt_length
    return [(ref[P - 1 + i], t, out.output_ids[:P + i]) for i, t in enumerate(out.generated_ids)]


def greedy(gen, prompt, n=12, **kw):
    return gen.generate([prompt], SamplingParams(max_new_tokens=n, return_log_probs=True, **kw))[0]


# ---- greedy, log probs, batching --------------------------------------------------
def test_greedy_is_argmax_of_full_forward_with_log_probs(gen, model):
    outs = gen.generate(PROMPTS, SamplingParams(max_new_tokens=10, return_log_probs=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids[:len(prompt)] == prompt and out.prompt_length == len(prompt)
        assert out.sequence_length == len(prompt) + 10 == len(out.output_ids)
        assert out.finish_reason == "length"
        for (logits, tok, _), lp in zip(steps(model, out), out.output_log_probs):
            assert tok == int(logits.argmax())
            assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=2e-4)
        assert out.cum_log_probs == pytest.approx(sum(out.output_log_probs), abs=1e-5)
    assert outs[0].cum_log_probs < 0
    assert gen.cache.num_free_blocks == gen.cache.num_blocks


def test_log_probs_only_on_request(gen):
    out = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0]
    assert out.cum_log_probs is None and out.output_log_probs is None


def test_batched_prompts_equal_each_alone(gen):
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=12, temperature=1.5, top_k=40, seed=7),
              SamplingParams(max_new_tokens=5, top_p=0.9, seed=3), SamplingParams(max_new_tokens=9, seed=11)]
    batch = gen.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batch):
        alone = gen.generate([prompt], p)[0]
        assert alone.output_ids == out.output_ids
    shuffled = gen.generate(PROMPTS[::-1], params[::-1])
    assert [o.output_ids for o in shuffled[::-1]] == [o.output_ids for o in batch]


def test_sampled_log_probs_match_reference(gen, model):
    out = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=1.3, top_k=50, top_p=0.95, seed=1,
                                                    return_log_probs=True))[0]
    for (logits, tok, _), lp in zip(steps(model, out), out.output_log_probs):
        assert lp == pytest.approx(float(torch.log_softmax(logits / 1.3, -1)[tok]), abs=2e-4)
    assert out.cum_log_probs == pytest.approx(sum(out.output_log_probs), abs=1e-5)


# ---- sampling options -------------------------------------------------------------
def test_temperature_scales_logits(gen, model):
    out = greedy(gen, PROMPTS[0], top_k=1, temperature=0.6)
    plain = greedy(gen, PROMPTS[0])
    assert out.output_ids == plain.output_ids
    for (logits, tok, _), lp in zip(steps(model, out), out.output_log_probs):
        assert lp == pytest.approx(float(torch.log_softmax(logits / 0.6, -1)[tok]), abs=2e-4)
    assert out.cum_log_probs > plain.cum_log_probs + 0.1      # sharper distribution


def test_top_k_1_is_greedy_and_top_k_stays_in_top_k(gen, model):
    plain = greedy(gen, PROMPTS[1], n=15)
    assert greedy(gen, PROMPTS[1], n=15, top_k=1, temperature=3.0, seed=9).output_ids == plain.output_ids
    non_argmax = 0
    for seed in range(4):
        out = greedy(gen, PROMPTS[1], n=15, top_k=3, temperature=3.0, seed=seed)
        for logits, tok, _ in steps(model, out):
            assert tok in torch.topk(logits, 3).indices.tolist()
            non_argmax += tok != int(logits.argmax())
    assert non_argmax > 5


def test_top_p_samples_inside_the_nucleus(gen, model):
    outside_if_ignored = 0
    for seed in range(4):
        out = greedy(gen, PROMPTS[2], n=15, top_p=0.6, temperature=2.0, seed=seed)
        for logits, tok, _ in steps(model, out):
            probs = torch.softmax(logits.double() / 2.0, -1)
            vals, idx = torch.sort(probs, descending=True)
            size = int((torch.cumsum(vals, 0) - vals < 0.6).sum())       # smallest prefix reaching 0.6
            assert tok in idx[:size].tolist()
            outside_if_ignored += float(vals[:size].sum()) < 0.9
    assert outside_if_ignored > 10        # the nucleus really excludes a lot of mass


@pytest.mark.parametrize("kind", ["repetition", "presence"])
def test_penalties_match_hand_computation(gen, model, kind):
    kw = {"repetition_penalty": 2.0} if kind == "repetition" else {"presence_penalty": 3.0}
    prompt = [480, 218, 5, 480, 17]
    out = greedy(gen, prompt, n=15, **kw)
    for (logits, tok, before), lp in zip(steps(model, out), out.output_log_probs):
        hand = logits.clone()
        for t in set(before):
            x = float(logits[t])
            if kind == "repetition":
                hand[t] = x / 2.0 if x > 0 else x * 2.0
            else:
                hand[t] = x - 3.0
        assert tok == int(hand.argmax())
        assert lp == pytest.approx(float(torch.log_softmax(hand, -1)[tok]), abs=2e-4)
    assert out.output_ids != greedy(gen, prompt, n=15).output_ids


def test_both_penalties_raise(gen):
    with pytest.raises(RequestError, match="mutually exclusive"):
        gen.generate([[1, 2]], SamplingParams(repetition_penalty=1.1, presence_penalty=0.1))
    p = SamplingParams()
    p.presence_penalty, p.repetition_penalty = 0.5, 1.5          # changed after construction
    with pytest.raises(RequestError, match="mutually exclusive"):
        gen.generate([[1, 2]], p)


def _first_new_token(tokens, prompt, start=2):
    """Index i >= start where tokens[i] occurs for the first time (not in the prompt either)."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i] and tokens[i] not in prompt:
            return i
    pytest.skip("greedy output has no suitable token")


def test_end_id_min_length_and_ignore_eos(gen, model):
    prompt = PROMPTS[1]
    g = greedy(gen, prompt, n=20).generated_ids
    k = _first_new_token(g, prompt)
    end = g[k]
    out = greedy(gen, prompt, n=20, end_id=end)
    assert out.generated_ids == g[:k + 1] and out.finish_reason == "stop"
    assert out.sequence_length == len(prompt) + k + 1
    out = greedy(gen, prompt, n=20, end_id=end, min_length=k + 4)
    assert end not in out.generated_ids[:k + 4] and len(out.generated_ids) > k + 1
    assert out.generated_ids[:k] == g[:k]
    for i, (logits, tok, _) in enumerate(steps(model, out)):
        masked = logits.clone()
        if i < k + 4:
            masked[end] = float("-inf")
        assert tok == int(masked.argmax())
    out = greedy(gen, prompt, n=20, end_id=end, ignore_eos=True)
    assert out.generated_ids == g and out.finish_reason == "length"


def test_default_end_id_is_the_config_one(gen):
    assert gen.end_id_for(SamplingParams()) is None        # tiny config: end_id 50256 >= vocab 512
    assert gen.end_id_for(SamplingParams(end_id=3)) == 3


def test_stop_words_stop_at_the_right_place(gen):
    prompt = PROMPTS[0]
    g = greedy(gen, prompt, n=20).generated_ids
    k = _first_new_token(g, prompt, start=3)
    absent = next(t for t in range(512) if t not in prompt + g)
    two = [g[k - 1], g[k]]                       # can only complete at step k: g[k] is new there
    out = greedy(gen, prompt, n=20, stop_words=[[absent], two])
    assert out.generated_ids == g[:k + 1] and out.finish_reason == "stop"
    assert out.sequence_length == len(prompt) + k + 1
    out = greedy(gen, prompt, n=20, stop_words=[[g[k]]])
    assert out.generated_ids == g[:k + 1] and out.finish_reason == "stop"
    assert greedy(gen, prompt, n=20, stop_words=[[g[k], absent]]).generated_ids == g     # never completed


def test_bad_words_never_appear(gen, model):
    prompt = PROMPTS[0]
    g = greedy(gen, prompt, n=12).generated_ids
    out = greedy(gen, prompt, n=12, bad_words=[[g[0]], [g[1], g[2]]])
    assert g[0] not in out.generated_ids and out.generated_ids != g
    seq = out.output_ids
    assert all((seq[i], seq[i + 1]) != (g[1], g[2]) for i in range(len(seq) - 1))
    for seed in range(3):
        top = torch.topk(ref_logits(model, prompt)[-1], 4).indices.tolist()
        out = greedy(gen, prompt, n=12, bad_words=[[t] for t in top], temperature=2.0, top_p=1.0, seed=seed)
        assert not set(top) & set(out.generated_ids)


def test_seed_reproducible_and_independent_of_batch(gen):
    p = SamplingParams(max_new_tokens=20, temperature=1.5, top_p=1.0, seed=42)
    a = gen.generate([PROMPTS[0]], p)[0].output_ids
    assert gen.generate([PROMPTS[0]], p)[0].output_ids == a
    others = [SamplingParams(max_new_tokens=15, temperature=2.0, top_k=50, seed=s) for s in (1, 2)]
    batch = gen.generate([PROMPTS[3], PROMPTS[0], PROMPTS[1]], [others[0], p, others[1]])
    assert batch[1].output_ids == a
    assert gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, temperature=1.5, top_p=1.0,
                                                     seed=43))[0].output_ids != a


# ---- beam search ------------------------------------------------------------------
def test_beam_width_1_is_greedy(gen):
    a = greedy(gen, PROMPTS[1], n=10)
    b = greedy(gen, PROMPTS[1], n=10, beam_width=1)
    assert a.output_ids == b.output_ids and a.output_log_probs == pytest.approx(b.output_log_probs)


def test_beam_4_beats_greedy_and_matches_reference(gen, model):
    for prompt in PROMPTS[:3]:
        g = greedy(gen, prompt, n=8)
        out = greedy(gen, prompt, n=8, beam_width=4)
        assert len(out.output_ids) == 4 and len({tuple(x) for x in out.output_ids}) == 4
        assert out.cum_log_probs[0] >= g.cum_log_probs - 1e-5
        assert out.cum_log_probs == sorted(out.cum_log_probs, reverse=True)     # len_penalty 0: score = cum
        for ids, lps, cum in zip(out.output_ids, out.output_log_probs, out.cum_log_probs):
            ref = torch.log_softmax(ref_logits(model, ids), -1)                  # checks the cache reorders
            want = [float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(ids[len(prompt):])]
            assert lps == pytest.approx(want, abs=2e-4) and cum == pytest.approx(sum(want), abs=1e-3)
    assert gen.cache.num_free_blocks == gen.cache.num_blocks


def _brute_force(model, prompt, end, temperature, alpha):
    """All continuations of <= 2 new tokens (ending at end_id or at length 2), best first."""
    lp1 = torch.log_softmax(ref_logits(model, prompt)[-1] / temperature, -1)
    hyps = [((end,), float(lp1[end]))]
    for a in range(lp1.numel()):
        if a != end:
            lp2 = torch.log_softmax(ref_logits(model, prompt + [a])[-1] / temperature, -1)
            hyps += [((a, b), float(lp1[a] + lp2[b])) for b in range(lp1.numel())]
    return sorted(((c / len(t) ** alpha, t) for t, c in hyps), reverse=True)


def test_len_penalty_ranking_matches_brute_force(small_gen):
    """FT: score = cum_log_prob / generated_length ** len_penalty, so len_penalty > 0 favours
    longer hypotheses and < 0 shorter ones. Beam width = vocab makes 2-token search exhaustive."""
    g, model, V, prompt, T = small_gen, small_gen.model, 16, [1, 2, 3], 2.0
    for alpha, want_len in ((2.0, 2), (-1.0, 1)):
        # an end_id for which this length penalty changes the best hypothesis the documented way
        for end in range(V):
            best0 = _brute_force(model, prompt, end, T, 0.0)[0][1]
            best = _brute_force(model, prompt, end, T, alpha)[0][1]
            if best != best0 and len(best) == want_len:
                break
        else:
            pytest.fail(f"no end_id where len_penalty={alpha} changes the best hypothesis")
        for a in (0.0, alpha):
            want = _brute_force(model, prompt, end, T, a)[:V]
            out = g.generate([prompt], SamplingParams(max_new_tokens=2, beam_width=V, end_id=end, len_penalty=a,
                                                      temperature=T, return_log_probs=True))[0]
            assert [tuple(x[3:]) for x in out.output_ids] == [t for _, t in want]
            assert out.scores == pytest.approx([s for s, _ in want], abs=1e-4)
            assert out.finish_reason == ["stop" if x[-1] == end else "length" for x in out.output_ids]
            lengths = [len(x) - 3 for x in out.output_ids]
            assert out.scores == pytest.approx([c / n ** a for c, n in zip(out.cum_log_probs, lengths)])
    assert g.cache.num_free_blocks == g.cache.num_blocks


# ---- streaming, limits, errors, cache ---------------------------------------------
def test_stream_yields_the_same_tokens_as_generate(gen):
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=9, temperature=1.5, top_k=20, seed=5),
              SamplingParams(max_new_tokens=4, beam_width=3, return_log_probs=True)]
    outs = gen.generate(PROMPTS[:3], params)
    events = list(gen.stream(PROMPTS[:3], params))
    assert all(isinstance(e, StreamEvent) for e in events)
    for i, out in enumerate(outs):
        mine = [e for e in events if e.index == i]
        best = out.generated_ids[0] if params[i].beam_width > 1 else out.generated_ids
        assert [e.token_id for e in mine] == best
        assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == (out.finish_reason[0] if params[i].beam_width > 1 else out.finish_reason)
    first_two = [e.index for e in events[:2]]
    assert first_two == [0, 1]                    # interleaved as produced, not per request
    assert gen.cache.num_free_blocks == gen.cache.num_blocks


def test_closing_a_stream_or_an_error_frees_the_cache(gen, monkeypatch):
    it = gen.stream(PROMPTS, SamplingParams(max_new_tokens=10, beam_width=2))
    next(it)
    it.close()
    assert gen.cache.num_free_blocks == gen.cache.num_blocks
    calls = {"n": 0}
    real = gen._forward

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a)

    monkeypatch.setattr(gen, "_forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        gen.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    assert gen.cache.num_free_blocks == gen.cache.num_blocks


def test_prompt_errors(gen):
    with pytest.raises(RequestError, match="prompt is empty"):
        gen.generate([[]])
    with pytest.raises(RequestError, match="request 1: prompt has 128 tokens; the model's context is 128"):
        gen.generate([[1], [3] * 128])
    with pytest.raises(RequestError, match="token id 512 outside the vocabulary"):
        gen.generate([[1, 512]])
    with pytest.raises(RequestError, match="2 SamplingParams for 1 prompts"):
        gen.generate([[1]], [SamplingParams(), SamplingParams()])
    with pytest.raises(RequestError, match="list of token ids"):
        gen.generate(["hello"])
    with pytest.raises(RequestError, match="'top_k'"):
        gen.generate([[1]], SamplingParams(top_k=600))


def test_generation_stops_at_the_context_length(gen):
    out = gen.generate([[7] * 127, [9] * 120], SamplingParams(max_new_tokens=20))
    assert [o.sequence_length for o in out] == [128, 128] and [o.finish_reason for o in out] == ["length"] * 2
    beams = gen.generate([[9] * 125], SamplingParams(max_new_tokens=20, beam_width=2))[0]
    assert beams.sequence_length == [128, 128]


def test_waves_when_the_cache_is_small(model, gen):
    small = Generator(model, max_batch_tokens=64, block_size=16)
    params = SamplingParams(max_new_tokens=10, temperature=1.2, top_k=30, seed=2)
    assert [o.output_ids for o in small.generate(PROMPTS, params)] == \
        [o.output_ids for o in gen.generate(PROMPTS, params)]
    assert small.cache.num_free_blocks == small.cache.num_blocks
    with pytest.raises(RequestError, match="KV-cache tokens.*max_batch_tokens"):
        small.generate([[1] * 60], SamplingParams(max_new_tokens=10))


# ---- LLM ------------------------------------------------------------------------
def test_llm_token_ids_without_tokenizer(model_dir, gen):
    from ftmoe.llm import LLM

    llm = LLM(model_dir)
    want = gen.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))
    assert [o.output_ids for o in llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))] == \
        [o.output_ids for o in want]
    one = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=5))
    assert len(one) == 1 and one[0].output_ids == want[0].output_ids and one[0].text is None
    assert llm.generate(torch.tensor(PROMPTS[0]), SamplingParams(max_new_tokens=5))[0].output_ids == \
        want[0].output_ids
    chunks = list(llm.stream(PROMPTS[1], SamplingParams(max_new_tokens=5)))
    assert [c.token_id for c in chunks] == want[1].generated_ids and chunks[-1].finish_reason == "length"
    with pytest.raises(RequestError, match="no tokenizer"):
        llm.generate("hello")


@pytest.mark.skipif(importlib.util.find_spec("ftmoe.tokenizer") is None, reason="ftmoe/tokenizer.py not written yet")
def test_llm_text_prompts_stop_strings_and_streaming(model_dir, tmp_path):
    from ftmoe.demo_tokenizer import build_gpt2_bpe_tokenizer
    from ftmoe.llm import LLM

    build_gpt2_bpe_tokenizer(str(tmp_path))          # byte-level: multi-byte characters span tokens
    llm = LLM(model_dir, tokenizer_dir=str(tmp_path))
    tok = llm.tokenizer
    p = SamplingParams(max_new_tokens=24, temperature=1.5, top_k=300, seed=4)
    out = llm.generate(["今天天气很好", "hello"], p)
    assert out[0].output_ids[:out[0].prompt_length] == tok.encode("今天天气很好")
    assert out[0].text == tok.decode(out[0].generated_ids, skip_special_tokens=True)
    chunks = list(llm.stream("今天天气很好", p))
    assert [c.token_id for c in chunks] == out[0].generated_ids
    assert "".join(c.text_delta for c in chunks) == out[0].text
    assert not any(c.text_delta.endswith("\ufffd") for c in chunks[:-1])
    # a string stop word is tokenized and stops generation where its id first appears
    prompt, g = out[1].output_ids[:out[1].prompt_length], out[1].generated_ids
    k = next(i for i, t in enumerate(g) if t not in prompt + g[:i] and tok.decode([t])
             and tok.encode(tok.decode([t])) == [t])
    stopped = llm.generate("hello", dataclasses.replace(p, stop_words=[tok.decode([g[k]])]))[0]
    assert stopped.generated_ids == g[:k + 1] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(g[:k + 1])


# ---- greedy chunks (several steps per host visit) ------------------------------------
def test_greedy_chunks_generate_what_single_steps_do(model, gen):
    """Generation through greedy chunks (4 steps per host visit) equals single steps: tokens, log
    probs, finish reasons, for requests ending inside a chunk (stop word, end id after
    min_length, max_new_tokens not a multiple of 4); a batch with a sampled request steps one by
    one; every cache block is free afterwards."""
    chunked = Generator(StepwiseChunks(model))
    chunked.decode_chunk = 4
    base = greedy(gen, PROMPTS[0], n=20).generated_ids
    params = [SamplingParams(max_new_tokens=10, return_log_probs=True),
              SamplingParams(max_new_tokens=13, stop_words=[[base[6]]]),
              SamplingParams(max_new_tokens=20, end_id=base[2], min_length=1),
              SamplingParams(max_new_tokens=7)]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[3]]
    want = gen.generate(prompts, params)
    got = chunked.generate(prompts, params)
    for w, o in zip(want, got):
        assert o.output_ids == w.output_ids and o.finish_reason == w.finish_reason
    assert got[0].output_log_probs == pytest.approx(want[0].output_log_probs, abs=1e-5)
    assert chunked.model.chunks and all(s <= 4 for _, s in chunked.model.chunks)
    assert chunked.cache.num_free_blocks == chunked.cache.num_blocks
    chunked.model.chunks.clear()
    mixed = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, top_k=5, seed=3)]
    assert [o.output_ids for o in chunked.generate(prompts[:2], mixed)] == \
        [o.output_ids for o in gen.generate(prompts[:2], mixed)]
    assert not chunked.model.chunks                      # a sampled request: single steps only


def test_decode_chunk_setting_is_checked(model, monkeypatch):
    from ftmoe.errors import FtmoeError

    monkeypatch.setenv("FTMOE_DECODE_CHUNK", "40")
    with pytest.raises(FtmoeError, match="FTMOE_DECODE_CHUNK: expected a number of steps 1..32, found '40'"):
        Generator(model)
    monkeypatch.setenv("FTMOE_DECODE_CHUNK", "1")
    assert Generator(model).decode_chunk == 1
