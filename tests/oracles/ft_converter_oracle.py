"""Independent numpy re-implementation of FasterTransformer v5.3's GPT-MoE checkpoint converter.

In:  a Megatron-DeepSpeed checkpoint folder (SPEC.md section 2), the inference tensor-parallel
     size, `weight_data_type` ('fp16' or 'fp32') and optionally a `vocab.json`.
Out: `ft_convert(ckpt_dir, out_dir, infer_gpu_num, weight_data_type, vocab_json)` writes
     `out_dir/<N>-gpu/` exactly as FT's `examples/pytorch/gpt/utils/megatron_gpt_moe_ckpt_convert.py`
     would: every `model.*.bin` (raw C-order arrays), `config.ini` (configparser output) and
     `args.txt` (`k:v` per line of vars(args)); returns that folder's path.
     `expected_files(...)` gives the {file name: shape} table of SPEC.md section 3, and
     `read_bin(path, shape, weight_data_type)` reads one file back.

A test oracle: it imports nothing from `ftmoe`. It re-implements FT's rules (learned from FT's
source, not copied): dtype conversion as FT's `torch2np` (bf16 goes through float32, then numpy
`astype`), 2-D tensors transposed to [in, out] (`safe_transpose`), checkpoint-version-3 QKV reorder
done per training rank, "split mode" (inference TP >= training TP: each training rank's tensor is
split into infer/train parts) and "concat mode" (inference TP < training TP: consecutive training
ranks are concatenated), replicated tensors taken from training rank 0, experts stacked in id
order and split along F.

Where FT's behaviour is a bug SPEC.md says ftmoe must not copy, this oracle does the sane thing
and says so in a comment marked `FT-BUG`. Where the oracle is deliberately narrower than FT
(no training pipeline parallelism), it raises NotImplementedError.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil

import numpy as np
import torch

from ._load import encoder_key, language_model, load_main_states, torch_load, weights_key

WEIGHT2NP = {"fp32": np.float32, "fp16": np.float16}
END_OF_TEXT = "<|endoftext|>"
GPT2_END_ID = 50256  # FT's OPENAI_GPT2_START_ID / OPENAI_GPT2_END_ID, used without a vocab file


def to_np(t: torch.Tensor, np_dtype) -> np.ndarray:
    """FT torch2np: to CPU, bf16 -> float32 (numpy has no bf16), .numpy(), then astype."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().astype(np_dtype)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """FT safe_transpose: 1-D unchanged, 2-D transposed, anything else an error."""
    if t.dim() == 1:
        return t
    if t.dim() == 2:
        return t.T
    raise ValueError(f"cannot transpose a {t.dim()}-D tensor")


def _has(key: str, *parts: str) -> bool:
    return any(p in key for p in parts)


# FT classifies main-file keys by substring, in this order (first match wins).
_REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
               "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
               "adaptor1.dense_4h_to_h.bias", "adaptor2.dense_4h_to_h.bias",
               "final_layernorm.weight", "final_layernorm.bias")
_ROW_SPLIT = ("attention.dense.weight", "mlp.dense_4h_to_h.weight", "adaptor1.dense_4h_to_h.weight",
              "adaptor2.dense_4h_to_h.weight")  # split / concat axis 0 of the transposed [in, out]
_COL_SPLIT = ("mlp.dense_h_to_4h.weight", "adaptor1.dense_h_to_4h.weight", "adaptor2.dense_h_to_4h.weight",
              "mlp.dense_h_to_4h.bias", "adaptor1.dense_h_to_4h.bias", "adaptor2.dense_h_to_4h.bias")


def _classify(key: str):
    """-> (kind, axis, output name stem). kind: 'rep' | 'split' | 'qkv_w' | 'qkv_b'."""
    stem = key
    if "layers." in key:
        stem = (key.replace("self_attention", "attention").replace("adaptor1", "after_attention_adapter")
                .replace("adaptor2", "after_ffn_adapter"))
        # (FT also adds idx_pp * layers_per_stage to the layer index; no PP here.)
    if _has(key, *_REPLICATED):
        return "rep", None, stem
    if _has(key, *_ROW_SPLIT):
        return "split", 0, stem
    if _has(key, *_COL_SPLIT):
        return "split", -1, stem
    if "attention.query_key_value.bias" in key:
        return "qkv_b", -1, stem
    if "attention.query_key_value.weight" in key:
        return "qkv_w", -1, stem
    if "experts" not in key:
        # FT-BUG (PP>1 gate misnaming): FT names this branch's files from the raw key, so the layer
        # index lacks the pipeline-stage offset; with PP=1 (all the oracle supports) it is correct.
        name = key.replace("deepspeed_moe", "moe").replace("megatron_moe", "moe")
        if _has(key, "layernorm", "gate", "attention.dense.bias", "dense_4h_to_h.bias"):
            return "rep", None, name
        if _has(key, "attention.dense.weight", "dense_4h_to_h.weight", "dense_h_to_4h.bias"):
            return "split", 0, name
        if "dense_h_to_4h.weight" in key:
            return "split", 1, name
    # FT-BUG: FT prints an error and calls sys.exit(1) here; we raise instead.
    raise KeyError(f"FasterTransformer's converter does not know the key {key!r}")


def _reorder_qkv(a: np.ndarray, kind: str, heads_local: int) -> np.ndarray:
    """Checkpoint-version-3 QKV of one training rank -> FT's [.., 3, local] layout.

    Megatron rows (after the transpose: columns) are [head, (q|k|v), D]; FT wants [(q|k|v), head, D].
    """
    local = a.shape[-1] // 3
    D = local // heads_local
    if kind == "qkv_b":
        return a.reshape(heads_local, 3, D).transpose(1, 0, 2).reshape(3, local)
    H = a.shape[0]
    return a.reshape(H, heads_local, 3, D).transpose(0, 2, 1, 3).reshape(H, 3, local)


def _distribute(per_train_rank: list[np.ndarray], axis: int, infer_tp: int) -> list[np.ndarray]:
    """Training-rank shards -> inference-rank shards along `axis` (FT's split / concat modes)."""
    train_tp = len(per_train_rank)
    if infer_tp >= train_tp:  # split mode
        assert infer_tp % train_tp == 0
        f = infer_tp // train_tp
        return [part for a in per_train_rank for part in np.split(a, f, axis=axis)]
    assert train_tp % infer_tp == 0  # concat mode
    f = train_tp // infer_tp
    return [np.concatenate(per_train_rank[i * f:(i + 1) * f], axis=axis) for i in range(infer_tp)]


def _save(arr: np.ndarray, path: str) -> None:
    np.ascontiguousarray(arr).tofile(path)  # raw, C order (what ndarray.tofile writes anyway)


def ft_convert(ckpt_dir: str, out_dir: str, infer_gpu_num: int, weight_data_type: str = "fp16",
               vocab_json: str | None = None) -> str:
    if weight_data_type not in WEIGHT2NP:
        # FT's argparse only offers fp32/fp16 (SPEC: ftmoe must also accept bf16; the oracle does not).
        raise ValueError(f"weight_data_type must be 'fp16' or 'fp32', not {weight_data_type!r}")
    np_dt = WEIGHT2NP[weight_data_type]
    saved = os.path.join(out_dir, f"{infer_gpu_num:d}-gpu")
    if os.path.exists(saved):
        shutil.rmtree(saved)
    os.makedirs(saved)
    if vocab_json:
        shutil.copy(vocab_json, os.path.join(saved, "vocab.json"))

    # is_deepspeed (main-file pattern) only changes how FT parses the expert key prefix, and the
    # expert file stem comes out the same either way, so it is not needed here.
    states, _ = load_main_states(ckpt_dir)
    s0 = states[0]
    _ = weights_key(s0)
    ckpt_ver = s0["checkpoint_version"]
    assert ckpt_ver == 3, f"FT asserts checkpoint_version == 3, got {ckpt_ver}"
    args = s0["args"]
    train_tp = int(args.tensor_model_parallel_size)
    assert len(states) == train_tp

    with open(os.path.join(saved, "args.txt"), "w") as f:
        for k, v in vars(args).items():
            f.write(f"{k}:{v}\n")

    # Embeddings: not transposed; wpe from rank 0, wte = training shards concatenated on vocab.
    lm0 = language_model(s0)
    _save(to_np(lm0["embedding"]["position_embeddings"]["weight"], np_dt), os.path.join(saved, "model.wpe.bin"))
    wte = np.concatenate([to_np(language_model(s)["embedding"]["word_embeddings"]["weight"], np_dt)
                          for s in states], axis=0)
    _save(wte, os.path.join(saved, "model.wte.bin"))
    padded_vocab = getattr(args, "padded_vocab_size", None)
    if padded_vocab is None:  # FT sets it after args.txt was written
        padded_vocab = wte.shape[0]

    num_experts = vars(args)["num_experts"][0] if "num_experts" in vars(args) else 0
    # Note: FT sets gpt_with_moe = 1 for any num_experts != 0, so a dense Megatron-DeepSpeed model
    # (num_experts = [1]) gets gpt_with_moe = 1, expert_num = 1, moe_layers = [].
    structure = {"gpt_with_moe": 1 if num_experts != 0 else 0, "expert_num": num_experts, "moe_layers": []}

    # Dense (non-expert) tensors. FT hard-codes the 'encoder' key (a 'transformer' checkpoint
    # would raise KeyError there); SPEC asks to accept both, so the oracle does.
    encs = [language_model(s)[encoder_key(language_model(s))] for s in states]
    has_adapters = any("adaptor" in k for k in encs[0])
    heads_local = int(args.num_attention_heads) // train_tp
    assert int(args.num_attention_heads) % train_tp == 0
    moe_layers: list[int] = []
    for key in encs[0]:
        kind, axis, stem = _classify(key)
        if "deepspeed_moe.gate" in key or "megatron_moe.gate" in key:
            moe_layers.append(int(key.split(".")[1]))
        if kind == "rep":
            _save(to_np(transposed(encs[0][key]), np_dt), os.path.join(saved, f"model.{stem}.bin"))
            continue
        shards = [to_np(transposed(e[key]), np_dt) for e in encs]
        if kind in ("qkv_w", "qkv_b"):
            shards = [_reorder_qkv(a, kind, heads_local) for a in shards]
        for r, a in enumerate(_distribute(shards, axis, infer_gpu_num)):
            _save(a, os.path.join(saved, f"model.{stem}.{r}.bin"))
    structure["moe_layers"] = moe_layers

    # Experts: expert parallel / expert TP size 1 in training; files layer_{n}_expert_{e}_mp_rank_XX,
    # n = MoE-layer ordinal, looked up by the file name only (FT does not check the keys' layer/id).
    for n, layer in enumerate(moe_layers):
        parts: dict[str, list[torch.Tensor]] = {"dense_h_to_4h.weight": [], "dense_h_to_4h.bias": [],
                                                "dense_4h_to_h.weight": [], "dense_4h_to_h.bias": []}
        for e in range(num_experts):
            for r in range(train_tp):
                path = os.path.join(ckpt_dir, f"layer_{n}_expert_{e}_mp_rank_{r:02d}_model_states.pt")
                if os.path.exists(path):
                    break
            else:
                raise FileNotFoundError(f"no expert file for MoE layer ordinal {n}, expert {e}")
            sd = torch_load(path)
            for k, v in sd.items():
                for name in parts:  # same substring order as FT
                    if name in k:
                        parts[name].append(v)
                        break
                else:
                    raise KeyError(f"unexpected expert key {k!r} (FT-BUG: FT calls sys.exit(1))")
        # FT derives the file stem from the first expert key; it always comes out as below.
        prefix = os.path.join(saved, f"model.layers.{layer}.mlp.moe.experts.")
        w1 = to_np(torch.stack(parts["dense_h_to_4h.weight"], 0).transpose(-1, -2), np_dt)  # [E, H, F]
        b1 = to_np(torch.stack(parts["dense_h_to_4h.bias"], 0), np_dt)                      # [E, F]
        w2 = to_np(torch.stack(parts["dense_4h_to_h.weight"], 0).transpose(-1, -2), np_dt)  # [E, F, H]
        b2 = to_np(torch.stack(parts["dense_4h_to_h.bias"], 0), np_dt)                      # [E, H]
        for r, a in enumerate(np.split(w1, infer_gpu_num, axis=2)):
            _save(a, prefix + f"dense_h_to_4h.weight.{r}.bin")
        for r, a in enumerate(np.split(b1, infer_gpu_num, axis=1)):
            _save(a, prefix + f"dense_h_to_4h.bias.{r}.bin")
        for r, a in enumerate(np.split(w2, infer_gpu_num, axis=1)):
            _save(a, prefix + f"dense_4h_to_h.weight.{r}.bin")
        _save(b2, prefix + "dense_4h_to_h.bias.bin")

    # FT-BUG: FT calls torch.cuda.synchronize() here, so it needs a GPU; nothing to wait for on CPU.

    if vocab_json:
        with open(vocab_json) as f:
            vocab = json.load(f)
        start_id = end_id = vocab[END_OF_TEXT]
    else:
        start_id = end_id = GPT2_END_ID
    cfg = configparser.ConfigParser()
    cfg["gpt"] = {}
    g = cfg["gpt"]
    g["model_name"] = "gpt"
    g["head_num"] = str(args.num_attention_heads)
    g["size_per_head"] = str(args.hidden_size // args.num_attention_heads)
    g["inter_size"] = str(args.ffn_hidden_size)
    g["num_layer"] = str(args.num_layers)
    g["max_pos_seq_len"] = str(args.max_position_embeddings)
    g["vocab_size"] = str(padded_vocab)
    g["has_adapters"] = str(has_adapters)
    g["adapter_inter_size"] = str(args.project_size) if has_adapters else "0"
    g["layernorm_eps"] = str(args.layernorm_epsilon)
    g["start_id"] = str(start_id)
    g["end_id"] = str(end_id)
    g["weight_data_type"] = weight_data_type
    g["tensor_para_size"] = str(infer_gpu_num)
    cfg["structure"] = structure  # configparser str()s the values: "1", "8", "[1, 3]"
    with open(os.path.join(saved, "config.ini"), "w") as f:
        cfg.write(f)
    return saved


# ---- SPEC.md section 3, as a table ---------------------------------------------------------

def expected_files(*, num_layers: int, hidden: int, ffn: int, vocab: int, positions: int, num_experts: int,
                   moe_layers: list[int], tp: int) -> dict[str, tuple[int, ...]]:
    """{file name: shape} of every `model.*.bin` that SPEC.md section 3 lists for TP size `tp`."""
    H, F, E, t = hidden, ffn, num_experts, tp
    out: dict[str, tuple[int, ...]] = {
        "model.wte.bin": (vocab, H), "model.wpe.bin": (positions, H),
        "model.final_layernorm.weight.bin": (H,), "model.final_layernorm.bias.bin": (H,),
    }
    for n in range(num_layers):
        p = f"model.layers.{n}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out[p + ln + ".weight.bin"] = (H,)
            out[p + ln + ".bias.bin"] = (H,)
        out[p + "attention.dense.bias.bin"] = (H,)
        for r in range(t):
            out[p + f"attention.query_key_value.weight.{r}.bin"] = (H, 3, H // t)
            out[p + f"attention.query_key_value.bias.{r}.bin"] = (3, H // t)
            out[p + f"attention.dense.weight.{r}.bin"] = (H // t, H)
        if n in moe_layers:
            out[p + "mlp.moe.gate.wg.weight.bin"] = (H, E)
            out[p + "mlp.moe.experts.dense_4h_to_h.bias.bin"] = (E, H)
            for r in range(t):
                out[p + f"mlp.moe.experts.dense_h_to_4h.weight.{r}.bin"] = (E, H, F // t)
                out[p + f"mlp.moe.experts.dense_h_to_4h.bias.{r}.bin"] = (E, F // t)
                out[p + f"mlp.moe.experts.dense_4h_to_h.weight.{r}.bin"] = (E, F // t, H)
        else:
            out[p + "mlp.dense_4h_to_h.bias.bin"] = (H,)
            for r in range(t):
                out[p + f"mlp.dense_h_to_4h.weight.{r}.bin"] = (H, F // t)
                out[p + f"mlp.dense_h_to_4h.bias.{r}.bin"] = (F // t,)
                out[p + f"mlp.dense_4h_to_h.weight.{r}.bin"] = (F // t, H)
    return out


def read_bin(path: str, shape, weight_data_type: str = "fp16") -> np.ndarray:
    return np.fromfile(path, dtype=WEIGHT2NP.get(weight_data_type, np.float16)).reshape(shape)
