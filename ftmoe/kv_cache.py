"""Block-organised KV cache (paged, as in vLLM), shared by the generator and the engine.

In:  sizes (layers, heads, head dim), a number of fixed-size blocks, and calls that
     add, extend, fork, reorder and free sequences by id.
Out: per-layer K/V storage `k[L]`, `v[L]` of shape [num_blocks, heads, block_size, D] (a head's
     tokens of one block are contiguous, so decode attention reads 2 KB runs) and,
     for each forward call, an `AttnMetadata` telling the attention layer where every new
     token's K/V goes (`slot_mapping`) and which blocks each row reads (`block_tables`).

A sequence owns a list of blocks; tokens at position p live in block p // block_size,
offset p % block_size. Blocks are allocated on demand and returned on `free`, so the
serving engine can admit requests against `num_free_blocks`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch

from .errors import FtmoeError


class CacheFullError(FtmoeError):
    """Not enough free KV-cache blocks for the request."""


@dataclasses.dataclass
class AttnMetadata:
    """Where one forward call's new tokens sit. B rows, T new tokens per row (right-padded)."""

    positions: torch.Tensor     # [B, T] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [B, T] long: flat cache slot (block*block_size+offset), -1 = padding
    block_tables: torch.Tensor  # [B, nb] long: blocks of each row (padded with 0)
    context_lens: torch.Tensor  # [B] long: tokens cached before this call
    seq_lens: torch.Tensor      # [B] long: valid new tokens in this call (<= T)

    @property
    def total_lens(self) -> torch.Tensor:
        return self.context_lens + self.seq_lens

    @property
    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.positions, self.slot_mapping, self.block_tables, self.context_lens, self.seq_lens)

    def to(self, device: torch.device | str) -> "AttnMetadata":
        """The same metadata on `device`, moved in one copy (the fields become views of it)."""
        f, dev = self.fields, torch.device(device)
        if all(t.device.type == dev.type and dev.index in (None, t.device.index) for t in f):
            return self
        return _packed([t.long() for t in f], device)

    def chunk_step(self, j: int, block_size: int) -> "AttnMetadata":
        """Step j of the greedy chunk this metadata starts (`KVCache.prepare_chunk`): positions and
        context lengths + j, each row's slot for its new position from its block table; what
        `kernels.advance` does on the GPU between a chunk's steps."""
        pos = self.positions[:, 0] + j
        slot = self.block_tables.gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size
        return AttnMetadata(pos[:, None], slot[:, None], self.block_tables, self.context_lens + j, self.seq_lens)


def _packed(fields: list[torch.Tensor], device: torch.device | str) -> AttnMetadata:
    """AttnMetadata of these fields on `device`, in one copy: the fields are views of it."""
    return _views(torch.cat([t.reshape(-1) for t in fields]).to(device), [t.shape for t in fields])


def _views(flat: torch.Tensor, shapes: list) -> AttnMetadata:
    """AttnMetadata whose fields are views of `flat`, laid out one after another in field order."""
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at:at + n].view(s))
        at += n
    return AttnMetadata(*out)


#: decode steps (one new token per row) of at most this many rows take `KVCache._prepare_decode`
DECODE_FAST_ROWS = 32


