"""The model equals an independent implementation that reads the original checkpoint.

`tests/oracles/megatron_reference.py` computes SPEC section 4 in float64 straight from the
Megatron-DeepSpeed files (no converter, no loader); ftmoe converts, loads the FT folder and
must agree to a relative error under 1e-5 in fp32, from any TP folder.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from ftmoe.convert import convert
from ftmoe.kv_cache import KVCache
from ftmoe.layers.mlp import MoEOptions, capacity_keep, route
from ftmoe.loader import load_model
from ftmoe.synthetic import PRESETS, SyntheticSpec, save_megatron_checkpoint
from tests.oracles.megatron_reference import MegatronReference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _ids(B: int, T: int, V: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ref_ckpts")
    f32 = dict(dtype=torch.float32)
    return {
        "base": save_megatron_checkpoint(str(root / "base"), PRESETS["tiny"], seed=21, **f32),
        "train_tp2_rng": save_megatron_checkpoint(str(root / "tp2"), PRESETS["tiny"], seed=22, train_tp=2,
                                                  layout="megatron", encoder_key="transformer", **f32),
        "top2_every_layer": save_megatron_checkpoint(
            str(root / "top2"), SyntheticSpec(num_layers=3, expert_interval=1, topk=2, num_experts=4), seed=23, **f32),
        "dense": save_megatron_checkpoint(str(root / "dense"), SyntheticSpec(num_layers=2, num_experts=0), seed=24,
                                          **f32),
    }


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("variant", ["base", "train_tp2_rng", "top2_every_layer", "dense"])
def test_logits_match_reference(variants, tmp_path, variant, tp):
    ckpt = variants[variant]
    model = load_model(convert(ckpt, str(tmp_path), tp=tp, dtype="fp32", progress=False))
    ids = _ids(3, 17, model.config.vocab_size, seed=tp)
    want = MegatronReference(ckpt, torch.float64).logits(ids)
    got = model(ids)
    assert got.shape == (3, 17, model.config.vocab_size)
    assert rel_err(got, want) < 1e-5


def test_reference_check_can_fail(variants, tmp_path):
    """Sanity: a model that ignores the expert b2 (DeepSpeed's behaviour) is caught."""
    ckpt = variants["base"]
    model = load_model(convert(ckpt, str(tmp_path), tp=1, dtype="fp32", progress=False))
    for layer in model.blocks():
        if layer.is_moe:
            layer.mlp.moe.experts.dense_4h_to_h.bias.data.zero_()
    ids = _ids(2, 9, 512, seed=0)
    assert rel_err(model(ids), MegatronReference(ckpt, torch.float64).logits(ids)) > 1e-3


@pytest.mark.parametrize("cf,min_cap", [(0.5, 1), (1.0, 4), (2.0, 0)])
def test_capacity_mode_matches_deepspeed_reference(variants, tmp_path, cf, min_cap):
    ckpt = variants["base"]
    d = convert(ckpt, str(tmp_path), tp=1, dtype="fp32", progress=False)
    model = load_model(d, moe_options=MoEOptions(top_k=1, capacity_factor=cf, min_capacity=min_cap))
    ids = _ids(2, 24, 512, seed=3)
    ref = MegatronReference(ckpt, torch.float64)
    want = ref.logits(ids, capacity_factor=cf, min_capacity=min_cap)
    assert rel_err(model(ids), want) < 1e-5
    if cf < 1:  # something was dropped, so dropless differs
        assert rel_err(load_model(d)(ids), want) > 1e-4


def test_route_ties_go_to_lower_id_and_probs_are_raw():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 5.0, 5.0]])
    p, ids = route(logits, 1)
    assert ids[:, 0].tolist() == [1, 0, 2]
    assert torch.allclose(p[:, 0], torch.softmax(logits, -1).gather(1, ids)[:, 0])
    p2, ids2 = route(logits, 2)
    assert ids2.tolist() == [[1, 2], [0, 1], [2, 3]]
    assert torch.allclose(p2, torch.softmax(logits, -1).gather(1, ids2))  # no renormalisation


