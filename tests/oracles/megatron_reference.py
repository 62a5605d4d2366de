"""Plain pure-torch GPT-MoE reference that reads a Megatron-DeepSpeed checkpoint folder.

In:  a checkpoint folder in the Megatron-DeepSpeed layout of SPEC.md section 2 (main file
     `mp_rank_00_model_states.pt` or `mp_rank_00/model_rng.pt`, plus `mp_rank_01...` when
     trained with tensor parallelism, plus `layer_{n}_expert_{e}_mp_rank_00_model_states.pt`),
     and token ids `LongTensor[B, T]`.
Out: `MegatronReference(ckpt_dir, dtype).logits(input_ids) -> Tensor[B, T, V]`, the SPEC
     section 4 math computed as plainly as possible (explicit per-head and per-token loops),
     in `dtype` (float64 by default). With `capacity_factor=` it models DeepSpeed's eval-time
     token dropping with a deterministic first-come rule. `last_trace` records the routing.

This is a test oracle: it imports nothing from `ftmoe`, and is written from the spec and the
original sources (Megatron-DeepSpeed `megatron/model/transformer.py`, DeepSpeed
`deepspeed/moe/sharded_moe.py`), not from ftmoe's code. Speed is not a goal.

Choices worth knowing:
- Rows of a batch are independent in dropless mode (no attention mask: causal only), so a
  right-padded batch gives each row's real-token logits unchanged.
- Dropless top-k: softmax over all experts in >= fp32, pick the k largest (ties -> lower id),
  combine with the raw probabilities (no renormalisation), expert output includes b2
  (`add_expert_b2=False` reproduces DeepSpeed/ModelScope, which drop it).
- Capacity mode (`capacity_factor=cf, min_capacity=m`): tokens are all B*T tokens of the call,
  flattened in (b, t) order. k=1: capacity = max(ceil(B*T/E * cf), m), cf multiplied in fp32
  like DeepSpeed's `_capacity` (`torch.tensor(capacity_factor)` is float32); each expert keeps
  its first `capacity` tokens, a dropped token's MoE output is 0. DeepSpeed's top1gating picks
  the kept tokens at random (use_rts) -- we do not -- and asserts B*T >= min_capacity (we don't).
  k>1: we follow DeepSpeed's top2gating slot order -- capacity uses cf*k, and every token's
  first choice is placed before any token's second choice (top2gating offsets `locations2` by
  the total count of first choices per expert); for k>2 the same rule continues rank by rank.
  Unlike DeepSpeed we (a) take the second choice deterministically (DeepSpeed adds Gumbel noise
  to the logits before picking it) and (b) combine kept choices with the raw probabilities
  (DeepSpeed renormalises the kept gates by g1+g2), so that a large capacity equals dropless.
"""
from __future__ import annotations

import math
import os

import torch

from ._load import EXPERT_KEY_RE, encoder, language_model, list_expert_files, load_main_states, torch_load

# Megatron tensor-parallel merge rules of the main-file tensors: concat dim, or None (replicated).
_CONCAT0 = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias")
_CONCAT1 = ("attention.dense.weight", "dense_4h_to_h.weight")


def _merge_dim(key: str):
    if key.endswith(_CONCAT0):
        return 0
    if key.endswith(_CONCAT1):
        return 1
    return None


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


