"""AsyncEngine: an asyncio front for LLMEngine, whose steps run in one background thread.

In:  `generate(request_id, prompt_ids, params)` calls from coroutines on one event loop;
     `shutdown(drain, timeout)`.
Out: per request, an async iterator of `TokenEvent`s ending with a finished event;
     `stats()` (the engine's) and `metrics_text()` (Prometheus exposition, see metrics.py).

Threads: only the engine thread touches the LLMEngine's state. The event loop validates a
request (`check_request` reads nothing that changes) and queues an ("add" | "abort") op;
the engine thread applies queued ops in order before each step, then hands the step's
events back with `loop.call_soon_threadsafe`, one asyncio.Queue per request. It sleeps
while there is nothing to do.
Errors: validation errors (RequestError, QueueFullError) raise on the first `anext` of
`generate`, before any event. A request whose model call failed raises that exception from
its iterator. A consumer that stops early (break, aclose, GeneratorExit, CancelledError)
aborts its request: its blocks are freed before the engine's next step.
Shutdown: new requests are refused (EngineShutdownError); with drain=True in-flight requests
finish (up to `timeout` s, then they are aborted), otherwise they end at once with "abort".
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from ..errors import FtmoeError, RequestError
from ..sampling import SamplingParams
from .llm_engine import LLMEngine, TokenEvent
from .scheduler import QueueFullError

log = logging.getLogger(__name__)


class EngineShutdownError(QueueFullError, RequestError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._ops: deque[tuple] = deque()
        self._ops_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False
        self._dead: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ftmoe-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        self._closing = True
        if self._thread is None:
            return
        if drain:
            await self._wait_idle(timeout)
        for rid in list(self._streams):
            self._push(("abort", rid))
        await self._wait_idle(5.0)                 # deliver the abort events
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._dead is None and (self._ops or self.engine.has_unfinished()):
            await asyncio.sleep(0.005)

    # ---- requests --------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        if self._dead is not None:
            raise FtmoeError(f"the engine stopped after an error: {self._dead!r:.200}")
        if self._closing:
            raise EngineShutdownError("the engine is shutting down; it takes no new requests")
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise FtmoeError("AsyncEngine.generate called from a second event loop")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use by an unfinished request")
        ids = self.engine.check_request(request_id, prompt_ids, params, check_duplicate=False)
        with self._ops_lock:
            adds = sum(op[0] == "add" for op in self._ops)
        if len(self.engine.scheduler.waiting) + adds >= self.engine.scheduler.max_queue:
            raise QueueFullError(f"the request queue is full ({self.engine.scheduler.max_queue} waiting); "
                                 f"retry later")
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._push(("add", request_id, ids, params))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
            if not finished:
                self._push(("abort", request_id))

    def stats(self) -> dict:
        return self.engine.stats()

    def metrics_text(self) -> str:
        return self.engine.metrics.render(self.engine.stats())

    # ---- the engine thread -------------------------------------------------------------
    def _push(self, op: tuple) -> None:
        with self._ops_lock:
            self._ops.append(op)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - never leave consumers waiting on a dead thread
            log.exception("the engine thread stopped after an error")
            self._dead = e
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._fail_streams, e)

    def _fail_streams(self, e: BaseException) -> None:
        for queue in self._streams.values():
            queue.put_nowait(e)

    def _serve(self) -> None:
        eng = self.engine
        while not self._stop:
            with self._ops_lock:
                ops = list(self._ops)
                self._ops.clear()
            for op in ops:
                if op[0] == "add":
                    try:
                        eng.add_request(*op[1:])
                    except FtmoeError as e:            # lost a race (queue filled up meanwhile)
                        self._deliver([(op[1], e)])
                else:
                    eng.abort(op[1])
            if not eng.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = eng.step()
            except Exception as e:  # noqa: BLE001 - an engine bug: fail everything in flight, keep serving
                log.exception("engine step failed; aborting every request")
                eng.abort_all(e)
                continue
            items = []
            for ev in events:
                err = eng.pop_error(ev.request_id) if ev.finish_reason == "abort" else None
                items.append((ev.request_id, err if err is not None else ev))
            self._deliver(items)

    def _deliver(self, items: list[tuple]) -> None:
        if items and self._loop is not None:
            with contextlib.suppress(RuntimeError):   # the event loop is closed: nobody listens
                self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items: list[tuple]) -> None:
        for rid, item in items:
            queue = self._streams.get(rid)
            if queue is not None:
                queue.put_nowait(item)
