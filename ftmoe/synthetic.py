"""Random GPT-MoE checkpoints in the exact Megatron-DeepSpeed layout (and random FT folders).

In:  sizes (`SyntheticSpec`) and layout options.
Out: a checkpoint folder like ModelScope's: the main file (`mp_rank_XX_model_states.pt`
     or `mp_rank_XX/model_rng.pt`) holding `args`, `checkpoint_version` and the
     non-expert weights, plus one `layer_{n}_expert_{e}_mp_rank_00_model_states.pt`
     per MoE layer ordinal n and global expert id e.

Used by `make demo`, by the tests, and by benchmarks that need real shapes without
the real weights (which our machines cannot download).
`save_ft_model` / `write_random_ft_model` (`python -m ftmoe.synthetic DIR --preset P --device
cuda`) write a FasterTransformer `<tp>-gpu` folder straight from a model's weights, skipping
the Megatron checkpoint and the conversion (minutes at the 0.35B shapes, seconds this way).
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
import types

import torch


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 8
    ffn_hidden_size: int = 128
    num_experts: int = 8
    expert_interval: int = 2
    topk: int = 1
    vocab_size: int = 512
    max_position_embeddings: int = 128
    layernorm_epsilon: float = 1e-5

    @property
    def moe_layers(self) -> list[int]:
        # Megatron-DeepSpeed: layer i is MoE iff (i + 1) % expert_interval == 0
        if not self.num_experts:
            return []
        return [i for i in range(self.num_layers) if (i + 1) % self.expert_interval == 0]


PRESETS = {
    "tiny": SyntheticSpec(),
    "gpt-moe-0.35b-64e": SyntheticSpec(24, 1024, 16, 4096, 64, 2, 1, 51200, 2048),
    "gpt-moe-1.3b-32e": SyntheticSpec(24, 2048, 32, 8192, 32, 2, 1, 51200, 2048),
    "gpt-moe-1.3b-64e": SyntheticSpec(24, 2048, 32, 8192, 64, 2, 1, 51200, 2048),
}


def _pickle_foreign_enum() -> tuple[object, types.ModuleType]:
    """An enum value whose class lives in a module that is absent at load time."""
    mod = types.ModuleType("megatron.model.enums")
    cls = enum.Enum("ModelType", {"encoder_or_decoder": 1, "encoder_and_decoder": 2})
    cls.__module__ = mod.__name__
    cls.__qualname__ = "ModelType"
    mod.ModelType = cls
    return cls.encoder_or_decoder, mod


def make_args(spec: SyntheticSpec, train_tp: int = 1) -> argparse.Namespace:
    """Training args as Megatron-DeepSpeed pickles them (a subset, same names and types)."""
    return argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, kv_channels=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings, make_vocab_size_divisible_by=128,
        layernorm_epsilon=spec.layernorm_epsilon, apply_residual_connection_post_layernorm=False,
        openai_gelu=False, onnx_safe=None, num_experts=[spec.num_experts] if spec.num_experts else [1],
        tensor_model_parallel_size=train_tp, pipeline_model_parallel_size=1,
        seq_length=spec.max_position_embeddings, tokenizer_type="JiebaBPETokenizer",
        fp16=True, bf16=False, params_dtype=torch.float16, expert_interval=spec.expert_interval,
        topk=spec.topk, moe_token_dropping=True, moe_train_capacity_factor=1.0,
        moe_eval_capacity_factor=1.0, moe_min_capacity=4, enable_expert_tensor_parallelism=False,
        data_path=["/data/synthetic_text_document"], padded_vocab_size=spec.vocab_size,
    )


def random_weights(spec: SyntheticSpec, seed: int = 0, dtype: torch.dtype = torch.float16,
                   gate_dtype: torch.dtype = torch.float32, zero_expert_b2: bool = False):
    """Full (TP=1) weights: (embedding dict, flat encoder dict, {layer: [expert dicts]})."""
    g = torch.Generator().manual_seed(seed)
    H, F, E, V, P = (spec.hidden_size, spec.ffn_hidden_size, spec.num_experts, spec.vocab_size,
                     spec.max_position_embeddings)

    def rnd(*shape, std=0.02, mean=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std + mean).to(dt)

    std_in, std_out = 1.0 / H ** 0.5, 1.0 / F ** 0.5
    emb = {"word_embeddings": {"weight": rnd(V, H, std=0.5)},
           "position_embeddings": {"weight": rnd(P, H, std=0.2)}}
    enc: dict[str, torch.Tensor] = {}
    experts: dict[int, list[dict[str, torch.Tensor]]] = {}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            enc[p + ln + ".weight"] = rnd(H, std=0.1, mean=1.0)
            enc[p + ln + ".bias"] = rnd(H, std=0.1)
        enc[p + "self_attention.query_key_value.weight"] = rnd(3 * H, H, std=std_in)
        enc[p + "self_attention.query_key_value.bias"] = rnd(3 * H, std=0.1)
        enc[p + "self_attention.dense.weight"] = rnd(H, H, std=std_in)
        enc[p + "self_attention.dense.bias"] = rnd(H, std=0.1)
        if i in spec.moe_layers:
            enc[p + "mlp.deepspeed_moe.gate.wg.weight"] = rnd(E, H, std=1.0, dt=gate_dtype)
            experts[i] = [{
                "dense_h_to_4h.weight": rnd(F, H, std=std_in),
                "dense_h_to_4h.bias": rnd(F, std=0.1),
                "dense_4h_to_h.weight": rnd(H, F, std=std_out),
                "dense_4h_to_h.bias": torch.zeros(H, dtype=dtype) if zero_expert_b2 else rnd(H, std=0.1),
            } for _ in range(E)]
        else:
            enc[p + "mlp.dense_h_to_4h.weight"] = rnd(F, H, std=std_in)
            enc[p + "mlp.dense_h_to_4h.bias"] = rnd(F, std=0.1)
            enc[p + "mlp.dense_4h_to_h.weight"] = rnd(H, F, std=std_out)
            enc[p + "mlp.dense_4h_to_h.bias"] = rnd(H, std=0.1)
    enc["final_layernorm.weight"] = rnd(H, std=0.1, mean=1.0)
    enc["final_layernorm.bias"] = rnd(H, std=0.1)
    return emb, enc, experts


# Megatron tensor-parallel split of each encoder tensor: dim to split, or None (replicated).
def _train_tp_dim(key: str) -> int | None:
    if key.endswith(("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight",
                     "dense_h_to_4h.bias")):
        return 0
    if key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None


def _shard(t: torch.Tensor, dim: int | None, tp: int, r: int) -> torch.Tensor:
    return t.clone() if dim is None else torch.chunk(t, tp, dim=dim)[r].clone()


def save_megatron_checkpoint(out_dir: str, spec: SyntheticSpec = PRESETS["tiny"], *, seed: int = 0,
                             dtype: torch.dtype = torch.float16, gate_dtype: torch.dtype = torch.float32,
                             layout: str = "deepspeed", train_tp: int = 1, encoder_key: str = "encoder",
                             attention_name: str = "self_attention", checkpoint_version=3.0,
                             zero_expert_b2: bool = False, foreign_args: bool = True,
                             expert_key_prefix: str = "language_model.encoder.") -> str:
    """Write a random checkpoint; returns `out_dir`.

    layout: "deepspeed" -> `mp_rank_XX_model_states.pt` with weights under `module`;
            "megatron"  -> `mp_rank_XX/model_rng.pt` with weights under `model`.
    train_tp: training tensor-parallel size (writes mp_rank_00..; experts replicated, saved once).
    foreign_args: pickle an enum from a module that will not exist at load time, as real
            checkpoints do (`model_type: megatron.model.enums.ModelType`).
    """
    os.makedirs(out_dir, exist_ok=True)
    emb, enc, experts = random_weights(spec, seed, dtype, gate_dtype, zero_expert_b2)
    args = make_args(spec, train_tp)
    fake_modules = {}
    if foreign_args:
        args.model_type, mod = _pickle_foreign_enum()
        fake_modules = {"megatron": types.ModuleType("megatron"),
                        "megatron.model": types.ModuleType("megatron.model"), mod.__name__: mod}
        fake_modules = {k: v for k, v in fake_modules.items() if k not in sys.modules}
        sys.modules.update(fake_modules)
    try:
        for r in range(train_tp):
            enc_r = {}
            for k, v in enc.items():
                name = k.replace("self_attention", attention_name)
                enc_r[name] = _shard(v, _train_tp_dim(k), train_tp, r)
            emb_r = {"word_embeddings": {"weight": _shard(emb["word_embeddings"]["weight"], 0, train_tp, r)},
                     "position_embeddings": {"weight": emb["position_embeddings"]["weight"].clone()}}
            weights = {"language_model": {"embedding": emb_r, encoder_key: enc_r}}
            state = {"args": args, "checkpoint_version": checkpoint_version, "iteration": 1000}
            if layout == "deepspeed":
                state["module"] = weights
                path = os.path.join(out_dir, f"mp_rank_{r:02d}_model_states.pt")
            elif layout == "megatron":
                state["model"] = weights
                os.makedirs(os.path.join(out_dir, f"mp_rank_{r:02d}"), exist_ok=True)
                path = os.path.join(out_dir, f"mp_rank_{r:02d}", "model_rng.pt")
            else:
                raise ValueError(f"layout must be 'deepspeed' or 'megatron', not {layout!r}")
            torch.save(state, path)
    finally:
        for name in fake_modules:
            sys.modules.pop(name, None)
    for n, layer in enumerate(spec.moe_layers):
        for e, ex in enumerate(experts[layer]):
            prefix = f"{expert_key_prefix}layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
            torch.save({prefix + k: v.clone() for k, v in ex.items()},
                       os.path.join(out_dir, f"layer_{n}_expert_{e}_mp_rank_00_model_states.pt"))
    return out_dir


def save_ft_model(model, out_dir: str, weight_data_type: str = "fp16", tp: int = 1) -> str:
    """Write a one-process `GPTMoE` (e.g. `bench.random_model`) as a FasterTransformer folder
    `<out_dir>/<tp>-gpu` (config.ini, args.txt with the top-k, model.*.bin), as `ftmoe convert`
    would write it from a checkpoint with these weights; returns that folder. The model's
    parameter names and shapes are the FT tensor names and full FT shapes, so no Megatron
    checkpoint (slow to write and to convert at the real sizes) is needed. Written in a staging
    folder and renamed into place like the converter's output."""
    import shutil

    from .convert.writer import cast_like_ft, replace_dir, staging_dir, write_split
    from .ftformat import TORCH_DTYPES, tensor_specs

    if weight_data_type not in TORCH_DTYPES:
        raise ValueError(f"weight_data_type must be one of {sorted(TORCH_DTYPES)}, found {weight_data_type!r}")
    cfg = dataclasses.replace(model.config, weight_data_type=weight_data_type, tensor_para_size=tp)
    cfg.check_tp(tp)
    state = model.state_dict()
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"{tp}-gpu")
    tmp = staging_dir(out_dir, tp)
    try:
        for spec in tensor_specs(cfg):
            t = state[spec.name]
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"tensor '{spec.name}': shape {list(t.shape)}, FT expects {list(spec.shape)}")
            write_split(spec, cast_like_ft(t.detach().cpu(), TORCH_DTYPES[weight_data_type]), tp, tmp)
        with open(os.path.join(tmp, "args.txt"), "w") as f:
            f.write(f"topk:{cfg.moe_k}\n")
        with open(os.path.join(tmp, "config.ini"), "w") as f:
            f.write(cfg.to_ini())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_random_ft_model(preset: str, out_dir: str, weight_data_type: str = "fp16", device: str = "cpu",
                          seed: int = 0, tp: int = 1) -> str:
    """Random weights at a preset's shapes (drawn on `device`, like `ftmoe bench`) written as
    an FT `<out_dir>/<tp>-gpu` folder that `ftmoe serve --model` loads; returns the folder."""
    from .bench import config_of, random_model
    from .ftformat import TORCH_DTYPES

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, found {preset!r}")
    model = random_model(config_of(preset), TORCH_DTYPES[weight_data_type], torch.device(device), seed=seed)
    return save_ft_model(model, out_dir, weight_data_type, tp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftmoe.synthetic",
                                description="write a random FasterTransformer model folder at a preset's shapes")
    p.add_argument("out_dir", help="the model goes to <out_dir>/<tp>-gpu")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"], help="weight_data_type of the files")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is much faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    a = p.parse_args(argv)
    import time

    t0 = time.perf_counter()
    d = write_random_ft_model(a.preset, a.out_dir, a.dtype, a.device, a.seed, a.tp)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"wrote {d}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
