"""Model configuration: one frozen dataclass, read from and written to FT's config.ini.

In:  a FasterTransformer `config.ini` (+ optional `args.txt`), or Megatron training args.
Out: `ModelConfig`, the only place the model sizes live; nothing else guesses them.
"""
from __future__ import annotations

import ast
import configparser
import dataclasses
import os
from typing import Any

from .errors import ModelFormatError

#: weight_data_type values we write; FT reads anything other than fp32 as fp16.
WEIGHT_DTYPES = ("fp16", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    max_pos_seq_len: int
    vocab_size: int
    layernorm_eps: float = 1e-5
    start_id: int = 50256
    end_id: int = 50256
    weight_data_type: str = "fp16"
    tensor_para_size: int = 1
    expert_num: int = 0
    moe_layers: tuple[int, ...] = ()
    moe_k: int = 1
    has_adapters: bool = False
    adapter_inter_size: int = 0
    model_name: str = "gpt"

    def __post_init__(self) -> None:
        for name in ("head_num", "size_per_head", "inter_size", "num_layer", "max_pos_seq_len",
                     "vocab_size", "tensor_para_size"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"config field '{name}' must be positive, found {getattr(self, name)}")
        if self.expert_num < 0 or (self.moe_layers and self.expert_num < 1):
            raise ModelFormatError(f"config field 'expert_num' is {self.expert_num} but moe_layers={list(self.moe_layers)}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layer]
        if bad:
            raise ModelFormatError(f"config field 'moe_layers' has layers {bad} outside 0..{self.num_layer - 1}")
        if self.moe_layers and not 1 <= self.moe_k <= self.expert_num:
            raise ModelFormatError(f"top-k {self.moe_k} must be in 1..expert_num={self.expert_num}")
        if self.has_adapters:
            raise ModelFormatError("models with adapters (has_adapters = True) are not supported")

    @property
    def hidden_size(self) -> int:
        return self.head_num * self.size_per_head

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def check_tp(self, tp: int) -> None:
        """Raise unless `tp` evenly splits the heads and the FFN size."""
        if tp < 1:
            raise ModelFormatError(f"tensor parallel size must be >= 1, found {tp}")
        if self.head_num % tp:
            raise ModelFormatError(f"tensor parallel size {tp} does not divide head_num={self.head_num}")
        if self.inter_size % tp:
            raise ModelFormatError(f"tensor parallel size {tp} does not divide inter_size={self.inter_size}")

    # ---- parameter counts -------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        H, F, V, P, E = self.hidden_size, self.inter_size, self.vocab_size, self.max_pos_seq_len, self.expert_num
        attn = H * 3 * H + 3 * H + H * H + H + 4 * H  # qkv, out, 2 layernorms
        mlp = H * F + F + F * H + H
        n_moe = len(self.moe_layers)
        n_dense = self.num_layer - n_moe
        embed = V * H + P * H + 2 * H
        experts = n_moe * E * mlp
        gates = n_moe * H * E
        total = embed + self.num_layer * attn + n_dense * mlp + experts + gates
        active = total - experts + n_moe * self.moe_k * mlp
        return {"total": total, "embedding": embed, "experts": experts, "active_per_token": active}

    # ---- config.ini ---------------------------------------------------------
    def to_ini(self) -> str:
        """config.ini text, byte-identical to FasterTransformer's converter output."""
        cp = configparser.ConfigParser()
        cp["gpt"] = {
            "model_name": self.model_name,
            "head_num": str(self.head_num),
            "size_per_head": str(self.size_per_head),
            "inter_size": str(self.inter_size),
            "num_layer": str(self.num_layer),
            "max_pos_seq_len": str(self.max_pos_seq_len),
            "vocab_size": str(self.vocab_size),
            "has_adapters": str(self.has_adapters),
            "adapter_inter_size": str(self.adapter_inter_size),
            "layernorm_eps": str(self.layernorm_eps),
            "start_id": str(self.start_id),
            "end_id": str(self.end_id),
            "weight_data_type": self.weight_data_type,
            "tensor_para_size": str(self.tensor_para_size),
        }
        cp["structure"] = {
            "gpt_with_moe": str(int(self.expert_num > 0)),
            "expert_num": str(self.expert_num),
            "moe_layers": str(list(self.moe_layers)),
        }
        import io

        buf = io.StringIO()
        cp.write(buf)
        return buf.getvalue()

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        """Read `<model_dir>/config.ini` (and `args.txt` for top-k, when present)."""
        path = os.path.join(model_dir, "config.ini")
        if not os.path.isfile(path):
            raise ModelFormatError(f"{path}: not found (is '{model_dir}' a converted <N>-gpu folder?)")
        cp = configparser.ConfigParser()
        try:
            cp.read(path)
        except configparser.Error as e:
            raise ModelFormatError(f"{path}: cannot parse: {e}".replace("\n", " ")) from None
        section = cp["gpt"] if cp.has_section("gpt") else None
        if section is None:
            raise ModelFormatError(f"{path}: missing section [gpt]")

        def get(sec: Any, key: str, conv: Any, default: Any = None) -> Any:
            if key not in sec:
                if default is not None:
                    return default
                raise ModelFormatError(f"{path}: missing field '{key}'")
            try:
                return conv(sec[key])
            except (ValueError, SyntaxError):
                raise ModelFormatError(f"{path}: field '{key}' has bad value '{sec[key]}'") from None

        def to_bool(s: str) -> bool:
            if s.strip().lower() in ("1", "true", "yes"):
                return True
            if s.strip().lower() in ("0", "false", "no"):
                return False
            raise ValueError(s)

        kw: dict[str, Any] = dict(
            model_name=section.get("model_name", "gpt"),
            head_num=get(section, "head_num", int),
            size_per_head=get(section, "size_per_head", int),
            inter_size=get(section, "inter_size", int),
            num_layer=get(section, "num_layer", int),
            max_pos_seq_len=get(section, "max_pos_seq_len", int),
            vocab_size=get(section, "vocab_size", int),
            layernorm_eps=get(section, "layernorm_eps", float, 1e-5),
            start_id=get(section, "start_id", int, 50256),
            end_id=get(section, "end_id", int, 50256),
            weight_data_type=section.get("weight_data_type", "fp16").strip(),
            tensor_para_size=get(section, "tensor_para_size", int, 1),
            has_adapters=get(section, "has_adapters", to_bool, False),
            adapter_inter_size=get(section, "adapter_inter_size", int, 0),
        )
        if cp.has_section("structure") and get(cp["structure"], "gpt_with_moe", int, 0):
            st = cp["structure"]
            kw["expert_num"] = get(st, "expert_num", int)
            layers = get(st, "moe_layers", ast.literal_eval)
            if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
                raise ModelFormatError(f"{path}: field 'moe_layers' must be a list of ints, found {st['moe_layers']}")
            kw["moe_layers"] = tuple(layers)
            kw["moe_k"] = get(st, "moe_k", int, 0) or _topk_from_args(model_dir)
        return cls(**kw)


def _topk_from_args(model_dir: str) -> int:
    """FT's config.ini has no top-k; take it from args.txt (`topk:N`), else 1."""
    path = os.path.join(model_dir, "args.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.rstrip("\n").partition(":")
                if key == "topk":
                    try:
                        return int(val)
                    except ValueError:
                        raise ModelFormatError(f"{path}: 'topk' has bad value '{val}'") from None
    return 1
