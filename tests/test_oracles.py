"""Self-checks of the two independent test oracles in tests/oracles/.

In:  small random checkpoints from `ftmoe.synthetic` (the only ftmoe import allowed here).
Out: pytest results. Checks that can fail: the Megatron reference is invariant to training
     TP, file layout and key names; its MoE really routes; capacity mode drops late tokens;
     the FT-converter oracle's files have SPEC section 3's names and shapes, its TP shards
     concatenate back to the TP=1 files, and a numpy forward pass over those files (written
     here from SPEC section 3/4, using FT's layout) reproduces the reference's logits.
"""
from __future__ import annotations

import configparser
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ftmoe.synthetic import PRESETS, SyntheticSpec, save_megatron_checkpoint  # noqa: E402
from oracles._load import placeholder_class, torch_load  # noqa: E402
from oracles.ft_converter_oracle import expected_files, ft_convert, read_bin  # noqa: E402
from oracles.megatron_reference import MegatronReference  # noqa: E402

SPEC = PRESETS["tiny"]
SPEC_TOP2 = SyntheticSpec(topk=2)


def _ids(B=2, T=16, seed=1, V=SPEC.vocab_size):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    made = {}

    def get(name, spec=SPEC, **kw):
        if name not in made:
            made[name] = save_megatron_checkpoint(str(root / name), spec, seed=3, **kw)
        return made[name]
    return get


# ----------------------------------------------------------------------------- loading

def test_placeholder_unpickler_loads_foreign_enum(ckpts):
    d = ckpts("base")
    path = os.path.join(d, "mp_rank_00_model_states.pt")
    with pytest.raises(Exception):  # plain torch.load cannot import megatron.model.enums
        torch.load(path, map_location="cpu", weights_only=False)
    state = torch_load(path)
    assert str(state["args"].model_type) == "ModelType.encoder_or_decoder"
    assert f"{state['args'].model_type}" == "ModelType.encoder_or_decoder"
    assert state["args"].params_dtype is torch.float16
    mt = placeholder_class("megatron.core.enums", "ModelType")
    assert str(mt(2)) == "ModelType.encoder_and_decoder" and str(mt(9)) == "ModelType.value_9"
    assert str(placeholder_class("no.such.module", "Thing")(1, "a")) == "Thing(1, 'a')"


# ----------------------------------------------------------------------------- reference

def test_reference_invariant_to_training_tp(ckpts):
    ids = _ids()
    base = MegatronReference(ckpts("base")).logits(ids)
    for tp in (2, 4):
        other = MegatronReference(ckpts(f"tp{tp}", train_tp=tp)).logits(ids)
        assert torch.equal(base, other), tp


@pytest.mark.parametrize("layout,enc,attn", [("megatron", "encoder", "self_attention"),
                                             ("deepspeed", "transformer", "attention"),
                                             ("megatron", "transformer", "attention")])
def test_reference_invariant_to_layout(ckpts, layout, enc, attn):
    ids = _ids()
    base = MegatronReference(ckpts("base")).logits(ids)
    other = MegatronReference(ckpts(f"{layout}-{enc}-{attn}", layout=layout, encoder_key=enc,
                                    attention_name=attn)).logits(ids)
    assert torch.equal(base, other)


def test_reference_rows_independent_and_right_padding(ckpts):
    ref = MegatronReference(ckpts("base"))
    ids = _ids(B=3, T=12)
    batch = ref.logits(ids)
    for b in range(3):
        assert torch.allclose(batch[b], ref.logits(ids[b:b + 1])[0], rtol=0, atol=1e-12)
    padded = ids.clone()
    padded[1, 7:] = 0  # right padding: real tokens' logits must not change
    assert torch.allclose(ref.logits(padded)[1, :7], batch[1, :7], rtol=0, atol=1e-12)


def test_reference_float32_close_to_float64(ckpts):
    ids = _ids()
    l64 = MegatronReference(ckpts("base")).logits(ids)
    l32 = MegatronReference(ckpts("base"), dtype=torch.float32).logits(ids)
    assert l32.dtype == torch.float32
    assert torch.allclose(l32.double(), l64, atol=2e-3, rtol=1e-4)


def _rewrite_expert(src_dir, dst_dir, n, e, scale):
    shutil.copytree(src_dir, dst_dir)
    name = f"layer_{n}_expert_{e}_mp_rank_00_model_states.pt"
    sd = torch.load(os.path.join(src_dir, name), map_location="cpu", weights_only=True)
    sd = {k: (v * scale if "dense_4h_to_h.weight" in k else v) for k, v in sd.items()}
    torch.save(sd, os.path.join(dst_dir, name))


