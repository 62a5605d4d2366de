"""`ftmoe serve`: the OpenAI-compatible HTTP server for a converted model.

In:  the `serve` options (`add_serve_parser`): a converted `<N>-gpu` folder, dtype, device,
     tensor/expert/pipeline parallel sizes, engine limits (sequences, queue, KV-cache
     tokens), host, port, an optional API key (or $FTMOE_API_KEY), the served model name.
Out: `run_serve(args)` -> exit code. It loads the model the way `LLM` does (taking
     `llm.generator.model`; CUDA graphs, where LLM uses them, are re-bound to the engine's
     KV cache), wraps it in `LLMEngine` + `AsyncEngine`, and serves
     `openai_server.build_app` with uvicorn until SIGINT/SIGTERM; then new completions get
     503, in-flight ones finish (up to --shutdown-timeout seconds), the engine is drained,
     worker processes are stopped, and it returns 0. A second signal forces the exit.
`python -m ftmoe.entrypoints.serve serve --model DIR ...` runs it without the `ftmoe` CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading

from ..errors import FtmoeError


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/models, "
                                            "/health, /metrics)")
    p.add_argument("--model", required=True, help="converted <N>-gpu folder (or its parent)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder; without one, "
                                                     "prompts must be token ids)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(default: $FTMOE_API_KEY, else no key)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when available)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="tokens per engine step")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503 overloaded")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache capacity in tokens "
                                                                     "(default: the engine's choice)")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    p.add_argument("--decode-chunk", type=int, default=None,
                   help="greedy decode steps run back to back when every running request decodes plain-greedy "
                        "and none waits (1-32; default $FTMOE_DECODE_CHUNK, else 8; 1 = one step at a time)")
    p.add_argument("--lazy-graphs", action="store_true",
                   help="capture each CUDA-graph bucket (decode batch, prefill batch x length) on first use "
                        "instead of at start-up (faster start; a request that reaches a new bucket stalls while "
                        "its kernels compile)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent rank is an error")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _resolve(args) -> tuple[str, str]:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def _check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address is taken."""
    if not 0 <= port < 65536:
        raise FtmoeError(f"--port must be in 0..65535, found {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise FtmoeError(f"--host {host!r}: cannot resolve ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise FtmoeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def load_for_serving(args):
    """(llm, model, tokenizer): `llm` owns the model (and worker processes: close it)."""
    from ..llm import LLM

    device, dtype = _resolve(args)
    # LLM's own Generator cache is not used by the engine: keep it at one block.
    llm = LLM(args.model, dtype=dtype, device=device, tokenizer_dir=args.tokenizer, max_batch_tokens=args.block_size,
              tp=args.tp, ep=args.ep, pp=args.pp, timeout_s=args.timeout)
    return llm, llm.generator.model, llm.tokenizer


def run_serve(args, hooks=()) -> int:
    """Serve until SIGINT/SIGTERM. `hooks`: callables (app, engine, args) run before serving
    (where e.g. a `--triton` front end would attach)."""
    try:
        import uvicorn
    except ImportError:
        raise FtmoeError("ftmoe serve needs the 'fastapi' and 'uvicorn' packages: pip install fastapi uvicorn") from None
    from ..engine import AsyncEngine, LLMEngine
    from .openai_server import build_app

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue", "block_size"):
        if getattr(args, name) < 1:
            raise FtmoeError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.decode_chunk is not None and not 1 <= args.decode_chunk <= 32:
        raise FtmoeError(f"--decode-chunk must be 1..32, found {args.decode_chunk}")
    _check_port(args.host, args.port)
    llm, model, tokenizer = load_for_serving(args)
    try:
        core = LLMEngine(model, kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_queue=args.max_queue, decode_chunk=args.decode_chunk)
        if getattr(model, "graphs", None) is not None:   # LLM chose CUDA graphs: bind them to the engine's cache
            model.enable_cuda_graphs(core.cache)
            if not args.lazy_graphs:                      # every decode bucket now, not on the first requests
                model.graphs.capture_upto(args.max_num_seqs, greedy=core.decode_chunk > 1 and
                                          model.can_greedy_chunk(core.cache, 1), progress=True)
                if model.prefill_graphs is not None:
                    model.prefill_graphs.capture_all(progress=True)
        elif hasattr(model, "capture_graphs") and not args.lazy_graphs:   # a parallel model: every rank, in step
            model.capture_graphs(args.max_num_seqs, greedy=core.decode_chunk > 1, progress=True)
        engine = AsyncEngine(core)
        name = args.served_model_name or args.model
        app = build_app(engine, tokenizer, name, api_key=args.api_key or os.environ.get("FTMOE_API_KEY") or None,
                        shutdown_timeout=args.shutdown_timeout)
        for hook in hooks:
            hook(app, engine, args)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                                timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))
        server = _make_server(config, app)
        graphs = ", CUDA graphs" if getattr(model, "graphs", None) is not None else ""
        print(f"ftmoe: serving {llm.model_dir} as '{name}' on http://{args.host}:{args.port}/v1 "
              f"[{type(model).__name__}{graphs}, {str(model.dtype).replace('torch.', '')} on {model.device}, "
              f"KV cache {core.cache.num_blocks * args.block_size} tokens] (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            server.run()
        except SystemExit as e:      # uvicorn exits 1 when it cannot bind or start
            raise FtmoeError(f"the server on {args.host}:{args.port} failed to start (exit {e.code})") from None
        if not server.started:
            raise FtmoeError(f"the server on {args.host}:{args.port} failed to start (see the log above)")
        return 0
    finally:
        llm.close()


def _make_server(config, app):
    """A uvicorn.Server for the main thread: the first SIGINT/SIGTERM marks the app as draining
    (new completions get 503) and starts uvicorn's graceful shutdown; a second one forces it.
    Unlike uvicorn's own handling, the signal is not re-raised afterwards, so `run_serve`
    returns normally (and stops worker processes)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            app.state.draining = True
            if self.should_exit:
                self.force_exit = True
                return
            self.should_exit = True
            print(f"ftmoe: {signal.Signals(sig).name}: finishing in-flight requests (again to force)",
                  file=sys.stderr, flush=True)

    return Server(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftmoe")
    add_serve_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except FtmoeError as e:
        print(f"ftmoe: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
