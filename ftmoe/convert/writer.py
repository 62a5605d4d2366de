"""Write a FasterTransformer c-model folder from a Megatron-DeepSpeed checkpoint.

In:  checkpoint folder, output folder, TP size, weight dtype, optional tokenizer folder.
Out: `<out>/<tp>-gpu/` with every `model.*.bin` (raw little-endian arrays, FT layout and
     split rules from `ftformat`), `config.ini`, `args.txt` and the tokenizer files,
     byte-identical to FasterTransformer's converter for fp16/fp32.

The folder is built under a temporary name beside the target and renamed at the end,
so a failure never leaves a half-written model behind.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile

import torch

from ..errors import CheckpointError, FtmoeError
from ..ftformat import TORCH_DTYPES, spec_for, split_for_tp, to_ft_layout
from ..progress import Progress
from .megatron_ds import open_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def cast_like_ft(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FT's torch2np: bf16 goes through fp32, then one round-to-nearest-even cast."""
    if t.dtype == torch.bfloat16 and dtype != torch.bfloat16:
        t = t.float()
    return t.to(dtype)


def write_raw(t: torch.Tensor, path: str) -> None:
    """One tensor as raw C-order bytes (FT's ndarray.tofile)."""
    with open(path, "wb") as f:
        f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def write_split(spec, ft: torch.Tensor, tp: int, folder: str) -> None:
    """One tensor in FT layout and dtype as its files for `tp` ranks (FT's split rule) in `folder`."""
    for path, part in zip(spec.files(tp), split_for_tp(spec, ft, tp)):
        write_raw(part, os.path.join(folder, path))


def staging_dir(out_dir: str, tp: int) -> str:
    """A fresh temp folder beside `<out_dir>/<tp>-gpu`, with the usual permissions; `replace_dir`
    moves it into place once complete, so a failed write leaves nothing half-written."""
    tmp = tempfile.mkdtemp(prefix=f".{tp}-gpu.partial-", dir=out_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions
    return tmp


def _tokenizer_ids(tokenizer_dir: str) -> tuple[int, int]:
    from ..tokenizer import special_ids

    ids = special_ids(tokenizer_dir)
    if ids is None:
        raise FtmoeError(f"{tokenizer_dir}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)")
    return ids


def convert(ckpt_dir: str, out_dir: str, tp: int = 1, dtype: str = "fp16", tokenizer_dir: str | None = None,
            progress: bool = True) -> str:
    """Convert; returns the path of the written `<out_dir>/<tp>-gpu` folder."""
    if dtype not in TORCH_DTYPES:
        raise FtmoeError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, found '{dtype}'")
    ckpt = open_checkpoint(ckpt_dir)
    cfg = ckpt.config
    cfg.check_tp(tp)
    start_end = _tokenizer_ids(tokenizer_dir) if tokenizer_dir else (cfg.start_id, cfg.end_id)
    cfg = dataclasses.replace(cfg, weight_data_type=dtype, tensor_para_size=tp,
                              start_id=start_end[0], end_id=start_end[1])
    tdtype = TORCH_DTYPES[dtype]
    total = ckpt.total_bytes(tdtype.itemsize)

    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"{tp}-gpu")
    free = shutil.disk_usage(out_dir).free
    if free < total:
        raise FtmoeError(f"{out_dir}: {total / 2**30:.2f} GiB needed for the converted model, "
                         f"{free / 2**30:.2f} GiB free")
    tmp = staging_dir(out_dir, tp)
    bar = Progress(total, f"converting to {tp}-gpu {dtype}", enabled=progress)
    try:
        for name, t in ckpt.tensors():
            spec = spec_for(cfg, name)
            ft = cast_like_ft(to_ft_layout(cfg, name, t), tdtype)
            write_split(spec, ft, tp, tmp)
            bar.update(ft.numel() * tdtype.itemsize, note=name if progress else "")
            del ft
        with open(os.path.join(tmp, "args.txt"), "w") as f:
            f.write(ckpt.args_txt())
        with open(os.path.join(tmp, "config.ini"), "w") as f:
            f.write(cfg.to_ini())
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
        bar.close()
        replace_dir(tmp, final)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"wrote {final} ({total / 2**20:.1f} MiB)", file=sys.stderr)
    return final


def replace_dir(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`, replacing an existing folder only once the new one is complete."""
    old = None
    if os.path.exists(final):
        if not os.path.isdir(final):
            raise CheckpointError(f"{final}: exists and is not a folder")
        old = final + ".old-" + os.path.basename(tmp)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
