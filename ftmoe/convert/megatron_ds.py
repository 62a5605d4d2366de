"""Read a Megatron-DeepSpeed GPT-MoE checkpoint folder, one tensor at a time.

In:  a folder with the main file (`mp_rank_00_model_states.pt`, or `mp_rank_00/model_rng.pt`,
     `mp_rank_00/model_states.pt`; `mp_rank_01...` for training TP > 1) and the expert files
     `layer_{n}_expert_{e}_mp_rank_XX_model_states.pt` (n: MoE-layer ordinal, e: global id).
Out: `MegatronCheckpoint` with a `ModelConfig` built from `args` and `tensors()`, a stream of
     (FT name, tensor in Megatron layout): training-TP shards merged, experts of one layer
     stacked `[E, out, in]`. At most the main file(s) plus one layer's experts are in memory.

Everything is validated against `args` before it is yielded; problems raise
`CheckpointError` naming the file, the tensor and what was expected.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..ftformat import spec_for, tensor_specs
from .unpickle import load_pt

_MAIN_PATTERNS = [  # (pattern, weights key preference)
    "mp_rank_{:02d}_model_states.pt",
    "mp_rank_{:02d}/model_rng.pt",
    "mp_rank_{:02d}/model_states.pt",
]
_EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.mlp\.(?:deepspeed_moe|megatron_moe)\.experts\.deepspeed_experts\.(\d+)\."
    r"(dense_h_to_4h|dense_4h_to_h)\.(weight|bias)$")
_ENC_KEY_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
# Megatron encoder sub-key -> FT suffix (attention keys come as self_attention.* or attention.*)
_ATT_MAP = {k: "attention." + k for k in ("query_key_value.weight", "query_key_value.bias",
                                          "dense.weight", "dense.bias")}
_ENC_MAP = {k: k for k in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                           "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                           "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")}
_ENC_MAP["mlp.deepspeed_moe.gate.wg.weight"] = _ENC_MAP["mlp.megatron_moe.gate.wg.weight"] = "mlp.moe.gate.wg.weight"
# Megatron tensor-parallel layout of each FT tensor: the dim that training TP split, or None.
_TRAIN_TP_DIM = {
    "attention.query_key_value.weight": 0, "attention.query_key_value.bias": 0,
    "attention.dense.weight": 1, "mlp.dense_h_to_4h.weight": 0, "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1, "wte": 0,
}
_EXPERT_TP_DIM = {"dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0, "dense_4h_to_h.weight": 1}


def _ft_suffix(sub: str) -> str | None:
    for att in ("self_attention.", "attention."):
        if sub.startswith(att):
            return _ATT_MAP.get(sub[len(att):])
    return _ENC_MAP.get(sub)


def _get(args: Any, name: str, path: str, default: Any = ...) -> Any:
    if hasattr(args, name) and getattr(args, name) is not None:
        return getattr(args, name)
    if default is not ...:
        return default
    raise CheckpointError(f"{path}: args has no field '{name}'")


@dataclasses.dataclass
class MegatronCheckpoint:
    ckpt_dir: str
    main_files: list[str]
    args: Any
    config: ModelConfig
    train_tp: int
    expert_files: dict[tuple[int, int], str]     # (moe ordinal, expert id) -> path
    _encoders: list[dict[str, torch.Tensor]]    # FT-named, one per training TP rank
    _wte: list[torch.Tensor]
    _wpe: torch.Tensor

    @property
    def main_file(self) -> str:
        return self.main_files[0]

    def args_txt(self) -> str:
        """FT's args.txt: `key:value` per line of the training args, in order."""
        return "".join(f"{k}:{v}\n" for k, v in vars(self.args).items())

    def total_bytes(self, itemsize: int) -> int:
        return sum(torch.Size(s.shape).numel() for s in tensor_specs(self.config)) * itemsize

    # ---- the stream ----------------------------------------------------------
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        yield "wpe", self._checked("wpe", self._wpe, self.main_file)
        yield "wte", self._checked("wte", torch.cat(self._wte, 0) if self.train_tp > 1 else self._wte[0],
                                   self.main_file)
        for name in ("final_layernorm.weight", "final_layernorm.bias"):
            yield name, self._merged(name)
        for i in range(cfg.num_layer):
            mlp = (("mlp.moe.gate.wg.weight",) if cfg.is_moe_layer(i) else
                   ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                    "mlp.dense_4h_to_h.bias"))
            for suffix in ("input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
                           "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
                           "post_attention_layernorm.weight", "post_attention_layernorm.bias") + mlp:
                yield f"layers.{i}.{suffix}", self._merged(f"layers.{i}.{suffix}")
            if cfg.is_moe_layer(i):
                yield from self._experts(i)

    def _checked(self, name: str, t: torch.Tensor, path: str) -> torch.Tensor:
        want = spec_for(self.config, name).megatron_shape
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(want)} "
                                  f"from the checkpoint's args")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected a float type")
        return t

    def _merged(self, name: str) -> torch.Tensor:
        suffix = _ENC_KEY_RE.match(name).group(2) if _ENC_KEY_RE.match(name) else name
        dim = _TRAIN_TP_DIM.get(suffix)
        if name not in self._encoders[0]:
            raise CheckpointError(f"{self.main_file}: tensor '{name}' is missing")
        if self.train_tp == 1 or dim is None:
            t = self._encoders[0][name]
        else:
            t = torch.cat([enc[name] for enc in self._encoders], dim)
        return self._checked(name, t, self.main_file)

    def _experts(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        n = cfg.moe_layers.index(layer)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("dense_h_to_4h.weight", "dense_h_to_4h.bias",
                                                                 "dense_4h_to_h.weight", "dense_4h_to_h.bias")}
        for e in range(cfg.expert_num):
            path = self.expert_files[(n, e)]
            for k, v in self._read_expert(path, layer, e).items():
                parts[k].append(v)
        for k, vs in parts.items():
            name = f"layers.{layer}.mlp.moe.experts.{k}"
            yield name, self._checked(name, torch.stack(vs, 0), self.expert_files[(n, 0)])
            vs.clear()

    def _read_expert(self, path: str, layer: int, e: int) -> dict[str, torch.Tensor]:
        paths = [path]
        if _get(self.args, "enable_expert_tensor_parallelism", path, False) and self.train_tp > 1:
            paths = [re.sub(r"mp_rank_\d+", f"mp_rank_{r:02d}", path) for r in range(self.train_tp)]
        shards = [self._read_expert_file(p, layer, e) for p in paths]
        if len(shards) == 1:
            return shards[0]
        return {k: (shards[0][k] if k not in _EXPERT_TP_DIM else torch.cat([s[k] for s in shards], _EXPERT_TP_DIM[k]))
                for k in shards[0]}

    def _read_expert_file(self, path: str, layer: int, e: int) -> dict[str, torch.Tensor]:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: expert file is missing")
        sd = load_pt(path)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a dict of 4 tensors, found {type(sd).__name__}")
        out: dict[str, torch.Tensor] = {}
        for key, val in sd.items():
            m = _EXPERT_KEY_RE.search(key)
            if m is None:
                raise CheckpointError(f"{path}: unexpected key '{key}' (expected "
                                      f"'...layers.L.mlp.deepspeed_moe.experts.deepspeed_experts.E.<param>')")
            kl, ke = int(m.group(1)), int(m.group(2))
            if (kl, ke) != (layer, e):
                raise CheckpointError(f"{path}: key '{key}' is for layer {kl} expert {ke}, but the file name says "
                                      f"layer {layer} (MoE ordinal {self.config.moe_layers.index(layer)}) expert {e}")
            out[f"{m.group(3)}.{m.group(4)}"] = val
        missing = {"dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias"} - set(out)
        if missing:
            raise CheckpointError(f"{path}: missing tensors {sorted(missing)}")
        return out


