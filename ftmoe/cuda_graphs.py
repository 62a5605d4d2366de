"""CUDA graphs for the decode step, one per batch-size bucket, sharing one memory pool; and
for fresh-prompt prefill, one per (batch, prompt length) bucket.

In:  a `FastGPTMoE`, the `KVCache` it decodes into, and per step the rows' token ids,
     positions, block tables, context lengths and slots.
Out: logits [B, V] from replaying the graph of the smallest bucket >= B; rows past B are
     padding (slot -1, context 0), so they read and write no cache.

A graph bakes in the cache tensors and the block-table width, so a runner belongs to one
cache; inputs are copied into static buffers before each replay (no allocation per step):
from the host in one copy (`step_host`), or field by field from device tensors (`step`).
Greedy chunks (`greedy_chunk`): a second graph per bucket appends the argmax and
`kernels.advance` (tokens fed back, rows moved one position on), so N steps replay back to back
from one host copy and the host reads N tokens per row once. Under tensor parallelism the
graph all-gathers each rank's per-row argmax partials of its vocabulary slice and merges them
on every rank (`kernels.advance.greedy_merge`), so every rank feeds back the same tokens; the
parallel runner loads a chunk's inputs from device tensors (`load`, `greedy_steps`).
Short contexts: where decode attention runs in one pass for short contexts (small buckets:
`attention.one_pass_differs`), a bucket keeps a step graph (and greedy-chunk graph) for each
context limit of `attention.ONE_PASS_TILES`, on the same static inputs; a step from the host,
whose context lengths the host holds, replays the smallest whose limit every row is within.
On a shard of a parallel model the graphs hold its collectives (NCCL is captured), every
rank captures and replays the same buckets in the same order, and a pipeline stage after
the first takes the residual [B, H] instead of token ids.
"""
from __future__ import annotations

import dataclasses

import torch

from .fast_model import FastGPTMoE
from .kernels import attention, size_switch
from .kernels.advance import GreedyWork, greedy_advance, greedy_merge, step_inputs
from .kernels.hostfetch import fetch_from_host
from .kv_cache import AttnMetadata, KVCache
from .progress import Progress

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class GreedyChunk:
    """A greedy chunk queued on the GPU (`DecodeGraphs.greedy_chunk_start`): its graph bucket,
    live rows, steps, and the host buffers its tokens (and log probs) are copied into, with the
    event that marks the copy done (None on the CPU)."""
    bucket: int
    rows: int
    steps: int
    logprobs: bool
    toks: torch.Tensor
    lps: torch.Tensor | None
    done: torch.cuda.Event | None


#: most steps in one greedy chunk (the chunk's token buffer rows)
MAX_CHUNK = 32
#: decode buckets of up to this many rows read `step_host`'s inputs from pinned host memory in
#: the graph's first kernel (`kernels.hostfetch`) instead of a copy before the replay (steps
#: timed alone on an H100: x0.971 at batch 1, x0.968 at 8, x0.994 / 0.996 / 0.992 at 16 / 32 /
#: 64; the bench with it forced on: 1.27 -> 1.24 at 256); FTMOE_GRAPH_FETCH=0 / 1 forces it
#: (read at capture). One GPU only: the parallel runner feeds its graphs from device tensors
FETCH_MAX_ROWS = 256


