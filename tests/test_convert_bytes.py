"""Converter output is byte-identical to FasterTransformer's converter rules.

The oracle (`tests/oracles/ft_converter_oracle.py`) re-implements FT v5.3's
`megatron_gpt_moe_ckpt_convert.py` independently, in numpy; here every file ftmoe writes
is compared with it byte for byte, over TP sizes, dtypes and checkpoint variants.
"""
from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
import torch

from ftmoe.convert import convert
from ftmoe.synthetic import PRESETS, SyntheticSpec, save_megatron_checkpoint
from tests.oracles.ft_converter_oracle import ft_convert, read_bin

TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer.json"}


def assert_same_folder(ours: str, theirs: str, ignore: set[str] = TOKENIZER_FILES) -> None:
    a = set(os.listdir(ours)) - ignore
    b = set(os.listdir(theirs)) - ignore
    assert a == b, f"only ours: {sorted(a - b)[:5]}, only FT's: {sorted(b - a)[:5]}"
    bins = [f for f in a if f.endswith(".bin")]
    assert len(bins) > 20
    for f in sorted(a):
        assert filecmp.cmp(os.path.join(ours, f), os.path.join(theirs, f), shallow=False), f


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bytes_ckpts")
    tiny = PRESETS["tiny"]
    return {
        "deepspeed": save_megatron_checkpoint(str(root / "ds"), tiny, seed=5),
        "train_tp2": save_megatron_checkpoint(str(root / "tp2"), tiny, seed=6, train_tp=2),
        "model_rng": save_megatron_checkpoint(str(root / "rng"), tiny, seed=7, layout="megatron",
                                              expert_key_prefix="module.language_model.encoder."),
        "bf16_fp16gate": save_megatron_checkpoint(str(root / "bf16"), tiny, seed=8, dtype=torch.bfloat16,
                                                  gate_dtype=torch.float16),
        "top2_interval1": save_megatron_checkpoint(
            str(root / "top2"), SyntheticSpec(num_layers=3, expert_interval=1, topk=2, num_experts=4), seed=9),
        "dense": save_megatron_checkpoint(str(root / "dense"), SyntheticSpec(num_layers=2, num_experts=0), seed=10),
    }


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_identical_to_ft(ckpts, tmp_path, tp, dtype):
    ours = convert(ckpts["deepspeed"], str(tmp_path / "ours"), tp=tp, dtype=dtype, progress=False)
    theirs = ft_convert(ckpts["deepspeed"], str(tmp_path / "ft"), tp, dtype)
    assert_same_folder(ours, theirs)


@pytest.mark.parametrize("variant,tp", [("train_tp2", 1), ("train_tp2", 2), ("train_tp2", 4), ("train_tp2", 8),
                                        ("model_rng", 1), ("model_rng", 4), ("bf16_fp16gate", 2),
                                        ("top2_interval1", 2), ("dense", 2)])
def test_identical_to_ft_variants(ckpts, tmp_path, variant, tp):
    ours = convert(ckpts[variant], str(tmp_path / "ours"), tp=tp, dtype="fp16", progress=False)
    theirs = ft_convert(ckpts[variant], str(tmp_path / "ft"), tp, "fp16")
    assert_same_folder(ours, theirs)


def test_config_ini_text(ckpts, tmp_path):
    ours = convert(ckpts["deepspeed"], str(tmp_path / "o"), tp=4, progress=False)
    text = open(os.path.join(ours, "config.ini")).read()
    assert text.startswith("[gpt]\nmodel_name = gpt\nhead_num = 8\nsize_per_head = 8\ninter_size = 128\n")
    assert "tensor_para_size = 4\n\n[structure]\ngpt_with_moe = 1\nexpert_num = 8\nmoe_layers = [1, 3]\n" in text
    args = open(os.path.join(ours, "args.txt")).read().splitlines()
    assert "model_type:ModelType.encoder_or_decoder" in args and "num_experts:[8]" in args
    assert "params_dtype:torch.float16" in args


