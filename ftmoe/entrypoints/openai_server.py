"""OpenAI-compatible HTTP server over the serving engine (a FastAPI app; `serve` runs it).

In:  an `AsyncEngine`, the model's tokenizer (or None: token-id prompts only), the served
     model name and an optional API key.
Out: `build_app(...)` -> a FastAPI app with
       POST /v1/completions  OpenAI completions: text / token-id prompts (one or a batch), n,
                             stop, seed, logprobs, echo, stream (SSE `data: {...}` chunks, one
                             per token, then `data: [DONE]`), usage; each choice also carries
                             `token_ids` (extension)
       GET  /v1/models       the served model
       GET  /health          200 {"status": "ok"}; 503 while shutting down
       GET  /metrics         Prometheus text: the engine's metrics + HTTP responses by status
Errors are OpenAI-style `{"error": {message, type, param, code}}`: 400 bad request (bad JSON,
bad field types or values, prompt too long, text without a tokenizer), 401 missing or wrong
API key (/v1/* only), 404 unknown model, 503 overloaded (engine queue full; Retry-After) or
shutting down, 500 engine failure.

Each choice of a request is one engine request `<id>-<k>`, driven by its own task into one
queue. A client that disconnects (while queued, mid-generation or mid-stream) gets its
requests aborted: their iterators are closed, which frees their KV blocks. The app's lifespan
starts the engine and, at exit, drains it (`shutdown(drain=True)`).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import inspect
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineShutdownError, QueueFullError
from ..errors import RequestError
from .openai_protocol import ApiError, TextState, logprobs_obj, parse_request, plan_choices

_BACKGROUND: set = set()                    # cleanup tasks, kept alive until done
_PATHS = ("/v1/completions", "/v1/models", "/health", "/metrics")


class _Disconnected(Exception):
    pass


async def _finalize(tasks: list, gens: list) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    for g in gens:
        with contextlib.suppress(Exception):
            await g.aclose()


class _Choices:
    """The engine streams of one HTTP request, merged into one queue of (choice, event)."""

    def __init__(self, engine, rid: str, items: list):
        self.gens = [engine.generate(f"{rid}-{k}", ids, p) for k, (ids, p) in enumerate(items)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Submit every choice; raises the engine's error (queue full, bad request) if any."""
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in self.gens]
        self.tasks = [asyncio.create_task(self._pump(k, g, f)) for k, (g, f) in enumerate(zip(self.gens, started))]
        await asyncio.wait(started, return_when=asyncio.FIRST_EXCEPTION)
        errors = [f.exception() for f in started if f.done() and f.exception() is not None]
        if errors:
            self.close()
            raise errors[0]

    async def _pump(self, k: int, gen, started: asyncio.Future) -> None:
        try:
            async for ev in gen:
                if not started.done():
                    started.set_result(None)
                self.queue.put_nowait((k, ev))
        except Exception as e:
            if not started.done():
                started.set_exception(e)
            else:
                self.queue.put_nowait((k, e))
            return
        if not started.done():
            started.set_result(None)
        self.queue.put_nowait((k, None))            # the stream ended

    def close(self, ks=None) -> None:
        """Abort choices (all by default). Synchronous, so it works inside a cancelled scope."""
        ks = range(len(self.gens)) if ks is None else ks
        tasks = [self.tasks[k] for k in ks if k < len(self.tasks)]
        for t in tasks:
            t.cancel()
        c = asyncio.get_running_loop().create_task(_finalize(tasks, [self.gens[k] for k in ks]))
        _BACKGROUND.add(c)
        c.add_done_callback(_BACKGROUND.discard)

    async def steps(self, states: list[TextState]):
        """(choice, text delta, first new token index, finish reason or None) per event."""
        done = [False] * len(states)
        while not all(done):
            k, ev = await self.queue.get()
            if done[k]:
                continue
            if isinstance(ev, BaseException):
                raise ev
            st, lo = states[k], len(states[k].ids)
            if ev is None:
                finished, reason, delta = True, "abort", st.add(None, True)
            else:
                finished, reason = ev.finished, (ev.finish_reason or "stop") if ev.finished else None
                delta = st.add(ev.token_id, ev.finished, ev.logprob)
            if st.stopped and not finished:
                finished, reason = True, "stop"
                self.close([k])
            done[k] = finished
            yield k, delta, lo, reason


