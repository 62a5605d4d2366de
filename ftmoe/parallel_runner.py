"""Run a sharded GPTMoE over several processes: rank 0 drives, the other ranks follow.

In:  this rank's model shard and `ParallelState`; on rank 0, the generator's calls
     (`runner(ids, meta, cache, last_only)`, `runner.make_cache(...)`, block copies).
Out: on rank 0, full logits [B, (T,) V] fp32, as a single-process GPTMoE would return.

Every call on rank 0 is broadcast to all ranks, then every rank runs its part. A forward step
is one broadcast of a fixed-size int64 message on the device (a header, then the token ids and
cache metadata packed in one tensor: no pickling, one host-to-device copy on rank 0; a payload
larger than the message follows in a second broadcast); other commands (cache set-up, block
copies, stop, load report) follow a header with `broadcast_object_list`.
- the batch rows are split into contiguous micro-batches for the pipeline (stage s receives
  micro-batch j from stage s-1 while it sends j-1 on: FasterTransformer's bubble hiding), and
  each micro-batch over the expert/data-parallel index d (row r -> d = r % ep: a strided
  slice, no index copies);
- attention and dense layers reduce over TP, MoE layers exchange tokens over EP (model.py);
- the last stage's ranks send their logits (their rows, their vocabulary slice; 16-bit
  models in 16 bits) to rank 0: one NCCL gather without a pipeline, sends and receives with one.
Only rank 0 samples, so every rank sees the same tokens. The KV cache's block bookkeeping
lives on rank 0; each rank stores its own layers and heads under the same block ids.
Greedy chunks (`greedy_chunk`, without a pipeline): one broadcast starts N decode steps that
every rank replays back to back from its decode graphs, each step's argmax fed back on the
devices (under TP the graph merges the vocabulary slices' argmax, so the TP ranks agree); one
gather brings the N x B tokens to rank 0, whose host work is then paid once per chunk, not per step.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .distributed import ParallelState
from .errors import FtmoeError
from .kv_cache import AttnMetadata, KVCache
from .model import GPTMoE


@dataclasses.dataclass
class _DistChunk:
    """A greedy chunk queued on every rank (`DistributedModel.greedy_chunk_start`): its rows,
    steps, and the host buffer the ranks' tokens (and log probs) are gathered into, with the
    event that marks the copy done (None on CPUs)."""
    rows: int
    steps: int
    logprobs: bool
    host: torch.Tensor           # [world, (2,) steps, rows per rank]: int64 tokens, or float64 (tokens, log probs)
    layout: list                 # (row slice, source rank, rows) per EP index
    done: object

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.done is not None:
            self.done.synchronize()
        toks = torch.empty(self.steps, self.rows, dtype=torch.long)
        lps = torch.empty(self.steps, self.rows, dtype=torch.float32) if self.logprobs else None
        for sl, src, n in self.layout:
            part = self.host[src]
            if self.logprobs:
                toks[:, sl] = part[0, :, :n].long()
                lps[:, sl] = part[1, :, :n].float()
            else:
                toks[:, sl] = part[:, :n]
        return toks, lps


class _ShardCache(KVCache):
    """Rank 0's cache: block bookkeeping for everyone, storage for rank 0's shard; block copies
    (beam search) are mirrored on every rank. Its metadata stays on the CPU: the runner packs it."""

    meta_device = "cpu"

    def __init__(self, runner: "DistributedModel", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._runner = runner

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if src:
            self._runner._command(("copy_blocks", list(src), list(dst)))


def _pad_rows(x: torch.Tensor, meta: AttnMetadata, n_pad: int, T: int):
    """Inputs padded to n_pad rows (prefill, or decode with T = 1): one dummy token each
    (position 0, no context) with no KV slot. x is [n, T] token ids or a later stage's residual [n*T, H]."""
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


