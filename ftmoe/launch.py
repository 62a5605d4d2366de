"""Start the processes of a parallel model: spawned on this node, or under torchrun.

In:  a ParallelConfig and how to load the model. Out: rank 0's `DistributedModel` (in this
process) and the worker processes; or, under torchrun, this process's rank (ranks != 0 serve
rank 0 until it stops, then return None).

Spawned workers rendezvous with rank 0 over TCP on 127.0.0.1 (a free port); torchrun's own
rendezvous (its RANK/WORLD_SIZE/MASTER_ADDR environment) is used as is, on one node or many.
Collectives time out (`timeout_s`), so a rank that dies becomes an error on rank 0, not a hang.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .distributed import ParallelConfig, init_parallel
from .parallel_runner import DistributedModel


def under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limit_host_threads(device) -> int | None:
    """A process that drives a GPU only builds small index tensors on the host each step, but
    torch's default of one OpenMP thread per core makes each such op wake (and spin) a whole
    thread pool; with several ranks on one host the pools starve the ranks themselves (2 x H200,
    TP=2 decode at batch 1: 8.0 ms per step with the default, 2.2 ms with one thread). Sets
    torch's intra-op threads to FTMOE_HOST_THREADS (default 1) on CUDA devices unless the user
    set OMP_NUM_THREADS; returns the number set, or None when left alone."""
    if torch.device(device).type != "cuda" or "OMP_NUM_THREADS" in os.environ:
        return None
    n = max(1, int(os.environ.get("FTMOE_HOST_THREADS", "1")))
    torch.set_num_threads(n)
    return n


def _load(pc, model_dir, dtype, device, moe_options, micro_batches, timeout_s, init_method=None, rank=None,
          fast=None, random_preset=None):
    from .loader import load_model

    if os.environ.get("FTMOE_HANG_DUMP_S"):   # debugging: every rank prints its Python stack and exits after N s
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["FTMOE_HANG_DUMP_S"]), exit=True)
    par = init_parallel(pc, timeout_s=timeout_s, init_method=init_method, rank=rank, device=device)
    limit_host_threads(par.device)
    if random_preset is not None:     # benchmarks: this rank's shard of random weights at a preset's shapes
        from .bench import config_of, random_model

        cfg = config_of(random_preset)
        pc.check(cfg)
        model = random_model(cfg, dtype, par.device, seed=par.stage, par=par)
    else:
        model = load_model(model_dir, dtype, par.device, moe_options=moe_options, par=par)
    if fast is None:   # kernels (and decode graphs) on GPUs; capacity mode runs on the reference path
        fast = par.device.type == "cuda" and (moe_options is None or moe_options.capacity_factor is None)
    return DistributedModel(model, par, micro_batches, fast=fast)


def _worker(rank, pc, model_dir, dtype, device, moe_options, micro_batches, timeout_s, init_method, fast,
            random_preset=None):
    runner = _load(pc, model_dir, dtype, device, moe_options, micro_batches, timeout_s, init_method, rank, fast,
                   random_preset)
    _follow_then_leave(runner)


def _follow_then_leave(runner: DistributedModel) -> None:
    """A worker rank: serve rank 0's steps until it stops, then leave the process group."""
    try:
        runner.follow()
    finally:
        runner.release_graphs()      # NCCL's teardown waits for graphs that captured its collectives
        dist.destroy_process_group()


def start(pc: ParallelConfig, model_dir: str, dtype, device: str = "cpu", moe_options=None,
          micro_batches: int | None = None, timeout_s: float = 120.0, fast: bool | None = None,
          random_preset: str | None = None):
    """Returns (runner, worker processes). Under torchrun, ranks != 0 follow rank 0 here and
    get (None, [])."""
    if under_torchrun():
        runner = _load(pc, model_dir, dtype, device, moe_options, micro_batches, timeout_s, fast=fast,
                       random_preset=random_preset)
        if runner.par.rank != 0:
            _follow_then_leave(runner)
            return None, []
        return runner, []
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(1, pc.world_size):
        p = ctx.Process(target=_worker, args=(r, pc, model_dir, dtype, device, moe_options, micro_batches,
                                              timeout_s, init_method, fast, random_preset), daemon=True)
        p.start()
        procs.append(p)
    try:
        return _load(pc, model_dir, dtype, device, moe_options, micro_batches, timeout_s, init_method, 0,
                     fast, random_preset), procs
    except BaseException:
        for p in procs:
            p.kill()
        raise


def stop(runner: DistributedModel | None, procs: list, timeout_s: float = 30.0) -> None:
    """Tell the workers to stop, leave the process group, reap the processes."""
    try:
        if runner is not None and dist.is_initialized():
            runner.shutdown()
    except Exception:
        pass
    finally:
        if runner is not None:
            runner.release_graphs()
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in procs:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
