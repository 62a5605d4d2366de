"""GPTMoE: the Megatron GPT-MoE network, with parameters named as FT's files.

In:  token ids [B, T] and, for cached decoding, `AttnMetadata` + `KVCache`; for a shard of a
     parallel model, a `ParallelState` (this rank's TP/EP/PP coordinates and groups).
Out: logits [B, T, V] (fp32), or [B, V] for each row's last valid token (`last_only`).

`state_dict()` keys equal the FT file stems (`layers.3.attention.query_key_value.weight`
<-> `model.layers.3.attention.query_key_value.weight.bin`), so loading is an identity map;
a pipeline stage holds only its layers (keys keep their global layer numbers).
Math follows SPEC section 4: pre-LN blocks, learned positions, tied LM head. Row-parallel
outputs (attention out, MLP down) are all-reduced over TP before their bias is added.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .distributed import ParallelState
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
    def __init__(self, cfg: ModelConfig, i: int, local_idx: int, dtype, device, par: ParallelState,
                 moe_options: MoEOptions | None = None):
        super().__init__()
        H, tp = cfg.hidden_size, par.tp
        self.par = par
        self.is_moe = cfg.is_moe_layer(i)
        self.input_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)
        self.attention = Attention(H, cfg.head_num, local_idx, dtype, device, tp)
        self.post_attention_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)
        if self.is_moe:
            opts = moe_options or MoEOptions(top_k=cfg.moe_k)
            self.mlp = _MoEHolder(MoE(H, cfg.inter_size, cfg.expert_num, dtype, device, tp, opts,
                                      ep=par.ep, ep_rank=par.d, par=par))
        else:
            self.mlp = DenseMLP(H, cfg.inter_size, dtype, device, tp)

    def forward(self, x: torch.Tensor, meta: AttnMetadata | None, cache: KVCache | None,
                mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        if B == 0:  # no rows here (data-parallel attention); still take part in the expert exchange
            if self.is_moe:
                self.mlp.moe(x.reshape(0, H))
            return x
        a = self.par.tp_all_reduce(self.attention(self.input_layernorm(x), meta, cache, mask))
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
            y = self.par.tp_all_reduce(self.mlp(u)) + self.mlp.dense_4h_to_h.bias
        return x + y


class GPTMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None,
                 moe_options: MoEOptions | None = None, par: ParallelState | None = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.par = par = par or ParallelState.single()
        H = cfg.hidden_size
        self.layer_ids = list(par.config.stage_layers(cfg.num_layer, par.stage))
        if par.is_first_stage or par.is_last_stage:
            self.wte = _empty(cfg.vocab_size, H, dtype=dtype, device=device)    # [V, H], also the LM head
        if par.is_first_stage:
            self.wpe = _empty(cfg.max_pos_seq_len, H, dtype=dtype, device=device)   # [P, H]
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, j, dtype, device, par, moe_options)
                                     for j, i in enumerate(self.layer_ids)})
        if par.is_last_stage:
            self.final_layernorm = LayerNorm(H, cfg.layernorm_eps, dtype, device)
        # vocab-parallel head: TP rank t computes logits for rows [v0, v1) of the tied embedding
        rows = par.config.vocab_slices(cfg.vocab_size)[par.t]
        self.vocab_start, self.vocab_end = rows.start, rows.stop

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def blocks(self) -> list[Block]:
        return list(self.layers.values())

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() and int(positions.max()) >= self.config.max_pos_seq_len:
            raise ValueError(f"position {int(positions.max())} is past max_pos_seq_len="
                             f"{self.config.max_pos_seq_len}")
        return self.wte[input_ids] + self.wpe[positions]                             # [B, T, H]

    def run_layers(self, x: torch.Tensor, meta: AttnMetadata | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if meta is None:
            valid, S = None, T
        else:
            valid = torch.arange(T, device=x.device)[None, :] < meta.seq_lens[:, None]          # [B, T]
            S = meta.block_tables.shape[1] * cache.block_size
        mask = causal_mask(meta, T, S, x.device)
        for layer in self.layers.values():
            x = layer(x, meta, cache, mask, valid)
        return x

    def head(self, x: torch.Tensor, meta: AttnMetadata | None, last_only: bool) -> torch.Tensor:
        """Final LN and this rank's vocabulary slice of the tied head -> fp32 logits."""
        B, T = x.shape[:2]
        if last_only:
            last = (meta.seq_lens - 1) if meta is not None else torch.full((B,), T - 1, device=x.device)
            x = x[torch.arange(B, device=x.device), last]                            # [B, H]
        h = self.final_layernorm(x)
        return (h @ self.wte[self.vocab_start:self.vocab_end].t()).float()          # [B, (T,) V/t]

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """The whole network in one process (pp = 1): ids [B, T] -> logits."""
        B, T = input_ids.shape
        positions = meta.positions if meta is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.run_layers(self.embed(input_ids, positions), meta, cache)
        return self.head(x, meta, last_only)