def test_capacity_keep_is_first_come_slot_major():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_keep(ids, 3, capacity=2)
    # expert 0: tokens 0,1 (first choices) kept, token 2 dropped, token 3's second choice dropped
    # expert 1: token 3 (first choice) then token 0 (second choice) kept, token 2 second choice dropped
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_incremental_decoding_equals_full_forward(tiny_model_dir, block_size):
    model = load_model(tiny_model_dir)
    V = model.config.vocab_size
    seqs = [_ids(1, n, V, seed=n)[0] for n in (13, 5, 9)]
    full = [model(s[None])[0] for s in seqs]
    cache = KVCache.for_model(model.config, 64, block_size=block_size)
    for i in range(3):
        cache.add(i)
    # ragged prefill of the first 4, 2 and 6 tokens in one right-padded call
    start = [4, 2, 6]
    batch = torch.zeros(3, max(start), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, :start[i]] = s[:start[i]]
    out = model(batch, cache.prepare([0, 1, 2], start), cache)
    for i in range(3):
        assert rel_err(out[i, :start[i]], full[i][:start[i]]) < 1e-5
    # then one token at a time for the sequences that have tokens left
    pos = list(start)
    while any(p < len(s) for p, s in zip(pos, seqs)):
        live = [i for i in range(3) if pos[i] < len(seqs[i])]
        step = torch.stack([seqs[i][pos[i]:pos[i] + 1] for i in live])
        logits = model(step, cache.prepare(live, [1] * len(live)), cache, last_only=True)
        for row, i in enumerate(live):
            assert rel_err(logits[row], full[i][pos[i]]) < 1e-5
            pos[i] += 1
    for i in range(3):
        assert cache.length(i) == len(seqs[i])
        cache.free(i)
    assert cache.num_free_blocks == cache.num_blocks


def test_kv_cache_fork_and_reorder(tiny_model_dir):
    model = load_model(tiny_model_dir)
    s = _ids(1, 8, 512, seed=9)[0]
    cache = KVCache.for_model(model.config, 64, block_size=3)
    cache.add(0)
    model(s[None, :5], cache.prepare([0], [5]), cache)
    cache.fork(0, 1)
    cache.add(2)
    model(s[None, :2].flip(1), cache.prepare([2], [2]), cache)
    cache.reorder([0, 1, 2], [2, 0, 0])  # seq 0 becomes seq 2's content; 1 and 2 become seq 0's
    assert [cache.length(i) for i in range(3)] == [2, 5, 5]
    full = model(s[None, :6])[0, 5]
    for i in (1, 2):
        got = model(s[None, 5:6], cache.prepare([i], [1]), cache, last_only=True)[0]
        assert rel_err(got, full) < 1e-5


@pytest.mark.parametrize("tp,dtype", [(2, "fp32"), (4, "fp16")])
def test_loads_folders_made_by_ft_converter(variants, tmp_path, tp, dtype):
    """A folder written by (our re-implementation of) FT's own converter loads and runs."""
    from tests.oracles.ft_converter_oracle import ft_convert

    ckpt = variants["base"]
    model = load_model(ft_convert(ckpt, str(tmp_path), tp, dtype), dtype="float32")
    ids = _ids(2, 11, 512, seed=4)
    want = MegatronReference(ckpt, torch.float64).logits(ids)
    assert rel_err(model(ids), want) < (1e-5 if dtype == "fp32" else 5e-3)


def test_kv_cache_memory_budget():
    from ftmoe.config import ModelConfig

    cfg = ModelConfig(head_num=16, size_per_head=64, inter_size=4096, num_layer=24, max_pos_seq_len=2048,
                      vocab_size=51200, expert_num=64, moe_layers=tuple(range(1, 24, 2)))
    per_tok = KVCache.bytes_per_token(cfg, torch.bfloat16)
    assert per_tok == 2 * 24 * 1024 * 2                     # 96 KiB per token for the 0.35B model
    assert KVCache.bytes_per_token(cfg, torch.bfloat16, tp=4) == per_tok // 4
    n = KVCache.tokens_for_memory(cfg, 10 * 2**30, torch.bfloat16, block_size=16)
    assert n % 16 == 0 and n * per_tok <= 10 * 2**30 < (n + 16) * per_tok


