"""Tests for ftmoe.sampling: parameter validation and the pure logits pipeline.

In:  hand-made logits and a tiny random model's real logits.
Out: checks that each option does what FasterTransformer does (and fails if it is ignored):
     penalties against hand computations, greedy/top-k/top-p/temperature against exact
     distributions (empirical frequencies of seeded draws), log probs before truncation.
"""
from __future__ import annotations

import math

import pytest
import torch

from ftmoe.errors import RequestError
from ftmoe.sampling import (SamplingParams, apply_penalties, banned_tokens, ends_with_word, nucleus_probs,
                            process_logits, sample)



@pytest.fixture(scope="module")
def model_logits(tmp_path_factory) -> torch.Tensor:
    """Next-token logits [V] of the tiny synthetic model after a fixed prompt."""
    from ftmoe.convert import convert
    from ftmoe.loader import load_model
    from ftmoe.synthetic import save_megatron_checkpoint

    d = tmp_path_factory.mktemp("sampling_model")
    ck = save_megatron_checkpoint(str(d / "ck"), dtype=torch.float32)
    model = load_model(convert(ck, str(d / "out"), tp=1, dtype="fp32", progress=False))
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 17, 300, 5]]))[0, -1]


def freqs(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    g = params.make_generator() if params.seed is not None else torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel(), dtype=torch.float64)
    for _ in range(n):
        tok, _ = sample(logits, params, g)
        counts[tok] += 1
    return counts / n


# ---- validation -------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", 0.0), ("temperature", float("nan")), ("top_k", -1),
    ("top_p", 1.5), ("top_p", -0.1), ("repetition_penalty", 0.0), ("presence_penalty", float("inf")),
    ("min_length", -1), ("end_id", -3), ("seed", -1), ("beam_width", 0), ("len_penalty", float("nan")),
    ("return_log_probs", 1), ("ignore_eos", "yes"), ("stop_words", "abc"), ("max_new_tokens", 2.5),
])
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert f"'{field}'" in str(e.value)
    assert f"found {value!r}" in str(e.value)


@pytest.mark.parametrize("field,value", [("stop_words", [[3], []]), ("bad_words", [[1, "a"]]),
                                         ("bad_words", [[-2]])])
def test_bad_word_entries_are_named(field, value):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert f"'{field}' has bad entry {value[-1]!r}" in str(e.value)


@pytest.mark.parametrize("field,value", [("top_k", 513), ("end_id", 512), ("beam_width", 600),
                                         ("stop_words", [[3, 512]]), ("bad_words", [[512]])])
def test_validate_against_vocab(field, value):
    p = SamplingParams(**{field: value})               # fine without a vocabulary
    with pytest.raises(RequestError, match=field):
        p.validate(512)


def test_repetition_and_presence_are_exclusive():
    with pytest.raises(RequestError, match="repetition_penalty.*presence_penalty.*mutually exclusive"):
        SamplingParams(repetition_penalty=1.2, presence_penalty=0.5)
    SamplingParams(repetition_penalty=1.2)
    SamplingParams(presence_penalty=0.5)


def test_greedy_rule():
    assert SamplingParams().greedy                      # top_k = top_p = 0
    assert SamplingParams(top_k=1, top_p=0.9).greedy
    assert not SamplingParams(top_p=0.5).greedy
    assert not SamplingParams(top_k=4).greedy


def test_string_words_need_a_tokenizer():
    p = SamplingParams(stop_words=["end"])
    with pytest.raises(RequestError, match="stop_words.*tokenizer"):
        p.word_ids("stop_words")


# ---- penalties ----------------------------------------------------------------------
def test_repetition_penalty_matches_hand_computation(model_logits):
    history = [5, 17, 42, 17, 300, 5]
    out = apply_penalties(model_logits, history, SamplingParams(repetition_penalty=1.7))
    want = model_logits.clone()
    for t in set(history):                                # once per distinct token
        x = float(model_logits[t])
        want[t] = x / 1.7 if x > 0 else x * 1.7
    assert torch.allclose(out, want, rtol=1e-6, atol=0)
    assert not torch.equal(out, model_logits)
    signs = {t: float(model_logits[t]) > 0 for t in set(history)}
    assert len(set(signs.values())) == 2, "want both positive and negative logits among the penalised tokens"
    assert torch.equal(model_logits, model_logits.clone())  # input untouched (pure)


def test_presence_penalty_matches_hand_computation(model_logits):
    history = [5, 17, 42, 17, 300, 5]
    before = model_logits.clone()
    out = apply_penalties(model_logits, history, SamplingParams(presence_penalty=0.8))
    want = model_logits.clone()
    for t in set(history):
        want[t] -= 0.8
    assert torch.allclose(out, want, atol=0, rtol=0)
    assert torch.equal(model_logits, before)


def test_temperature_divides_before_the_penalty(model_logits):
    out = apply_penalties(model_logits, [7], SamplingParams(temperature=0.5, presence_penalty=1.0))
    want = model_logits / 0.5
    want[7] -= 1.0
    assert torch.allclose(out, want)


def test_min_length_and_bad_words_in_process_logits(model_logits):
    p = SamplingParams(min_length=3, bad_words=[[9], [1, 2]])
    out = process_logits(model_logits, [4, 1], 2, p, end_id=11)
    assert out[11] == -math.inf and out[9] == -math.inf and out[2] == -math.inf
    assert torch.equal(out[20:], model_logits[20:])
    out = process_logits(model_logits, [4, 1, 8], 3, p, end_id=11)   # min_length reached; prefix [1] gone
    assert out[11] == model_logits[11] and out[2] == model_logits[2] and out[9] == -math.inf