_OBJECT, _FORWARD, _GREEDY = 1, 2, 3          # header codes: a pickled command follows / a forward step / a greedy chunk
_MODES = ("reference", "decode", "prefill")
_HEADER = 6                                   # [code, B, T, nb, last_only, mode]; a greedy chunk: [code, B, 1, nb, flags, short]
_MESSAGE = 16384                              # int64s in a step's first broadcast: the header and most payloads


def _payload_len(B: int, T: int, nb: int) -> int:
    return 3 * B * T + B * nb + 2 * B


def _pack(input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
    """One int64 CPU tensor: ids, positions, slots [B*T] each, block tables [B*nb], context and new lengths [B]."""
    parts = (input_ids, meta.positions, meta.slot_mapping, meta.block_tables, meta.context_lens, meta.seq_lens)
    return torch.cat([t.reshape(-1).to("cpu", torch.long) for t in parts])


def _unpack(payload: torch.Tensor, B: int, T: int, nb: int) -> tuple[torch.Tensor, AttnMetadata]:
    ids, pos, slots, tables, ctx, lens = payload.split([B * T, B * T, B * T, B * nb, B, B])
    return ids.view(B, T), AttnMetadata(pos.view(B, T), slots.view(B, T), tables.view(B, nb), ctx, lens)


def _rows(lo: int, hi: int, d: int, ep: int) -> slice:
    """Rows r in [lo, hi) with r % ep == d, as a slice."""
    return slice(lo + (d - lo) % ep, hi, ep)


def _count(sl: slice) -> int:
    return len(range(sl.start, sl.stop, sl.step))


def _prefill_graphs_wanted(par: ParallelState) -> bool:
    """Per-rank prefill graphs (collectives captured, like the decode graphs): on unless
    FTMOE_DIST_PREFILL_GRAPHS=0 (2 x H200, 2026-11-28: 8 x 512 in 8.9 ms at TP=2 and EP=2,
    against 41-51 ms launched eagerly; NCCL parity passed); without a pipeline only (a graph
    returns last-token logits). On CPUs the same bucketed procedure runs without capture."""
    return os.environ.get("FTMOE_DIST_PREFILL_GRAPHS", "1") != "0" and par.pp == 1


def _place(full: torch.Tensor, rows: list[slice], counts: list[int], part: torch.Tensor, vs: range) -> None:
    """Rank 0's logit assembly: part's first sum(counts) rows are the strided row slices `rows`
    (one per micro-batch, in order) of vocabulary slice `vs`; extra rows and columns are padding."""
    for r, p in zip(rows, part[:sum(counts)].split(counts)):
        if p.shape[0]:
            full[r, ..., vs.start:vs.stop] = p[..., :len(vs)]


def _rank_error(what: str, e: Exception) -> FtmoeError:
    msg = str(e).splitlines()[0][:200]
    return FtmoeError(f"distributed step '{what}' failed on rank 0 (a worker rank died or timed out): {msg}")


class DistributedModel:
    def __init__(self, model: GPTMoE, par: ParallelState, micro_batches: int | None = None, fast: bool = False,
                 cuda_graphs: bool | None = None):
        self.model, self.par = model, par
        self.fast = None
        if fast:   # Triton kernels for all-decode and fresh-prefill calls
            from .fast_model import FastGPTMoE

            self.fast = FastGPTMoE(model)
        # decode steps replay per-rank CUDA graphs (collectives inside) on GPUs; FTMOE_CUDA_GRAPHS=0 turns them off
        # (FTMOE_CUDA_GRAPHS=1 on CPUs: the graphs' static-buffer procedure, run eagerly, for tests)
        if cuda_graphs is None:
            env = os.environ.get("FTMOE_CUDA_GRAPHS", "")
            cuda_graphs = env == "1" or (par.device.type == "cuda" and env != "0")
        self.cuda_graphs = self.fast is not None and cuda_graphs
        self._last_mode = "reference"
        self.config, self.dtype, self.device = model.config, model.dtype, par.device
        self.micro_batches = micro_batches
        self.cache: KVCache | None = None
        cfg = self.config
        self._local_layers = len(model.layer_ids)
        self._heads = cfg.head_num // par.tp
        self._pinned, self._staged, self._msg = None, None, None
        self._last_chunk: _DistChunk | None = None      # rank 0: the greedy chunk queued last
        self._chunk_ring: list = []                     # rank 0: host buffers for chunks' tokens

    # ---- rank 0 ---------------------------------------------------------------------
    def make_cache(self, max_tokens: int, block_size: int) -> KVCache:
        return self._command(("init_cache", max(1, -(-max_tokens // block_size)), block_size))

    def __call__(self, input_ids: torch.Tensor, meta: AttnMetadata | None = None, cache: KVCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        if meta is None:
            raise ValueError("the distributed model runs with a KV cache (meta and cache)")
        B, T = input_ids.shape
        # the path is chosen here, once, from the metadata on the host, and sent to every rank
        mode = "reference"
        if self.fast is not None and T == 1 and bool((meta.seq_lens == 1).all()):
            mode = "decode"
        elif self.fast is not None and bool((meta.context_lens == 0).all()):
            mode = "prefill"
        self._last_chunk = None
        ids, dmeta = self._broadcast_step([_FORWARD, B, T, meta.block_tables.shape[1], int(last_only),
                                           _MODES.index(mode)], input_ids, meta, "forward")
        try:
            return self._forward(ids, dmeta, mode, last_only)
        except RuntimeError as e:   # a collective failed or timed out: some rank is gone
            raise _rank_error("forward", e) from None

    def _broadcast_step(self, head: list[int], input_ids: torch.Tensor, meta: AttnMetadata, what: str):
        """A step's header and its ids and metadata (T = head[2]) to every rank, in one or two
        broadcasts of one device buffer; returns them unpacked on this rank's device."""
        B, T, nb = head[1], head[2], head[3]
        n = _HEADER + _payload_len(B, T, nb)
        try:
            msg = self._to_device(torch.tensor(head), _pack(input_ids, meta))
            if self.par.config.world_size > 1:
                dist.broadcast(msg[:_MESSAGE], src=0)
                if n > _MESSAGE:
                    dist.broadcast(msg[_MESSAGE:n], src=0)
        except RuntimeError as e:   # a collective failed or timed out: some rank is gone
            raise _rank_error(what, e) from None
        return _unpack(msg[_HEADER:n], B, T, nb)

    # ---- greedy chunks (rank 0) ---------------------------------------------------------
    def can_greedy_chunk(self, cache: KVCache, batch: int) -> bool:
        """Whether `greedy_chunk` runs for `batch` rows on `cache`: the decode graphs serve this
        cache and each EP rank's share of the rows; no pipeline (its last stage's tokens would have
        to travel back to the first stage every step)."""
        g = self.fast.graphs if self.fast is not None else None
        return g is not None and cache is self.cache and self.par.pp == 1 and g.serves(cache, -(-batch // self.par.ep))

    def greedy_chunk(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache, steps: int,
                     logprobs: bool = False):
        """`steps` greedy decode steps of every row run back to back on every rank, each step's
        argmax fed back on the devices (under TP merged over the vocabulary slices inside the
        graph), the tokens gathered to rank 0 once: (tokens [steps, B], log probs or None) on the
        host, or None where this model cannot (`can_greedy_chunk`). meta from `prepare_chunk`."""
        chunk = self.greedy_chunk_start(input_ids, meta, cache, steps, logprobs)
        return None if chunk is None else self.greedy_chunk_result(chunk)

    def greedy_chunk_start(self, input_ids: torch.Tensor | None, meta: AttnMetadata, cache: KVCache, steps: int,
                           logprobs: bool = False, after: _DistChunk | None = None) -> _DistChunk | None:
        """`greedy_chunk` without the wait (after: the chunk queued last, same rows, whose last
        tokens every rank continues from on its device; input_ids None), or None where this model
        cannot."""
        from .cuda_graphs import MAX_CHUNK, DecodeGraphs

        B = meta.positions.shape[0]
        if not self.can_greedy_chunk(cache, B) or meta.positions.device.type != "cpu":
            return None
        if not 1 <= steps <= MAX_CHUNK:
            raise ValueError(f"a greedy chunk takes 1..{MAX_CHUNK} steps, got {steps}")
        if after is not None:
            if after is not self._last_chunk or (after.rows, after.logprobs) != (B, logprobs):
                raise ValueError("a continued greedy chunk must follow the last chunk queued, with its rows")
        elif input_ids is None:
            raise ValueError("a greedy chunk needs token ids unless it continues the last chunk")
        graphs = self.fast.graphs
        # every rank must replay the same graph (its collectives pair up): rank 0 picks the context limit
        short = graphs.short_limit(graphs.bucket_for(-(-B // self.par.ep)), DecodeGraphs.max_ctx(meta), steps)
        ids = input_ids if input_ids is not None else torch.zeros(B, 1, dtype=torch.long)   # (not read)
        flags = steps | int(logprobs) << 8 | int(after is not None) << 9
        self._last_chunk = None
        dids, dmeta = self._broadcast_step([_GREEDY, B, 1, meta.block_tables.shape[1], flags, short], ids, meta,
                                           "greedy chunk")
        try:
            self._last_chunk = self._greedy(dids, dmeta, flags, short)
        except RuntimeError as e:   # a collective failed or timed out: some rank is gone
            raise _rank_error("greedy chunk", e) from None
        return self._last_chunk

    @staticmethod
    def greedy_chunk_result(chunk: _DistChunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A started chunk's tokens [steps, B] and log probs (or None) on the host, once it has run."""
        return chunk.result()

    def _to_device(self, header: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """The step's message on this rank's device, header then payload, at least _MESSAGE long
        (the tail past the payload is stale): one copy from a reused pinned buffer into a reused
        device buffer on GPUs (stream order keeps the previous step's readers ahead of it)."""
        n = header.numel() + payload.numel()
        if self.device.type != "cuda":
            return torch.cat([header, payload, payload.new_zeros(max(0, _MESSAGE - n))])
        if self._pinned is None or self._pinned.numel() < n:
            size = max(n, 4 * _MESSAGE)
            self._pinned = torch.empty(size, dtype=torch.long).pin_memory()
            self._msg = torch.zeros(size, dtype=torch.long, device=self.device)
            self._staged = None
        if self._staged is not None:
            self._staged.synchronize()          # the previous step's copy has left the pinned buffer
        torch.cat([header, payload], out=self._pinned[:n])
        self._msg[:n].copy_(self._pinned[:n], non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        return self._msg

    def shutdown(self) -> None:
        self._command(("stop",))

    def release_graphs(self) -> None:
        """Free the decode graphs before the process group goes: NCCL's communicator teardown
        waits for every graph that captured its collectives to be destroyed (it hangs otherwise)."""
        if self.fast is not None and self.fast.graphs is not None:
            self.fast.graphs = self.fast.prefill_graphs = None
            import gc

            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def capture_graphs(self, max_batch: int, greedy: bool = False, progress: bool = False) -> list[int] | None:
        """Every rank captures now, in the same order (their collectives pair up), the decode graph
        buckets a step of up to `max_batch` rows uses (each EP rank's share of them), with greedy
        their greedy-chunk graphs (no pipeline), and every prefill bucket, as a server does before
        it takes requests: a bucket captured on first use stalls that step on every rank. Returns
        the decode buckets (None without decode graphs)."""
        return self._command(("capture", int(max_batch), bool(greedy), bool(progress)))

    def moe_load(self) -> list[list[int]]:
        """After a forward: per MoE layer, the slots each EP rank's experts served ([] without EP)."""
        return self._command(("moe_load",)) or []

    def _command(self, cmd: tuple):
        self._last_chunk = None
        try:
            if self.par.config.world_size > 1:
                header = torch.zeros(_MESSAGE, dtype=torch.long, device=self.device)
                header[0] = _OBJECT
                dist.broadcast(header, src=0)
                dist.broadcast_object_list([cmd], src=0)
            return self._execute(cmd)
        except RuntimeError as e:   # a collective failed or timed out: some rank is gone
            raise _rank_error(cmd[0], e) from None

    # ---- ranks != 0 -----------------------------------------------------------------------
    def follow(self) -> None:
        msg = torch.empty(_MESSAGE, dtype=torch.long, device=self.device)
        while True:
            dist.broadcast(msg, src=0)           # reused: stream order puts it after the last step's readers
            code, B, T, nb, last_only, mode = msg[:_HEADER].tolist()
            if code in (_FORWARD, _GREEDY):
                n = _HEADER + _payload_len(B, T, nb)
                payload = msg[_HEADER:n]
                if n > _MESSAGE:
                    rest = torch.empty(n - _MESSAGE, dtype=torch.long, device=self.device)
                    dist.broadcast(rest, src=0)
                    payload = torch.cat([payload, rest])
                ids, meta = _unpack(payload, B, T, nb)
                if code == _GREEDY:      # last_only holds the chunk's flags, mode its context limit
                    self._greedy(ids, meta, last_only, mode)
                else:
                    self._forward(ids, meta, _MODES[mode], bool(last_only))
                continue
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
                self.fast.enable_cuda_graphs(self.cache, prefill=False)
            if self.fast is not None and _prefill_graphs_wanted(self.par):
                from .cuda_graphs import PrefillGraphs

                self.fast.prefill_graphs = PrefillGraphs(self.fast, self.cache)
            return self.cache
        if kind == "copy_blocks":
            KVCache._copy_blocks(self.cache, cmd[1], cmd[2])
            return None
        if kind == "stop":
            return None
        if kind == "moe_load":
            return self._moe_load()
        if kind == "capture":
            return self._capture(*cmd[1:])
        raise ValueError(f"unknown command {kind!r}")

    def _capture(self, max_batch: int, greedy: bool, progress: bool) -> list[int] | None:
        graphs = self.fast.graphs if self.fast is not None else None
        if graphs is None:
            return None
        show = progress and self.par.rank == 0
        buckets = graphs.capture_upto(-(-max_batch // self.par.ep), greedy=greedy and self.par.pp == 1, progress=show)
        if self.fast.prefill_graphs is not None:
            self.fast.prefill_graphs.capture_all(progress=show)
        return buckets

    def _chunks(self, B: int) -> list[tuple[int, int]]:
        """The pipeline's micro-batches: contiguous row ranges [lo, hi)."""
        m = max(1, min(self.micro_batches or (min(B, self.par.pp) if self.par.pp > 1 else 1), B))
        base, extra = divmod(B, m)
        bounds = [j * base + min(j, extra) for j in range(m + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, meta_all: AttnMetadata, mode: str, last_only: bool):
        """input_ids [B, T] and meta_all on this rank's device; mode chosen by rank 0."""
        par, model, dev = self.par, self.model, self.device
        B, T = input_ids.shape
        H = self.config.hidden_size
        self._last_mode = mode
        chunks = self._chunks(B)
        pending, outs = [], []
        for lo, hi in chunks:
            sl = _rows(lo, hi, par.d, par.ep)
            meta = AttnMetadata(*(f[sl] for f in (meta_all.positions, meta_all.slot_mapping, meta_all.block_tables,
                                                  meta_all.context_lens, meta_all.seq_lens)))
            n = _count(sl)
            # expert parallelism on the fast path: every EP rank runs the same number of rows
            # (padding rows have no KV slots), because the MoE exchange has fixed shapes
            n_pad = max(_count(_rows(lo, hi, d, par.ep)) for d in range(par.ep)) \
                if mode != "reference" and par.ep > 1 else n
            hidden = {"decode": (n, H), "prefill": (n * T, H), "reference": (n, T, H)}[mode]
            if par.is_first_stage:
                x = input_ids[sl]
            else:
                x = torch.empty(*hidden, dtype=self.dtype, device=dev)
                if n:
                    dist.recv(x, src=par.rank_of(par.stage - 1, par.d, par.t))
            if mode == "decode":
                y = self._decode(x, meta, n_pad) if n_pad else x
                if self.fast.graphs is not None and len(chunks) > 1:
                    y = y.clone()      # the next micro-batch may replay the same graph over its output
                if par.is_last_stage and n and not last_only:
                    y = y[:, None]
            elif mode == "prefill":
                y = x
                if n_pad:
                    if n_pad > n:
                        x, meta = _pad_rows(x, meta, n_pad, T)
                    # every rank has the same (n_pad, T), so a prefill graph, if any, is the same graph
                    y = self.fast.run_prefill(x, meta, self.cache, last_only, causal_only=False)
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
        """One decode step of this rank's n rows (x: token ids [n, 1], or a later stage's residual
        [n, H]), replayed from a graph when one fits; rows [n, n_pad) are padding with no KV slot."""
        n = meta.positions.shape[0]
        graphs = self.fast.graphs
        graphed = graphs is not None and graphs.serves(self.cache, n_pad)
        if not graphed and n_pad > n:          # a graph pads its own bucket
            x, meta = _pad_rows(x, meta, n_pad, 1)
        # an EP rank's rows are a strided slice of the step's rows: the kernels take contiguous ones
        args = (x[:, 0] if self.par.is_first_stage else x, meta.positions[:, 0], meta.block_tables,
                meta.context_lens.contiguous(), meta.slot_mapping[:, 0].contiguous())
        if graphed:
            return graphs.step(*args, min_rows=n_pad)
        return self.fast.decode_step(*args, self.cache)[:n]

    @torch.inference_mode()
    def _greedy(self, ids: torch.Tensor, meta_all: AttnMetadata, flags: int, short: int) -> _DistChunk | None:
        """A greedy chunk on this rank: its rows (a strided slice under EP, padded to the largest
        share) loaded into its decode graphs' bucket (ids kept on a continued chunk), the greedy
        graph replayed `steps` times, then every rank's tokens gathered to rank 0 (one collective
        a chunk), which copies them to a host buffer behind the gather (returned; None elsewhere)."""
        par = self.par
        steps, logprobs, cont = flags & 0xFF, bool(flags >> 8 & 1), bool(flags >> 9 & 1)
        B = ids.shape[0]
        layout = [(rows[0], counts[0]) for rows, counts in self._ep_rows(B)]   # no pipeline: one micro-batch
        sl = layout[par.d][0]
        n_pad = max(n for _, n in layout)
        graphs = self.fast.graphs
        bucket = graphs.bucket_for(n_pad)
        graphs.capture_greedy(bucket, logprobs, short)          # (its collectives: every rank, in the same order)
        graphs.load(None if cont else ids[sl, 0], meta_all.positions[sl, 0], meta_all.block_tables[sl],
                    meta_all.context_lens[sl], meta_all.slot_mapping[sl, 0], bucket)
        toks, lps = graphs.greedy_steps(bucket, steps, logprobs, short, reset=True)
        mine = toks[:steps, :n_pad] if lps is None else \
            torch.stack([toks[:steps, :n_pad].double(), lps[:steps, :n_pad].double()])   # both exact in float64
        world = par.config.world_size
        parts = torch.empty(world, *mine.shape, dtype=mine.dtype, device=self.device) if par.rank == 0 else None
        if world > 1:
            dist.gather(mine.contiguous(), list(parts.unbind(0)) if parts is not None else None, dst=0)
        elif parts is not None:
            parts[0].copy_(mine)
        if par.rank != 0:
            return None
        host, done = self._chunk_host(parts.numel())
        host = host[:parts.numel()].view(parts.dtype).view(parts.shape)
        host.copy_(parts, non_blocking=done is not None)
        if done is not None:
            done.record()
        return _DistChunk(B, steps, logprobs, host, [(r, par.rank_of(0, d, 0), n) for d, (r, n) in enumerate(layout)],
                          done)

    def _chunk_host(self, n: int) -> tuple[torch.Tensor, object]:
        """The next of two host buffers (pinned on GPUs) of at least n int64s for a chunk's
        gathered tokens, once the copy into it for the chunk before last has finished."""
        gpu = self.device.type == "cuda"
        if not self._chunk_ring or self._chunk_ring[0][0].numel() < n:
            size = max(n, 4096)
            self._chunk_ring = [(torch.zeros(size, dtype=torch.long, pin_memory=gpu),
                                 torch.cuda.Event() if gpu else None) for _ in range(2)]
        out = self._chunk_ring[0]
        self._chunk_ring.reverse()
        if out[1] is not None:
            out[1].synchronize()
        return out

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
        """Last-stage ranks send (their rows, their vocab slice) to rank 0, which assembles [B, (T,) V]
        with strided slice copies (no index tensors, no host syncs)."""
        par, V = self.par, self.config.vocab_size
        mine = (outs[0] if len(outs) == 1 else torch.cat(outs, 0)) if outs else None
        # the head is a GEMM in the model's dtype, so 16-bit logits travel in 16 bits losslessly
        wire = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if par.pp == 1 and par.config.world_size > 1:
            return self._gather_logits_one_call(mine, B, T, last_only, wire)
        if par.rank != 0:
            if par.is_last_stage and mine is not None:
                dist.send(mine.to(wire).contiguous(), dst=0)
            return None
        if par.config.world_size == 1:
            return mine
        shape_tail = () if last_only else (T,)
        full = torch.empty(B, *shape_tail, V, dtype=torch.float32, device=self.device)
        last = par.pp - 1
        slices = par.config.vocab_slices(V)
        for d, (rows, counts) in enumerate(self._ep_rows(B)):
            if not sum(counts):
                continue
            for t, vs in enumerate(slices):
                src = par.rank_of(last, d, t)
                if src == 0:
                    part = mine
                else:
                    part = torch.empty(sum(counts), *shape_tail, len(vs), dtype=wire, device=self.device)
                    dist.recv(part, src=src)
                _place(full, rows, counts, part, vs)
        return full

    def _gather_logits_one_call(self, mine, B: int, T: int, last_only: bool, wire: torch.dtype):
        """Without a pipeline every rank holds logits: one gather to rank 0 of equal-shaped parts
        (rows padded to the largest EP share, vocab to the widest TP slice) instead of one receive
        per rank (each a host-side NCCL call)."""
        par, V = self.par, self.config.vocab_size
        tail = () if last_only else (T,)
        slices = par.config.vocab_slices(V)
        layout = self._ep_rows(B)
        n_max, w_max = max(sum(c) for _, c in layout), max(len(vs) for vs in slices)
        part = torch.zeros(n_max, *tail, w_max, dtype=wire, device=self.device)
        if mine is not None:
            part[:mine.shape[0], ..., :mine.shape[-1]] = mine
        parts = [torch.empty_like(part) for _ in range(par.config.world_size)] if par.rank == 0 else None
        dist.gather(part, parts, dst=0)
        if par.rank != 0:
            return None
        full = torch.empty(B, *tail, V, dtype=torch.float32, device=self.device)
        for d, (rows, counts) in enumerate(layout):
            for t, vs in enumerate(slices):
                _place(full, rows, counts, parts[par.rank_of(0, d, t)], vs)
        return full

    def _ep_rows(self, B: int) -> list[tuple[list[slice], list[int]]]:
        """Per EP index d: the row slices it holds (one per micro-batch, in order) and their sizes."""
        chunks = self._chunks(B)
        rows = [[_rows(lo, hi, d, self.par.ep) for lo, hi in chunks] for d in range(self.par.ep)]
        return [(rs, [_count(r) for r in rs]) for rs in rows]
