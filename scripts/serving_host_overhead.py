"""What the serving path costs the host per token, on the CPU, without a GPU.

A stand-in model "runs" each decode step for --step-ms: single steps sleep (a GPU wait releases
the GIL the same way); greedy chunks go on a queue that finishes --step-ms per step after the
queue's last chunk (`greedy_chunk_start` / `greedy_chunk_result`, as `FastGPTMoE` queues them on
the GPU). Behind it run the real `LLMEngine`, `AsyncEngine`, OpenAI app and uvicorn, in a server
process; this process streams --clients greedy completions at once and reports TPOT, so
TPOT - step is what the engine, the app and the HTTP stream add per token (the number the
serving benchmark on a GPU reports as TPOT above the bench's step time).

Usage: python3 scripts/serving_host_overhead.py [--step-ms 0.7] [--chunk 8] [--clients 1] [--tokens 256]
(FTMOE_CHUNK_OVERLAP=0 waits for each chunk before queuing the next, as before the overlap).
Measured on the development machine (2 CPU cores, 2026-11-28): 0.7 ms steps, chunks of 8, one
stream: 0.087 ms per token waited for, 0.002 ms overlapped; 16 streams 0.162 and 0.023 ms."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftmoe.config import ModelConfig  # noqa: E402
from ftmoe.engine import AsyncEngine, LLMEngine  # noqa: E402
from ftmoe.entrypoints.openai_server import build_app  # noqa: E402


class QueuedStandIn:
    """Logits of fixed random values (vocabulary 512: the host's argmax stays cheap); every decode
    step takes `step_s` of 'device' time."""

    def __init__(self, step_s: float):
        self.config = ModelConfig(head_num=16, size_per_head=64, inter_size=4096, num_layer=2, max_pos_seq_len=2048,
                                  vocab_size=512, expert_num=64, moe_layers=(1,))
        self.dtype, self.device, self.step_s = torch.float32, torch.device("cpu"), step_s
        self.logits = torch.randn(1024, self.config.vocab_size)
        self.ready = 0.0            # when the queued chunks are done

    def __call__(self, ids, meta, cache, last_only=True):
        time.sleep(self.step_s)
        return self.logits[: ids.shape[0]]

    def can_greedy_chunk(self, cache, batch):
        return True

    def greedy_chunk_start(self, ids, meta, cache, steps, logprobs=False, after=None):
        self.ready = max(time.perf_counter(), self.ready) + self.step_s * steps
        tok = self.logits[: meta.positions.shape[0]].argmax(-1)
        return self.ready, tok[None].expand(steps, -1).clone()

    def greedy_chunk_result(self, chunk):
        wait = chunk[0] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return chunk[1], None

    def greedy_chunk(self, ids, meta, cache, steps, logprobs=False):
        return self.greedy_chunk_result(self.greedy_chunk_start(ids, meta, cache, steps, logprobs))


def _serve(port: int, step_s: float, chunk: int, kv_tokens: int) -> None:
    import uvicorn

    torch.set_num_threads(1)
    engine = AsyncEngine(LLMEngine(QueuedStandIn(step_s), kv_cache_tokens=kv_tokens, decode_chunk=chunk))
    uvicorn.Server(uvicorn.Config(build_app(engine, None, "stand-in"), host="127.0.0.1", port=port,
                                  log_level="error")).run()


async def _stream(client, url: str, tokens: int) -> tuple[float, int]:
    """(TPOT seconds, tokens) of one streamed greedy completion of 128 prompt tokens."""
    body = {"model": "stand-in", "prompt": list(range(1, 129)), "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    first, n = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    n += len(ch.get("token_ids") or [])
                    if first is None:
                        first = time.perf_counter()
    return (time.perf_counter() - first) / max(n - 1, 1), n


async def _measure(url: str, clients: int, tokens: int) -> tuple[float, int]:
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        await _stream(client, url, 16)                                    # warm-up
        res = await asyncio.gather(*[_stream(client, url, tokens) for _ in range(clients)])
    return sum(t for t, _ in res) / len(res), min(n for _, n in res)


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step-ms", type=float, default=0.7)
    ap.add_argument("--chunk", type=int, default=8, help="--decode-chunk of the engine (1: single steps)")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(target=_serve, args=(port, a.step_ms / 1e3, a.chunk,
                                                                 a.clients * (a.tokens + 256)), daemon=True)
    proc.start()
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        tpot, n = asyncio.run(_measure(url, a.clients, a.tokens))
    finally:
        proc.terminate()
        proc.join(10)
    overlap = os.environ.get("FTMOE_CHUNK_OVERLAP", "1") != "0"
    print(f"step {a.step_ms:.2f} ms, --decode-chunk {a.chunk}{' (overlapped)' if a.chunk > 1 and overlap else ''}, "
          f"{a.clients} stream(s) of {n} tokens: TPOT {tpot * 1e3:.3f} ms, host per token "
          f"{tpot * 1e3 - a.step_ms:.3f} ms")


if __name__ == "__main__":
    main()
