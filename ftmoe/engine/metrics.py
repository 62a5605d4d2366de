"""Serving metrics in the Prometheus text exposition format (no client library needed).

In:  observations from the engine thread (`first_token`, `inter_token`, `tokens`, `finished`,
     times from `time.monotonic()`) and, when rendering, the engine's `stats()` dict.
Out: `render(stats)` -> text/plain; version=0.0.4 exposition:
     gauges   ftmoe_queue_length, ftmoe_running_requests, ftmoe_kv_blocks_used,
              ftmoe_kv_blocks_total, ftmoe_generation_tokens_per_second (last `window` s);
     histograms ftmoe_time_to_first_token_seconds, ftmoe_inter_token_latency_seconds;
     counters ftmoe_generated_tokens_total, ftmoe_requests_total{finish_reason=...},
              ftmoe_preemptions_total.
A lock makes each observation and each rendering atomic (the engine thread writes while an
HTTP handler reads).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FINISH_REASONS = ("stop", "length", "abort")


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)     # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip(self.buckets + (float("inf"),), self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{_num(le) if le != float("inf") else "+Inf"}"}} {cum}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, window: float = 10.0):
        self._lock = threading.Lock()
        self.window = window
        self.start = time.monotonic()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.generated_tokens = 0
        self.requests = dict.fromkeys(FINISH_REASONS, 0)
        self._recent: deque[tuple[float, int]] = deque()     # (time, tokens) per engine step

    # ---- observations (engine thread) ------------------------------------------------
    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def tokens(self, now: float, n: int) -> None:
        with self._lock:
            self.generated_tokens += n
            self._recent.append((now, n))
            self._prune(now)

    def finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated over the last `window` seconds (or since start, if sooner), per second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            span = max(min(self.window, now - self.start), 1e-3)
            return sum(n for _, n in self._recent) / span

    # ---- exposition ----------------------------------------------------------------
    def render(self, stats: dict) -> str:
        tps = self.tokens_per_second()
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        gauges = (("ftmoe_queue_length", "waiting", "Requests waiting to be scheduled."),
                  ("ftmoe_running_requests", "running", "Requests being generated (admitted to the batch)."),
                  ("ftmoe_kv_blocks_used", "kv_blocks_used", "KV-cache blocks in use."),
                  ("ftmoe_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in all."))
        for name, key, help_ in gauges:
            family(name, "gauge", help_, [f"{name} {_num(stats.get(key, 0))}"])
        family("ftmoe_generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {self.window:g} s.",
               [f"ftmoe_generation_tokens_per_second {_num(float(tps))}"])
        with self._lock:
            family("ftmoe_time_to_first_token_seconds", "histogram",
                   "Time from a request's arrival to its first generated token.",
                   self.ttft.lines("ftmoe_time_to_first_token_seconds"))
            family("ftmoe_inter_token_latency_seconds", "histogram",
                   "Time between consecutive tokens of a request.",
                   self.itl.lines("ftmoe_inter_token_latency_seconds"))
            family("ftmoe_generated_tokens_total", "counter", "Tokens generated.",
                   [f"ftmoe_generated_tokens_total {self.generated_tokens}"])
            family("ftmoe_requests_total", "counter", "Finished requests by finish reason.",
                   [f'ftmoe_requests_total{{finish_reason="{r}"}} {n}' for r, n in self.requests.items()])
        family("ftmoe_preemptions_total", "counter", "Sequences preempted (recomputed later) for KV-cache room.",
               [f"ftmoe_preemptions_total {_num(stats.get('preemptions', 0))}"])
        return "\n".join(out) + "\n"