def _find_main(ckpt_dir: str) -> tuple[str, list[str]]:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint folder not found")
    for pat in _MAIN_PATTERNS:
        first = os.path.join(ckpt_dir, pat.format(0))
        if os.path.isfile(first):
            files = [first]
            r = 1
            while os.path.isfile(os.path.join(ckpt_dir, pat.format(r))):
                files.append(os.path.join(ckpt_dir, pat.format(r)))
                r += 1
            return pat, files
    if glob.glob(os.path.join(ckpt_dir, "mp_rank_00_0*")) or glob.glob(os.path.join(ckpt_dir, "tp_rank_*")):
        raise CheckpointError(f"{ckpt_dir}: pipeline-parallel training checkpoints (mp_rank_XX_YYY, tp_rank_XX_pp_rank_YYY) "
                              f"are not supported yet")
    raise CheckpointError(f"{ckpt_dir}: no main checkpoint file (looked for "
                          + ", ".join(p.format(0) for p in _MAIN_PATTERNS) + ")")


def _weights(state: dict, path: str) -> tuple[dict, dict, str]:
    for key in ("module", "model"):
        if isinstance(state.get(key), dict):
            break
    else:
        raise CheckpointError(f"{path}: no weights under 'module' or 'model' (keys: {sorted(map(str, state))})")
    lm = state[key].get("language_model")
    if not isinstance(lm, dict):
        raise CheckpointError(f"{path}: '{key}' has no 'language_model' dict")
    for enc_key in ("encoder", "transformer"):
        if isinstance(lm.get(enc_key), dict):
            break
    else:
        raise CheckpointError(f"{path}: 'language_model' has neither 'encoder' nor 'transformer'")
    emb = lm.get("embedding")
    if not isinstance(emb, dict):
        raise CheckpointError(f"{path}: 'language_model' has no 'embedding'")
    return emb, lm[enc_key], key