def _prepare_ref(tables: dict, lens: dict, seq_ids, num_new, bs: int, pad_to=None):
    """The metadata of KVCache.prepare, row by row in plain Python (tables already reserved)."""
    T = max(max(num_new, default=0), pad_to or 0, 1)
    nb = max(1, max(len(tables[s]) for s in seq_ids))
    pos = [[lens[s] + t for t in range(T)] for s in seq_ids]
    slots = [[tables[s][p // bs] * bs + p % bs if t < n else -1 for t, p in enumerate(row)]
             for s, n, row in zip(seq_ids, num_new, pos)]
    return pos, slots, [tables[s] + [0] * (nb - len(tables[s])) for s in seq_ids]


def test_prepare_twin_under_random_operations(monkeypatch):
    """prepare's vectorised metadata equals a row-by-row reference through adds, multi-token and
    decode steps, truncations, forks and frees; a request that does not fit changes nothing. Small
    decode steps take the plain-Python path (`_prepare_decode`), checked against the same twin."""
    from ftmoe.kv_cache import CacheFullError

    fast = []
    real = KVCache._prepare_decode
    monkeypatch.setattr(KVCache, "_prepare_decode", lambda self, seqs: fast.append(len(seqs)) or real(self, seqs))
    rng = random.Random(5)
    bs = 4
    cache = KVCache(1, 1, 2, 40, bs, torch.float32, "cpu")
    live: list[int] = []
    for step in range(300):
        op = rng.random()
        if op < 0.15 and len(live) < 8:
            live.append(step)
            cache.add(step)
        elif op < 0.2 and live:
            cache.free(live.pop(rng.randrange(len(live))))
        elif op < 0.25 and live:
            s = rng.choice(live)
            cache.truncate(s, rng.randint(0, cache.length(s)))
        elif op < 0.3 and live and len(live) < 8:
            src = rng.choice(live)
            if len(cache.block_table(src)) <= cache.num_free_blocks:
                cache.fork(src, step)
                live.append(step)
        elif live:
            seqs = rng.sample(live, rng.randint(1, len(live)))
            new = [rng.choice([1, 1, 1, rng.randint(0, 9)]) for _ in seqs]
            pad = rng.choice([None, 12])
            before = ({s: cache.block_table(s) for s in live}, {s: cache.length(s) for s in live}, cache.num_free_blocks)
            try:
                meta = cache.prepare(seqs, new, pad_to=pad)
            except CacheFullError:
                assert ({s: cache.block_table(s) for s in live}, {s: cache.length(s) for s in live},
                        cache.num_free_blocks) == before
                continue
            tables = {s: cache.block_table(s) for s in seqs}
            pos, slots, tabs = _prepare_ref(tables, before[1], seqs, new, bs, pad)
            assert meta.positions.tolist() == pos and meta.slot_mapping.tolist() == slots
            assert meta.block_tables.tolist() == tabs
            assert meta.context_lens.tolist() == [before[1][s] for s in seqs] and meta.seq_lens.tolist() == new
            fields = [getattr(meta, f.name) for f in dataclasses.fields(meta)]
            assert all(f.dtype == torch.long for f in fields)
            assert len({f.untyped_storage().data_ptr() for f in fields}) == 1    # one copy to the device
            assert all(cache.length(s) == before[1][s] + n for s, n in zip(seqs, new))
            used = [b for s in live for b in cache.block_table(s)]
            assert len(set(used)) == len(used) and len(used) + cache.num_free_blocks == 40
            assert all(len(cache.block_table(s)) == cache.blocks_for(cache.length(s)) for s in seqs)
    assert len(fast) > 30 and max(fast) > 1                 # the decode path ran, for several rows too