class MegatronReference:
    def __init__(self, ckpt_dir: str, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        states, _ = load_main_states(ckpt_dir)
        s0 = states[0]
        self.args = s0["args"]
        ver = s0.get("checkpoint_version", 0)
        if float(ver) != 3.0:
            raise ValueError(f"only checkpoint_version 3 (per-head interleaved QKV) is supported, got {ver}")
        tp = len(states)

        # --- merge the training tensor-parallel shards
        word = torch.cat([language_model(s)["embedding"]["word_embeddings"]["weight"] for s in states], 0)
        pos = language_model(s0)["embedding"]["position_embeddings"]["weight"]
        encs = [encoder(s) for s in states]
        enc: dict[str, torch.Tensor] = {}
        for key in encs[0]:
            name = key.replace("self_attention.", "attention.")
            dim = _merge_dim(name)
            if dim is None or tp == 1:
                enc[name] = encs[0][key]
            else:
                enc[name] = torch.cat([e[key] for e in encs], dim)

        def cv(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype)

        self.wte = cv(word)
        self.wpe = cv(pos)
        self.num_heads = int(self.args.num_attention_heads)
        self.eps = float(self.args.layernorm_epsilon)
        layer_ids = sorted({int(k.split(".")[1]) for k in enc if k.startswith("layers.")})
        self.num_layers = len(layer_ids)
        assert layer_ids == list(range(self.num_layers)), layer_ids
        self.hidden = self.wte.shape[1]
        self.head_dim = self.hidden // self.num_heads

        self.layers = []
        moe_layers = []
        for i in range(self.num_layers):
            p = f"layers.{i}."
            L = {k[len(p):]: cv(v) for k, v in enc.items() if k.startswith(p)}
            L["is_moe"] = "mlp.deepspeed_moe.gate.wg.weight" in L
            if L["is_moe"]:
                moe_layers.append(i)
            self.layers.append(L)
        self.moe_layers = moe_layers
        self.final_w = cv(enc["final_layernorm.weight"])
        self.final_b = cv(enc["final_layernorm.bias"])
        self.topk = int(getattr(self.args, "topk", 1) or 1)

        # --- experts: file layer_{n}_expert_{e}_...: n = ordinal of the MoE layer
        files = list_expert_files(ckpt_dir)
        for n, layer in enumerate(moe_layers):
            E = self.layers[layer]["mlp.deepspeed_moe.gate.wg.weight"].shape[0]
            experts = []
            for e in range(E):
                ranks = files.get((n, e))
                if not ranks:
                    raise FileNotFoundError(f"missing expert file layer_{n}_expert_{e}_mp_rank_XX_model_states.pt")
                sd = torch_load(ranks[min(ranks)])
                ex = {}
                for k, v in sd.items():
                    m = EXPERT_KEY_RE.search(k)
                    if m is None:
                        raise KeyError(f"unexpected key {k!r} in expert file n={n} e={e}")
                    if (int(m.group(1)), int(m.group(2))) != (layer, e):
                        raise ValueError(f"expert file n={n} e={e} holds layer {m.group(1)} expert {m.group(2)}")
                    ex[k[m.end():]] = cv(v)
                assert sorted(ex) == sorted(["dense_h_to_4h.weight", "dense_h_to_4h.bias",
                                             "dense_4h_to_h.weight", "dense_4h_to_h.bias"]), sorted(ex)
                experts.append(ex)
            self.layers[layer]["experts"] = experts
        self.last_trace: list[dict] = []

    # ------------------------------------------------------------------ pieces
    def _attention(self, L: dict, a: torch.Tensor) -> torch.Tensor:
        """a: [T, H] (one row) -> attention output [T, H] incl. dense bias."""
        T = a.shape[0]
        D = self.head_dim
        W = L["attention.query_key_value.weight"]  # [3H, H], rows per head h: q, k, v (D each)
        b = L["attention.query_key_value.bias"]
        ctx = torch.zeros(T, self.hidden, dtype=a.dtype)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for h in range(self.num_heads):
            r = h * 3 * D
            q = a @ W[r:r + D].T + b[r:r + D]
            k = a @ W[r + D:r + 2 * D].T + b[r + D:r + 2 * D]
            v = a @ W[r + 2 * D:r + 3 * D].T + b[r + 2 * D:r + 3 * D]
            scores = (q @ k.T) / math.sqrt(D)
            scores = scores.masked_fill(~causal, float("-inf"))
            probs = torch.softmax(scores.to(torch.float64), dim=-1).to(a.dtype)
            ctx[:, h * D:(h + 1) * D] = probs @ v
        return ctx @ L["attention.dense.weight"].T + L["attention.dense.bias"]

    def _dense_mlp(self, L: dict, u: torch.Tensor) -> torch.Tensor:
        h = gelu_tanh(u @ L["mlp.dense_h_to_4h.weight"].T + L["mlp.dense_h_to_4h.bias"])
        return h @ L["mlp.dense_4h_to_h.weight"].T + L["mlp.dense_4h_to_h.bias"]

    @staticmethod
    def _expert(ex: dict, u: torch.Tensor, add_b2: bool) -> torch.Tensor:
        h = gelu_tanh(u @ ex["dense_h_to_4h.weight"].T + ex["dense_h_to_4h.bias"])
        y = h @ ex["dense_4h_to_h.weight"].T
        return y + ex["dense_4h_to_h.bias"] if add_b2 else y

    def _moe(self, L: dict, u: torch.Tensor, capacity_factor, min_capacity: int, add_b2: bool, topk: int):
        """u: [N, H], N tokens flattened in (b, t) order -> (MoE output [N, H], trace dict)."""
        N = u.shape[0]
        wg = L["mlp.deepspeed_moe.gate.wg.weight"]
        E = wg.shape[0]
        gate_dt = torch.float64 if u.dtype == torch.float64 else torch.float32
        choices = []  # per token: list of (expert, prob), best first
        for i in range(N):
            logits = u[i].to(gate_dt) @ wg.to(gate_dt).T
            p = torch.softmax(logits, dim=-1)
            picked = []
            remaining = p.clone()
            for _ in range(topk):
                e = int(torch.argmax(remaining))  # first maximum -> lower id wins ties
                picked.append((e, p[e]))
                remaining[e] = float("-inf")
            choices.append(picked)

        keep = [[True] * topk for _ in range(N)]
        capacity = None
        if capacity_factor is not None:
            cf32 = torch.tensor(float(capacity_factor) * topk, dtype=torch.float32)
            capacity = int(torch.ceil(torch.tensor(N / E, dtype=torch.float32) * cf32))
            capacity = max(capacity, int(min_capacity))
            used = [0] * E
            for rank in range(topk):          # all first choices, then all second choices, ...
                for i in range(N):            # tokens in flattened (b, t) order
                    e = choices[i][rank][0]
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        keep[i][rank] = False

        out = torch.zeros_like(u)
        for i in range(N):
            for rank, (e, prob) in enumerate(choices[i]):
                if keep[i][rank]:
                    out[i] += prob.to(u.dtype) * self._expert(L["experts"][e], u[i], add_b2)
        trace = {"experts": [[e for e, _ in c] for c in choices],
                 "probs": [[float(pr) for _, pr in c] for c in choices],
                 "kept": keep, "capacity": capacity, "moe_out": out.clone()}
        return out, trace

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, capacity_factor: float | None = None, min_capacity: int = 0,
               add_expert_b2: bool = True, topk: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] in self.dtype (dropless unless capacity_factor is set)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        k = self.topk if topk is None else topk
        x = torch.stack([self.wte[ids[b]] + self.wpe[:T] for b in range(B)])  # [B, T, H]
        self.last_trace = []
        for li, L in enumerate(self.layers):
            attn = torch.stack([
                self._attention(L, layer_norm(x[b], L["input_layernorm.weight"], L["input_layernorm.bias"], self.eps))
                for b in range(B)])
            x = x + attn
            u = layer_norm(x, L["post_attention_layernorm.weight"], L["post_attention_layernorm.bias"], self.eps)
            if L["is_moe"]:
                y, trace = self._moe(L, u.reshape(B * T, -1), capacity_factor, min_capacity, add_expert_b2, k)
                trace["layer"] = li
                self.last_trace.append(trace)
                x = x + y.reshape(B, T, -1)
            else:
                x = x + self._dense_mlp(L, u)
        h = layer_norm(x, self.final_w, self.final_b, self.eps)
        return h @ self.wte.T
