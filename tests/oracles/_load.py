"""Shared loading helpers for the test oracles (independent of `ftmoe`).

In:  a Megatron-DeepSpeed checkpoint folder (see SPEC.md section 2): main files
     `mp_rank_XX_model_states.pt` / `mp_rank_XX/model_rng.pt` / `mp_rank_XX/model_states.pt`
     (one per training tensor-parallel rank) and expert files
     `layer_{n}_expert_{e}_mp_rank_XX_model_states.pt`.
Out: the unpickled objects, with classes from modules that cannot be imported
     (e.g. `megatron.model.enums.ModelType` in the pickled `args`) replaced by
     placeholders; known Megatron enums become real `enum.Enum` classes whose
     `str()` is exactly what Megatron's enum prints (`ModelType.encoder_or_decoder`).

Only the standard library and torch are used; nothing from `ftmoe`.
"""
from __future__ import annotations

import enum
import os
import pickle
import re
import types

import torch

# Megatron / Megatron-DeepSpeed enums that show up in pickled `args`, with their members
# (megatron/model/enums.py, megatron/core/enums.py). A value not listed still loads, as a
# member named `value_<v>`, so that unknown newer members do not break loading.
KNOWN_ENUMS: dict[str, dict[str, int]] = {
    "ModelType": {"encoder_or_decoder": 1, "encoder_and_decoder": 2, "retro_encoder": 3, "retro_decoder": 4},
    "LayerType": {"encoder": 1, "decoder": 2, "retro_encoder": 3, "retro_decoder": 4,
                  "retro_decoder_with_retriever": 5},
    "AttnType": {"self_attn": 1, "cross_attn": 2},
    "AttnMaskType": {"padding": 1, "causal": 2, "prefix": 3},
    "PositionEmbeddingType": {"rotary": 1, "absolute": 2, "alibi": 3},
}

_CLASS_CACHE: dict[tuple[str, str], type] = {}


class Placeholder:
    """Stand-in for an object whose class could not be imported. Keeps what pickle gave it."""

    _ph_module = "?"
    _ph_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._ph_args = args
        obj._ph_kwargs = kwargs
        obj._ph_state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._ph_state = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1])

    def __repr__(self):
        inner = ", ".join(repr(a) for a in self._ph_args)
        return f"{self._ph_name}({inner})"

    __str__ = __repr__


class _LenientEnum(enum.Enum):
    """Base of the known-enum stand-ins: an unlisted value becomes a pseudo-member `value_<v>`."""

    @classmethod
    def _missing_(cls, value):
        obj = object.__new__(cls)
        obj._value_ = value
        obj._name_ = f"value_{value}"
        return obj


def placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _CLASS_CACHE:
        if module.split(".")[0] == "megatron" and name in KNOWN_ENUMS:
            cls = _LenientEnum(name, KNOWN_ENUMS[name], module=module, qualname=name)
        else:
            cls = type(name, (Placeholder,), {"__module__": module, "__qualname__": name,
                                              "_ph_module": module, "_ph_name": name})
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


class PlaceholderUnpickler(pickle.Unpickler):
    """pickle.Unpickler that substitutes placeholders for classes it cannot import."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return placeholder_class(module, name)


def _pickle_load(file, **kwargs):
    return PlaceholderUnpickler(file, **kwargs).load()


# A module-like object, as torch.load's `pickle_module` expects (it uses .Unpickler and .load).
PICKLE_MODULE = types.SimpleNamespace(__name__="oracle_placeholder_pickle", Unpickler=PlaceholderUnpickler,
                                      load=_pickle_load)


def torch_load(path: str):
    """torch.load on CPU with the placeholder unpickler (full unpickling, weights_only=False)."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=PICKLE_MODULE)


# ---- checkpoint folder layout -------------------------------------------------------------

# Main-file patterns without pipeline parallelism, in the order FasterTransformer tries them
# (its "Pattern 1/2/3" list, minus the `_{pp:03}` variants). Value: is_deepspeed flag.
MAIN_PATTERNS = [
    ("mp_rank_{:02d}/model_states.pt", True),
    ("mp_rank_{:02d}_model_states.pt", True),
    ("mp_rank_{:02d}/model_rng.pt", False),
]
PP_PATTERNS = ["mp_rank_{:02d}_{:03d}/model_states.pt", "tp_rank_{:02d}_pp_rank_{:03d}/model_states.pt",
               "mp_rank_{:02d}_{:03d}_model_states.pt", "tp_rank_{:02d}_pp_rank_{:03d}_model_states.pt",
               "mp_rank_{:02d}_{:03d}/model_rng.pt", "tp_rank_{:02d}_pp_rank_{:03d}/model_rng.pt"]

EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPERT_KEY_RE = re.compile(r"layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


def find_main_pattern(ckpt_dir: str) -> tuple[str, bool]:
    """(pattern, is_deepspeed) of the rank-0 main file; raises if none or if pipeline-parallel."""
    for pattern, is_ds in MAIN_PATTERNS:
        if os.path.exists(os.path.join(ckpt_dir, pattern.format(0))):
            return pattern, is_ds
    for pattern in PP_PATTERNS:
        if os.path.exists(os.path.join(ckpt_dir, pattern.format(0, 0))):
            raise NotImplementedError(f"pipeline-parallel checkpoint ({pattern}) is not supported by the oracle")
    raise FileNotFoundError(f"no mp_rank_00 main checkpoint file in {ckpt_dir}")


def load_main_states(ckpt_dir: str) -> tuple[list[dict], bool]:
    """All training-TP main files, rank order; returns (states, is_deepspeed)."""
    pattern, is_ds = find_main_pattern(ckpt_dir)
    s0 = torch_load(os.path.join(ckpt_dir, pattern.format(0)))
    tp = int(getattr(s0["args"], "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(s0["args"], "pipeline_model_parallel_size", 1) or 1)
    if pp != 1:
        raise NotImplementedError("training pipeline parallelism is not supported by the oracle")
    states = [s0] + [torch_load(os.path.join(ckpt_dir, pattern.format(r))) for r in range(1, tp)]
    return states, is_ds


def weights_key(state: dict) -> str:
    """'model' (Megatron) or 'module' (DeepSpeed); 'model' is tried first, as FT does."""
    for k in ("model", "module"):
        if k in state:
            return k
    raise KeyError("checkpoint has neither 'model' nor 'module'")


def language_model(state: dict) -> dict:
    return state[weights_key(state)]["language_model"]


def encoder_key(lm: dict) -> str:
    for k in ("encoder", "transformer"):
        if k in lm:
            return k
    raise KeyError("language_model has neither 'encoder' nor 'transformer'")


def encoder(state: dict) -> dict:
    lm = language_model(state)
    return lm[encoder_key(lm)]


def list_expert_files(ckpt_dir: str) -> dict[tuple[int, int], dict[int, str]]:
    """{(moe ordinal n, expert id e): {mp rank: path}} from the file names."""
    out: dict[tuple[int, int], dict[int, str]] = {}
    for name in os.listdir(ckpt_dir):
        m = EXPERT_FILE_RE.match(name)
        if m:
            n, e, r = (int(g) for g in m.groups())
            out.setdefault((n, e), {})[r] = os.path.join(ckpt_dir, name)
    return out
