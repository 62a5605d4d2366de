"""Bad checkpoints and bad flags give one clear error naming the file/tensor/field,
and never leave a half-written model folder behind."""
from __future__ import annotations

import os

import pytest
import torch

from ftmoe.cli import main
from ftmoe.convert import convert
from ftmoe.convert.unpickle import tolerant_pickle
from ftmoe.errors import CheckpointError, FtmoeError, ModelFormatError
from ftmoe.synthetic import PRESETS, save_megatron_checkpoint

MAIN = "mp_rank_00_model_states.pt"


@pytest.fixture()
def ckpt(tmp_path) -> str:
    # foreign_args=False: these tests re-save the main file, which needs importable classes
    return save_megatron_checkpoint(str(tmp_path / "ckpt"), PRESETS["tiny"], seed=3, foreign_args=False)


def _edit_main(ckpt: str, fn) -> None:
    path = os.path.join(ckpt, MAIN)
    state = torch.load(path, weights_only=False, pickle_module=tolerant_pickle)  # no mmap: we overwrite it
    fn(state)
    torch.save(state, path)


def _assert_clean(out: str) -> None:
    """Nothing half-written: no <N>-gpu folder and no temporary leftovers."""
    if os.path.isdir(out):
        assert os.listdir(out) == [] or all(not n.startswith(".") and not n.endswith("-gpu")
                                            for n in os.listdir(out)), os.listdir(out)


def test_missing_main_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no main checkpoint file.*mp_rank_00_model_states\.pt"):
        convert(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        convert(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)


def test_missing_expert_file(ckpt, tmp_path):
    os.remove(os.path.join(ckpt, "layer_1_expert_5_mp_rank_00_model_states.pt"))
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"layer_1_expert_5_mp_rank_00_model_states\.pt: expert file is missing"):
        convert(ckpt, out, progress=False)
    _assert_clean(out)


