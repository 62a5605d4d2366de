"""Loader: strict file checks with clear messages; any TP folder loads to the same model."""
from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from ftmoe.cli import main
from ftmoe.config import ModelConfig
from ftmoe.convert import convert
from ftmoe.errors import ModelFormatError
from ftmoe.loader import load_model


@pytest.fixture(scope="module")
def tp_dirs(tiny_ckpt_fp32, tmp_path_factory) -> dict[int, str]:
    out = str(tmp_path_factory.mktemp("tp_dirs"))
    return {tp: convert(tiny_ckpt_fp32, out, tp=tp, dtype="fp32", progress=False) for tp in (1, 2, 4, 8)}


@pytest.fixture()
def model_copy(tp_dirs, tmp_path) -> str:
    return shutil.copytree(tp_dirs[2], str(tmp_path / "2-gpu"))


def test_tp_folders_load_identically(tp_dirs):
    ref = load_model(tp_dirs[1]).state_dict()
    for tp in (2, 4, 8):
        sd = load_model(tp_dirs[tp]).state_dict()
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (tp, k)


def test_parent_folder_is_accepted(tp_dirs, tmp_path):
    parent = tmp_path / "only"
    shutil.copytree(tp_dirs[1], parent / "1-gpu")
    m = load_model(str(parent))
    assert m.config.tensor_para_size == 1
    with pytest.raises(ModelFormatError, match="holds several converted models"):
        load_model(os.path.dirname(tp_dirs[1]))


def test_truncated_bin(model_copy):
    path = os.path.join(model_copy, "model.layers.1.mlp.moe.experts.dense_h_to_4h.weight.1.bin")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ModelFormatError, match=rf"dense_h_to_4h\.weight\.1\.bin: {size - 10} bytes, expected {size}"):
        load_model(model_copy)


def test_missing_bin(model_copy):
    os.remove(os.path.join(model_copy, "model.layers.0.attention.query_key_value.bias.0.bin"))
    with pytest.raises(ModelFormatError, match=r"query_key_value\.bias\.0\.bin: missing \(expected 384 bytes"):
        load_model(model_copy)


def test_unexpected_bin(model_copy):
    shutil.copyfile(os.path.join(model_copy, "model.layers.0.attention.dense.weight.1.bin"),
                    os.path.join(model_copy, "model.layers.0.attention.dense.weight.2.bin"))
    with pytest.raises(ModelFormatError, match=r"dense\.weight\.2\.bin: unexpected file.*tensor_para_size=2"):
        load_model(model_copy)


def test_config_errors(model_copy):
    ini = os.path.join(model_copy, "config.ini")
    text = open(ini).read()
    open(ini, "w").write(text.replace("head_num = 8", "head_num = eight"))
    with pytest.raises(ModelFormatError, match=r"config\.ini: field 'head_num' has bad value 'eight'"):
        load_model(model_copy)
    open(ini, "w").write(text.replace("weight_data_type = fp32", "weight_data_type = int4"))
    with pytest.raises(ModelFormatError, match="weight_data_type 'int4'"):
        load_model(model_copy)
    open(ini, "w").write(text.replace("vocab_size = 512\n", ""))
    with pytest.raises(ModelFormatError, match="missing field 'vocab_size'"):
        load_model(model_copy)
    open(ini, "w").write(text.replace("inter_size = 128", "inter_size = 256"))
    with pytest.raises(ModelFormatError, match=r"bytes, expected"):
        load_model(model_copy)
    os.remove(ini)
    with pytest.raises(ModelFormatError, match="no config.ini"):
        load_model(model_copy)


def test_bad_dtype_and_device(tp_dirs):
    with pytest.raises(ModelFormatError, match="dtype must be one of"):
        load_model(tp_dirs[1], dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelFormatError, match="no CUDA GPU"):
            load_model(tp_dirs[1], device="cuda")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_load_is_close(tp_dirs, dtype):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = load_model(tp_dirs[1])(ids)
    lo = load_model(tp_dirs[2], dtype=dtype)(ids)
    assert lo.dtype == torch.float32
    err = (lo - ref).abs().max() / ref.abs().max()
    assert err < (2e-2 if dtype == "float16" else 6e-2), err


def test_param_counts_match_real_model():
    cfg = ModelConfig(head_num=16, size_per_head=64, inter_size=4096, num_layer=24, max_pos_seq_len=2048,
                      vocab_size=51200, expert_num=64, moe_layers=tuple(range(1, 24, 2)))
    c = cfg.param_counts()
    assert abs(c["total"] / 1e9 - 6.70) < 0.02          # SPEC: 6.70 B total
    assert abs(c["experts"] / 1e9 - 6.45) < 0.01        # 768 experts x 8.39 M
    assert abs(c["active_per_token"] / 1e6 - 358) < 5    # about 358 M active


def test_info_cli(tp_dirs, capsys):
    assert main(["info", tp_dirs[4]]) == 0
    out = capsys.readouterr().out
    assert "tensor_para_size" in out and "experts" in out and "MiB" in out
    assert main(["info", "--json", tp_dirs[4]]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    total = sum(os.path.getsize(os.path.join(tp_dirs[4], f)) for f in os.listdir(tp_dirs[4]) if f.endswith(".bin"))
    assert info["bytes"] == total and info["config"]["moe_layers"] == [1, 3]


@pytest.mark.parametrize("tp,dtype", [(1, "fp32"), (2, "fp16")])
def test_random_ft_folder_loads_with_the_same_weights(tmp_path, tp, dtype):
    from ftmoe.bench import config_of, random_model
    from ftmoe.synthetic import main as synthetic_main, save_ft_model

    m = random_model(config_of("tiny"), torch.float32, torch.device("cpu"), seed=5)
    d = save_ft_model(m, str(tmp_path / "out"), dtype, tp=tp)
    assert os.path.basename(d) == f"{tp}-gpu"
    loaded = load_model(d, "float32").state_dict()
    want = m.state_dict()
    assert loaded.keys() == want.keys()
    for k, v in want.items():
        ref = v if dtype == "fp32" else v.half().float()
        assert torch.equal(loaded[k], ref), k
    cfg = ModelConfig.from_dir(d)
    assert (cfg.tensor_para_size, cfg.weight_data_type, cfg.moe_layers, cfg.moe_k) == \
        (tp, dtype, m.config.moe_layers, m.config.moe_k)
    assert synthetic_main([str(tmp_path / "cli"), "--preset", "tiny", "--dtype", "fp16"]) == 0
    assert load_model(str(tmp_path / "cli")).config == dataclasses.replace(m.config, weight_data_type="fp16")
