"""The one table of FasterTransformer c-model tensors: names, shapes, split rules, layouts.

In:  a `ModelConfig`, and tensors in Megatron's torch layout (`[out, in]` linears,
     per-head interleaved QKV, experts stacked in id order as `[E, out, in]`).
Out: `TensorSpec`s (file names, full FT shapes, TP split axis) and `to_ft_layout`,
     the Megatron -> FT transform. The converter writes with this table and the
     loader reads with it; neither spells a file name of its own.

Legend: H hidden, F ffn, E experts, V vocab, P positions, D head dim, t TP size.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

import torch

from .config import ModelConfig
from .errors import ModelFormatError

_Shape = Callable[[ModelConfig], tuple]


@dataclasses.dataclass(frozen=True)
class _Rule:
    suffix: str             # FT name after "layers.N." (or the whole global name)
    ft_shape: _Shape        # full (unsplit) FT shape
    split_axis: int | None  # TP split axis of the FT array; None = replicated, one file
    meg_shape: _Shape       # Megatron torch shape (experts stacked in front)


def _H(c: ModelConfig) -> int:
    return c.hidden_size


_GLOBAL = [
    _Rule("wpe", lambda c: (c.max_pos_seq_len, _H(c)), None, lambda c: (c.max_pos_seq_len, _H(c))),
    _Rule("wte", lambda c: (c.vocab_size, _H(c)), None, lambda c: (c.vocab_size, _H(c))),
    _Rule("final_layernorm.weight", lambda c: (_H(c),), None, lambda c: (_H(c),)),
    _Rule("final_layernorm.bias", lambda c: (_H(c),), None, lambda c: (_H(c),)),
]
_LAYER = [
    _Rule("input_layernorm.weight", lambda c: (_H(c),), None, lambda c: (_H(c),)),
    _Rule("input_layernorm.bias", lambda c: (_H(c),), None, lambda c: (_H(c),)),
    _Rule("attention.query_key_value.weight", lambda c: (_H(c), 3, _H(c)), 2, lambda c: (3 * _H(c), _H(c))),
    _Rule("attention.query_key_value.bias", lambda c: (3, _H(c)), 1, lambda c: (3 * _H(c),)),
    _Rule("attention.dense.weight", lambda c: (_H(c), _H(c)), 0, lambda c: (_H(c), _H(c))),
    _Rule("attention.dense.bias", lambda c: (_H(c),), None, lambda c: (_H(c),)),
    _Rule("post_attention_layernorm.weight", lambda c: (_H(c),), None, lambda c: (_H(c),)),
    _Rule("post_attention_layernorm.bias", lambda c: (_H(c),), None, lambda c: (_H(c),)),
]
_DENSE = [
    _Rule("mlp.dense_h_to_4h.weight", lambda c: (_H(c), c.inter_size), 1, lambda c: (c.inter_size, _H(c))),
    _Rule("mlp.dense_h_to_4h.bias", lambda c: (c.inter_size,), 0, lambda c: (c.inter_size,)),
    _Rule("mlp.dense_4h_to_h.weight", lambda c: (c.inter_size, _H(c)), 0, lambda c: (_H(c), c.inter_size)),
    _Rule("mlp.dense_4h_to_h.bias", lambda c: (_H(c),), None, lambda c: (_H(c),)),
]
_MOE = [
    _Rule("mlp.moe.gate.wg.weight", lambda c: (_H(c), c.expert_num), None, lambda c: (c.expert_num, _H(c))),
    _Rule("mlp.moe.experts.dense_h_to_4h.weight", lambda c: (c.expert_num, _H(c), c.inter_size), 2,
          lambda c: (c.expert_num, c.inter_size, _H(c))),
    _Rule("mlp.moe.experts.dense_h_to_4h.bias", lambda c: (c.expert_num, c.inter_size), 1,
          lambda c: (c.expert_num, c.inter_size)),
    _Rule("mlp.moe.experts.dense_4h_to_h.weight", lambda c: (c.expert_num, c.inter_size, _H(c)), 1,
          lambda c: (c.expert_num, _H(c), c.inter_size)),
    _Rule("mlp.moe.experts.dense_4h_to_h.bias", lambda c: (c.expert_num, _H(c)), None,
          lambda c: (c.expert_num, _H(c))),
]
_RULES = {r.suffix: r for r in _GLOBAL + _LAYER + _DENSE + _MOE}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One logical FT tensor: `name` is the file stem without `model.` and rank."""

    name: str
    shape: tuple            # full FT shape
    split_axis: int | None  # None: one replicated file `model.<name>.bin`
    megatron_shape: tuple   # the shape the converter expects on the Megatron side

    def files(self, tp: int) -> list[str]:
        if self.split_axis is None:
            return [f"model.{self.name}.bin"]
        return [f"model.{self.name}.{r}.bin" for r in range(tp)]

    def shard_shape(self, tp: int) -> tuple:
        if self.split_axis is None:
            return self.shape
        s = list(self.shape)
        if s[self.split_axis] % tp:
            raise ModelFormatError(f"tensor '{self.name}': axis {self.split_axis} of size "
                                   f"{s[self.split_axis]} does not split {tp} ways")
        s[self.split_axis] //= tp
        return tuple(s)