def test_extra_expert_file(ckpt, tmp_path):
    src = os.path.join(ckpt, "layer_0_expert_0_mp_rank_00_model_states.pt")
    os.link(src, os.path.join(ckpt, "layer_0_expert_8_mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError, match=r"unexpected expert file layer_0_expert_8.*2 MoE layers x 8 experts"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_expert_key_disagrees_with_file_name(ckpt, tmp_path):
    a = os.path.join(ckpt, "layer_0_expert_1_mp_rank_00_model_states.pt")
    b = os.path.join(ckpt, "layer_0_expert_2_mp_rank_00_model_states.pt")
    os.replace(a, b + ".tmp")
    os.replace(b, a)
    os.replace(b + ".tmp", b)
    with pytest.raises(CheckpointError, match=r"expert_1_.*is for layer 1 expert 2.*expert 1"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_unexpected_key(ckpt, tmp_path):
    def add(state):
        state["module"]["language_model"]["encoder"]["layers.0.mlp.rotary.weight"] = torch.zeros(3)
    _edit_main(ckpt, add)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: unexpected key 'layers\.0\.mlp\.rotary\.weight'"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_missing_tensor(ckpt, tmp_path):
    _edit_main(ckpt, lambda s: s["module"]["language_model"]["encoder"].pop("layers.2.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.2\.mlp\.dense_4h_to_h\.bias' is missing"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("version", [2.0, 1, None])
def test_wrong_checkpoint_version(ckpt, tmp_path, version):
    _edit_main(ckpt, lambda s: s.__setitem__("checkpoint_version", version))
    with pytest.raises(CheckpointError, match=rf"checkpoint_version is {version}, expected 3"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_shape_disagrees_with_args(ckpt, tmp_path):
    _edit_main(ckpt, lambda s: setattr(s["args"], "ffn_hidden_size", 256))
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"'layers\.0\.mlp\.dense_h_to_4h\.weight' has shape \[128, 64\], "
                                              r"expected \[256, 64\]"):
        convert(ckpt, out, progress=False)
    _assert_clean(out)


def test_missing_args_field(ckpt, tmp_path):
    _edit_main(ckpt, lambda s: delattr(s["args"], "num_layers"))
    with pytest.raises(CheckpointError, match="args has no field 'num_layers'"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("tp,what", [(3, "head_num=8"), (16, "head_num=8"), (0, ">= 1")])
def test_tp_not_dividing(ckpt, tmp_path, tp, what):
    out = str(tmp_path / "out")
    with pytest.raises(ModelFormatError, match=rf"tensor parallel size {tp}.*{what}|must be >= 1"):
        convert(ckpt, out, tp=tp, progress=False)
    assert not os.path.exists(os.path.join(out, f"{tp}-gpu"))


def test_tp_not_dividing_ffn(tmp_path):
    from ftmoe.synthetic import SyntheticSpec
    spec = SyntheticSpec(hidden_size=64, num_attention_heads=4, ffn_hidden_size=6 * 4 + 2)  # 26: 4 does not divide
    ckpt = save_megatron_checkpoint(str(tmp_path / "c"), spec)
    with pytest.raises(ModelFormatError, match="does not divide inter_size=26"):
        convert(ckpt, str(tmp_path / "out"), tp=4, progress=False)


def test_truncated_main_file(ckpt, tmp_path):
    path = os.path.join(ckpt, MAIN)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: cannot read torch checkpoint"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_failure_keeps_previous_output(ckpt, tmp_path):
    out = str(tmp_path / "out")
    good = convert(ckpt, out, tp=1, progress=False)
    before = sorted(os.listdir(good))
    os.remove(os.path.join(ckpt, "layer_1_expert_7_mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError):
        convert(ckpt, out, tp=1, progress=False)
    assert sorted(os.listdir(good)) == before
    assert sorted(os.listdir(out)) == ["1-gpu"]


def test_failure_mid_stream_leaves_nothing(ckpt, tmp_path):
    """An expert file that is unreadable is only found mid-conversion (layer 3): the partial
    output must be removed."""
    path = os.path.join(ckpt, "layer_1_expert_0_mp_rank_00_model_states.pt")
    open(path, "wb").write(b"not a checkpoint")
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"layer_1_expert_0_mp_rank_00_model_states\.pt: cannot read"):
        convert(ckpt, out, progress=False)
    assert os.listdir(out) == []


def test_training_tp_file_count_mismatch(tmp_path):
    ckpt = save_megatron_checkpoint(str(tmp_path / "c"), PRESETS["tiny"], train_tp=2)
    os.remove(os.path.join(ckpt, "mp_rank_01_model_states.pt"))
    with pytest.raises(CheckpointError, match=r"tensor_model_parallel_size=2 but 1 main file"):
        convert(ckpt, str(tmp_path / "out"), progress=False)


def test_bad_dtype(ckpt, tmp_path):
    with pytest.raises(FtmoeError, match="--dtype must be one of"):
        convert(ckpt, str(tmp_path / "out"), dtype="int8", progress=False)


def test_cli_error_is_one_line(ckpt, tmp_path, capsys):
    os.remove(os.path.join(ckpt, "layer_0_expert_2_mp_rank_00_model_states.pt"))
    rc = main(["convert", "-i", ckpt, "-o", str(tmp_path / "out"), "--tp", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("ftmoe: error: ") and "layer_0_expert_2" in err
    assert "Traceback" not in err


def test_cli_ft_flag_aliases(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = main(["convert", "-input_dir", ckpt, "-saved_dir", out, "-i_g", "2", "-weight_data_type", "fp32", "-q"])
    assert rc == 0
    assert open(os.path.join(out, "2-gpu", "config.ini")).read().count("weight_data_type = fp32") == 1
    rc = main(["convert", "--input-dir", ckpt, "--saved-dir", out, "--infer-gpu-num", "3", "-q"])
    assert rc == 1 and "does not divide head_num=8" in capsys.readouterr().err
