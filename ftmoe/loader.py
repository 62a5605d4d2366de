"""Load a FasterTransformer c-model folder (ours or FT's own) into a `GPTMoE`.

In:  `<out>/<t>-gpu/` (config.ini + model.*.bin), a dtype and a device.
Out: a `GPTMoE` in eval mode whose weights are the files' contents.

Strict: before reading a byte, every expected file must exist with exactly the size the
config implies, and no unexpected `model.*.bin` may be present; the error names the file
and the expected versus found size. Files are memory-mapped; the shards of a TP folder
are concatenated along their split axis, so any TP folder loads on one device.
"""
from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .distributed import ParallelState
from .errors import ModelFormatError
from .ftformat import TensorSpec, tensor_specs, torch_dtype_of
from .layers.mlp import MoEOptions
from .model import GPTMoE
from .progress import Progress

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelFormatError(f"dtype must be one of float32, float16, bfloat16; found '{dtype}'") from None


def resolve_model_dir(model_dir: str) -> str:
    """Accept the `<t>-gpu` folder itself, or its parent when it holds exactly one."""
    if not os.path.isdir(model_dir):
        raise ModelFormatError(f"{model_dir}: model folder not found")
    if os.path.isfile(os.path.join(model_dir, "config.ini")):
        return model_dir
    subs = sorted(d for d in os.listdir(model_dir)
                  if d.endswith("-gpu") and os.path.isfile(os.path.join(model_dir, d, "config.ini")))
    if len(subs) == 1:
        return os.path.join(model_dir, subs[0])
    if subs:
        raise ModelFormatError(f"{model_dir}: holds several converted models ({', '.join(subs)}); name one")
    raise ModelFormatError(f"{model_dir}: no config.ini (expected a converted <N>-gpu folder)")


def check_files(model_dir: str, cfg: ModelConfig) -> list[tuple[TensorSpec, list[str]]]:
    """Every expected file exists with the right size and nothing unexpected is there."""
    file_dtype = torch_dtype_of(cfg.weight_data_type)
    tp = cfg.tensor_para_size
    plan, problems, expected = [], [], set()
    for spec in tensor_specs(cfg):
        want = torch.Size(spec.shard_shape(tp)).numel() * file_dtype.itemsize
        paths = []
        for fname in spec.files(tp):
            expected.add(fname)
            path = os.path.join(model_dir, fname)
            paths.append(path)
            if not os.path.isfile(path):
                problems.append(f"{path}: missing (expected {want} bytes, shape {list(spec.shard_shape(tp))} "
                                f"{cfg.weight_data_type})")
            elif os.path.getsize(path) != want:
                problems.append(f"{path}: {os.path.getsize(path)} bytes, expected {want} "
                                f"(shape {list(spec.shard_shape(tp))} {cfg.weight_data_type}); truncated or "
                                f"from another model?")
        plan.append((spec, paths))
    extra = sorted(f for f in os.listdir(model_dir) if f.startswith("model.") and f.endswith(".bin")
                   and f not in expected)
    if extra:
        problems.append(f"{os.path.join(model_dir, extra[0])}: unexpected file ({len(extra)} unexpected in all; "
                        f"config.ini says tensor_para_size={tp}, moe_layers={list(cfg.moe_layers)})")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ModelFormatError(problems[0] + more)
    return plan


def read_tensor(spec: TensorSpec, paths: list[str], cfg: ModelConfig) -> torch.Tensor:
    """The full FT tensor, shards concatenated along the split axis (memory-mapped reads)."""
    file_dtype = torch_dtype_of(cfg.weight_data_type)
    shard = spec.shard_shape(cfg.tensor_para_size)
    parts = [torch.from_file(p, shared=False, size=torch.Size(shard).numel(), dtype=file_dtype).view(shard)
             for p in paths]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.split_axis)


def read_shard(spec: TensorSpec, paths: list[str], cfg: ModelConfig, par: ParallelState) -> torch.Tensor:
    """This rank's part of a tensor: its TP slice along the split axis (one file when the folder
    was converted for the same TP size), and its experts (axis 0) under expert parallelism."""
    if spec.split_axis is not None and par.tp > 1 and cfg.tensor_para_size == par.tp:
        t = read_tensor(spec, [paths[par.t]], cfg)
    else:
        t = read_tensor(spec, paths, cfg)
        if spec.split_axis is not None and par.tp > 1:
            t = torch.tensor_split(t, par.tp, dim=spec.split_axis)[par.t]
    if ".experts." in spec.name and par.ep > 1:
        n = t.shape[0] // par.ep
        t = t[par.d * n:(par.d + 1) * n]
    return t


def load_model(model_dir: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               moe_options: MoEOptions | None = None, progress: bool | None = None,
               par: ParallelState | None = None) -> GPTMoE:
    """progress: a progress line on stderr; by default only for models over 1 GB.
    par: load only this rank's shard (its stage's layers, TP slices and experts)."""
    model_dir = resolve_model_dir(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    tdtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelFormatError("device 'cuda' requested but no CUDA GPU is available")
    plan = check_files(model_dir, cfg)
    par = par or ParallelState.single(device)
    par.config.check(cfg)
    with torch.device("meta"):
        model = GPTMoE(cfg, tdtype, moe_options=moe_options, par=par)
    wanted = model.state_dict()
    plan = [(s, p) for s, p in plan if s.name in wanted]
    total = sum(torch.Size(s.shape).numel() for s, _ in plan) * torch_dtype_of(cfg.weight_data_type).itemsize
    bar = Progress(total, f"loading {model_dir}", enabled=progress if progress is not None else total > 2**30)
    state = {}
    for spec, paths in plan:
        t = read_shard(spec, paths, cfg, par)
        if t.shape != wanted[spec.name].shape:
            raise ModelFormatError(f"{paths[0]}: shard shape {list(t.shape)} differs from the model's "
                                   f"{list(wanted[spec.name].shape)}")
        state[spec.name] = torch.nn.Parameter(t.to(device=device, dtype=tdtype), requires_grad=False)
        bar.update(t.numel() * t.element_size())
    bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    model.source_dir = model_dir
    return model.eval()
