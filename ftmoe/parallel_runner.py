"""Run a sharded GPTMoE over several processes: rank 0 drives, the other ranks follow.

In:  this rank's model shard and `ParallelState`; on rank 0, the generator's calls
     (`runner(ids, meta, cache, last_only)`, `runner.make_cache(...)`, block copies).
Out: on rank 0, full logits [B, (T,) V] fp32, as a single-process GPTMoE would return.

Every call on rank 0 is broadcast to all ranks (`broadcast_object_list`: the batch's token
ids and cache metadata, a few KB), then every rank runs its part:
- the batch rows are split over the expert/data-parallel index d (row r -> d = r % ep) and
  into micro-batches for the pipeline (stage s receives micro-batch j from stage s-1 while
  it sends j-1 on: FasterTransformer's bubble hiding);
- attention and dense layers reduce over TP, MoE layers exchange tokens over EP (model.py);
- the last stage's ranks send their logits (their rows, their vocabulary slice) to rank 0.
Only rank 0 samples, so every rank sees the same tokens. The KV cache's block bookkeeping
lives on rank 0; each rank stores its own layers and heads under the same block ids.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .distributed import ParallelState
from .errors import FtmoeError
from .kv_cache import AttnMetadata, KVCache
from .model import GPTMoE


class _ShardCache(KVCache):
    """Rank 0's cache: block bookkeeping for everyone, storage for rank 0's shard; block copies
    (beam search) are mirrored on every rank."""

    def __init__(self, runner: "DistributedModel", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._runner = runner

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if src:
            self._runner._command(("copy_blocks", list(src), list(dst)))


def _pad_rows(x: torch.Tensor, meta: AttnMetadata, n_pad: int, T: int):
    """Prefill inputs padded to n_pad rows: one dummy token each (position 0) with no KV slot.
    x is [n, T] token ids or a later stage's residual [n*T, H]."""
    n = meta.positions.shape[0]
    pad = n_pad - n
    if x.dim() == 2 and x.shape[0] == n and x.dtype == torch.long:
        x = torch.cat([x, x.new_zeros(pad, T)])
    else:
        x = torch.cat([x, x.new_zeros(pad * T, x.shape[1])])
    f = meta
    meta = AttnMetadata(torch.cat([f.positions, f.positions.new_zeros(pad, T)]),
                        torch.cat([f.slot_mapping, f.slot_mapping.new_full((pad, T), -1)]),
                        torch.cat([f.block_tables, f.block_tables.new_zeros(pad, f.block_tables.shape[1])]),
                        torch.cat([f.context_lens, f.context_lens.new_zeros(pad)]),
                        torch.cat([f.seq_lens, f.seq_lens.new_ones(pad)]))
    return x, meta


def _meta_fields(meta: AttnMetadata) -> tuple:
    return tuple(t.cpu() for t in (meta.positions, meta.slot_mapping, meta.block_tables, meta.context_lens,
                                   meta.seq_lens))