class KVCache:
    #: where `prepare` puts the metadata (None: the storage's device). "cpu" where the consumer
    #: packs it on the host itself: the parallel runner, and decode graphs (`enable_cuda_graphs`),
    #: which take a step's token ids and metadata to the GPU in one copy.
    meta_device: str | None = None

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks, num_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, NB, heads, bs, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    @classmethod
    def for_model(cls, cfg, max_tokens: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", tp: int = 1) -> "KVCache":
        """A cache that holds `max_tokens` tokens in total across all sequences."""
        nb = max(1, -(-max_tokens // block_size))
        return cls(cfg.num_layer, cfg.head_num // tp, cfg.size_per_head, nb, block_size, dtype, device)

    @staticmethod
    def bytes_per_token(cfg, dtype: torch.dtype = torch.float32, tp: int = 1, num_layers: int | None = None) -> int:
        """K and V of one token over all (or num_layers) layers, this rank's heads."""
        layers = cfg.num_layer if num_layers is None else num_layers
        return 2 * layers * (cfg.head_num // tp) * cfg.size_per_head * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def tokens_for_memory(cfg, budget_bytes: int, dtype: torch.dtype, block_size: int = 16, tp: int = 1) -> int:
        """How many tokens (whole blocks) a memory budget holds."""
        per_block = KVCache.bytes_per_token(cfg, dtype, tp) * block_size
        return max(1, budget_bytes // per_block) * block_size

    # ---- bookkeeping --------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: int) -> int:
        return self._lens[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def add(self, seq_id: int) -> None:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already in the KV cache")
        self._tables[seq_id] = []
        self._lens[seq_id] = 0

    def free(self, seq_id: int) -> None:
        blocks = self._tables.pop(seq_id, None)
        self._lens.pop(seq_id, None)
        if blocks:
            self._free.extend(reversed(blocks))

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"KV cache full: need {n} more blocks of {self.block_size} tokens, "
                                 f"{len(self._free)} of {self.num_blocks} free")
        cut = len(self._free) - n
        taken = self._free[cut:][::-1]            # the order n pop()s would give: low ids first
        del self._free[cut:]
        return taken

    def reserve(self, seq_id: int, n_new: int) -> None:
        """Make room for `n_new` more tokens of `seq_id` (allocates whole blocks)."""
        table = self._tables[seq_id]
        need = self.blocks_for(self._lens[seq_id] + n_new) - len(table)
        if need > 0:
            table.extend(self._take(need))

    def fork(self, src: int, dst: int) -> None:
        """`dst` becomes a copy of `src` with its own blocks."""
        self.add(dst)
        src_blocks = self._tables[src]
        try:
            dst_blocks = self._take(len(src_blocks))
        except CacheFullError:
            self.free(dst)
            raise
        self._copy_blocks(src_blocks, dst_blocks)
        self._tables[dst] = dst_blocks
        self._lens[dst] = self._lens[src]

    def reorder(self, seq_ids: list[int], parents: list[int]) -> None:
        """Beam reorder: sequence seq_ids[i] takes the content of seq_ids[parents[i]]."""
        if parents == list(range(len(seq_ids))):
            return
        old = {s: (self._tables[s], self._lens[s]) for s in seq_ids}
        new_tables = [old[seq_ids[p]] for p in parents]
        # allocate fresh blocks for all, copy, then release the old ones
        total = sum(len(b) for b, _ in new_tables)
        dst_all = self._take(total)
        src_flat = [b for blocks, _ in new_tables for b in blocks]
        self._copy_blocks(src_flat, dst_all)
        pos = 0
        for s in seq_ids:
            self._free.extend(reversed(old[s][0]))
        for s, (blocks, n) in zip(seq_ids, new_tables):
            self._tables[s] = dst_all[pos:pos + len(blocks)]
            self._lens[s] = n
            pos += len(blocks)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past `length` (frees whole blocks no longer needed)."""
        if length > self._lens[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id} of length {self._lens[seq_id]} to {length}")
        table = self._tables[seq_id]
        keep = self.blocks_for(length)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self._lens[seq_id] = length

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if src:
            s = torch.tensor(src, device=self.k.device)
            d = torch.tensor(dst, device=self.k.device)
            self.k[:, d] = self.k[:, s]
            self.v[:, d] = self.v[:, s]

    # ---- storage access (the layout lives here) ---------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [n, heads, D] at flat slots [n] (block * block_size + offset)."""
        blk, off = slots // self.block_size, slots % self.block_size
        self.k[layer][blk, :, off] = k.to(self.k.dtype)
        self.v[layer][blk, :, off] = v.to(self.v.dtype)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each row's blocks, in position order: [B, nb * block_size, heads, D]."""
        B, nb = block_tables.shape
        k = self.k[layer][block_tables].permute(0, 1, 3, 2, 4)                  # [B, nb, bs, heads, D]
        v = self.v[layer][block_tables].permute(0, 1, 3, 2, 4)
        return (k.reshape(B, nb * self.block_size, *k.shape[3:]), v.reshape(B, nb * self.block_size, *v.shape[3:]))

    # ---- per-call metadata ---------------------------------------------------
    def prepare(self, seq_ids: list[int], num_new: list[int], pad_to: int | None = None) -> AttnMetadata:
        """Reserve room for `num_new[i]` tokens of each sequence, advance lengths, and describe
        the call. All-or-nothing: on CacheFullError no sequence has changed. The per-row work is
        a few Python loops over B; the [B, nb] tables, positions and slots are built with numpy
        (a serving step's host cost: 1024 decode rows in well under a millisecond) and reach the
        device in one copy."""
        if len(seq_ids) != len(num_new):
            raise ValueError("seq_ids and num_new differ in length")
        if len(seq_ids) <= DECODE_FAST_ROWS and (pad_to or 1) == 1 and all(n == 1 for n in num_new):
            return self._prepare_decode(seq_ids)
        B, bs = len(seq_ids), self.block_size
        tabs = [self._tables[s] for s in seq_ids]
        ctx = np.fromiter((self._lens[s] for s in seq_ids), dtype=np.int64, count=B)
        n_new = np.asarray(num_new, dtype=np.int64).reshape(B)
        have = np.fromiter(map(len, tabs), dtype=np.int64, count=B)
        need = np.maximum(0, -(-(ctx + n_new) // bs) - have)
        if int(need.sum()) > len(self._free):
            raise CacheFullError(f"KV cache full: need {int(need.sum())} more blocks of {bs} tokens, "
                                 f"{len(self._free)} of {self.num_blocks} free")
        taken, at = self._take(int(need.sum())), 0
        for i in np.flatnonzero(need).tolist():
            n = int(need[i])
            tabs[i].extend(taken[at:at + n])
            at += n
        for s, n in zip(seq_ids, num_new):
            self._lens[s] += n
        T = max(int(n_new.max(initial=0)), pad_to or 0, 1)
        counts = have + need
        nb = max(1, int(counts.max(initial=0)))
        tables = np.zeros((B, nb), dtype=np.int64)
        tables[np.arange(nb)[None, :] < counts[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tabs), dtype=np.int64, count=int(counts.sum()))
        t = np.arange(T)
        positions = ctx[:, None] + t[None, :]                                     # [B, T]
        blk = np.take_along_axis(tables, np.minimum(positions // bs, nb - 1), axis=1)
        slots = np.where(t[None, :] < n_new[:, None], blk * bs + positions % bs, -1)
        # one host-to-device copy for the whole call (not one per field)
        return _packed([torch.from_numpy(a) for a in (positions, slots, tables, ctx, n_new)],
                       self.meta_device or self.k.device)

    def _prepare_decode(self, seq_ids: list[int]) -> AttnMetadata:
        """`prepare(seq_ids, [1] * B)` for a few rows, in plain Python over the rows and one numpy
        buffer that becomes the packed metadata (a decode step's host cost at batch 1: ~20 us
        instead of ~80 us through the general path's array work). Same result, same errors."""
        B, bs = len(seq_ids), self.block_size
        tabs = [self._tables[s] for s in seq_ids]
        lens = [self._lens[s] for s in seq_ids]
        needs = [max(0, -(-(n + 1) // bs) - len(t)) for n, t in zip(lens, tabs)]
        total = sum(needs)
        if total:
            taken, at = self._take(total), 0            # raises CacheFullError before any change
            for t, k in zip(tabs, needs):
                if k:
                    t.extend(taken[at:at + k])
                    at += k
        for s in seq_ids:
            self._lens[s] += 1
        nb = max(1, max(map(len, tabs)))
        buf = np.zeros(B * (4 + nb), dtype=np.int64)       # positions, slots, tables [B, nb], ctx, n_new
        buf[:B] = lens
        buf[B:2 * B] = [t[n // bs] * bs + n % bs for n, t in zip(lens, tabs)]
        tables = buf[2 * B:2 * B + B * nb].reshape(B, nb)
        for i, t in enumerate(tabs):
            tables[i, :len(t)] = t
        buf[2 * B + B * nb:3 * B + B * nb] = lens
        buf[3 * B + B * nb:] = 1
        return _views(torch.from_numpy(buf).to(self.meta_device or self.k.device),
                      [(B, 1), (B, 1), (B, nb), (B,), (B,)])

    def prepare_chunk(self, seq_ids: list[int], steps: int) -> AttnMetadata:
        """Metadata of a greedy chunk (`DecodeGraphs.greedy_chunk`): room for `steps` more tokens
        of every sequence is reserved and their lengths advance by `steps`, as `steps` decode
        steps would; the metadata describes the first step only (T = 1), with block tables that
        hold all `steps` tokens (the GPU moves the rows on from there)."""
        m = self.prepare(seq_ids, [steps] * len(seq_ids))
        return AttnMetadata(m.positions[:, :1], m.slot_mapping[:, :1], m.block_tables, m.context_lens,
                            torch.ones_like(m.seq_lens))
