"""Tests for ftmoe.tokenizer and ftmoe.demo_tokenizer.

In:  the demo tokenizers, built into pytest temp folders.
Out: pass/fail for round trips (Chinese, English, mixed, whitespace), special-token
     handling, folder detection, special ids, error messages and determinism.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from tokenizers import Tokenizer
from tokenizers.models import BPE

from ftmoe.demo_tokenizer import build_gpt2_bpe_tokenizer, build_jieba_bpe_tokenizer
from ftmoe.errors import FtmoeError
from ftmoe.tokenizer import (
    GPT2BPETokenizer,
    JiebaBPETokenizer,
    load_tokenizer,
    special_ids,
)

ZH = "今天天气很好，我们一起去公园散步。"
EN = "Hello world! The model is fast, and the test is simple."
MIXED = "模型说：“你好，世界！”Hello, world!\n早上好！Good morning！\n  两个空格\n"
TEXTS = [ZH, EN, MIXED]


@pytest.fixture(scope="module")
def jieba_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("jieba_tok")
    build_jieba_bpe_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("gpt2_tok")
    build_gpt2_bpe_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def jtok(jieba_dir: str) -> JiebaBPETokenizer:
    tok = load_tokenizer(jieba_dir)
    assert isinstance(tok, JiebaBPETokenizer)
    return tok


@pytest.fixture(scope="module")
def gtok(gpt2_dir: str) -> GPT2BPETokenizer:
    tok = load_tokenizer(gpt2_dir)
    assert isinstance(tok, GPT2BPETokenizer)
    return tok


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", TEXTS)
def test_jieba_round_trip(jtok: JiebaBPETokenizer, text: str) -> None:
    ids = jtok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert jtok.token_to_id("<unk>") not in ids  # every character is in the demo vocab
    assert jtok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS + ["龘 𝔘 emoji 😀 tab\tend"])
def test_gpt2_round_trip(gtok: GPT2BPETokenizer, text: str) -> None:
    ids = gtok.encode(text)
    assert ids and max(ids) < gtok.vocab_size
    assert gtok.decode(ids) == text  # byte level: any text survives


def test_jieba_encode_is_jieba_words_then_pretokenized_bpe(jtok: JiebaBPETokenizer) -> None:
    import jieba

    words = list(jieba.cut(MIXED))
    assert " " in words and "\n" in words  # jieba keeps whitespace as words
    expected = jtok.hf_tokenizer.encode(words, is_pretokenized=True, add_special_tokens=True).ids
    assert jtok.encode(MIXED) == expected
    assert jtok.cut(MIXED) == words


def test_jieba_whitespace_is_kept(jtok: JiebaBPETokenizer) -> None:
    ids = jtok.encode("a  b\n\nc")
    assert ids.count(jtok.token_to_id(" ")) == 2
    assert ids.count(jtok.newline_id) == 2
    assert jtok.decode(ids) == "a  b\n\nc"


def test_empty_text(jtok: JiebaBPETokenizer, gtok: GPT2BPETokenizer) -> None:
    for tok in (jtok, gtok):
        assert tok.encode("") == []
        assert tok.decode([]) == ""


def test_unknown_characters_become_unk_and_vanish(jtok: JiebaBPETokenizer) -> None:
    unk = jtok.token_to_id("<unk>")
    ids = jtok.encode("龘好")
    assert ids[0] == unk
    assert jtok.decode(ids) == "好"


def test_decode_accepts_arrays_and_drops_ids_past_vocab(jtok: JiebaBPETokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = jtok.encode(ZH)
    assert jtok.decode(np.array(ids, dtype=np.int32)) == ZH
    assert jtok.decode(ids + [jtok.vocab_size, 51199]) == ZH


# ---------------------------------------------------------------- special tokens


def test_jieba_special_tokens(jtok: JiebaBPETokenizer) -> None:
    assert jtok.eod_id == 7
    assert jtok.sep_id == 6 == jtok.token_to_id("<sep>")
    assert jtok.newline_id == jtok.token_to_id("\n") is not None
    assert jtok.token_to_id("no-such-token") is None
    ids = [7] + jtok.encode(ZH) + [6, 7]
    assert jtok.decode(ids) == ZH
    assert jtok.decode(ids, skip_special_tokens=True) == ZH
    assert jtok.decode(ids, skip_special_tokens=False) == f"<|endoftext|>{ZH}<sep><|endoftext|>"


def test_jieba_stop_at_sep(jtok: JiebaBPETokenizer) -> None:
    ids = jtok.encode(ZH) + [6] + jtok.encode(EN)
    assert jtok.decode(ids, stop_at_sep=True) == ZH
    assert jtok.decode(ids) == ZH + EN


def test_jieba_special_token_text_is_not_special(jtok: JiebaBPETokenizer) -> None:
    # jieba cuts "<|endoftext|>" into "<", "|", "endoftext", "|", ">" before the BPE
    # model sees it, so (as in ModelScope) a typed special token is plain text.
    assert 7 not in jtok.encode("<|endoftext|>你好")


def test_gpt2_special_tokens(gtok: GPT2BPETokenizer) -> None:
    eod = gtok.eod_id
    assert eod is not None and gtok.token_to_id("<|endoftext|>") == eod
    assert gtok.encode("<|endoftext|>") == [eod]
    ids = [eod] + gtok.encode(EN) + [eod]
    assert gtok.decode(ids) == EN
    assert gtok.decode(ids, skip_special_tokens=False) == f"<|endoftext|>{EN}<|endoftext|>"


def test_special_ids(jieba_dir: str, gpt2_dir: str, tmp_path) -> None:
    assert special_ids(jieba_dir) == (7, 7)
    eod = load_tokenizer(gpt2_dir).eod_id
    assert special_ids(gpt2_dir) == (eod, eod)
    assert special_ids(tmp_path) is None


def test_special_ids_without_endoftext(tmp_path) -> None:
    jd = tmp_path / "j"
    jd.mkdir()
    Tokenizer(BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(jd / "tokenizer.json"))
    with pytest.raises(FtmoeError, match="tokenizer.json"):
        special_ids(jd)

    gd = tmp_path / "g"
    gd.mkdir()
    (gd / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (gd / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(FtmoeError, match="vocab.json"):
        special_ids(gd)


# ---------------------------------------------------------------- folder detection


def test_load_tokenizer_picks_scheme(jieba_dir: str, gpt2_dir: str, tmp_path) -> None:
    assert isinstance(load_tokenizer(jieba_dir), JiebaBPETokenizer)
    assert isinstance(load_tokenizer(gpt2_dir), GPT2BPETokenizer)
    assert load_tokenizer(tmp_path) is None

    both = tmp_path / "both"
    both.mkdir()
    for d in (jieba_dir, gpt2_dir):
        for name in os.listdir(d):
            shutil.copy(os.path.join(d, name), both / name)
    assert isinstance(load_tokenizer(both), JiebaBPETokenizer)  # tokenizer.json wins


def test_files_and_vocab_size(jtok: JiebaBPETokenizer, gtok: GPT2BPETokenizer,
                              jieba_dir: str, gpt2_dir: str) -> None:
    assert jtok.files == [os.path.join(jieba_dir, "tokenizer.json")]
    assert gtok.files == [os.path.join(gpt2_dir, "vocab.json"), os.path.join(gpt2_dir, "merges.txt")]
    assert 100 < jtok.vocab_size <= 512
    assert 257 < gtok.vocab_size <= 400
    for f in jtok.files + gtok.files:
        assert os.path.isfile(f)


def test_copied_files_load_elsewhere(jtok: JiebaBPETokenizer, gtok: GPT2BPETokenizer, tmp_path) -> None:
    for tok, sub in ((jtok, "j"), (gtok, "g")):
        d = tmp_path / sub
        d.mkdir()
        for f in tok.files:
            shutil.copy(f, d / os.path.basename(f))
        again = load_tokenizer(d)
        assert type(again) is type(tok)
        assert again.encode(MIXED) == tok.encode(MIXED)


def test_missing_half_of_gpt2_pair(gpt2_dir: str, tmp_path) -> None:
    shutil.copy(os.path.join(gpt2_dir, "vocab.json"), tmp_path / "vocab.json")
    with pytest.raises(FtmoeError, match="merges.txt"):
        load_tokenizer(tmp_path)


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(FtmoeError, match="nope"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": "1.0", "model": 3}', b"\xff\xfe\x00"])
def test_corrupt_tokenizer_json(tmp_path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(FtmoeError) as ei:
        load_tokenizer(tmp_path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    with pytest.raises(FtmoeError, match="tokenizer.json"):
        special_ids(tmp_path)


def test_truncated_tokenizer_json(jieba_dir: str, tmp_path) -> None:
    data = open(os.path.join(jieba_dir, "tokenizer.json"), "rb").read()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(FtmoeError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_gpt2_files(gpt2_dir: str, tmp_path) -> None:
    bad_vocab = tmp_path / "v"
    bad_vocab.mkdir()
    (bad_vocab / "vocab.json").write_text('{"a": 0, ')
    shutil.copy(os.path.join(gpt2_dir, "merges.txt"), bad_vocab / "merges.txt")
    with pytest.raises(FtmoeError, match="vocab.json"):
        load_tokenizer(bad_vocab)

    bad_merges = tmp_path / "m"
    bad_merges.mkdir()
    shutil.copy(os.path.join(gpt2_dir, "vocab.json"), bad_merges / "vocab.json")
    (bad_merges / "merges.txt").write_text("#version: 0.2\nnot-a-pair-line\n")
    with pytest.raises(FtmoeError, match="merges.txt"):
        load_tokenizer(bad_merges)


# ---------------------------------------------------------------- demo builders


def test_demo_builders_are_deterministic(tmp_path) -> None:
    for run in ("a", "b"):
        build_jieba_bpe_tokenizer(tmp_path / run)
        build_gpt2_bpe_tokenizer(tmp_path / run)
        build_jieba_bpe_tokenizer(tmp_path / run / "small", vocab_size=300)
        build_gpt2_bpe_tokenizer(tmp_path / run / "small", vocab_size=300)
    for rel in ("tokenizer.json", "vocab.json", "merges.txt",
                "small/tokenizer.json", "small/vocab.json", "small/merges.txt"):
        a = (tmp_path / "a" / rel).read_bytes()
        b = (tmp_path / "b" / rel).read_bytes()
        assert a == b, rel


def test_demo_builders_respect_vocab_size(tmp_path) -> None:
    for n in (300, 512):
        d = tmp_path / str(n)
        path = build_jieba_bpe_tokenizer(d, vocab_size=n)
        assert path == str(d / "tokenizer.json")
        tok = JiebaBPETokenizer(path)
        assert tok.vocab_size <= n and tok.eod_id == 7 and tok.sep_id == 6
        assert tok.newline_id is not None and tok.token_to_id(" ") is not None
    v, m = build_gpt2_bpe_tokenizer(tmp_path / "g", vocab_size=300)
    assert (v, m) == (str(tmp_path / "g" / "vocab.json"), str(tmp_path / "g" / "merges.txt"))
    assert GPT2BPETokenizer(v, m).vocab_size <= 300
    with pytest.raises(ValueError):
        build_jieba_bpe_tokenizer(tmp_path / "tiny", vocab_size=16)
    with pytest.raises(ValueError):
        build_gpt2_bpe_tokenizer(tmp_path / "tiny", vocab_size=100)
