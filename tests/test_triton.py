"""Tests for ftmoe.entrypoints.triton_server / triton_repo: FT GPT tensors over Triton.

In:  the tiny fp32 model (conftest `tiny_model_dir`); FT-style tensors built by hand.
Out: unit checks of the request mapping (word lists, defaults, ragged batches, errors), the
     output packing and the repository files (no pytriton needed); then, only where `pytriton`
     and `tritonclient` import, a real tritonserver (pytriton's, CPU) on 127.0.0.1 free ports:
     HTTP and gRPC results equal `LLM.generate`, decoupled gRPC streams one response per step,
     a bad request gets an error and the server keeps serving, and the bundled binary serves a
     classic repository written by `write_model_repository`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ftmoe.entrypoints import triton_repo as tr
from ftmoe.entrypoints import triton_server as ts
from ftmoe.errors import RequestError
from ftmoe.generation import GenerationOutput, StreamEvent
from ftmoe.sampling import SamplingParams

HAVE_SERVER = all(importlib.util.find_spec(m) is not None for m in ("pytriton", "tritonclient"))
needs_server = pytest.mark.skipif(not HAVE_SERVER, reason="needs nvidia-pytriton, tritonclient[http,grpc]")
PROMPTS = [[5, 17, 42], [300, 2, 9, 81, 7]]



def ft_inputs(prompts, out_len=6, **opt) -> dict[str, np.ndarray]:
    """FT client tensors: right-padded input_ids, input_lengths [B,1], per-request scalars [B,1]."""
    B, L = len(prompts), max(len(p) for p in prompts)
    d = {"input_ids": np.array([p + [0] * (L - len(p)) for p in prompts], np.uint32), "input_lengths": np.array([[len(p)] for p in prompts], np.uint32),
         "request_output_len": np.full((B, 1), out_len, np.uint32)}
    types = {n: t for n, t, *_ in ts.INPUTS}
    for name, v in opt.items():
        d[name] = v if name in ts.WORDS else np.array([[x] for x in (v if isinstance(v, list) else [v] * B)],
                                                      types[name])
    return d


# ---- mapping (no server) -------------------------------------------------------------------------
def test_word_list_format():
    arr = np.array([[1, 2, 3, 4, 5, 0], [2, 3, 5, -1, -1, -1]], np.int32)   # FT's layout, zero/-1 padded
    assert ts.parse_word_list(arr) == [[1, 2], [3], [4, 5]]
    assert ts.parse_word_list(np.array([[0], [-1]], np.int32)) == []
    t = ts.word_list_tensor([[[7, 8], [9]], []])
    assert t.shape == (2, 2, 3) and t.dtype == np.int32
    assert [ts.parse_word_list(t[b]) for b in range(2)] == [[[7, 8], [9]], []]
    for bad in ([[1, 2], [3, -1]], [[1, 2], [2, 1]], [[1, 2], [0, -1]]):
        with pytest.raises(RequestError, match="offsets"):
            ts.parse_word_list(np.array(bad, np.int32), "bad_words_list")
    with pytest.raises(RequestError, match=r"\[2, W\]"):
        ts.parse_word_list(np.zeros((3, 2), np.int32))


def test_defaults_and_ragged_batch():
    reqs = ts.requests_from_inputs(ft_inputs(PROMPTS, out_len=9))
    assert [p for p, _ in reqs] == PROMPTS                      # padding cut by input_lengths
    assert reqs[0][1] == SamplingParams(max_new_tokens=9) and reqs[0][1].greedy
    # FT's config reshapes scalars to [] -> the backend sees [B]; empty prompt + start_id
    d = ft_inputs([[1, 2], [3]], runtime_top_p=0.9, random_seed=[7, 2**64 - 1], is_return_log_probs=True)
    d["input_lengths"] = np.array([2, 0], np.uint32)
    d["start_id"] = np.array([11, 11], np.uint32)
    d["stop_words_list"] = ts.word_list_tensor([[[4, 5]], [[6], [7, 8]]])
    (p0, s0), (p1, s1) = ts.requests_from_inputs(d)
    assert p0 == [1, 2] and p1 == [11]
    assert s0.top_p == 0.9 and s0.seed == 7 and s1.seed == 2**64 - 1 and s1.return_log_probs is True
    assert s0.stop_words == [[4, 5]] and s1.stop_words == [[6], [7, 8]]


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("request_output_len"), "required input 'request_output_len'"),
    (lambda d: d.update(foo=np.zeros((2, 1), np.float32)), "unknown input"),
    (lambda d: d.update(input_lengths=np.array([[3], [9]], np.uint32)), "request 1: input_lengths 9"),
    (lambda d: d.update(input_ids=np.zeros(5, np.uint32)), "input_ids"),
    (lambda d: d.update(runtime_top_p=np.array([[0.5], [2.0]], np.float32)), "request 1.*runtime_top_p"),
    (lambda d: d.update(request_output_len=np.zeros((2, 1), np.uint32)), "request_output_len"),
    (lambda d: d.update(beam_search_diversity_rate=np.full((2, 1), 0.5, np.float32)), "diversity"),
    (lambda d: d.update(repetition_penalty=np.full((2, 1), 1.2, np.float32),
                        presence_penalty=np.full((2, 1), 0.5, np.float32)), "mutually exclusive"),
    (lambda d: d.update(temperature=np.zeros((1, 1), np.float32)), "temperature.*batch size 2"),
])
def test_bad_requests(change, match):
    d = ft_inputs(PROMPTS)
    change(d)
    with pytest.raises(RequestError, match=match):
        ts.requests_from_inputs(d)


def test_output_packing():
    single = GenerationOutput([1, 2, 3], 3, -0.5, [-0.2, -0.3], "length", 1)
    beams = GenerationOutput([[4, 5], [4, 6, 7, 8]], [2, 4], None, None, ["stop", "length"], 1)
    out = ts.outputs_to_tensors([single, beams], pads=[0, 9])
    assert out["output_ids"].dtype == np.uint32 and out["output_ids"].shape == (2, 2, 4)
    assert out["output_ids"].tolist() == [[[1, 2, 3, 0], [0, 0, 0, 0]], [[4, 5, 9, 9], [4, 6, 7, 8]]]
    assert out["sequence_length"].tolist() == [[3, 0], [2, 4]]
    assert out["cum_log_probs"][0, 0] == np.float32(-0.5) and out["output_log_probs"].shape == (2, 2, 3)
    reqs = [([1], SamplingParams(return_log_probs=True)), ([2, 3], SamplingParams())]
    events = [StreamEvent(0, 7, -1.0, False), StreamEvent(1, 8, -2.0, False), StreamEvent(0, 9, -0.5, True),
              StreamEvent(1, 6, -1.0, True)]
    steps = list(ts.stream_tensors(events, reqs, [0, 0]))
    assert [s["output_ids"].tolist() for s in steps] == [[[[1, 7, 0]], [[2, 3, 8]]], [[[1, 7, 9, 0]], [[2, 3, 8, 6]]]]
    assert steps[-1]["cum_log_probs"].tolist() == [[-1.5], [0.0]]


def test_repository_files(tiny_model_dir, tmp_path):
    folder = tr.write_model_repository(tiny_model_dir, str(tmp_path / "repo"), "gpt_moe", decoupled=True)
    cfg = open(os.path.join(folder, "config.pbtxt")).read()
    for text in ('name: "gpt_moe"', 'backend: "python"', "decoupled: True", 'key: "model_checkpoint_path"',
                 f'string_value: "{os.path.abspath(tiny_model_dir)}"', 'key: "tensor_para_size"',
                 'key: "pipeline_para_size"', 'key: "data_type"', 'key: "ftmoe_path"', "max_batch_size: 64"):
        assert text in cfg
    for name, dtype, dims, *_ in ts.INPUTS + ts.OUTPUTS:
        assert f'name: "{name}"' in cfg
    assert cfg.count("optional: true") == 15 and "TYPE_UINT64" in cfg and "TYPE_BOOL" in cfg
    compile(open(os.path.join(folder, "1", "model.py")).read(), "model.py", "exec")
    parser = argparse.ArgumentParser()
    tr.add_triton_parsers(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["triton-repo", "--model", tiny_model_dir, "--out", str(tmp_path / "r2"), "--decoupled",
                           "--checkpoint-path", "/models/1-gpu"])
    assert a.handler(a) == 0
    cfg = open(tmp_path / "r2" / "ftmoe_gpt" / "config.pbtxt").read()
    assert "decoupled: True" in cfg and 'string_value: "/models/1-gpu"' in cfg


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from ftmoe.llm import LLM

    return LLM(tiny_model_dir)


def test_backend_words_and_beams(llm):
    backend = ts.LLMBackend(llm)
    d = ft_inputs(PROMPTS, out_len=5, beam_width=[1, 2], bad_words_list=ts.word_list_tensor([[[441]], [[81]]]))
    out = ts.infer_batch(backend, d)
    want = llm.generate(PROMPTS, [SamplingParams(max_new_tokens=5, bad_words=[[441]]),
                                  SamplingParams(max_new_tokens=5, beam_width=2, bad_words=[[81]])])
    assert out["output_ids"].shape[:2] == (2, 2)
    got = [[out["output_ids"][b, k, :out["sequence_length"][b, k]].tolist() for k in range(2)] for b in range(2)]
    assert got[0][0] == want[0].output_ids and got[1] == want[1].output_ids


# ---- real tritonserver ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_inputs(mod, d):
    from tritonclient.utils import np_to_triton_dtype

    xs = [mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype)) for name, arr in d.items()]
    for x, arr in zip(xs, d.values()):
        x.set_data_from_numpy(arr)
    return xs


def rows(result) -> list[list[int]]:
    ids, n = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    return [ids[b, 0, :n[b, 0]].tolist() for b in range(ids.shape[0])]


def start(argv, env, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(client, proc, log_path, timeout=90.0, models=("ftmoe_gpt",)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if all(client.is_model_ready(m) for m in models):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready (exit code {proc.poll()}):\n{log_path.read_text()[-3000:]}")


def _serve(llm, decoupled):
    ports = SimpleNamespace(http=free_port(), grpc=free_port(), metrics=free_port())
    server = ts.serve_triton(llm, http_port=ports.http, grpc_port=ports.grpc, metrics_port=ports.metrics,
                             decoupled=decoupled, address="127.0.0.1", block=False, exit_timeout_secs=3)
    return server, ports


@pytest.fixture(scope="module")
def server(llm):
    srv, ports = _serve(llm, decoupled=False)
    yield ports
    srv.stop()


@needs_server
def test_http_greedy_ragged_batch(server, llm):
    import tritonclient.http as http

    with http.InferenceServerClient(f"127.0.0.1:{server.http}") as c:
        res = c.infer("ftmoe_gpt", client_inputs(http, ft_inputs(PROMPTS, out_len=6)))
    assert rows(res) == [o.output_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=6))]


@needs_server
def test_grpc_seeded_sampling_and_errors(server, llm):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    opt = dict(runtime_top_k=[0, 20], runtime_top_p=[0.9, 0.0], temperature=0.8, random_seed=[3, 4],
               is_return_log_probs=True)
    want = llm.generate(PROMPTS, [SamplingParams(max_new_tokens=7, top_p=0.9, temperature=0.8, seed=3,
                                                 return_log_probs=True),
                                  SamplingParams(max_new_tokens=7, top_k=20, temperature=0.8, seed=4,
                                                 return_log_probs=True)])
    with grpc.InferenceServerClient(f"127.0.0.1:{server.grpc}") as c:
        with pytest.raises(InferenceServerException, match="runtime_top_p"):
            c.infer("ftmoe_gpt", client_inputs(grpc, ft_inputs(PROMPTS, runtime_top_p=1.5)))
        res = c.infer("ftmoe_gpt", client_inputs(grpc, ft_inputs(PROMPTS, out_len=7, **opt)))  # still serving
    assert rows(res) == [o.output_ids for o in want]
    np.testing.assert_allclose(res.as_numpy("cum_log_probs")[:, 0], [o.cum_log_probs for o in want], rtol=1e-5)
    np.testing.assert_allclose(res.as_numpy("output_log_probs")[0, 0], want[0].output_log_probs, rtol=1e-5)


def stream(grpc_port, model, requests, counts):
    """Send `requests` on one gRPC stream; collect counts[i] (result, error) callbacks for each."""
    import tritonclient.grpc as grpc

    got: queue.Queue = queue.Queue()
    with grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as c:
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        out = []
        for inputs, n in zip(requests, counts):
            c.async_stream_infer(model, client_inputs(grpc, inputs))
            out.append([got.get(timeout=30) for _ in range(n)])
        c.stop_stream()
    assert got.empty()                                # nothing more than one response per step
    return out


@needs_server
def test_decoupled_grpc_stream(llm):
    srv, ports = _serve(llm, decoupled=True)
    try:
        steps, [bad] = stream(ports.grpc, "ftmoe_gpt", [ft_inputs(PROMPTS[:1], out_len=5),
                                                        ft_inputs(PROMPTS[:1], temperature=-1.0)], [5, 1])
    finally:
        srv.stop()
    want = llm.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5))[0].output_ids
    assert all(e is None for _, e in steps)
    assert [rows(r)[0] for r, _ in steps] == [want[:4 + i] for i in range(5)]   # prompt + tokens so far
    assert bad[1] is not None and "temperature" in str(bad[1])


@needs_server
def test_bundled_binary_serves_classic_repository(tiny_model_dir, llm, tmp_path):
    import tritonclient.http as http

    tr.write_model_repository(tiny_model_dir, str(tmp_path / "repo"))
    tr.write_model_repository(tiny_model_dir, str(tmp_path / "repo"), "ftmoe_gpt_stream", decoupled=True)
    port, grpc_port = free_port(), free_port()
    argv, env = tr.bundled_tritonserver(str(tmp_path / "repo"), str(tmp_path / "work"), port, grpc_port,
                                        free_port())
    env.pop("PYTHONPATH", None)                       # the stub ignores it: model.py finds ftmoe itself
    proc = start(argv, env, tmp_path / "server.log")
    try:
        with http.InferenceServerClient(f"127.0.0.1:{port}") as c:
            wait_ready(c, proc, tmp_path / "server.log", models=("ftmoe_gpt", "ftmoe_gpt_stream"))
            res = c.infer("ftmoe_gpt", client_inputs(http, ft_inputs(PROMPTS, out_len=4)))
            with pytest.raises(Exception, match="runtime_top_k"):
                c.infer("ftmoe_gpt", client_inputs(http, ft_inputs(PROMPTS, runtime_top_k=100000)))
        steps, [bad] = stream(grpc_port, "ftmoe_gpt_stream", [ft_inputs(PROMPTS, out_len=4),
                                                              ft_inputs(PROMPTS, runtime_top_p=[0.5, 2.0])], [4, 1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    want = [o.output_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=4))]
    assert rows(res) == want and rows(steps[-1][0]) == want and rows(steps[0][0]) == [w[:-3] for w in want]
    assert bad[1] is not None and "request 1" in str(bad[1]) and "runtime_top_p" in str(bad[1])


@needs_server
def test_run_triton_serve_stops_on_sigterm(tiny_model_dir, tmp_path):
    import tritonclient.http as http

    code = ("import argparse, sys; from ftmoe.entrypoints import triton_repo as tr; p = argparse.ArgumentParser(); "
            "p.add_argument('--model'); p.add_argument('--host'); tr.add_triton_serve_arguments(p); "
            "sys.exit(tr.run_triton_serve(p.parse_args()))")
    port = free_port()
    argv = [sys.executable, "-c", code, "--model", tiny_model_dir, "--host", "127.0.0.1", "--triton",
            f"--http-port={port}", f"--grpc-port={free_port()}", f"--metrics-port={free_port()}"]
    proc = start(argv, dict(os.environ), tmp_path / "serve.log")
    try:
        with http.InferenceServerClient(f"127.0.0.1:{port}") as c:
            wait_ready(c, proc, tmp_path / "serve.log")
            res = c.infer("ftmoe_gpt", client_inputs(http, ft_inputs(PROMPTS[:1], out_len=2)))
        assert res.as_numpy("sequence_length").tolist() == [[5]]
        proc.send_signal(signal.SIGTERM)              # `docker stop`: a clean exit, server stopped
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