class DistributedModel:
    def __init__(self, model: GPTMoE, par: ParallelState, micro_batches: int | None = None, fast: bool = False,
                 cuda_graphs: bool | None = None):
        self.model, self.par = model, par
        self.fast = None
        if fast:   # Triton kernels for all-decode and fresh-prefill calls
            from .fast_model import FastGPTMoE

            self.fast = FastGPTMoE(model)
        # decode steps replay per-rank CUDA graphs (collectives inside) on GPUs; FTMOE_CUDA_GRAPHS=0 turns them off
        if cuda_graphs is None:
            cuda_graphs = par.device.type == "cuda" and os.environ.get("FTMOE_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = self.fast is not None and cuda_graphs
        self._last_mode = "reference"
        self.config, self.dtype, self.device = model.config, model.dtype, par.device
        self.micro_batches = micro_batches
        self.cache: KVCache | None = None
        cfg = self.config
        self._local_layers = len(model.layer_ids)
        self._heads = cfg.head_num // par.tp

    # ---- rank 0 ---------------------------------------------------------------------
    def make_cache(self, max_tokens: int, block_size: int) -> KVCache:
        return self._command(("init_cache", max(1, -(-max_tokens // block_size)), block_size))

    def __call__(self, input_ids: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        if meta is None:
            raise ValueError("the distributed model runs with a KV cache (meta and cache)")
        return self._command(("forward", input_ids.cpu(), _meta_fields(meta), last_only))

    def shutdown(self) -> None:
        self._command(("stop",))

    def release_graphs(self) -> None:
        """Free the decode graphs before the process group goes: NCCL's communicator teardown
        waits for every graph that captured its collectives to be destroyed (it hangs otherwise)."""
        if self.fast is not None and self.fast.graphs is not None:
            self.fast.graphs = None
            import gc

            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def moe_load(self) -> list[list[int]]:
        """After a forward: per MoE layer, the slots each EP rank's experts served ([] without EP)."""
        return self._command(("moe_load",)) or []

    def _command(self, cmd: tuple):
        try:
            dist.broadcast_object_list([cmd], src=0)
            return self._execute(cmd)
        except RuntimeError as e:   # a collective failed or timed out: some rank is gone
            msg = str(e).splitlines()[0][:200]
            raise FtmoeError(f"distributed step '{cmd[0]}' failed on rank 0 (a worker rank died or timed "
                             f"out): {msg}") from None

    # ---- ranks != 0 -----------------------------------------------------------------------
    def follow(self) -> None:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0][0] == "stop":
                return
            self._execute(box[0])

    # ---- every rank ---------------------------------------------------------------------
    def _execute(self, cmd: tuple):
        kind = cmd[0]
        if kind == "init_cache":
            nb, bs = cmd[1], cmd[2]
            args = (self._local_layers, self._heads, self.config.size_per_head, nb, bs, self.dtype, self.device)
            self.release_graphs()          # graphs of an earlier cache
            self.cache = _ShardCache(self, *args) if self.par.rank == 0 else KVCache(*args)
            if self.cuda_graphs:
                self.fast.enable_cuda_graphs(self.cache)
            return self.cache
        if kind == "copy_blocks":
            KVCache._copy_blocks(self.cache, cmd[1], cmd[2])
            return None
        if kind == "forward":
            return self._forward(*cmd[1:])
        if kind == "stop":
            return None
        if kind == "moe_load":
            return self._moe_load()
        raise ValueError(f"unknown command {kind!r}")

    def _micro_rows(self, B: int, d: int) -> list[list[int]]:
        """Global rows of each micro-batch that data-parallel index d handles (row r -> d = r % ep)."""
        m = self.micro_batches or (min(B, self.par.pp) if self.par.pp > 1 else 1)
        chunks = torch.tensor_split(torch.arange(B), max(1, min(m, B)))
        return [[r for r in c.tolist() if r % self.par.ep == d] for c in chunks]

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, fields: tuple, last_only: bool):
        par, model, dev = self.par, self.model, self.device
        B, T = input_ids.shape
        H = self.config.hidden_size
        # the same choice on every rank: it depends only on the broadcast metadata
        mode = "reference"
        if self.fast is not None and T == 1 and bool((fields[4] == 1).all()):
            mode = "decode"
        elif self.fast is not None and bool((fields[3] == 0).all()):
            mode = "prefill"
        self._last_mode = mode
        micro = [self._micro_rows(B, d) for d in range(par.ep)]
        pending, outs = [], []
        for j, rows in enumerate(micro[par.d]):
            idx = torch.tensor(rows, dtype=torch.long)
            meta = AttnMetadata(*(f[idx].to(dev) for f in fields))
            n = len(rows)
            # expert parallelism on the fast path: every EP rank runs the same number of rows
            # (padding rows have no KV slots), because the MoE exchange has fixed shapes
            n_pad = max(len(m[j]) for m in micro) if mode != "reference" and par.ep > 1 else n
            hidden = {"decode": (n, H), "prefill": (n * T, H), "reference": (n, T, H)}[mode]
            if par.is_first_stage:
                x = input_ids[idx].to(dev)
            else:
                x = torch.empty(*hidden, dtype=self.dtype, device=dev)
                if n:
                    dist.recv(x, src=par.rank_of(par.stage - 1, par.d, par.t))
            if mode == "decode":
                y = self._decode(x[:, 0] if par.is_first_stage else x, meta, n_pad) if n_pad else x
                if self.fast.graphs is not None and len(micro[par.d]) > 1:
                    y = y.clone()      # the next micro-batch may replay the same graph over its output
                if par.is_last_stage and n and not last_only:
                    y = y[:, None]
            elif mode == "prefill":
                y = x
                if n_pad:
                    if n_pad > n:
                        x, meta = _pad_rows(x, meta, n_pad, T)
                    y = self.fast.prefill(x, meta, self.cache, last_only)
                    y = y[:n] if par.is_last_stage else y[:n * T]
            else:
                if par.is_first_stage:
                    x = model.embed(x, meta.positions)
                y = model.run_layers(x, meta, self.cache)
                if par.is_last_stage and n:
                    y = model.head(y, meta, last_only)
            if not par.is_last_stage:
                if n:
                    pending.append(dist.isend(y.contiguous(), dst=par.rank_of(par.stage + 1, par.d, par.t)))
            elif n:
                outs.append(y)
        for w in pending:
            w.wait()
        return self._gather_logits(outs, B, T, last_only)

    def _decode(self, x: torch.Tensor, meta: AttnMetadata, n_pad: int) -> torch.Tensor:
        """One decode step of this rank's rows (graph replay when enabled); rows [n, n_pad) are padding."""
        n = x.shape[0]
        args = (x, meta.positions[:, 0], meta.block_tables.int(), meta.context_lens.int(), meta.slot_mapping[:, 0].int())
        graphs = self.fast.graphs
        if graphs is not None and graphs.cache is self.cache and n_pad <= graphs.buckets[-1]:
            return graphs.step(*args, min_rows=n_pad)
        if n_pad > n:
            pad = n_pad - n
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            pos, tables, ctx, slots = args[1:]
            args = (x, torch.cat([pos, pos.new_zeros(pad)]), torch.cat([tables, tables.new_zeros(pad, tables.shape[1])]),
                    torch.cat([ctx, ctx.new_zeros(pad)]), torch.cat([slots, slots.new_full((pad,), -1)]))
        return self.fast.decode_step(*args, self.cache)[:n]

    def _moe_load(self):
        """Gather every rank's per-layer served-slot counts to rank 0: [layer][ep rank] (TP rank 0's view)."""
        if self.par.ep == 1:
            return None
        if self._last_mode != "reference":      # the fast path counts on the GPU, per local layer
            counts = self.fast.ep_counts.tolist()
            mine = {i: counts[j] for j, (i, b) in enumerate(zip(self.model.layer_ids, self.model.blocks())) if b.is_moe}
        else:
            mine = {i: getattr(b.mlp.moe, "last_received", 0)
                    for i, b in zip(self.model.layer_ids, self.model.blocks()) if b.is_moe}
        box = [None] * dist.get_world_size() if self.par.rank == 0 else None
        dist.gather_object((self.par.d, self.par.t, mine), box, dst=0)
        if self.par.rank != 0:
            return None
        layers = sorted({i for _, _, m in box for i in m})
        return [[next(m[i] for d, t, m in box if d == dd and t == 0 and i in m) for dd in range(self.par.ep)]
                for i in layers]

    def _gather_logits(self, outs: list[torch.Tensor], B: int, T: int, last_only: bool):
        """Last-stage ranks send (their rows, their vocab slice) to rank 0, which assembles [B, (T,) V]."""
        par, V = self.par, self.config.vocab_size
        mine = torch.cat(outs, 0) if outs else None
        shape_tail = () if last_only else (T,)
        if par.rank != 0:
            if par.is_last_stage and mine is not None:
                dist.send(mine.contiguous(), dst=0)
            return None
        full = torch.empty(B, *shape_tail, V, dtype=torch.float32, device=self.device)
        last = par.pp - 1
        slices = par.config.vocab_slices(V)
        for d in range(par.ep):
            rows = [r for mb in self._micro_rows(B, d) for r in mb]
            if not rows:
                continue
            for t, vs in enumerate(slices):
                src = par.rank_of(last, d, t)
                if src == 0:
                    part = mine
                else:
                    part = torch.empty(len(rows), *shape_tail, len(vs), dtype=torch.float32, device=self.device)
                    dist.recv(part, src=src)
                full[torch.tensor(rows, device=self.device), ..., vs.start:vs.stop] = part
        return full
