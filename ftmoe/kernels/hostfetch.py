"""A decode graph's inputs read straight from pinned host memory, by the graph's first kernel.

In:  `host`, a pinned int32 CPU tensor [n + 1]: the step's packed inputs, then a flag (1: fresh,
     written by the host for this replay; 0: keep what the device buffer holds); `dst`, the
     device buffer [n].
Out: dst = host[:n] where the flag is set.

A step timed alone otherwise pays, in series with the GPU, a copy call on the host and a copy
engine transfer before the graph may start; here the graph's own first kernel loads the few KB
over the bus (`.cv` loads: never a cached line of system memory) and the next kernel waits for it
as for any other. The host pointer is passed as an integer: a pinned allocation is mapped at the
same address on the device (unified addressing), and Triton takes only device tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: int32 elements per program
BLOCK = 1024


@triton.jit
def _fetch_kernel(SRC_ADDR, DST, n, BLOCK: tl.constexpr):
    src = SRC_ADDR.to(tl.pointer_type(tl.int32))
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    fresh = tl.load(src + n, cache_modifier=".cv")
    m = (offs < n) & (offs * 0 + fresh != 0)      # (vector form: the interpreter's & takes no scalar)
    tl.store(DST + offs, tl.load(src + offs, mask=m, other=0, cache_modifier=".cv"), mask=m)


def fetch_from_host(host: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = host[:-1] on the device if host[-1] != 0 (see the module docstring)."""
    n = dst.numel()
    assert host.dtype == dst.dtype == torch.int32 and host.numel() == n + 1, \
        f"host is {host.dtype} [{host.numel()}], dst {dst.dtype} [{n}]: expected int32 [n + 1] and [n]"
    assert host.device.type == "cpu" and dst.is_contiguous() and host.is_contiguous()
    assert dst.device.type == "cpu" or host.is_pinned(), "the device reads only pinned host memory"
    _fetch_kernel[(triton.cdiv(n, BLOCK),)](host.data_ptr(), dst, n, BLOCK=BLOCK, num_warps=4)
