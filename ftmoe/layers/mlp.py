"""Feed-forward blocks: the dense MLP and the Mixture-of-Experts layer.

In:  u [N, H] (post-attention-layernormed tokens, flattened).
Out: y [N, H] without the row-parallel output bias of the dense MLP (added after the
     TP reduce by the caller); the MoE output includes each expert's b2, weighted.

MoE (SPEC section 4): gate logits in fp32, softmax over all experts, top-k with ties
to the lower expert id, combine with the raw probabilities (no renormalisation),
dropless by default; `capacity_factor` turns on DeepSpeed's eval-time dropping with a
deterministic first-come rule.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .basic import Linear, _empty, gelu_tanh


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, dtype, device=None, tp: int = 1):
        super().__init__()
        self.dense_h_to_4h = Linear(hidden, ffn // tp, dtype, device)   # [H, F/t]
        self.dense_4h_to_h = Linear(ffn // tp, hidden, dtype, device)   # [F/t, H]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(u)), add_bias=False)


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """Routing options. capacity_factor None = dropless (FasterTransformer's behaviour)."""

    top_k: int = 1
    capacity_factor: float | None = None
    min_capacity: int = 4


class _Gate(nn.Module):
    def __init__(self, hidden: int, experts: int, dtype, device=None):
        super().__init__()
        self.wg = Linear(hidden, experts, dtype, device, bias=False)    # [H, E]


class _Experts(nn.Module):
    def __init__(self, hidden: int, ffn_local: int, experts: int, dtype, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Module()
        self.dense_h_to_4h.weight = _empty(experts, hidden, ffn_local, dtype=dtype, device=device)  # [E, H, F/t]
        self.dense_h_to_4h.bias = _empty(experts, ffn_local, dtype=dtype, device=device)            # [E, F/t]
        self.dense_4h_to_h = nn.Module()
        self.dense_4h_to_h.weight = _empty(experts, ffn_local, hidden, dtype=dtype, device=device)  # [E, F/t, H]
        self.dense_4h_to_h.bias = _empty(experts, hidden, dtype=dtype, device=device)               # [E, H]


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax over experts, then top-k with ties to the lower id.
    logits [N, E] -> (probs [N, k] fp32, expert ids [N, k] long)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if k == 1:
        ids = probs.argmax(dim=-1, keepdim=True)        # argmax returns the first maximum
        return probs.gather(1, ids), ids
    masked = probs.clone()
    ids = []
    for _ in range(k):
        i = masked.argmax(dim=-1, keepdim=True)
        ids.append(i)
        masked.scatter_(1, i, float("-inf"))
    ids_t = torch.cat(ids, dim=1)
    return probs.gather(1, ids_t), ids_t


def capacity_keep(ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """DeepSpeed-style dropping, deterministic: assignments are visited slot by slot
    (all tokens' first choice, then second...), tokens in order; each expert keeps its
    first `capacity`. ids [N, k] -> keep [N, k] bool."""
    flat = ids.t().reshape(-1)                                           # slot-major order
    onehot = torch.nn.functional.one_hot(flat, num_experts)              # [k*N, E]
    rank = (onehot.cumsum(0) * onehot).sum(-1) - 1                       # position within its expert
    return (rank < capacity).view(ids.shape[1], ids.shape[0]).t()


class MoE(nn.Module):
    """Experts [E/ep, ...] of this rank (ids e0..e0+E/ep-1), each split along F over TP ranks."""

    def __init__(self, hidden: int, ffn: int, experts: int, dtype, device=None, tp: int = 1,
                 options: MoEOptions = MoEOptions(), ep: int = 1, ep_rank: int = 0, par=None):
        super().__init__()
        self.num_experts = experts
        self.num_local = experts // ep
        self.e0 = ep_rank * self.num_local
        self.options = options
        self.par = par
        self.gate = _Gate(hidden, experts, dtype, device)
        self.experts = _Experts(hidden, ffn // tp, self.num_local, dtype, device)

    def _partial(self, x: torch.Tensor, e_local: torch.Tensor) -> torch.Tensor:
        """x [R, H], local expert ids [R] -> gelu(x W1 + b1) W2 over this rank's F shard, fp32, no b2."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        ex = self.experts
        for e in torch.unique(e_local).tolist():
            rows = (e_local == e).nonzero(as_tuple=True)[0]
            h = gelu_tanh(x[rows] @ ex.dense_h_to_4h.weight[e] + ex.dense_h_to_4h.bias[e])   # [n, F/t]
            out[rows] = (h @ ex.dense_4h_to_h.weight[e]).float()                              # [n, H]
        return out

    def _finish(self, partial: torch.Tensor, e_local: torch.Tensor) -> torch.Tensor:
        """Sum the F shards over TP, then add b2 (once, after the reduce, as FT does)."""
        if self.par is not None and partial.shape[0]:
            self.par.tp_all_reduce(partial)
        return partial + self.experts.dense_4h_to_h.bias[e_local].float()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        N, H = u.shape
        logits = u.float() @ self.gate.wg.weight.float()                  # [N, E] fp32
        probs, ids = route(logits, self.options.top_k)                    # [N, k]
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.options.capacity_factor is not None:
            cap = max(math.ceil(N / self.num_experts * self.options.capacity_factor), self.options.min_capacity)
            keep = capacity_keep(ids, self.num_experts, cap)
        tok, slot = keep.nonzero(as_tuple=True)                           # kept (token, choice) slots
        e = ids[tok, slot]
        if self.par is not None and self.par.ep > 1:
            y = self._exchange(u[tok], e)
        else:
            y = self._finish(self._partial(u[tok], e), e)
        out = torch.zeros(N, H, dtype=torch.float32, device=u.device)
        out.index_add_(0, tok, y * probs[tok, slot][:, None])
        return out.to(u.dtype)

    def _exchange(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Expert parallel: send each slot to the rank owning its expert (all-to-all, uneven),
        compute there, send the results back. x [S, H], global expert ids e [S] -> y [S, H] fp32."""
        import torch.distributed as dist

        par, L = self.par, self.num_local
        dest = e // L
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=par.ep)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=par.ep_group)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        self.last_received = sum(rc)               # slots this rank's experts served (load report)
        H = x.shape[1]
        recv_x = x.new_empty(sum(rc), H)
        dist.all_to_all_single(recv_x, x[order].contiguous(), rc, sc, group=par.ep_group)
        recv_e = e.new_empty(sum(rc))
        dist.all_to_all_single(recv_e, (e[order] - dest[order] * L).contiguous(), rc, sc, group=par.ep_group)
        y_recv = self._finish(self._partial(recv_x, recv_e), recv_e)
        y_sorted = y_recv.new_empty(x.shape[0], H)
        dist.all_to_all_single(y_sorted, y_recv, sc, rc, group=par.ep_group)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
        return y