def _rule_for(name: str) -> _Rule:
    m = _LAYER_RE.match(name)
    rule = _RULES.get(m.group(2) if m else name)
    if rule is None:
        raise KeyError(f"no FT tensor rule for '{name}'")
    return rule


def spec_for(cfg: ModelConfig, name: str) -> TensorSpec:
    rule = _rule_for(name)
    return TensorSpec(name, tuple(rule.ft_shape(cfg)), rule.split_axis, tuple(rule.meg_shape(cfg)))


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the model, in a fixed order (globals, then layer by layer)."""
    names = [r.suffix for r in _GLOBAL]
    for i in range(cfg.num_layer):
        mlp = _MOE if cfg.is_moe_layer(i) else _DENSE
        names += [f"layers.{i}.{r.suffix}" for r in _LAYER + mlp]
    return [spec_for(cfg, n) for n in names]


def layer_tensor_names(cfg: ModelConfig, i: int) -> Iterator[str]:
    mlp = _MOE if cfg.is_moe_layer(i) else _DENSE
    for r in _LAYER + mlp:
        yield f"layers.{i}.{r.suffix}"


def to_ft_layout(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Megatron torch layout -> full FT layout (still the source dtype), contiguous."""
    H, heads, D = cfg.hidden_size, cfg.head_num, cfg.size_per_head
    suffix = _LAYER_RE.match(name).group(2) if _LAYER_RE.match(name) else name
    if suffix == "attention.query_key_value.weight":
        # [3H, H] rows per head (q_h, k_h, v_h) -> [H, 3H] -> [H, heads, 3, D] -> [H, 3, heads, D]
        t = t.t().reshape(H, heads, 3, D).permute(0, 2, 1, 3).reshape(H, 3, H)
    elif suffix == "attention.query_key_value.bias":
        t = t.reshape(heads, 3, D).permute(1, 0, 2).reshape(3, H)
    elif name in ("wte", "wpe") or not name.endswith(".weight") or t.dim() == 1:
        pass                              # embeddings, biases, layernorms: as they are
    elif t.dim() == 2:
        t = t.t()                         # linear [out, in] -> [in, out]; gate [E, H] -> [H, E]
    elif t.dim() == 3:
        t = t.transpose(1, 2)             # experts [E, out, in] -> [E, in, out]
    want = tuple(_rule_for(name).ft_shape(cfg))
    if tuple(t.shape) != want:
        raise ModelFormatError(f"tensor '{name}': FT layout {list(t.shape)} differs from the expected {list(want)}")
    return t.contiguous()


def split_for_tp(spec: TensorSpec, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Full FT array -> the per-rank arrays (one for replicated tensors)."""
    if spec.split_axis is None:
        return [t]
    spec.shard_shape(tp)  # raises if it does not divide
    return [p.contiguous() for p in torch.chunk(t, tp, dim=spec.split_axis)]


#: FT weight_data_type -> torch dtype (FT itself reads anything but fp32 as fp16).
TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def torch_dtype_of(weight_data_type: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[weight_data_type]
    except KeyError:
        raise ModelFormatError(f"weight_data_type '{weight_data_type}' is not one of "
                               f"{sorted(TORCH_DTYPES)}") from None
