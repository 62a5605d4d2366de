"""Shared fixtures: tiny random Megatron-DeepSpeed checkpoints and their conversions.

Everything is written under pytest's tmp dirs; jieba and inductor caches go to a
git-ignored `.tmp/` in the repo unless TMPDIR is already set.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

_REPO_TMP = pathlib.Path(__file__).resolve().parent.parent / ".tmp"
if "TMPDIR" not in os.environ:
    _REPO_TMP.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(_REPO_TMP)
    tempfile.tempdir = None

import torch  # noqa: E402

# Triton kernels run on the CPU through the interpreter when there is no GPU; the flag must be
# set before any kernel is defined (i.e. before ftmoe.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ftmoe.synthetic import PRESETS, save_megatron_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a loaded 2-core box: 1 torch thread is 10-100x faster than 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_ckpt_fp32(tmp_path_factory) -> str:
    """Tiny MoE checkpoint, fp32 weights, fp32 gate, non-zero expert b2."""
    return save_megatron_checkpoint(str(tmp_path_factory.mktemp("ckpt_fp32")), PRESETS["tiny"], seed=1,
                                    dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_ckpt_fp32, tmp_path_factory) -> str:
    """The fp32 tiny checkpoint converted to a 1-gpu fp32 FT folder."""
    from ftmoe.convert import convert

    return convert(tiny_ckpt_fp32, str(tmp_path_factory.mktemp("ft_fp32")), tp=1, dtype="fp32", progress=False)


@pytest.fixture
def fewer_attention_splits(monkeypatch):
    """Whole-model tests on the CPU: decode attention split over 2 programs per (row, head), not 8.

    The interpreter runs programs one by one, and the tiny model's contexts fill 1-3 KV blocks, so
    most of the 8 splits are empty programs that cost ~30 ms each: this takes the split and merge
    kernels through the same code at a quarter of the programs. The 8-split default is tested on
    its own (tests/test_kernels.py); on a GPU nothing changes."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "FTMOE_ATTN_SPLIT" not in os.environ:
        monkeypatch.setenv("FTMOE_ATTN_SPLIT", "2")
