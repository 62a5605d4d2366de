"""Tokenizers for a model folder: text in, token ids out, and back.

In:  a folder holding either
     - `tokenizer.json` (ModelScope / Alibaba PAI "JiebaBPE": the text is cut into words
       by `jieba.cut`, and the words are encoded by a HF `tokenizers` tokenizer with
       `is_pretokenized=True`), or
     - `vocab.json` + `merges.txt` (GPT-2 byte-level BPE).
Out: a tokenizer with one interface for both schemes:
     `encode(text) -> list[int]`, `decode(ids, skip_special_tokens=True) -> str`,
     `token_to_id(tok) -> int | None`, and the properties `vocab_size`, `eod_id`
     (id of `<|endoftext|>` or None) and `files` (the files that make up the tokenizer,
     for a converter to copy into a model folder).
     `load_tokenizer(dir)` picks the scheme from the folder's files (None when it holds
     no tokenizer); `special_ids(dir)` gives the (start_id, end_id) pair the model
     config needs, both the id of `<|endoftext|>`.

Behaviour matched to ModelScope's `JiebaBPETokenizer` (models/nlp/gpt3/tokenizer.py,
gpt_moe/tokenizer.py, also FasterTransformer's examples/pytorch/gpt/utils/tokenizer.py):
- encode: `jieba.cut(text)` in its default mode (accurate, HMM on). jieba keeps every
  space, tab and newline as a word of its own (two spaces give two `' '` words), and
  splits `<|endoftext|>` typed in the text into `<`, `|`, `endoftext`, `|`, `>`, so
  special tokens written in a prompt are NOT recognised as special tokens. The words
  go to `Tokenizer.encode(words, is_pretokenized=True, add_special_tokens=True)`.
- decode: `Tokenizer.decode(ids, skip_special_tokens=...)`: how the pieces are joined is
  whatever the `decoder` of tokenizer.json says (HF `tokenizers` joins with single
  spaces when the decoder is null). ModelScope's gpt3 tokenizer also cuts the ids at
  the first `<sep>` before decoding; that is `stop_at_sep=True` here (off by default).

All errors about the files (missing, unreadable, corrupt, without `<|endoftext|>`)
raise `FtmoeError` naming the file. jieba is imported and initialised on first use,
with its logging silenced; it caches its dictionary in the temp folder (`$TMPDIR`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Union

from tokenizers import Tokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from ftmoe.errors import FtmoeError

EOD_TOKEN = "<|endoftext|>"
SEP_TOKEN = "<sep>"

JIEBA_FILE = "tokenizer.json"
GPT2_VOCAB_FILE = "vocab.json"
GPT2_MERGES_FILE = "merges.txt"

_jieba_module: ModuleType | None = None
_jieba_lock = threading.Lock()


def _jieba() -> ModuleType:
    """Import jieba on first use, with its stderr logging silenced."""
    global _jieba_module
    if _jieba_module is None:
        with _jieba_lock:
            if _jieba_module is None:
                try:
                    import jieba
                except ImportError as e:  # pragma: no cover - jieba is a dependency
                    raise FtmoeError(
                        "the JiebaBPE tokenizer needs the 'jieba' package: pip install jieba"
                    ) from e
                jieba.setLogLevel(logging.WARNING)
                _jieba_module = jieba
    return _jieba_module


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _ids_list(ids: Iterable[int]) -> list[int]:
    # accepts lists, tuples, numpy arrays and torch tensors (1-D)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


class _HFTokenizerBase:
    """Shared parts of both schemes; `_tk` is a `tokenizers.Tokenizer`."""

    _tk: Tokenizer
    _files: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int | None:
        """Id of `<|endoftext|>` (start and end id of the model), or None."""
        return self._tk.token_to_id(EOD_TOKEN)

    @property
    def files(self) -> list[str]:
        """The files that make up this tokenizer."""
        return list(self._files)

    @property
    def hf_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    def token_to_id(self, tok: str) -> int | None:
        return self._tk.token_to_id(tok)

    def id_to_token(self, idx: int) -> str | None:
        return self._tk.id_to_token(int(idx))

    def _known_ids(self, ids: Iterable[int]) -> list[int]:
        # Ids past the tokenizer's vocabulary (the model's embedding table is padded,
        # e.g. to 51200 rows) have no text: dropped, as HF `tokenizers` does.
        n = self.vocab_size
        return [i for i in _ids_list(ids) if 0 <= i < n]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._files)}, vocab_size={self.vocab_size})"


class JiebaBPETokenizer(_HFTokenizerBase):
    """ModelScope / PAI JiebaBPE: jieba words encoded by a HF `tokenizer.json`."""

    def __init__(self, tokenizer_json: Union[str, os.PathLike]):
        path = os.fspath(tokenizer_json)
        if not os.path.isfile(path):
            raise FtmoeError(f"{path}: tokenizer file not found (or not a regular file)")
        try:
            self._tk = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception for bad JSON
            raise FtmoeError(
                f"{path}: not a readable HF tokenizers tokenizer.json ({_one_line(e)})"
            ) from e
        self._files = (path,)
        self.sep_id: int | None = self._tk.token_to_id(SEP_TOKEN)
        self.newline_id: int | None = self._tk.token_to_id("\n")

    def cut(self, text: str) -> list[str]:
        """The jieba words that `encode` feeds to the BPE model."""
        return list(_jieba().cut(text))

    def encode(self, text: str) -> list[int]:
        words = self.cut(text)
        if not words:
            return []
        return self._tk.encode(words, is_pretokenized=True, add_special_tokens=True).ids

    def decode(
        self,
        ids: Iterable[int],
        skip_special_tokens: bool = True,
        stop_at_sep: bool = False,
    ) -> str:
        """Ids to text. `stop_at_sep` drops the first `<sep>` and all after it
        (ModelScope's gpt3 `detokenize(early_stop=True)`)."""
        ids = self._known_ids(ids)
        if stop_at_sep and self.sep_id is not None and self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)


