"""The command line: generate (text, ids, JSON), info, and one-line errors with exit code 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftmoe.cli import main


@pytest.fixture(scope="module")
def tok_model_dir(tiny_ckpt_fp32, tmp_path_factory) -> str:
    from ftmoe.convert import convert
    from ftmoe.demo_tokenizer import build_jieba_bpe_tokenizer

    root = tmp_path_factory.mktemp("cli_model")
    build_jieba_bpe_tokenizer(str(root / "tok"), vocab_size=512)
    return convert(tiny_ckpt_fp32, str(root / "out"), tp=2, dtype="fp32", tokenizer_dir=str(root / "tok"),
                   progress=False)


def test_generate_json_from_ids(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir, "--prompt-ids", "1,2,3", "--prompt-ids", "9,8",
               "--max-new-tokens", "5", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["output_ids"][:3] == [1, 2, 3] and first["sequence_length"] == len(first["output_ids"])
    assert second["output_ids"][:2] == [9, 8] and second["sequence_length"] <= 2 + 5
    assert "text" in first and len(first["output_log_probs"]) == first["sequence_length"] - 3


def test_generate_text_greedy_is_deterministic_and_sampling_uses_seed(tok_model_dir, capsys):
    args = ["generate", "--model", tok_model_dir, "--prompt", "今天天气很好", "--max-new-tokens", "6", "--json"]
    outs = []
    for extra in ([], [], ["--top-k", "50", "--seed", "3"], ["--top-k", "50", "--seed", "3"],
                  ["--top-k", "50", "--seed", "4", "--temperature", "5"]):
        assert main(args + extra) == 0
        outs.append(json.loads(capsys.readouterr().out)["output_ids"])
    assert outs[0] == outs[1] and outs[2] == outs[3]
    assert outs[4] != outs[0]
    assert isinstance(json.loads(json.dumps(outs[0]))[0], int)


def test_generate_stream_prints_text(tok_model_dir, capsys):
    assert main(["generate", "--model", tok_model_dir, "--prompt", "人工智能", "--max-new-tokens", "4",
                 "--stream"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("argv,needle", [
    (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", ",".join(["1"] * 200)], "prompt has 200 tokens"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "top_p"),
    (["--prompt-ids", "1", "--repetition-penalty", "1.2", "--presence-penalty", "0.5"], "presence_penalty"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_generate_errors_are_one_line(tiny_model_dir, capsys, argv, needle):
    rc = main(["generate", "--model", tiny_model_dir, "--max-new-tokens", "2"] + argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("ftmoe: error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("spec", ["1,x", "0,8", ""])
def test_tune_in_step_batches_are_checked(spec, capsys):
    assert main(["tune", "--in-step", spec]) == 1
    err = capsys.readouterr().err
    assert err == f"ftmoe: error: --in-step: expected comma-separated batch sizes >= 1, found {spec!r}\n"


def test_missing_model_folder(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_console_script_runs(tiny_model_dir):
    """`python -m ftmoe.cli` (what the `ftmoe` script calls) exits 1 with one line on a bad folder."""
    r = subprocess.run([sys.executable, "-m", "ftmoe.cli", "info", os.path.join(tiny_model_dir, "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ftmoe: error:" in r.stderr
