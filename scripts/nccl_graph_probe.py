"""Does this host capture torch.distributed NCCL collectives in CUDA graphs? Two processes:
all_reduce / all_gather / reduce_scatter on a sub-group, eager on a side stream, then captured
and replayed, then the group destroyed (after freeing the graph, unless --keep-graph: with the graph
alive, destroy_process_group hangs, seen with NCCL 2.28); each step prints, and a hang dumps every process's Python stack after --hang-s.
Usage: python3 scripts/nccl_graph_probe.py [--hang-s 60]"""
import argparse
import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, world, port, hang_s, keep):
    faulthandler.dump_traceback_later(hang_s, exit=True)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    g = dist.new_group(list(range(world)))
    x = torch.ones(1024, device="cuda") * (rank + 1)
    out = torch.empty(world * 1024, device="cuda")
    back = torch.empty(1024, device="cuda")

    def step():
        dist.all_reduce(x, group=g)
        dist.all_gather_into_tensor(out, x, group=g)
        dist.reduce_scatter_tensor(back, out, group=g)

    def say(msg):
        print(f"rank {rank} {time.strftime('%X')} {msg}", flush=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    say("eager on a side stream ok")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    say("captured")
    x.fill_(1.0)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    say(f"replayed: x[0] = {x[0].item()} (expect {world ** 3})")
    dist.barrier()
    if not keep:      # NCCL's teardown waits for graphs holding its collectives: free them first
        del graph
        import gc

        gc.collect()
        torch.cuda.synchronize()
    dist.destroy_process_group()
    say("process group destroyed")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--hang-s", type=int, default=60)
    ap.add_argument("--keep-graph", action="store_true", help="destroy the group with the graph alive (hangs)")
    a = ap.parse_args()
    world = min(2, torch.cuda.device_count())
    mp.spawn(work, args=(world, 29555, a.hang_s, a.keep_graph), nprocs=world)