def test_moe_routes_only_to_chosen_expert(ckpts, tmp_path):
    ids = _ids()
    B, T = ids.shape
    ref = MegatronReference(ckpts("base"))
    base = ref.logits(ids)
    last = ref.last_trace[-1]
    assert last["layer"] == SPEC.moe_layers[-1] == SPEC.num_layers - 1
    chosen = torch.tensor([c[0] for c in last["experts"]]).reshape(B, T)
    counts = torch.bincount(chosen.flatten(), minlength=SPEC.num_experts)
    assert (counts > 0).sum() >= 2, "routing collapsed onto one expert; the test would be weak"
    e = int(torch.argmax(counts))
    _rewrite_expert(ckpts("base"), str(tmp_path / "mod"), len(SPEC.moe_layers) - 1, e, 2.0)
    mod = MegatronReference(str(tmp_path / "mod")).logits(ids)
    changed = (mod != base).any(dim=-1)
    assert torch.equal(changed, chosen == e)

    # first MoE layer: tokens before a row's first token routed to e keep their logits (causal)
    first = ref.last_trace[0]
    chosen0 = torch.tensor([c[0] for c in first["experts"]]).reshape(B, T)
    e0 = int(chosen0[0, T // 2])
    _rewrite_expert(ckpts("base"), str(tmp_path / "mod0"), 0, e0, 2.0)
    mod0 = MegatronReference(str(tmp_path / "mod0")).logits(ids)
    for b in range(B):
        hits = (chosen0[b] == e0).nonzero().flatten()
        t0 = int(hits[0]) if len(hits) else T
        assert torch.equal(mod0[b, :t0], base[b, :t0])
        if t0 < T:
            assert not torch.equal(mod0[b, t0], base[b, t0])


def test_expert_b2_switch(ckpts):
    ids = _ids()
    ref = MegatronReference(ckpts("base"))
    assert not torch.equal(ref.logits(ids), ref.logits(ids, add_expert_b2=False))
    z = MegatronReference(ckpts("zero-b2", zero_expert_b2=True))
    assert torch.equal(z.logits(ids), z.logits(ids, add_expert_b2=False))


def test_capacity_large_equals_dropless(ckpts):
    ids = _ids()
    ref = MegatronReference(ckpts("base"))
    assert torch.equal(ref.logits(ids), ref.logits(ids, capacity_factor=100.0, min_capacity=0))


def test_capacity_formula(ckpts):
    ids = _ids(B=2, T=16)  # 32 tokens, 8 experts
    ref = MegatronReference(ckpts("base"))
    for cf, m, want in [(1.0, 0, 4), (1.0, 6, 6), (1.1, 0, 5), (0.01, 0, 1), (0.5, 1, 2)]:
        ref.logits(ids, capacity_factor=cf, min_capacity=m)
        assert all(tr["capacity"] == want for tr in ref.last_trace), (cf, m)


def test_tiny_capacity_drops_late_tokens(ckpts):
    ids = _ids()
    ref = MegatronReference(ckpts("base"))
    dropless = ref.logits(ids)
    capped = ref.logits(ids, capacity_factor=0.01, min_capacity=1)  # capacity 1 per expert
    dropped_any = False
    for tr in ref.last_trace:
        assert tr["capacity"] == 1
        seen = set()
        for i, (ex, kept) in enumerate(zip(tr["experts"], tr["kept"])):
            first_come = ex[0] not in seen
            seen.add(ex[0])
            assert kept[0] == first_come, (tr["layer"], i)
            if kept[0]:
                assert tr["moe_out"][i].abs().sum() > 0
            else:
                dropped_any = True
                assert torch.count_nonzero(tr["moe_out"][i]) == 0
    assert dropped_any
    assert torch.equal(capped[0, 0], dropless[0, 0])  # the very first token is never dropped
    assert not torch.equal(capped, dropless)


def test_capacity_top2_orders_first_choices_first(ckpts):
    ref = MegatronReference(ckpts("top2", SPEC_TOP2))
    ids = _ids()
    ref.logits(ids, capacity_factor=0.25, min_capacity=0)  # capacity ceil(4 * 0.5) = 2
    for tr in ref.last_trace:
        assert tr["capacity"] == 2
        firsts = {}
        for ex in tr["experts"]:
            firsts[ex[0]] = firsts.get(ex[0], 0) + 1
        used = {}
        for ex, kept in zip(tr["experts"], tr["kept"]):
            used[ex[0]] = used.get(ex[0], 0) + 1
            assert kept[0] == (used[ex[0]] <= 2)
        second_used = {}
        for ex, kept in zip(tr["experts"], tr["kept"]):
            e = ex[1]
            second_used[e] = second_used.get(e, 0) + 1
            assert kept[1] == (firsts.get(e, 0) + second_used[e] <= 2)


# ----------------------------------------------------------------------------- FT oracle

def _spec_table(spec, tp):
    return expected_files(num_layers=spec.num_layers, hidden=spec.hidden_size, ffn=spec.ffn_hidden_size,
                          vocab=spec.vocab_size, positions=spec.max_position_embeddings,
                          num_experts=spec.num_experts, moe_layers=spec.moe_layers, tp=tp)


def _files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("dt,itemsize", [("fp16", 2), ("fp32", 4)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ft_files_match_spec_table(ckpts, tmp_path, tp, dt, itemsize):
    out = ft_convert(ckpts("base"), str(tmp_path), tp, dt)
    assert out == os.path.join(str(tmp_path), f"{tp}-gpu")
    table = _spec_table(SPEC, tp)
    got = set(os.listdir(out)) - {"config.ini", "args.txt"}
    assert got == set(table), (sorted(got - set(table)), sorted(set(table) - got))
    for name, shape in table.items():
        assert os.path.getsize(os.path.join(out, name)) == math.prod(shape) * itemsize, name


def _split_axis(shape1, shape_t):
    diff = [i for i, (a, b) in enumerate(zip(shape1, shape_t)) if a != b]
    assert len(diff) <= 1
    return diff[0] if diff else None


@pytest.mark.parametrize("tp", [2, 4])
def test_ft_shards_concat_to_tp1(ckpts, tmp_path, tp):
    one = ft_convert(ckpts("base"), str(tmp_path / "a"), 1)
    many = ft_convert(ckpts("base"), str(tmp_path / "b"), tp)
    t1, tt = _spec_table(SPEC, 1), _spec_table(SPEC, tp)
    for name, shape in t1.items():
        if name.endswith(".0.bin"):
            stem = name[:-len("0.bin")]
            axis = _split_axis(shape, tt[stem + "0.bin"])
            parts = [read_bin(os.path.join(many, f"{stem}{r}.bin"), tt[f"{stem}{r}.bin"]) for r in range(tp)]
            assert np.array_equal(np.concatenate(parts, axis=axis), read_bin(os.path.join(one, name), shape)), name
        else:
            assert open(os.path.join(one, name), "rb").read() == open(os.path.join(many, name), "rb").read(), name


@pytest.mark.parametrize("train_tp", [2, 4])
@pytest.mark.parametrize("infer_tp", [1, 2, 4])
def test_ft_invariant_to_training_tp(ckpts, tmp_path, train_tp, infer_tp):
    # infer < train: FT's concat mode; infer >= train: split mode
    a = _files(ft_convert(ckpts("base"), str(tmp_path / "a"), infer_tp))
    b = _files(ft_convert(ckpts(f"tp{train_tp}", train_tp=train_tp), str(tmp_path / "b"), infer_tp))
    a.pop("args.txt"), b.pop("args.txt")  # tensor_model_parallel_size differs there
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_ft_invariant_to_layout(ckpts, tmp_path):
    a = _files(ft_convert(ckpts("base"), str(tmp_path / "a"), 2))
    b = _files(ft_convert(ckpts("megatron-transformer-attention", layout="megatron", encoder_key="transformer",
                                attention_name="attention"), str(tmp_path / "b"), 2))
    assert a == b


def test_ft_qkv_layout_against_megatron_rows(ckpts, tmp_path):
    out = ft_convert(ckpts("base"), str(tmp_path), 2, "fp32")
    enc = torch_load(os.path.join(ckpts("base"), "mp_rank_00_model_states.pt"))["module"]["language_model"]["encoder"]
    H, nh = SPEC.hidden_size, SPEC.num_attention_heads
    D = H // nh
    W = enc["layers.2.self_attention.query_key_value.weight"].float().numpy()  # [3H, H]
    bias = enc["layers.2.self_attention.query_key_value.bias"].float().numpy()
    for r in range(2):
        w_r = read_bin(os.path.join(out, f"model.layers.2.attention.query_key_value.weight.{r}.bin"),
                       (H, 3, H // 2), "fp32")
        b_r = read_bin(os.path.join(out, f"model.layers.2.attention.query_key_value.bias.{r}.bin"),
                       (3, H // 2), "fp32")
        for hl in range(nh // 2):
            h = r * nh // 2 + hl
            for j in range(3):  # q, k, v
                rows = slice(h * 3 * D + j * D, h * 3 * D + (j + 1) * D)
                assert np.array_equal(w_r[:, j, hl * D:(hl + 1) * D], W[rows].T)
                assert np.array_equal(b_r[j, hl * D:(hl + 1) * D], bias[rows])


def test_ft_dtypes(ckpts, tmp_path):
    d = ckpts("base")
    enc = torch_load(os.path.join(d, "mp_rank_00_model_states.pt"))["module"]["language_model"]["encoder"]
    gate = enc["layers.1.mlp.deepspeed_moe.gate.wg.weight"]
    assert gate.dtype == torch.float32
    for dt, tdt in [("fp16", torch.float16), ("fp32", torch.float32)]:
        out = ft_convert(d, str(tmp_path / dt), 1, dt)
        got = read_bin(os.path.join(out, "model.layers.1.mlp.moe.gate.wg.weight.bin"), (SPEC.hidden_size, -1), dt)
        assert np.array_equal(got, gate.to(tdt).T.numpy())
    # bf16 checkpoint: FT's torch2np goes through float32, so fp32 output is exact
    bd = ckpts("bf16", dtype=torch.bfloat16, gate_dtype=torch.bfloat16)
    out = ft_convert(bd, str(tmp_path / "bf"), 1, "fp32")
    wte = torch_load(os.path.join(bd, "mp_rank_00_model_states.pt"))["module"]["language_model"]["embedding"][
        "word_embeddings"]["weight"]
    assert np.array_equal(read_bin(os.path.join(out, "model.wte.bin"), tuple(wte.shape), "fp32"), wte.float().numpy())
    with pytest.raises(ValueError):
        ft_convert(d, str(tmp_path / "x"), 1, "bf16")


CONFIG_TP2 = """[gpt]
model_name = gpt
head_num = 8
size_per_head = 8
inter_size = 128
num_layer = 4
max_pos_seq_len = 128
vocab_size = 512
has_adapters = False
adapter_inter_size = 0
layernorm_eps = 1e-05
start_id = {sid}
end_id = {sid}
weight_data_type = fp16
tensor_para_size = 2

[structure]
gpt_with_moe = 1
expert_num = 8
moe_layers = [1, 3]

"""


def test_ft_config_and_args(ckpts, tmp_path):
    d = ckpts("base")
    out = ft_convert(d, str(tmp_path / "a"), 2)
    assert open(os.path.join(out, "config.ini")).read() == CONFIG_TP2.format(sid=50256)
    args = torch_load(os.path.join(d, "mp_rank_00_model_states.pt"))["args"]
    lines = open(os.path.join(out, "args.txt")).read().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == list(vars(args))
    assert "model_type:ModelType.encoder_or_decoder" in lines
    assert "params_dtype:torch.float16" in lines and "num_experts:[8]" in lines
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<pad>": 0, "<|endoftext|>": 7}))
    out = ft_convert(d, str(tmp_path / "b"), 2, vocab_json=str(vocab))
    assert open(os.path.join(out, "config.ini")).read() == CONFIG_TP2.format(sid=7)
    assert json.load(open(os.path.join(out, "vocab.json")))["<|endoftext|>"] == 7
    cp = configparser.ConfigParser()
    cp.read(os.path.join(out, "config.ini"))
    assert cp["structure"]["moe_layers"] == "[1, 3]"


def test_ft_unknown_key_raises(ckpts, tmp_path):
    d = str(tmp_path / "odd")
    shutil.copytree(ckpts("base"), d)
    path = os.path.join(d, "mp_rank_00_model_states.pt")
    state = torch_load(path)
    state["args"].model_type = "plain"  # the placeholder enum cannot be pickled again
    state["module"]["language_model"]["encoder"]["layers.0.mystery.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(KeyError):
        ft_convert(d, str(tmp_path / "out"), 1)


# ------------------------------------------------- cross-check: FT-layout forward == reference

def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def _ln(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def ft_forward(d, ids, topk=1):
    """numpy float64 forward over an FT c-model folder (all TP ranks, summed like an all-reduce)."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(d, "config.ini"))
    g, s = cfg["gpt"], cfg["structure"]
    nh, D, F, nl = int(g["head_num"]), int(g["size_per_head"]), int(g["inter_size"]), int(g["num_layer"])
    V, P, t, dt = int(g["vocab_size"]), int(g["max_pos_seq_len"]), int(g["tensor_para_size"]), g["weight_data_type"]
    eps, E, moe = float(g["layernorm_eps"]), int(s["expert_num"]), json.loads(s["moe_layers"])
    H = nh * D

    def rd(name, *shape):
        return read_bin(os.path.join(d, name), shape, dt).astype(np.float64)

    wte, wpe = rd("model.wte.bin", V, H), rd("model.wpe.bin", P, H)
    B, T = ids.shape
    x = wte[ids] + wpe[:T]
    causal = np.tril(np.ones((T, T), bool))
    for n in range(nl):
        p = f"model.layers.{n}."
        a = _ln(x, rd(p + "input_layernorm.weight.bin", H), rd(p + "input_layernorm.bias.bin", H), eps)
        acc = np.zeros_like(x)
        for r in range(t):
            w = rd(p + f"attention.query_key_value.weight.{r}.bin", H, 3, H // t)
            bq = rd(p + f"attention.query_key_value.bias.{r}.bin", 3, H // t)
            qkv = np.einsum("bsh,hjk->bsjk", a, w) + bq  # [B, T, 3, H/t]
            q, k, v = (qkv[:, :, j].reshape(B, T, nh // t, D) for j in range(3))
            sc = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
            sc = np.where(causal, sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            ctx = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(B, T, H // t)
            acc += ctx @ rd(p + f"attention.dense.weight.{r}.bin", H // t, H)
        x = x + acc + rd(p + "attention.dense.bias.bin", H)
        u = _ln(x, rd(p + "post_attention_layernorm.weight.bin", H), rd(p + "post_attention_layernorm.bias.bin", H),
                eps)
        acc = np.zeros_like(x)
        if n in moe:
            logits = u @ rd(p + "mlp.moe.gate.wg.weight.bin", H, E)
            prob = np.exp(logits - logits.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            order = np.argsort(-prob, axis=-1, kind="stable")[..., :topk]  # ties -> lower id
            b2 = rd(p + "mlp.moe.experts.dense_4h_to_h.bias.bin", E, H)
            for r in range(t):
                w1 = rd(p + f"mlp.moe.experts.dense_h_to_4h.weight.{r}.bin", E, H, F // t)
                b1 = rd(p + f"mlp.moe.experts.dense_h_to_4h.bias.{r}.bin", E, F // t)
                w2 = rd(p + f"mlp.moe.experts.dense_4h_to_h.weight.{r}.bin", E, F // t, H)
                for kk in range(topk):
                    e = order[..., kk]
                    pe = np.take_along_axis(prob, e[..., None], -1)
                    hmid = _gelu(np.einsum("bsh,bshf->bsf", u, w1[e]) + b1[e])
                    acc += pe * np.einsum("bsf,bsfh->bsh", hmid, w2[e])
            for kk in range(topk):
                e = order[..., kk]
                acc += np.take_along_axis(prob, e[..., None], -1) * b2[e]
        else:
            for r in range(t):
                hmid = _gelu(u @ rd(p + f"mlp.dense_h_to_4h.weight.{r}.bin", H, F // t)
                             + rd(p + f"mlp.dense_h_to_4h.bias.{r}.bin", F // t))
                acc += hmid @ rd(p + f"mlp.dense_4h_to_h.weight.{r}.bin", F // t, H)
            acc += rd(p + "mlp.dense_4h_to_h.bias.bin", H)
        x = x + acc
    h = _ln(x, rd("model.final_layernorm.weight.bin", H), rd("model.final_layernorm.bias.bin", H), eps)
    return h @ wte.T


@pytest.mark.parametrize("name,spec,tp", [("base", SPEC, 1), ("base", SPEC, 2), ("top2", SPEC_TOP2, 1),
                                          ("top2", SPEC_TOP2, 4)])
def test_ft_layout_forward_matches_reference(ckpts, tmp_path, name, spec, tp):
    d = ckpts(name, spec)
    ids = _ids()
    ref = MegatronReference(d).logits(ids).numpy()
    out = ft_convert(d, str(tmp_path), tp, "fp32")  # fp32 files hold the fp16 weights exactly
    got = ft_forward(out, ids.numpy(), topk=spec.topk)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