def _capture(run, pool, warmups: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `run` up on a side stream (compile kernels, pick cuBLAS algorithms), then capture it
    into a graph that allocates from `pool` (None: a new pool, the graph's own)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = run()
    return g, out


class DecodeGraphs:
    def __init__(self, fast: FastGPTMoE, cache: KVCache, max_blocks_per_seq: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.fast, self.cache = fast, cache
        self.nb = max_blocks_per_seq
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.short: dict[tuple[int, int], tuple] = {}   # (bucket, context limit) -> short-context (graph, out)
        self.pool = None
        self._stage: dict[int, list] = {}       # bucket -> pinned staging buffers (step_host)
        self.greedy: dict[tuple[int, bool, int], tuple] = {}   # (bucket, logprobs, context limit) -> greedy-chunk graph
        self._chunk_ring: dict[tuple[int, bool], list] = {}   # (bucket, logprobs) -> host token buffers
        self._last_chunk: GreedyChunk | None = None

    def serves(self, cache: KVCache, B: int) -> bool:
        """Whether a step of B rows on `cache` can replay these graphs (their cache, a bucket that fits)."""
        return cache is self.cache and B <= self.buckets[-1]

    def bucket_for(self, B: int) -> int:
        for b in self.buckets:
            if b >= B:
                return b
        raise ValueError(f"batch {B} is larger than the largest graph bucket {self.buckets[-1]}")

    def _packed_len(self, B: int) -> int:
        return (4 + self.nb) * B + 1

    def _static(self, B: int) -> dict:
        """A bucket's static inputs: one int32 buffer [(4 + nb) * B + 1] holding the token ids,
        positions, context lengths, slots, the [B, nb] block tables and a greedy chunk's step
        counter, so a step's inputs reach the GPU in one copy (`step_host`); a later pipeline
        stage takes a residual [B, H] instead of ids."""
        dev = self.fast.device
        packed = torch.zeros(self._packed_len(B), dtype=torch.int32, device=dev)
        s = dict(step_inputs(packed, B, self.nb), packed=packed)
        s["slots"].fill_(-1)
        if not self.fast.par.is_first_stage:
            s["ids"] = torch.zeros(B, self.fast.H, dtype=self.fast.dtype, device=dev)
        return s

    def _run(self, s: dict, short: int = 0, fp32_logits: bool = True) -> torch.Tensor:
        """The bucket's decode step; short: every row's context is within this limit (0: any);
        fp32_logits=False: logits left in the model's dtype (the greedy chunks' argmax reads them so)."""
        return self.fast.decode_step(s["ids"], s["positions"], s["tables"], s["ctx"], s["slots"], self.cache,
                                     max_ctx=short or None, fp32_logits=fp32_logits)

    def _run_step(self, s: dict, short: int = 0) -> torch.Tensor:
        """A bucket's step graph: with a host buffer (fetch mode), its first kernel takes the
        inputs from it when the host marked them fresh."""
        if "host" in s:
            fetch_from_host(s["host"], s["packed"])
        return self._run(s, short)

    def has_short(self, B: int) -> bool:
        """Whether bucket B keeps short-context graphs (its attention differs for short contexts)."""
        return attention.one_pass_differs(B * self.fast.heads)

    def short_limit(self, bucket: int, max_ctx: int, steps: int = 1) -> int:
        """The context limit of the (captured) bucket's short-context graphs that `steps` steps from
        a longest row of max_ctx cached tokens replay (the last step's row has max_ctx + steps - 1):
        the smallest that holds it; 0: the graphs for any context."""
        last = max_ctx + steps - 1
        return next((c for c, _ in attention.ONE_PASS_TILES if self.has_short(bucket) and last <= c), 0)

    def graph(self, bucket: int, max_ctx: int) -> torch.cuda.CUDAGraph | None:
        """The step graph a step of `bucket` from the host replays when its longest row has max_ctx
        cached tokens (captured first if it is not yet; None on the CPU), for tools that time it."""
        self.capture(bucket)
        limit = self.short_limit(bucket, max_ctx)
        return self.short[(bucket, limit)][0] if limit else self.graphs[bucket][0]

    @torch.inference_mode()
    def capture(self, B: int) -> None:
        if B in self.graphs:
            return
        s = self._static(B)
        gpu = self.fast.device.type == "cuda"
        if self.fast.par.config.world_size == 1 and size_switch("FTMOE_GRAPH_FETCH", B, FETCH_MAX_ROWS):
            s["host"] = torch.zeros(self._packed_len(B) + 1, dtype=torch.int32, pin_memory=gpu)   # + the flag
            s["host_views"] = self._views(s["host"], B)
            s["host_done"] = torch.cuda.Event() if gpu else None
        if not gpu:                              # CPU (tests): the same static buffers, run eagerly
            self.graphs[B] = (None, s, None)
            if self.has_short(B):
                self.short.update({(B, c): (None, None) for c, _ in attention.ONE_PASS_TILES})
            return
        g, out = _capture(lambda: self._run_step(s), self.pool, warmups=2)
        if self.pool is None:
            self.pool = g.pool()
        self.graphs[B] = (g, s, out)
        if self.has_short(B):
            for c, _ in attention.ONE_PASS_TILES:
                self.short[(B, c)] = _capture(lambda: self._run_step(s, short=c), self.pool, warmups=2)

    def _replay(self, bucket: int, B: int, short: int = 0) -> torch.Tensor:
        """Replay the bucket's step graph (short: its graph for that context limit); B rows out."""
        g, s, out = self.graphs[bucket]
        if short:
            g, out = self.short[(bucket, short)]
        if g is None:
            out = self._run_step(s, short)
        else:
            g.replay()
        if s.get("host_done") is not None:
            s["host_done"].record()              # the host buffer is free again once this has run
        return out[:B]

    @staticmethod
    def _host_buffer(s: dict, fresh: bool) -> tuple | None:
        """Fetch mode: the host buffer's views once the last replay that may read it has run, its
        flag set (`fresh`: the next replay takes its inputs from it) or cleared; else None."""
        if "host" not in s:
            return None
        if s["host_done"] is not None:
            s["host_done"].synchronize()
        h = s["host_views"][0]
        h[-1] = 1 if fresh else 0
        return s["host_views"]

    def _bucket(self, B: int, min_rows: int) -> tuple[int, tuple]:
        bucket = self.bucket_for(max(B, min_rows))
        self.capture(bucket)
        return bucket, self.graphs[bucket]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
             context_lens: torch.Tensor, slots: torch.Tensor, min_rows: int = 0, max_ctx: int | None = None) -> torch.Tensor:
        """Inputs already on the device (any integer dtype), one copy each.
        min_rows: replay a bucket of at least this many rows (expert-parallel ranks must agree).
        max_ctx: the longest row's cached tokens where the caller knows it (a short-context graph
        may then serve: `short_limit`); None: the graph for any context."""
        B = ids.shape[0]
        bucket, _ = self._bucket(B, min_rows)
        self.load(ids, positions, block_tables, context_lens, slots, bucket)
        return self._replay(bucket, B, 0 if max_ctx is None else self.short_limit(bucket, max_ctx))

    @torch.inference_mode()
    def load(self, ids: torch.Tensor | None, positions: torch.Tensor, block_tables: torch.Tensor,
             context_lens: torch.Tensor, slots: torch.Tensor, bucket: int) -> None:
        """Device inputs of B rows into the (captured) bucket's static inputs, one copy each; rows
        past B are padding. ids None: the ids on the device stay (a greedy chunk continuing the
        last one, as `_load` does from the host); the chunk step counter is `greedy_steps`'s."""
        B = positions.shape[0]
        s = self.graphs[bucket][1]
        self._last_chunk = None
        self._host_buffer(s, fresh=False)        # fetch mode: the replay keeps these device inputs
        if ids is not None:
            s["ids"][:B].copy_(ids)
        s["positions"][:B].copy_(positions)
        s["tables"][:B, : block_tables.shape[1]].copy_(block_tables)
        s["ctx"][:B].copy_(context_lens)
        s["slots"][:B].copy_(slots)
        if B < bucket:
            s["slots"][B:].fill_(-1)
            s["ctx"][B:].fill_(0)

    @torch.inference_mode()
    def step_host(self, ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """One decode step from the host: token ids [B] or [B, 1] and `meta` (T = 1) on the CPU,
        as a serving loop holds them. They are written into a pinned staging buffer laid out like
        the bucket's static inputs and reach the GPU in one copy (no per-field copies, casts or
        fills on the device), then the graph replays. Padding rows get slot -1 and context 0."""
        B = meta.positions.shape[0]
        bucket, (_, s, _) = self._bucket(B, 0)
        views = self._host_buffer(s, fresh=True)
        if views is None:
            self._load(ids, meta, bucket)
        else:                                    # fetch mode: the graph's first kernel reads them
            self._check_meta(meta)
            self._pack(views, ids, meta, bucket)
        return self._replay(bucket, B, self.short_limit(bucket, self.max_ctx(meta)))

    @staticmethod
    def max_ctx(meta: AttnMetadata) -> int:
        """The longest row's cached tokens (metadata on the host): what `short_limit` takes."""
        return int(meta.context_lens.numpy().max()) if meta.context_lens.numel() else 0

    def _load(self, ids: torch.Tensor | None, meta: AttnMetadata, bucket: int) -> None:
        """Host ids and metadata -> the bucket's static inputs, in one copy (step counter 0).
        ids None: the ids already on the device stay (a greedy chunk continuing the last one)."""
        self._check_meta(meta)
        s = self.graphs[bucket][1]
        buf, done, views = self._staging(bucket)
        self._pack(views, ids, meta, bucket)
        if ids is None:
            s["packed"][bucket:].copy_(buf[bucket:], non_blocking=True)
        else:
            s["packed"].copy_(buf, non_blocking=True)
        if done is not None:
            done.record()

    def _check_meta(self, meta: AttnMetadata) -> None:
        if not self.fast.par.is_first_stage:
            raise ValueError("step_host takes token ids: a later pipeline stage's residual comes through step()")
        if meta.positions.dim() != 2 or meta.positions.shape[1] != 1:
            raise ValueError(f"decode graphs take one new token per row, got positions of shape "
                             f"{tuple(meta.positions.shape)}")
        w = meta.block_tables.shape[1]
        if w > self.nb:
            raise ValueError(f"block tables of {w} blocks are wider than the graphs' {self.nb}")

    def _views(self, buf: torch.Tensor, B: int) -> tuple:
        """numpy views of a host buffer laid out as bucket B's static inputs (`_static`): whole,
        the [4, B] head (ids, positions, context lengths, slots), the [B, nb] block tables."""
        h = buf.numpy()
        return h, h[:4 * B].reshape(4, B), h[4 * B:(4 + self.nb) * B].reshape(B, self.nb)

    def _pack(self, views: tuple, ids: torch.Tensor | None, meta: AttnMetadata, bucket: int) -> None:
        """Ids (None: keep the device's) and metadata into a host buffer laid out as the static
        inputs, through its numpy views (`_views`); padding
        rows get slot -1 and context 0, the chunk step counter 0."""
        B, w = meta.positions.shape[0], meta.block_tables.shape[1]
        h, head, tables = views
        # numpy on whole tensors, sliced in numpy: a torch slice costs the host ~2 us, numpy's ~0.2
        if ids is not None:
            head[0, :B] = ids.numpy().reshape(-1)
            self._last_chunk = None            # new ids: nothing continues on the device from here
        head[1, :B] = meta.positions.numpy()[:, 0]
        head[2, :B] = meta.context_lens.numpy()
        head[3, :B] = meta.slot_mapping.numpy()[:, 0]
        if B < bucket:
            head[:3, B:] = 0
            head[3, B:] = -1
        tables[:B, :w] = meta.block_tables.numpy()
        h[self._packed_len(bucket) - 1] = 0     # the chunk step counter (a host buffer's flag follows)

    @torch.inference_mode()
    def capture_upto(self, max_batch: int, greedy: bool = False, progress: bool = False) -> list[int]:
        """Capture every bucket a batch of up to `max_batch` rows can use (and, with greedy, its
        greedy-chunk graph) now, as a server does before it takes requests: a bucket captured
        lazily stalls the first steps that reach it (its warm-up runs compile the kernels of that
        batch size: seconds at a large bucket). Returns the buckets."""
        top = self.bucket_for(min(max_batch, self.buckets[-1]))
        todo = [b for b in self.buckets if b <= top]
        bar = Progress(len(todo), f"capturing CUDA graphs (batch 1..{top}{', greedy chunks' if greedy else ''})",
                       enabled=progress, unit="graphs")
        for b in todo:
            self.capture(b)
            if greedy:
                self.capture_greedy(b, False)
                for c, _ in attention.ONE_PASS_TILES:
                    if (b, c) in self.short:
                        self.capture_greedy(b, False, short=c)
            bar.update(1, f"batch {b}")
        bar.close()
        return todo

    # ---- greedy chunks: steps replayed back to back, each one's tokens fed back on the GPU ----
    @torch.inference_mode()
    def capture_greedy(self, B: int, logprobs: bool, short: int = 0) -> None:
        """The greedy-chunk graph of bucket B: a decode step, then `greedy_advance`: the argmax of
        its logits (first index on ties, as the host's greedy), optionally their log-softmax, the
        tokens fed back and every live row moved one position on, in one kernel.
        It shares the bucket's static inputs; they are set to padding first, because the
        warm-up steps run on whatever they hold (padding rows read and write no cache), and put
        back after (a chunk that continues the last one on the device, into a graph captured
        only now, reads the ids that chunk fed back).
        short: the step of the short-context graphs of that context limit (`short_limit`)."""
        key = (B, logprobs, short)
        if key in self.greedy:
            return
        self.capture(B)
        s = self.graphs[B][1]
        kept = s["packed"].clone()     # the inputs as they are (a chunk continued on the device reads its ids)
        s["slots"].fill_(-1)
        s["ctx"].zero_()
        dev = self.fast.device
        toks = torch.zeros(MAX_CHUNK, B, dtype=torch.long, device=dev)
        lps = torch.zeros(MAX_CHUNK, B, dtype=torch.float32, device=dev) if logprobs else None

        m, par = self.fast.model, self.fast.par
        work = GreedyWork(B, m.vocab_end - m.vocab_start, dev)
        if par.tp > 1:   # this rank's vocabulary slice: per-row partials, all-gathered, merged on every rank
            part = torch.zeros(3 * B, dtype=torch.float32, device=dev)
            parts = torch.zeros(par.tp * 3 * B, dtype=torch.float32, device=dev)

        def run():
            # logits in the model's dtype: the argmax and log-softmax read them as fp32, the values
            # the host's greedy sees, without a conversion kernel over [B, V] (42 us at 256 rows)
            logits = self._run(s, short, fp32_logits=False)
            if par.tp == 1:
                greedy_advance(logits, toks, lps, s, self.cache.block_size, work)
                return toks
            greedy_advance(logits, toks, lps, s, self.cache.block_size, work, part=part, vocab_start=m.vocab_start)
            par.tp_all_gather(parts, part)
            greedy_merge(parts.view(par.tp, 3, B), toks, lps, s, self.cache.block_size, self.fast.config.vocab_size)
            return toks

        if dev.type != "cuda":
            s["packed"].copy_(kept)
            self.greedy[key] = (None, run, toks, lps)
            return
        g, _ = _capture(run, self.pool, warmups=2)
        s["packed"].copy_(kept)        # the warm-ups fed their own tokens back
        self.greedy[key] = (g, None, toks, lps)

    @torch.inference_mode()
    def greedy_chunk(self, ids: torch.Tensor, meta: AttnMetadata, steps: int,
                     logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`steps` greedy decode steps from one host copy, replayed back to back with no host
        work between them. ids [B] or [B, 1] and meta (T = 1) on the host as for `step_host`;
        every row's block table must already hold its `steps` new tokens (`KVCache.prepare_chunk`).
        Returns the tokens [steps, B] and, with logprobs, their log-softmax [steps, B] (CPU)."""
        return self.greedy_chunk_result(self.greedy_chunk_start(ids, meta, steps, logprobs))

    @torch.inference_mode()
    def greedy_chunk_start(self, ids: torch.Tensor | None, meta: AttnMetadata, steps: int, logprobs: bool = False,
                           after: GreedyChunk | None = None) -> GreedyChunk:
        """`greedy_chunk` without the wait: the steps are queued and their tokens copied to a
        pinned host buffer behind them; `greedy_chunk_result` waits and reads. after: the chunk
        queued last (same rows), whose last tokens this one continues from on the device (ids
        None): the host, which does not know them yet, sends the rest of the metadata, so the
        GPU runs chunk after chunk while the host accepts the previous one's tokens."""
        if not 1 <= steps <= MAX_CHUNK:
            raise ValueError(f"a greedy chunk takes 1..{MAX_CHUNK} steps, got {steps}")
        B = meta.positions.shape[0]
        bucket = self.bucket_for(B)
        if after is not None:
            if after is not self._last_chunk or (after.bucket, after.rows, after.logprobs) != (bucket, B, logprobs):
                raise ValueError("a continued greedy chunk must follow the last chunk queued, with its rows")
        elif ids is None:
            raise ValueError("a greedy chunk needs token ids unless it continues the last chunk")
        self.capture(bucket)
        short = self.short_limit(bucket, self.max_ctx(meta), steps)
        self.capture_greedy(bucket, logprobs, short)
        self._load(None if after is not None else ids, meta, bucket)
        toks, lps = self.greedy_steps(bucket, steps, logprobs, short)
        out_t, out_l, done = self._chunk_out(bucket, logprobs)
        out_t[:steps].copy_(toks[:steps], non_blocking=True)
        if lps is not None:
            out_l[:steps].copy_(lps[:steps], non_blocking=True)
        if done is not None:
            done.record()
        self._last_chunk = GreedyChunk(bucket, B, steps, logprobs, out_t, out_l, done)
        return self._last_chunk

    @torch.inference_mode()
    def greedy_steps(self, bucket: int, steps: int, logprobs: bool = False, short: int = 0,
                     reset: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queue `steps` replays of the bucket's greedy-chunk graph (short: its short-context
        one) on the inputs loaded; reset: set the step counter to 0 first (`_load` does it with
        the host's copy). Returns its device outputs, tokens [MAX_CHUNK, bucket] (and log probs),
        rows 0..steps-1 being this chunk's once the replays have run."""
        self.capture_greedy(bucket, logprobs, short)
        g, run, toks, lps = self.greedy[(bucket, logprobs, short)]
        if reset:
            self.graphs[bucket][1]["ctr"].zero_()
        for _ in range(steps):
            if g is None:
                run()
            else:
                g.replay()
        return toks, lps

    @staticmethod
    def greedy_chunk_result(chunk: GreedyChunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk's tokens [steps, B] and log probs (or None), on the host, once it has run."""
        if chunk.done is not None:
            chunk.done.synchronize()
        n, B = chunk.steps, chunk.rows
        return chunk.toks[:n, :B].clone(), None if chunk.lps is None else chunk.lps[:n, :B].clone()

    def _chunk_out(self, bucket: int, logprobs: bool):
        """The next of two host buffers (pinned on a GPU) for a chunk's tokens and log probs, once
        the copy into it for the chunk before last has finished."""
        key = (bucket, logprobs)
        ring = self._chunk_ring.get(key)
        if ring is None:
            gpu = self.fast.device.type == "cuda"
            ring = self._chunk_ring[key] = [
                (torch.zeros(MAX_CHUNK, bucket, dtype=torch.long, pin_memory=gpu),
                 torch.zeros(MAX_CHUNK, bucket, dtype=torch.float32, pin_memory=gpu) if logprobs else None,
                 torch.cuda.Event() if gpu else None) for _ in range(2)]
        out = ring[0]
        ring.reverse()
        if out[2] is not None:
            out[2].synchronize()
        return out

    def _staging(self, bucket: int) -> tuple[torch.Tensor, torch.cuda.Event | None, tuple]:
        """The next of two pinned host buffers for this bucket, once its previous copy to the GPU
        has finished (the copy reads the buffer asynchronously), with the event to record and its
        numpy views (`_views`)."""
        ring = self._stage.get(bucket)
        if ring is None:
            gpu = self.fast.device.type == "cuda"
            ring = self._stage[bucket] = []
            for _ in range(2):
                buf = torch.zeros(self._packed_len(bucket), dtype=torch.int32, pin_memory=gpu)
                ring.append((buf, torch.cuda.Event() if gpu else None, self._views(buf, bucket)))
        buf, done, views = ring[0]
        ring.reverse()
        if done is not None:
            done.synchronize()                  # not yet recorded: returns at once
        return buf, done, views


PREFILL_T_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
PREFILL_B_BUCKETS = (1, 2, 4, 8, 16, 32)


class PrefillGraphs:
    """Fresh-prompt prefill (last-token logits) replayed from CUDA graphs, one per bucket
    (B rounded up in PREFILL_B_BUCKETS, T in PREFILL_T_BUCKETS, at most `max_tokens` tokens),
    for the host-bound launch sequence of a prefill (~30 kernels per MoE layer). Padding: extra
    columns of a row have no KV slot (and are masked as keys), extra rows are one dummy token with
    no KV slot; tokens without a slot route to no expert. Calls outside the buckets return None
    (the caller runs eagerly). A bucket whose rows are all exactly T long (no padding at all) is
    captured with causal attention, the others with a key-padding mask. On the CPU (tests) the
    same static-buffer procedure runs without capture."""

    def __init__(self, fast: FastGPTMoE, cache: KVCache, t_buckets=PREFILL_T_BUCKETS, b_buckets=PREFILL_B_BUCKETS,
                 max_tokens: int = 8192):
        self.fast, self.cache = fast, cache
        self.t_buckets = tuple(t for t in sorted(t_buckets) if t <= fast.config.max_pos_seq_len)
        self.b_buckets = tuple(sorted(b_buckets))
        self.max_tokens = max_tokens
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph | None, dict, torch.Tensor | None]] = {}
        self.pool = None
        self.capture_enabled = fast.device.type == "cuda"

    def reset(self, cache: KVCache) -> None:
        """Drop every graph (each bakes in its cache's storage) and their memory pool: the next
        call captures again, into a fresh pool (a pool whose graphs are all gone cannot be reused)."""
        self.graphs.clear()
        self.pool = None
        self.cache = cache

    def bucket_for(self, B: int, T: int) -> tuple[int, int] | None:
        bb = next((b for b in self.b_buckets if b >= B), None)
        tb = next((t for t in self.t_buckets if t >= T), None)
        if bb is None or tb is None or bb * tb > self.max_tokens:
            return None
        return bb, tb

    def _static(self, B: int, T: int) -> dict:
        dev = self.fast.device
        z = torch.zeros(B, T, dtype=torch.long, device=dev)
        return {"ids": z.clone(), "positions": z.clone(), "slots": torch.full((B, T), -1, dtype=torch.long, device=dev),
                "seq_lens": torch.ones(B, dtype=torch.long, device=dev),
                "tables": torch.zeros(B, 1, dtype=torch.long, device=dev),
                "ctx": torch.zeros(B, dtype=torch.long, device=dev)}

    def _run(self, s: dict, causal_only: bool) -> torch.Tensor:
        meta = AttnMetadata(s["positions"], s["slots"], s["tables"], s["ctx"], s["seq_lens"])
        return self.fast.prefill(s["ids"], meta, self.cache, last_only=True, ragged=not causal_only)

    @torch.inference_mode()
    def capture(self, key: tuple[int, int, bool]) -> None:
        s = self._static(key[0], key[1])
        if not self.capture_enabled:
            self.graphs[key] = (None, s, None)
            return
        g, out = _capture(lambda: self._run(s, key[2]), self.pool, warmups=1)
        if self.pool is None:
            self.pool = g.pool()
        self.graphs[key] = (g, s, out)

    @torch.inference_mode()
    def capture_all(self, progress: bool = False) -> list[tuple[int, int, bool]]:
        """Capture every bucket now (the key-padding variant of each; the causal one, which
        needs rows exactly T long, at the smallest batch bucket only), as a server does before it takes requests: a bucket captured on first use
        stalls that request, by seconds where its kernels compile. Returns the keys."""
        keys = [(b, t, False) for t in self.t_buckets for b in self.b_buckets if b * t <= self.max_tokens]
        b0 = self.b_buckets[0]
        keys += [(b0, t, True) for t in self.t_buckets if b0 * t <= self.max_tokens]
        bar = Progress(len(keys), "capturing prefill graphs", enabled=progress, unit="graphs")
        for key in keys:
            if key not in self.graphs:
                self.capture(key)
            bar.update(1, f"{key[0]} x {key[1]}{' causal' if key[2] else ''}")
        bar.close()
        return keys

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, meta: AttnMetadata, causal_only: bool | None = None) -> torch.Tensor | None:
        """Last-token logits [B, V] of fresh prompts, or None when no bucket fits. causal_only=False
        always takes the key-padding variant (ranks of a parallel model must pick the same graph,
        whose collectives pair up, whatever their own rows' lengths)."""
        B, T = input_ids.shape
        bucket = self.bucket_for(B, T)
        if bucket is None:
            return None
        if causal_only is None:
            causal_only = not bool((meta.seq_lens != T).any()) if bucket == (B, T) else False
        causal_only = causal_only and bucket == (B, T)       # a padded bucket needs the key mask
        key = (*bucket, causal_only)
        if key not in self.graphs:
            self.capture(key)
        g, s, out = self.graphs[key]
        s["ids"][:B, :T].copy_(input_ids)
        s["positions"].zero_()
        s["positions"][:B, :T].copy_(meta.positions)
        s["slots"].fill_(-1)
        s["slots"][:B, :T].copy_(meta.slot_mapping)
        s["seq_lens"].fill_(1)
        s["seq_lens"][:B].copy_(meta.seq_lens)
        if g is None:
            return self._run(s, causal_only)[:B]
        g.replay()
        return out[:B]
