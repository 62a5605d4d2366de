"""LayerNorm, FT-layout linear, and the tanh GELU.

In:  activations [..., in]. Out: activations [..., out].
Weights are stored as FT stores them, `[in, out]`, so `y = x @ W + b`, and parameter
names match FT files (`weight`, `bias`), making loading an identity table.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _empty(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as Megatron's and FT's GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class LayerNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _empty(n, dtype=dtype, device=device)
        self.bias = _empty(n, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the storage dtype
        y = nn.functional.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class Linear(nn.Module):
    """y = x @ weight + bias with weight [in, out] (FT layout)."""

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device=None, bias: bool = True):
        super().__init__()
        self.weight = _empty(n_in, n_out, dtype=dtype, device=device)
        self.bias = _empty(n_out, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if (add_bias and self.bias is not None) else y