class GPT2BPETokenizer(_HFTokenizerBase):
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt`."""

    def __init__(self, vocab_json: Union[str, os.PathLike], merges_txt: Union[str, os.PathLike]):
        vocab_path, merges_path = os.fspath(vocab_json), os.fspath(merges_txt)
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FtmoeError(f"{p}: tokenizer file not found (or not a regular file)")
        # Read vocab.json ourselves first: gives a precise message for the common
        # failure (a truncated or non-JSON file) and finds the special tokens.
        try:
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FtmoeError(f"{vocab_path}: not a readable GPT-2 vocab.json ({_one_line(e)})") from e
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise FtmoeError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
        try:
            model = BPE.from_file(vocab_path, merges_path)
        except Exception as e:
            raise FtmoeError(
                f"{merges_path}: not a readable GPT-2 merges.txt for {vocab_path} ({_one_line(e)})"
            ) from e
        tk = Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        if EOD_TOKEN in vocab:
            # as in GPT-2: matched whole in the text, skipped by decode
            tk.add_special_tokens([EOD_TOKEN])
        self._tk = tk
        self._files = (vocab_path, merges_path)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tk.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = self._known_ids(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)


AnyTokenizer = Union[JiebaBPETokenizer, GPT2BPETokenizer]


def load_tokenizer(model_dir: Union[str, os.PathLike]) -> AnyTokenizer | None:
    """The tokenizer a folder holds: `tokenizer.json` -> JiebaBPE (preferred),
    `vocab.json` + `merges.txt` -> GPT-2 BPE, neither -> None."""
    d = os.fspath(model_dir)
    if not os.path.isdir(d):
        raise FtmoeError(f"{d}: tokenizer folder not found")
    tj = os.path.join(d, JIEBA_FILE)
    if os.path.exists(tj):
        return JiebaBPETokenizer(tj)
    vj, mt = os.path.join(d, GPT2_VOCAB_FILE), os.path.join(d, GPT2_MERGES_FILE)
    has_v, has_m = os.path.exists(vj), os.path.exists(mt)
    if has_v and has_m:
        return GPT2BPETokenizer(vj, mt)
    if has_v != has_m:
        present, missing = (vj, mt) if has_v else (mt, vj)
        raise FtmoeError(
            f"{missing}: missing; a GPT-2 BPE tokenizer needs it next to {present}"
        )
    return None


def special_ids(tokenizer_dir: Union[str, os.PathLike]) -> tuple[int, int] | None:
    """(start_id, end_id) for the model config: both the id of `<|endoftext|>`.
    None when the folder holds no tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        return None
    eod = tok.eod_id
    if eod is None:
        raise FtmoeError(f"{tok.files[0]}: has no {EOD_TOKEN} token (needed as start/end id)")
    return eod, eod


__all__ = [
    "EOD_TOKEN",
    "SEP_TOKEN",
    "AnyTokenizer",
    "GPT2BPETokenizer",
    "JiebaBPETokenizer",
    "load_tokenizer",
    "special_ids",
]
