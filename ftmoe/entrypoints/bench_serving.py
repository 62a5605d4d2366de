"""Serving benchmark: replay random requests with Poisson arrivals against a running server.

In:  an OpenAI-compatible server's base URL (e.g. http://127.0.0.1:8000), the number of
     requests, the arrival rate (requests/s; inf sends them all at once), a prompt-length
     range (prompts are random token-id lists, ids drawn from `token_id_range`), max_tokens,
     a seed, the model name (default: the first of /v1/models), an optional API key.
Out: `run_bench_serving(...)` -> a dict of results, as vLLM's benchmark_serving reports them:
     completed / failed counts (and the first errors), duration, request throughput, output
     and total token throughput, and mean / p50 / p99 in ms of TTFT (request sent -> first
     token), TPOT ((latency - TTFT) / (output tokens - 1)), ITL (gap between consecutive
     streamed tokens) and end-to-end latency. `main_bench_serving(argv)` prints it as a table
     and can write it as JSON (`--json`).
Several rates (`--request-rate 1,4,inf`, with one `--num-requests` for all or one per rate)
run one after another on the same server; each gets its table, then `format_summary` prints
one row per rate, and `--json` holds a list of the per-rate dicts (rewritten after every rate,
so a cut-off run keeps what it measured). A rate that fails outright (server gone) is
recorded with an `error` and the next one still runs. `--warmup N` first sends N unmeasured
requests at full speed (at most 16 tokens each), so Triton compiles and CUDA graph captures
are not counted in the first rate.
Requests are streaming completions (`stream_options.include_usage`, so output tokens come from
`usage`); `ignore_eos` (an extension vLLM and ftmoe accept) keeps output lengths fixed.
Bounded: at most `num_requests` requests, each at most `timeout` s, the whole run at most
`max_duration` s (unfinished requests then count as failed).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _one(client, url: str, body: dict, headers: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    out = {"ok": False, "ttft": None, "itl": [], "output_tokens": 0, "latency": 0.0, "error": None}
    last, usage = t0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:].strip() == "[DONE]":
                    out["ok"] = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    out["error"] = str(obj["error"].get("message"))[:200]
                    break
                usage = obj.get("usage") or usage
                for ch in obj.get("choices") or []:
                    k = len(ch.get("token_ids") or []) or (1 if ch.get("text") else 0)
                    if k:
                        now = time.perf_counter()
                        if out["ttft"] is None:
                            out["ttft"] = now - t0
                        else:
                            out["itl"].append(now - last)
                        last = now
                        out["output_tokens"] += k
    except Exception as e:  # noqa: BLE001 - any transport failure is a failed request
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    out["latency"] = time.perf_counter() - t0
    if usage:
        out["output_tokens"] = usage.get("completion_tokens", out["output_tokens"])
    out["ok"] = out["ok"] and out["error"] is None and out["ttft"] is not None
    return out


def _check(num_requests: int, request_rate: float, prompt_len_range, max_tokens: int) -> None:
    lo, hi = prompt_len_range
    if not (1 <= lo <= hi) or num_requests < 1 or max_tokens < 1 or not request_rate > 0:
        raise ValueError(f"need 1 <= prompt lengths {lo}..{hi}, num_requests {num_requests} >= 1, "
                         f"max_tokens {max_tokens} >= 1, request_rate {request_rate} > 0")


async def bench_serving_async(base_url: str, num_requests: int, request_rate: float, prompt_len_range, max_tokens: int,
                              seed: int, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                              max_duration: float = 3600.0, token_id_range=(100, 500), max_concurrency: int | None = None,
                              ignore_eos: bool = True, sampling: dict | None = None) -> dict:
    import httpx

    _check(num_requests, request_rate, prompt_len_range, max_tokens)
    lo, hi = prompt_len_range
    base = base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max_concurrency or num_requests, max_keepalive_connections=20)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if model is None:
            r = await client.get(f"{base}/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = [[rng.randrange(*token_id_range) for _ in range(rng.randint(lo, hi))] for _ in range(num_requests)]
        gaps = [0.0 if math.isinf(request_rate) else rng.expovariate(request_rate) for _ in prompts]
        sem = asyncio.Semaphore(max_concurrency or num_requests)

        async def send(p):
            async with sem:
                body = {"model": model, "prompt": p, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                        **(sampling or {}),
                        "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
                return await _one(client, f"{base}/v1/completions", body, headers, timeout)

        t0 = time.perf_counter()
        deadline = t0 + max_duration
        tasks = []
        for p, gap in zip(prompts, gaps):
            if gap:
                await asyncio.sleep(min(gap, max(0.0, deadline - time.perf_counter())))
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(send(p)))
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())) if tasks \
            else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    results = [t.result() for t in tasks if t in done]
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    n_in = sum(len(prompts[i]) for i, t in enumerate(tasks) if t in done and t.result()["ok"])
    n_out = sum(r["output_tokens"] for r in ok)
    out = {"completed": len(ok), "failed": num_requests - len(ok), "errors": errors[:5], "duration_s": duration,
           "num_requests": num_requests, "prompt_len": [lo, hi], "max_tokens": max_tokens,
           "total_input_tokens": n_in, "total_output_tokens": n_out, "request_rate": request_rate,
           "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
           "total_token_throughput": (n_in + n_out) / duration}
    series = {"ttft": [r["ttft"] for r in ok], "itl": [x for r in ok for x in r["itl"]],
              "tpot": [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1],
              "e2el": [r["latency"] for r in ok]}
    for name, xs in series.items():
        out[f"mean_{name}_ms"] = 1000 * sum(xs) / len(xs) if xs else 0.0
        out[f"median_{name}_ms"] = 1000 * _pct(xs, 50)
        out[f"p99_{name}_ms"] = 1000 * _pct(xs, 99)
    return out


def run_bench_serving(base_url: str, num_requests: int, request_rate: float, prompt_len_range, max_tokens: int,
                      seed: int, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                      **kw) -> dict:
    """Synchronous wrapper of `bench_serving_async` (call it outside an event loop)."""
    return asyncio.run(bench_serving_async(base_url, num_requests, request_rate, prompt_len_range, max_tokens, seed,
                                           model, api_key, timeout, **kw))


def format_table(r: dict) -> str:
    rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
            ("Request rate (req/s)", r["request_rate"]), ("Benchmark duration (s)", f"{r['duration_s']:.2f}"),
            ("Total input tokens", r["total_input_tokens"]), ("Total generated tokens", r["total_output_tokens"]),
            ("Request throughput (req/s)", f"{r['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{r['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{r['total_token_throughput']:.2f}")]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f"-- {title}", None))
        rows += [(f"{k.capitalize()} {name.upper()} (ms)", f"{r[f'{k}_{name}_ms']:.2f}") for k in ("mean", "median", "p99")]
    lines = ["{s:=^50}".format(s=" Serving Benchmark Result ")]
    lines += [f"{k:<40}{'' if v is None else v:>10}" for k, v in rows]
    lines += [f"error: {e}" for e in r["errors"]] + ["=" * 50]
    return "\n".join(lines)


# (title, result key, width, decimals); key None: "completed/num_requests"
_SUMMARY_COLS = (("rate/s", "request_rate", 7, None), ("ok/n", None, 9, None), ("dur s", "duration_s", 7, 1),
                 ("req/s", "request_throughput", 7, 2), ("out tok/s", "output_throughput", 10, 1),
                 ("tot tok/s", "total_token_throughput", 10, 1),
                 ("TTFT p50", "median_ttft_ms", 9, 1), ("TTFT p99", "p99_ttft_ms", 9, 1),
                 ("TPOT p50", "median_tpot_ms", 9, 2), ("TPOT p99", "p99_tpot_ms", 9, 2),
                 ("ITL p50", "median_itl_ms", 8, 2), ("ITL p99", "p99_itl_ms", 8, 2),
                 ("E2E p50", "median_e2el_ms", 9, 1))


def format_summary(results: list[dict]) -> str:
    """One row per rate (latencies in ms); a rate that failed outright shows its error."""
    head = "".join(f"{title:>{w}}" for title, _, w, _ in _SUMMARY_COLS)
    lines = ["Serving benchmark summary (latencies in ms)", head, "-" * len(head)]
    for r in results:
        if "completed" not in r:
            lines.append(f"{_rate_str(r['request_rate']):>7}  error: {r.get('error')}")
            continue
        cells = []
        for _, key, w, dec in _SUMMARY_COLS:
            if key is None:
                v = f"{r['completed']}/{r.get('num_requests', r['completed'] + r['failed'])}"
            elif key == "request_rate":
                v = _rate_str(r[key])
            else:
                v = f"{r[key]:.{dec}f}"
            cells.append(f"{v:>{w}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def _rate_str(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def _list(conv, what: str):
    def parse(s: str) -> list:
        try:
            vals = [conv(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, found {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, found {s!r}")
        return vals
    return parse


def _range(s: str) -> tuple[int, int]:
    try:
        lo, _, hi = s.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (integers), found {s!r}") from None


def add_bench_serving_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--num-requests", type=_list(int, "integers"), default=[100],
                   help="requests per run: one count, or one per rate (comma-separated)")
    p.add_argument("--request-rate", type=_list(float, "numbers"), default=[float("inf")],
                   help="Poisson arrivals per second (inf: all at once); comma-separated for one run per rate, "
                        "e.g. 1,4,16,inf")
    p.add_argument("--prompt-len", type=_range, default=(32, 256), help="random prompt lengths LO:HI (tokens)")
    p.add_argument("--token-ids", type=_range, default=(100, 500), help="prompt token ids drawn from [LO, HI)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at the end token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="requests sample at this temperature (default 0: greedy, as vLLM's benchmark sends)")
    p.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus sampling")
    p.add_argument("--top-k", type=int, default=None, help="with --temperature: top-k sampling")
    p.add_argument("--api-key", default=os.environ.get("FTMOE_API_KEY"), help="default: $FTMOE_API_KEY")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=3600.0, help="seconds for each rate's run")
    p.add_argument("--warmup", type=int, default=0, help="first send this many unmeasured requests at full speed "
                                                         "(at most 16 tokens each)")
    p.add_argument("--json", default=None, help="write the results here (a list with several rates)")
    return p


def run_bench_serving_args(a) -> int:
    """Every rate in turn (see the module docstring); 0 when each completed a request."""
    import httpx

    rates, counts = list(a.request_rate), list(a.num_requests)
    if len(counts) == 1:
        counts *= len(rates)
    if len(counts) != len(rates):
        raise ValueError(f"--num-requests has {len(counts)} counts for {len(rates)} rates (give one, or one per rate)")
    for rate, n in zip(rates, counts):
        _check(n, rate, a.prompt_len, a.max_tokens)
    if a.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, found {a.warmup}")
    if a.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, found {a.temperature}")
    sampling = {"temperature": a.temperature, **({"top_p": a.top_p} if a.top_p is not None else {}),
                **({"top_k": a.top_k} if a.top_k is not None else {})}
    kw = dict(max_duration=a.max_duration, token_id_range=a.token_ids, max_concurrency=a.max_concurrency,
              ignore_eos=not a.no_ignore_eos, sampling=sampling)
    if a.warmup:
        r = run_bench_serving(a.base_url, a.warmup, float("inf"), a.prompt_len, min(a.max_tokens, 16), a.seed + 7919,
                              a.model, a.api_key, a.timeout, **kw)
        print(f"warmup: {r['completed']}/{a.warmup} requests in {r['duration_s']:.1f} s"
              + (f" (first error: {r['errors'][0]})" if r["errors"] else ""), flush=True)
    results = []
    for rate, n in zip(rates, counts):
        try:
            r = run_bench_serving(a.base_url, n, rate, a.prompt_len, a.max_tokens, a.seed, a.model, a.api_key,
                                  a.timeout, **kw)
            print(format_table(r), flush=True)
        except (ValueError, httpx.HTTPError, OSError) as e:
            r = {"request_rate": rate, "num_requests": n, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"rate {_rate_str(rate)}/s: failed: {r['error']}", file=sys.stderr, flush=True)
        results.append(r)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results[0] if len(rates) == 1 else results, f, indent=2)
    if len(results) > 1:
        print(format_summary(results), flush=True)
    return 0 if all(r.get("completed") for r in results) else 1


def run_bench_serving_cli(a) -> int:
    """`run_bench_serving_args` with a bad option or an unreachable server as one error line."""
    import httpx

    try:
        return run_bench_serving_args(a)
    except (ValueError, httpx.HTTPError) as e:
        print(f"ftmoe: error: {a.base_url}: {e}", file=sys.stderr)
        return 1


def main_bench_serving(argv: list[str] | None = None) -> int:
    a = add_bench_serving_args(argparse.ArgumentParser(prog="ftmoe bench-serving", description=__doc__.split("\n")[0])
                               ).parse_args(argv)
    return run_bench_serving_cli(a)


if __name__ == "__main__":
    sys.exit(main_bench_serving())