def test_gpt2_vocab_sets_ids(ckpts, tmp_path):
    from ftmoe.demo_tokenizer import build_gpt2_bpe_tokenizer
    vocab, merges = build_gpt2_bpe_tokenizer(str(tmp_path / "tok"))
    ours = convert(ckpts["deepspeed"], str(tmp_path / "ours"), tp=2, tokenizer_dir=str(tmp_path / "tok"),
                   progress=False)
    theirs = ft_convert(ckpts["deepspeed"], str(tmp_path / "ft"), 2, "fp16", vocab_json=vocab)
    assert_same_folder(ours, theirs, ignore={"merges.txt"})  # vocab.json copied by both; merges by ours (FT: --merges-path)
    assert os.path.isfile(os.path.join(ours, "merges.txt"))


def test_jieba_tokenizer_sets_ids(ckpts, tmp_path):
    from ftmoe.demo_tokenizer import build_jieba_bpe_tokenizer
    build_jieba_bpe_tokenizer(str(tmp_path / "tok"))
    ours = convert(ckpts["deepspeed"], str(tmp_path / "ours"), tp=1, tokenizer_dir=str(tmp_path / "tok"),
                   progress=False)
    text = open(os.path.join(ours, "config.ini")).read()
    assert "start_id = 7\nend_id = 7\n" in text
    assert os.path.isfile(os.path.join(ours, "tokenizer.json"))


def test_naming_variants_convert_identically(tmp_path):
    """`transformer` vs `encoder`, `attention` vs `self_attention`: same weights, same bytes."""
    tiny = PRESETS["tiny"]
    a = save_megatron_checkpoint(str(tmp_path / "a"), tiny, seed=11)
    b = save_megatron_checkpoint(str(tmp_path / "b"), tiny, seed=11, encoder_key="transformer",
                                 attention_name="attention", layout="megatron")
    assert_same_folder(convert(a, str(tmp_path / "oa"), tp=2, progress=False),
                       convert(b, str(tmp_path / "ob"), tp=2, progress=False))


def test_bf16_output(ckpts, tmp_path):
    """bf16 is our addition: same layout as fp16, values rounded to bf16."""
    bf = convert(ckpts["deepspeed"], str(tmp_path / "bf"), tp=2, dtype="bf16", progress=False)
    f32 = convert(ckpts["deepspeed"], str(tmp_path / "f32"), tp=2, dtype="fp32", progress=False)
    assert "weight_data_type = bf16" in open(os.path.join(bf, "config.ini")).read()
    name = "model.layers.1.mlp.moe.experts.dense_h_to_4h.weight.1.bin"
    raw = np.fromfile(os.path.join(bf, name), dtype=np.uint16).astype(np.uint32) << 16
    got = torch.from_numpy(raw.view(np.float32))
    want = torch.from_numpy(read_bin(os.path.join(f32, name), (-1,), "fp32")).to(torch.bfloat16).float()
    assert torch.equal(got, want)


def test_ft_vocab_flags_leave_only_the_model(ckpts, tmp_path):
    """`--vocab-path/--merges-path` (FT's flags): ids from vocab.json, files copied, nothing else left in -o."""
    from ftmoe.cli import main
    from ftmoe.demo_tokenizer import build_gpt2_bpe_tokenizer

    vocab, merges = build_gpt2_bpe_tokenizer(str(tmp_path / "tok"))
    out = tmp_path / "out"
    assert main(["convert", "-i", ckpts["deepspeed"], "-o", str(out), "--tp", "2", "--vocab-path", vocab,
                 "--merges-path", merges, "-q"]) == 0
    assert sorted(os.listdir(out)) == ["2-gpu"]
    theirs = ft_convert(ckpts["deepspeed"], str(tmp_path / "ft"), 2, "fp16", vocab_json=vocab)
    assert_same_folder(str(out / "2-gpu"), theirs, ignore={"merges.txt"})
