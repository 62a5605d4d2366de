"""Small, deterministic tokenizers for demos and tests (the real ones can't be downloaded).

In:  an output folder and a vocabulary size.
Out: - `build_jieba_bpe_tokenizer(out_dir, vocab_size=512)` writes `tokenizer.json`, a
       ModelScope-style JiebaBPE tokenizer: a HF `tokenizers` BPE model trained on the
       jieba words of the bilingual corpus below (no normalizer, no pre-tokenizer, so
       every jieba word, spaces and newlines included, is encoded as given; a `Fuse`
       decoder so decoding concatenates the pieces). Special tokens get the first ids:
       0 `<pad>`, 1 `<unk>` (the BPE unknown token), 2 `<s>`, 3 `</s>`, 4 `<cls>`,
       5 `<mask>`, 6 `<sep>`, 7 `<|endoftext|>` (start/end id, as in the real model).
       Returns the file's path.
     - `build_gpt2_bpe_tokenizer(out_dir, vocab_size=400)` writes `vocab.json` and
       `merges.txt`, a GPT-2 style byte-level BPE (256 byte symbols, `<|endoftext|>` = 0,
       then merges) trained on the same corpus. Returns (vocab_path, merges_path).
Both produce identical files on every run and take well under a second after jieba's
dictionary is loaded; the vocabulary size is at most the one asked for.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from ftmoe.tokenizer import EOD_TOKEN, GPT2_MERGES_FILE, GPT2_VOCAB_FILE, JIEBA_FILE, _jieba

JIEBA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<unk>", "<s>", "</s>", "<cls>", "<mask>", "<sep>", EOD_TOKEN,
)
UNK_TOKEN = "<unk>"

# Written for this project. Simple everyday Chinese with a little English, repeated
# words on purpose so that BPE finds merges in a few KB.
DEMO_CORPUS = """\
今天天气很好，我们一起去公园散步。公园里有很多人，有的人在跑步，有的人在看书。
小明和小红是好朋友。他们每天一起上学，一起回家。小明喜欢数学，小红喜欢画画。
早上七点，妈妈做好了早饭。我喝了一杯牛奶，吃了两个鸡蛋，然后去上班。
我们的城市不大，但是很干净。城市的北边有一座山，南边有一条河。
春天来了，花开了，草绿了，小鸟在树上唱歌。夏天很热，我们去河边游泳。
秋天的时候，树叶变黄了，农民开始收获。冬天下雪了，孩子们在外面堆雪人。
这家饭店的菜很好吃，价格也不贵。我最喜欢的是红烧肉和西红柿炒鸡蛋。
学习语言需要时间。每天读一点书，写一点字，说一点话，慢慢就会进步。
电脑和手机让生活更方便。我们可以在网上买东西，也可以和远方的朋友说话。
模型越大，需要的计算就越多。混合专家模型只让一部分专家处理每个词，所以计算更少。
一个专家就是一个前馈网络。门控网络决定每个词去哪个专家。
我们的推理引擎读取模型的权重，然后一个词一个词地生成文本。
生成文本的时候，模型先读完输入，再根据概率选出下一个词。
如果温度高，输出更多样；如果温度低，输出更稳定。
这个问题很简单，但是我们还是要认真回答。请你把答案写在下面。
老师说：“明天考试，大家早点休息。”同学们都点头说好。
他在北京工作了三年，后来回到上海，开了一家小公司。
周末我喜欢在家看电影，有时候也去图书馆看书。
这本书讲的是一个小孩子长大的故事，很有意思。
你好！很高兴认识你。你叫什么名字？我叫小王，我是学生。
今天是星期一，明天是星期二。我们下个月去旅行。
中国有很多美丽的地方，比如长城、西湖和黄山。
天气预报说今天下午有雨，出门记得带伞。
我们的目标是让模型更快、更省内存，同时输出不变。

The weather is nice today, so we walk in the park.
A mixture of experts model sends each token to one expert.
The gate is a small linear layer that scores every expert.
We read the weights, convert them, and generate text one token at a time.
Hello world! This is a small test of the tokenizer.
The model is fast, the answer is short, and the test is simple.
Please write the answer below, and keep it short.
Good morning! How are you today? I am fine, thank you.
There are 24 layers, 16 heads and 64 experts in this model.
Version 1.0 was released in 2023; version 2.0 came later.

早上好！Good morning！今天我们学习 GPU 和 CPU 的区别。
这个模型有 24 层，每层有 16 个头。The hidden size is 1024.
我用 Python 写了一个小程序，它可以把文本变成数字。
模型说：“你好，世界！”Hello, world!
  这一行前面有两个空格。\t制表符也是一个词。
"""


def _corpus_words() -> list[str]:
    """The corpus cut into jieba words, as the JiebaBPE tokenizer will see text."""
    jieba = _jieba()
    return [w for w in jieba.cut(DEMO_CORPUS) if w]


def _fixed_alphabet(words: list[str], max_chars: int) -> list[str]:
    """Keep the training words whose characters are among the `max_chars` most frequent
    ones (ties broken by code point), so the trainer never has to cut the alphabet
    itself (its own cut breaks ties in hash order, which differs between runs)."""
    counts = Counter(ch for w in words for ch in w)
    if len(counts) <= max_chars:
        return words
    must = {" ", "\n"}
    ranked = sorted(counts, key=lambda c: (c not in must, -counts[c], ord(c)))
    keep = set(ranked[:max_chars])
    return [w for w in words if all(ch in keep for ch in w)]


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_jieba_bpe_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> str:
    """Write `<out_dir>/tokenizer.json` (JiebaBPE, `<|endoftext|>` = 7, `<sep>` = 6)."""
    n_special = len(JIEBA_SPECIAL_TOKENS)
    if vocab_size < n_special + 32:
        raise ValueError(f"vocab_size must be at least {n_special + 32}, got {vocab_size}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)

    words = _fixed_alphabet(_corpus_words(), vocab_size - n_special - vocab_size // 8)
    tk = Tokenizer(BPE(unk_token=UNK_TOKEN))
    tk.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(JIEBA_SPECIAL_TOKENS),
        show_progress=False,
    )
    # No pre-tokenizer: each item is one jieba word, exactly what encode() will send.
    tk.train_from_iterator(words, trainer=trainer)
    assert tk.token_to_id(EOD_TOKEN) == 7 and tk.token_to_id("<sep>") == 6
    assert tk.get_vocab_size(with_added_tokens=True) <= vocab_size

    path = os.path.join(out, JIEBA_FILE)
    _write_atomic(path, (tk.to_str(pretty=True) + "\n").encode("utf-8"))
    return path


def build_gpt2_bpe_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400) -> tuple[str, str]:
    """Write `<out_dir>/vocab.json` and `<out_dir>/merges.txt` (GPT-2 byte-level BPE)."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, <|endoftext|>, one merge), got {vocab_size}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)

    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer=trainer)

    model = json.loads(tk.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert len(vocab) <= vocab_size and vocab[EOD_TOKEN] == 0

    vocab_path = os.path.join(out, GPT2_VOCAB_FILE)
    merges_path = os.path.join(out, GPT2_MERGES_FILE)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _write_atomic(vocab_path, (json.dumps(ordered, ensure_ascii=False) + "\n").encode("utf-8"))
    _write_atomic(merges_path, ("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode("utf-8"))
    return vocab_path, merges_path


__all__ = [
    "DEMO_CORPUS",
    "JIEBA_SPECIAL_TOKENS",
    "build_gpt2_bpe_tokenizer",
    "build_jieba_bpe_tokenizer",
]