def _emb(emb: dict, which: str, path: str) -> torch.Tensor:
    if isinstance(emb.get(which), dict) and "weight" in emb[which]:
        return emb[which]["weight"]
    if f"{which}.weight" in emb:
        return emb[f"{which}.weight"]
    raise CheckpointError(f"{path}: embedding has no '{which}.weight'")


def _rename_encoder(enc: dict, path: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, val in enc.items():
        if key.startswith("final_layernorm."):
            name = key if key in ("final_layernorm.weight", "final_layernorm.bias") else None
        else:
            m = _ENC_KEY_RE.match(key)
            suffix = _ft_suffix(m.group(2)) if m else None
            name = f"layers.{int(m.group(1))}.{suffix}" if suffix else None
        if name is None:
            raise CheckpointError(f"{path}: unexpected key '{key}' in the encoder weights")
        if not isinstance(val, torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' is a {type(val).__name__}, expected a tensor")
        out[name] = val
    return out


def open_checkpoint(ckpt_dir: str) -> MegatronCheckpoint:
    """Find, load and validate the main file(s) and the expert file list."""
    _, main_files = _find_main(ckpt_dir)
    path = main_files[0]
    state = load_pt(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    version = state.get("checkpoint_version")
    if version is None or float(version) != 3.0:
        raise CheckpointError(f"{path}: checkpoint_version is {version}, expected 3 (only Megatron's "
                              f"version-3 QKV layout is supported)")
    args = state.get("args")
    if args is None:
        raise CheckpointError(f"{path}: no 'args' in the checkpoint")
    train_tp = int(_get(args, "tensor_model_parallel_size", path, 1))
    if int(_get(args, "pipeline_model_parallel_size", path, 1)) > 1:
        raise CheckpointError(f"{path}: pipeline_model_parallel_size is "
                              f"{args.pipeline_model_parallel_size}; pipeline-parallel training checkpoints "
                              f"are not supported yet")
    if len(main_files) != train_tp:
        raise CheckpointError(f"{ckpt_dir}: args say tensor_model_parallel_size={train_tp} but "
                              f"{len(main_files)} main file(s) were found ({', '.join(map(os.path.basename, main_files))})")
    encoders, wtes = [], []
    wpe = None
    for r, p in enumerate(main_files):
        st = state if r == 0 else load_pt(p)
        emb, enc, _ = _weights(st, p)
        encoders.append(_rename_encoder(enc, p))
        wtes.append(_emb(emb, "word_embeddings", p))
        if r == 0:
            wpe = _emb(emb, "position_embeddings", p)
    for r in range(1, train_tp):
        if set(encoders[r]) != set(encoders[0]):
            diff = sorted(set(encoders[r]) ^ set(encoders[0]))[:3]
            raise CheckpointError(f"{main_files[r]}: tensor names differ from {main_files[0]} (e.g. {diff})")

    H = int(_get(args, "hidden_size", path))
    heads = int(_get(args, "num_attention_heads", path))
    if H % heads:
        raise CheckpointError(f"{path}: hidden_size={H} is not divisible by num_attention_heads={heads}")
    n_exp = _get(args, "num_experts", path, [0])
    n_exp = int(n_exp[0] if isinstance(n_exp, (list, tuple)) else n_exp)
    vocab = sum(int(w.shape[0]) for w in wtes)
    padded = int(_get(args, "padded_vocab_size", path, vocab))
    if padded != vocab:
        raise CheckpointError(f"{path}: word_embeddings have {vocab} rows in all, but args.padded_vocab_size={padded}")
    moe_layers = sorted(int(_ENC_KEY_RE.match(k).group(1)) for k in encoders[0] if k.endswith("mlp.moe.gate.wg.weight"))
    if moe_layers and n_exp < 1:
        raise CheckpointError(f"{path}: gates found in layers {moe_layers} but args.num_experts={n_exp}")
    layers = int(_get(args, "num_layers", path))
    cfg = ModelConfig(
        head_num=heads, size_per_head=H // heads,
        inter_size=int(_get(args, "ffn_hidden_size", path, 4 * H)), num_layer=layers,
        max_pos_seq_len=int(_get(args, "max_position_embeddings", path)), vocab_size=vocab,
        layernorm_eps=float(_get(args, "layernorm_epsilon", path, 1e-5)),
        expert_num=n_exp, moe_layers=tuple(moe_layers),  # FT: a dense model with num_experts=[1] says expert_num = 1
        moe_k=int(_get(args, "topk", path, 1)) if moe_layers else 1)
    present = {int(_ENC_KEY_RE.match(k).group(1)) for k in encoders[0] if _ENC_KEY_RE.match(k)}
    extra = sorted(present - set(range(layers)))
    if extra:
        raise CheckpointError(f"{path}: weights for layers {extra} but args.num_layers={layers}")
    want = {sp.name for sp in tensor_specs(cfg) if sp.name not in ("wte", "wpe") and ".experts." not in sp.name}
    if set(encoders[0]) - want:
        raise CheckpointError(f"{path}: unexpected key '{sorted(set(encoders[0]) - want)[0]}' in the encoder weights "
                              f"(not part of a {'MoE' if moe_layers else 'dense'} GPT with {layers} layers)")
    if want - set(encoders[0]):
        raise CheckpointError(f"{path}: tensor '{sorted(want - set(encoders[0]))[0]}' is missing "
                              f"({len(want - set(encoders[0]))} missing in all)")
    ckpt = MegatronCheckpoint(ckpt_dir, main_files, args, cfg, train_tp, _expert_files(ckpt_dir, cfg, train_tp),
                              encoders, wtes, wpe)
    return ckpt


def _expert_files(ckpt_dir: str, cfg: ModelConfig, train_tp: int) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for name in sorted(os.listdir(ckpt_dir)):
        m = _EXPERT_FILE_RE.match(name)
        if m:
            n, e, r = map(int, m.groups())
            found.setdefault((n, e), []).append((r, os.path.join(ckpt_dir, name)))
    n_moe, E = len(cfg.moe_layers), cfg.expert_num
    want = {(n, e) for n in range(n_moe) for e in range(E)}
    extra = sorted(set(found) - want)
    if extra:
        n, e = extra[0]
        raise CheckpointError(f"{ckpt_dir}: unexpected expert file {os.path.basename(found[extra[0]][0][1])} "
                              f"({len(extra)} extra in all): the model has {n_moe} MoE layers x {E} experts")
    missing = sorted(want - set(found))
    if missing:
        n, e = missing[0]
        raise CheckpointError(f"{os.path.join(ckpt_dir, f'layer_{n}_expert_{e}_mp_rank_00_model_states.pt')}: "
                              f"expert file is missing ({len(missing)} of {len(want)} missing)")
    # experts are replicated over training TP ranks: take the lowest rank's copy
    return {k: min(v)[1] for k, v in found.items()}