async def _or_disconnect(request: Request, aw):
    """Await `aw`, unless the client disconnects first (then raise _Disconnected)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(aw), asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise _Disconnected
    return task.result()


class _StatusCounter:
    """ASGI middleware counting responses by path and status (for /metrics)."""

    def __init__(self, app, counts: collections.Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _PATHS else "other"

        async def counted(msg):
            if msg["type"] == "http.response.start":
                self.counts[(path, msg["status"])] += 1
            await send(msg)
        await self.app(scope, receive, counted)


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, EngineShutdownError):
        return ApiError(503, str(e), code="shutting_down")
    if isinstance(e, QueueFullError):
        return ApiError(503, f"the server is overloaded, try again later ({e})", code="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(e, RequestError):
        return ApiError(400, str(e))
    return ApiError(500, f"engine failure: {type(e).__name__}: {e}")


def build_app(engine, tokenizer, model_name: str, api_key: str | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """The app; `app.state.draining = True` makes new completions fail with 503."""
    max_len = getattr(engine, "max_model_len", None) or getattr(getattr(engine, "engine", None), "max_model_len", None)
    counts: collections.Counter = collections.Counter()

    async def lifespan(app: FastAPI):
        started = engine.start()
        if inspect.isawaitable(started):
            await started
        yield
        app.state.draining = True
        await engine.shutdown(drain=True, timeout=shutdown_timeout)

    app = FastAPI(title="ftmoe OpenAI-compatible server", lifespan=lifespan)
    app.state.draining = False
    app.add_middleware(_StatusCounter, counts=counts)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        lines = ["# HELP ftmoe_http_responses_total HTTP responses by path and status code.",
                 "# TYPE ftmoe_http_responses_total counter"]
        lines += [f'ftmoe_http_responses_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(counts.items())]
        return PlainTextResponse(engine.metrics_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ftmoe",
                                            "max_model_len": max_len}]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        req = parse_request(await request.body())
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist (this server serves '{model_name}')",
                           "model", "model_not_found")
        if app.state.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        prompts, items, prefixes = plan_choices(req, tokenizer, max_len)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        states = [TextState(tokenizer, req.stops, req.stream or req.logprobs is not None) for _ in items]
        run = _Choices(engine, rid, items)
        try:
            await _or_disconnect(request, run.start())
        except _Disconnected:
            run.close()
            return Response(status_code=499)
        except Exception as e:
            raise _engine_error(e) from None
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        n_prompt = sum(len(ids) for ids, _ in prompts)

        def usage() -> dict:
            n_out = sum(len(s.ids) for s in states)
            return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            async def close() -> None:         # also when the body never started (early disconnect)
                run.close()
            return StreamingResponse(_sse(run, states, prefixes, req.logprobs is not None, tokenizer, head,
                                          usage if include_usage else None), media_type="text/event-stream",
                                     background=BackgroundTask(close))
        try:
            reasons = await _or_disconnect(request, _collect(run, states))
        except _Disconnected:
            return Response(status_code=499)
        except Exception as e:
            raise _engine_error(e) from None
        finally:
            run.close()
        choices = [{"index": k, "text": prefixes[k] + st.text, "finish_reason": reasons[k], "token_ids": st.ids,
                    "logprobs": logprobs_obj(tokenizer, st, len(prefixes[k])) if req.logprobs is not None else None}
                   for k, st in enumerate(states)]
        return {**head, "choices": choices, "usage": usage()}

    return app


async def _collect(run: _Choices, states: list[TextState]) -> list[str]:
    reasons = [""] * len(states)
    async for k, _, _, reason in run.steps(states):
        if reason is not None:
            reasons[k] = reason
    return reasons


async def _sse(run: _Choices, states, prefixes, want_logprobs: bool, tokenizer, head: dict, usage):
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    sent_prefix = [False] * len(states)
    try:
        try:
            async for k, delta, lo, reason in run.steps(states):
                st, pre = states[k], "" if sent_prefix[k] else prefixes[k]
                sent_prefix[k] = True
                lp = logprobs_obj(tokenizer, st, len(prefixes[k]), lo) if want_logprobs else None
                yield data({**head, "choices": [{"index": k, "text": pre + delta, "logprobs": lp,
                                                 "finish_reason": reason, "token_ids": st.ids[lo:]}]})
        except Exception as e:
            yield data(_engine_error(e).body())
        if usage is not None:
            yield data({**head, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"
    finally:
        run.close()
