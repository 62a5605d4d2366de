"""GPTMoE: the Megatron GPT-MoE network, with parameters named as FT's files.

In:  token ids [B, T] and, for cached decoding, `AttnMetadata` + `KVCache`.
Out: logits [B, T, V] (fp32), or [B, V] for each row's last valid token (`last_only`).

`state_dict()` keys equal the FT file stems (`layers.3.attention.query_key_value.weight`
<-> `model.layers.3.attention.query_key_value.weight.bin`), so loading is an identity map.
Math follows SPEC section 4: pre-LN blocks, learned positions, tied LM head.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import AttnMetadata, KVCache
from .layers.attention import Attention, causal_mask
from .layers.basic import LayerNorm, _empty
from .layers.mlp import DenseMLP, MoE, MoEOptions


class _MoEHolder(nn.Module):
    """Gives MoE parameters FT's `mlp.moe.` prefix."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device=None, tp: int = 1,
                 moe_options: MoEOptions | None = None):
        super().__init__()
        H = cfg.hidden_size
        self.is_moe = cfg.is_moe_layer(i)
        self.input_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)
        self.attention = Attention(H, cfg.head_num, i, dtype, device, tp)
        self.post_attention_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)
        if self.is_moe:
            opts = moe_options or MoEOptions(top_k=cfg.moe_k)
            self.mlp = _MoEHolder(MoE(H, cfg.inter_size, cfg.expert_num, dtype, device, tp, opts))
        else:
            self.mlp = DenseMLP(H, cfg.inter_size, dtype, device, tp)

    def forward(self, x: torch.Tensor, meta: AttnMetadata | None, cache: KVCache | None,
                mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        a = self.attention(self.input_layernorm(x), meta, cache, mask)
        x = x + (a + self.attention.dense.bias)
        u = self.post_attention_layernorm(x)
        if self.is_moe:
            # route only real tokens: padding must not take expert capacity
            flat = u.reshape(-1, H)
            if valid is None:
                y = self.mlp.moe(flat).view(B, T, H)
            else:
                y = torch.zeros_like(flat)
                idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
                y[idx] = self.mlp.moe(flat[idx])
                y = y.view(B, T, H)
        else:
            y = self.mlp(u) + self.mlp.dense_4h_to_h.bias
        return x + y


class GPTMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None, tp: int = 1,
                 moe_options: MoEOptions | None = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        H = cfg.hidden_size
        self.wte = _empty(cfg.vocab_size, H, dtype=dtype, device=device)        # [V, H], also the LM head
        self.wpe = _empty(cfg.max_pos_seq_len, H, dtype=dtype, device=device)   # [P, H]
        self.layers = nn.ModuleList(Block(cfg, i, dtype, device, tp, moe_options) for i in range(cfg.num_layer))
        self.final_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)

    @property
    def device(self) -> torch.device:
        return self.wte.device

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        if meta is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            valid = None
            S = T
        else:
            positions = meta.positions
            valid = torch.arange(T, device=input_ids.device)[None, :] < meta.seq_lens[:, None]   # [B, T]
            S = meta.block_tables.shape[1] * cache.block_size
        if int(positions.max()) >= self.config.max_pos_seq_len:
            raise ValueError(f"position {int(positions.max())} is past max_pos_seq_len="
                             f"{self.config.max_pos_seq_len}")
        x = self.wte[input_ids] + self.wpe[positions]                            # [B, T, H]
        mask = causal_mask(meta, T, S, input_ids.device)
        for layer in self.layers:
            x = layer(x, meta, cache, mask, valid)
        if last_only:
            last = (meta.seq_lens - 1) if meta is not None else torch.full((B,), T - 1, device=x.device)
            x = x[torch.arange(B, device=x.device), last]                        # [B, H]
        h = self.final_layernorm(x)
        return (h @ self.wte.t()).float()                                        # [B, (T,) V]
