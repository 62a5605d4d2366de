"""Parallel layout and process groups: tensor (TP), expert (EP) and pipeline (PP) parallelism.

In:  a `ParallelConfig(tp, ep, pp)` and an initialised `torch.distributed` world of
     tp * ep * pp processes (NCCL on GPUs, gloo on CPUs).
Out: `ParallelState`, passed explicitly to the model and the runner (never global): this
     rank's coordinates, its process groups and the collectives the layers call.

Rank layout: rank = stage * (tp * ep) + d * tp + t, where stage is the pipeline stage,
d the expert-parallel / data-parallel index and t the tensor-parallel index.
- TP group (same stage, same d): attention and dense MLPs Megatron-split; experts split
  along F (FasterTransformer style).
- EP group (same stage, same t): experts partitioned E/ep per rank, tokens exchanged by
  all-to-all; the batch's rows are split over d for attention (data-parallel attention).
- Stage s holds a contiguous range of layers; hidden states go stage to stage by send/recv.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .config import ModelConfig
from .errors import FtmoeError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.ep * self.pp

    def check(self, cfg: ModelConfig) -> None:
        for name in ("tp", "ep", "pp"):
            if getattr(self, name) < 1:
                raise FtmoeError(f"--{name} must be >= 1, found {getattr(self, name)}")
        if cfg.head_num % self.tp:
            raise FtmoeError(f"--tp {self.tp} does not divide head_num={cfg.head_num}")
        if cfg.inter_size % self.tp:
            raise FtmoeError(f"--tp {self.tp} does not divide inter_size={cfg.inter_size}")
        if self.ep > 1 and (not cfg.moe_layers or cfg.expert_num % self.ep):
            raise FtmoeError(f"--ep {self.ep} does not divide expert_num={cfg.expert_num}")
        if self.pp > cfg.num_layer:
            raise FtmoeError(f"--pp {self.pp} is more than num_layer={cfg.num_layer}")

    def vocab_slices(self, vocab_size: int) -> list[range]:
        """Rows of the tied embedding whose logits TP rank t computes (the vocab-parallel head)."""
        sizes = [len(c) for c in torch.tensor_split(torch.arange(vocab_size), self.tp)]
        starts = [sum(sizes[:t]) for t in range(self.tp)]
        return [range(a, a + n) for a, n in zip(starts, sizes)]

    def stage_layers(self, num_layers: int, stage: int) -> range:
        """Contiguous layers of a stage; the first stages take one more when it does not divide."""
        base, extra = divmod(num_layers, self.pp)
        lo = stage * base + min(stage, extra)
        return range(lo, lo + base + (1 if stage < extra else 0))


@dataclasses.dataclass
class ParallelState:
    config: ParallelConfig
    rank: int
    stage: int
    d: int                   # expert/data-parallel index
    t: int                   # tensor-parallel index
    tp_group: object = None
    ep_group: object = None
    device: torch.device = torch.device("cpu")

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.config.pp - 1

    def rank_of(self, stage: int, d: int, t: int) -> int:
        return stage * self.tp * self.ep + d * self.tp + t

    # ---- collectives used by the layers --------------------------------------
    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [tp * n, ...] = every TP rank's x [n, ...], in TP-index order."""
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=self.tp_group)

    def ep_all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [ep * n, ...] = every EP rank's x [n, ...], in EP-index order."""
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=self.ep_group)

    def ep_reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [n, ...] = the sum over EP ranks of their x [ep * n, ...] rows of this rank's index."""
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=self.ep_group)

    @classmethod
    def single(cls, device="cpu") -> "ParallelState":
        return cls(ParallelConfig(), 0, 0, 0, 0, device=torch.device(device))


def init_parallel(pc: ParallelConfig, backend: str | None = None, timeout_s: float = 120.0,
                  init_method: str | None = None, rank: int | None = None, device: str = "auto") -> ParallelState:
    """Join the world and build the groups. Without init_method the world comes from the
    environment (torchrun's RANK/WORLD_SIZE/MASTER_ADDR/...). Every rank must call this with
    the same ParallelConfig. device "cpu" forces gloo; "auto" uses NCCL when there are GPUs."""
    if not dist.is_initialized():
        world = pc.world_size if init_method else int(os.environ.get("WORLD_SIZE", "1"))
        if world != pc.world_size:
            raise FtmoeError(f"--tp {pc.tp} x --ep {pc.ep} x --pp {pc.pp} needs {pc.world_size} processes, "
                             f"the launcher started {world}")
        use_gpu = device != "cpu" and torch.cuda.is_available()
        backend = backend or ("nccl" if use_gpu else "gloo")
        kw = {}
        if init_method:
            kw.update(init_method=init_method, rank=rank, world_size=world)
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank if rank is not None else os.environ.get("RANK", "0")))
            torch.cuda.set_device(local % torch.cuda.device_count())
            kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != pc.world_size:
        raise FtmoeError(f"the process group has {world} ranks, the parallel config needs {pc.world_size}")
    per_stage = pc.tp * pc.ep
    stage, rem = divmod(rank, per_stage)
    d, t = divmod(rem, pc.tp)
    state = ParallelState(pc, rank, stage, d, t,
                          device=torch.device("cuda", torch.cuda.current_device())
                          if dist.get_backend() == "nccl" else torch.device("cpu"))
    # every rank creates every group, in the same order (a torch.distributed requirement)
    for s in range(pc.pp):
        for dd in range(pc.ep):
            g = dist.new_group([state.rank_of(s, dd, tt) for tt in range(pc.tp)])
            if (s, dd) == (stage, d):
                state.tp_group = g
        for tt in range(pc.tp):
            g = dist.new_group([state.rank_of(s, dd, tt) for dd in range(pc.ep)])
            if (s, tt) == (stage, t):
                state.ep_group = g
    return state