def test_word_matching_helpers():
    assert banned_tokens([1, 2, 3], [[7], [3, 9], [2, 9], [1, 2, 3, 4]]) == [7, 9, 4]
    assert ends_with_word([1, 2, 3], [[2, 3]]) and ends_with_word([3], [[3]])
    assert not ends_with_word([1, 2, 3], [[1, 2]]) and not ends_with_word([3], [[2, 3]])


# ---- sampling -----------------------------------------------------------------------
def test_greedy_is_argmax_with_full_log_softmax(model_logits):
    tok, lp = sample(model_logits, SamplingParams(), None)
    assert tok == int(model_logits.argmax())
    assert lp == pytest.approx(float(torch.log_softmax(model_logits, -1)[tok]), abs=1e-6)
    tok1, _ = sample(model_logits, SamplingParams(top_k=1, top_p=0.3, temperature=5.0), torch.Generator())
    assert tok1 == tok


def test_top_k_samples_only_the_top_k_with_renormalised_probs(model_logits):
    p = SamplingParams(top_k=5, temperature=2.0, seed=1)
    logits = apply_penalties(model_logits, [], p)
    f = freqs(logits, p, 3000)
    top = torch.topk(logits, 5).indices
    assert f[top].sum() == 1.0                           # never outside the top 5
    want = torch.softmax(logits[top].double(), -1)
    assert torch.allclose(f[top], want, atol=0.04)
    assert (f[top] > 0).all()                            # and really samples, not argmax
    assert torch.allclose(nucleus_probs(logits, p)[top], want)


def test_top_p_keeps_the_smallest_nucleus_ft_style():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).clamp(min=1e-30).log()
    p = SamplingParams(top_p=0.7, seed=3)
    f = freqs(logits, p, 4000)
    # nucleus {0, 1} (0.5 < 0.7 <= 0.8); FT draws u ~ U(0, 0.7): token 1 keeps 0.2 of its 0.3
    assert f[2:].sum() == 0
    assert f[0] == pytest.approx(0.5 / 0.7, abs=0.03) and f[1] == pytest.approx(0.2 / 0.7, abs=0.03)
    assert torch.allclose(nucleus_probs(logits, p), torch.tensor([5 / 7, 2 / 7, 0, 0, 0], dtype=torch.float64))


def test_top_k_then_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    p = SamplingParams(top_k=3, top_p=0.5, seed=4)
    # top-3 renormalised: 4/9, 3/9, 2/9; nucleus at 0.5 -> {0, 1}, token 1 gets 0.5 - 4/9
    want = torch.tensor([4 / 9, 0.5 - 4 / 9, 0, 0], dtype=torch.float64) / 0.5
    assert torch.allclose(nucleus_probs(logits, p), want)
    f = freqs(logits, p, 4000)
    assert f[2:].sum() == 0 and f[1] == pytest.approx(float(want[1]), abs=0.025)


def test_temperature_changes_the_distribution_as_logits_over_t(model_logits):
    logits = model_logits[:8]
    for t in (0.5, 2.0):
        p = SamplingParams(temperature=t, top_p=1.0, seed=5)
        proc = process_logits(logits, [], 0, p, end_id=None)
        want = torch.softmax(logits.double() / t, -1)
        assert torch.allclose(nucleus_probs(proc, p), want, atol=1e-6)
        f = freqs(proc, p, 3000)
        assert torch.allclose(f, want, atol=0.035)
        tok, lp = sample(proc, p, p.make_generator())
        assert lp == pytest.approx(float(torch.log_softmax(logits / t, -1)[tok]), abs=1e-5)


def test_log_prob_is_before_truncation(model_logits):
    p = SamplingParams(top_k=2, seed=0)
    full = torch.log_softmax(model_logits, -1)
    for _ in range(20):
        g = p.make_generator()
        tok, lp = sample(model_logits, p, g)
        assert lp == pytest.approx(float(full[tok]), abs=1e-6)


def test_banned_tokens_are_never_sampled(model_logits):
    top = torch.topk(model_logits, 3).indices.tolist()
    p = SamplingParams(bad_words=[[t] for t in top], temperature=1.5, top_p=1.0, seed=2)
    proc = process_logits(model_logits, [], 0, p, end_id=None)
    f = freqs(proc, p, 1000)
    assert f[top].sum() == 0 and (f > 0).sum() > 3


def test_seeded_generators_reproduce_and_differ(model_logits):
    p = SamplingParams(temperature=2.0, top_p=1.0, seed=123)

    def draw(params):
        g = params.make_generator()
        return [sample(model_logits, params, g)[0] for _ in range(30)]

    assert draw(p) == draw(p)
    other = SamplingParams(temperature=2.0, top_p=1.0, seed=124)
    assert draw(p) != draw(other)
    unseeded = SamplingParams(temperature=2.0, top_p=1.0)
    assert draw(unseeded) != draw(unseeded)              # None: a fresh random seed each time


def test_to_device_keeps_values_and_dtype():
    """`sampling.to_device` (the small host lists of a sampling step, copied without a stream sync)
    gives the list's values in the asked dtype on the asked device."""
    from ftmoe.sampling import to_device

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = to_device([3, 1, 2], torch.long, dev)
    assert got.dtype == torch.long and got.device.type == dev and got.tolist() == [3, 1, 2]
    p = to_device([0.95, 1.0], torch.float64, dev)
    assert p.dtype == torch.float64 and p.cpu().tolist() == [0.95, 1.0]
    if dev == "cuda":           # the copy is ordered on the stream: a kernel right after it reads it
        assert (to_device(list(range(4096)), torch.long, dev) * 2).sum().item() == 4095 * 4096
