"""Tests for ftmoe.entrypoints: the OpenAI-compatible server, `serve`, and the serving benchmark.

In:  a tiny random GPT-MoE (vocab 512, 128 positions) converted with a small JiebaBPE
     tokenizer; real uvicorn servers on free 127.0.0.1 ports (in a thread over the real
     engine, and one `serve` subprocess for start-up and SIGTERM).
Out: HTTP results checked against `LLM.generate` on the same folder (greedy and seeded
     sampled text, token ids, log probs), streaming, stop strings, 32 concurrent requests,
     every bad request, overload (503), disconnects freeing KV blocks, API keys, graceful
     shutdown, and `run_bench_serving`. Traffic goes to 127.0.0.1 only; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from ftmoe.engine import AsyncEngine, LLMEngine  # noqa: E402
from ftmoe.entrypoints.bench_serving import run_bench_serving  # noqa: E402
from ftmoe.entrypoints.openai_server import build_app  # noqa: E402
from ftmoe.sampling import SamplingParams  # noqa: E402

PROMPTS = ["今天天气很好，我们", "人工智能的发展", "小明和小红"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from ftmoe.convert import convert
    from ftmoe.demo_tokenizer import build_jieba_bpe_tokenizer
    from ftmoe.synthetic import PRESETS, save_megatron_checkpoint

    d = tmp_path_factory.mktemp("serve_model")
    build_jieba_bpe_tokenizer(str(d / "tok"), vocab_size=512)
    ck = save_megatron_checkpoint(str(d / "ck"), PRESETS["tiny"], seed=3, dtype=torch.float32)
    return convert(ck, str(d / "out"), tp=1, dtype="fp32", tokenizer_dir=str(d / "tok"), progress=False)


@pytest.fixture(scope="module")
def llm(model_dir):
    from ftmoe.llm import LLM
    return LLM(model_dir)


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port from a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextlib.contextmanager
def serving(llm, tokenizer="same", api_key=None, **engine_kw):
    engine = AsyncEngine(LLMEngine(llm.model, **engine_kw))
    srv = ServerThread(build_app(engine, llm.tokenizer if tokenizer == "same" else tokenizer, "tiny", api_key))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(llm):
    with serving(llm, kv_cache_tokens=2048) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def wait_idle(url: str, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["ftmoe_kv_blocks_used"], m["ftmoe_running_requests"], m["ftmoe_queue_length"]) == (0, 0, 0):
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.05)


# ---- correctness against LLM.generate -------------------------------------------------
def test_models_health_metrics(server):
    r = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert r["data"][0]["id"] == "tiny" and r["data"][0]["max_model_len"] == 128
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    m = metrics(server.url)
    assert m["ftmoe_kv_blocks_total"] == 2048 // 16 and "ftmoe_kv_blocks_used" in m


def test_greedy_text_matches_llm(client, llm):
    ref = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, return_log_probs=True))
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, o in zip(r.choices, ref):
        assert c.text == o.text and c.token_ids == o.generated_ids and c.finish_reason == o.finish_reason
        assert c.logprobs.token_logprobs == pytest.approx(o.output_log_probs, abs=1e-4)
        assert len(c.logprobs.tokens) == 12 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)
        assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset[-1] <= len(c.text)
    n_prompt = sum(len(llm.encode(p)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 36)
    # token-id prompts, echo
    ids = llm.encode(PROMPTS[0])
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == llm.decode(ids) + ref[0].text


def test_openai_defaults_sample_like_ft(client, llm):
    """OpenAI's defaults (temperature 1, top_p 1) sample from the full distribution; choice i
    uses seed + i; top_k and temperature map to FT's."""
    p = PROMPTS[2]
    r = client.completions.create(model="tiny", prompt=p, max_tokens=10, seed=7, n=2)
    ref = llm.generate([p, p], [SamplingParams(max_new_tokens=10, top_p=1.0, seed=s) for s in (7, 8)])
    assert [c.token_ids for c in r.choices] == [o.generated_ids for o in ref]
    assert ref[0].generated_ids != ref[1].generated_ids
    greedy = llm.generate(p, SamplingParams(max_new_tokens=10))[0]
    assert ref[0].generated_ids != greedy.generated_ids
    r = client.completions.create(model="tiny", prompt=p, max_tokens=10, seed=3, temperature=0.7, top_p=0.9,
                                  extra_body={"top_k": 20})
    o = llm.generate(p, SamplingParams(max_new_tokens=10, seed=3, temperature=0.7, top_p=0.9, top_k=20))[0]
    assert r.choices[0].token_ids == o.generated_ids and r.choices[0].text == o.text


def test_stream_matches(client, server, llm):
    ref = llm.generate(PROMPTS[2], SamplingParams(max_new_tokens=16))[0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    body = [c for c in chunks if c.choices]
    assert len(body) == 16 and all(len(c.choices[0].token_ids) == 1 for c in body)
    assert [c.choices[0].token_ids[0] for c in body] == ref.generated_ids
    assert "".join(c.choices[0].text for c in body) == ref.text
    assert [c.choices[0].finish_reason for c in body] == [None] * 15 + [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 3, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert len(lines) == 4 and lines[-1] == "data: [DONE]" and all(x.startswith("data: {") for x in lines[:3])


def test_stream_batch_n_echo_matches_non_stream(server, llm):
    body = {"prompt": [[5, 6, 7], [300, 2, 9]], "n": 2, "max_tokens": 6, "seed": 11, "echo": True}
    texts, ids = [""] * 4, [[] for _ in range(4)]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    texts[ch["index"]] += ch["text"]
                    ids[ch["index"]] += ch["token_ids"]
    assert [c["index"] for c in whole] == [0, 1, 2, 3]
    assert texts == [c["text"] for c in whole] and ids == [c["token_ids"] for c in whole]
    assert whole[0]["text"].startswith(llm.decode([5, 6, 7])) and whole[2]["text"].startswith(llm.decode([300, 2, 9]))


def test_stop_strings_are_cut(client, llm):
    full = llm.generate(PROMPTS[2], SamplingParams(max_new_tokens=20, ignore_eos=True))[0].text
    assert len(full) >= 8, full
    stop = full[3:5]
    want = full[:full.find(stop)]
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(stop=["never-there", stop], **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = [c for c in client.completions.create(stop=stop, stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) < 20


def test_32_concurrent_requests_match_one_at_a_time(server, llm):
    rng = random.Random(0)
    reqs = []
    for i in range(32):
        body = {"prompt": [rng.randrange(8, 512) for _ in range(rng.randint(1, 60))], "max_tokens": rng.randint(1, 20)}
        if i % 2:
            body.update(temperature=0.8, top_k=20, seed=i)
        else:
            body.update(temperature=0)
        reqs.append(body)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in reqs))

    outs = asyncio.run(asyncio.wait_for(run(), 80))
    for b, r in zip(reqs, outs):
        assert r.status_code == 200, r.text
        p = (SamplingParams(max_new_tokens=b["max_tokens"], temperature=0.8, top_k=20, top_p=1.0, seed=b["seed"])
             if "seed" in b else SamplingParams(max_new_tokens=b["max_tokens"]))
        o = llm.generate([b["prompt"]], p)[0]
        ch = r.json()["choices"][0]
        assert (ch["token_ids"], ch["text"], ch["finish_reason"]) == (o.generated_ids, o.text, o.finish_reason)
    wait_idle(server.url)


# ---- errors, overload, disconnects, keys -----------------------------------------------
BAD = [
    (b"{not json", 400, None), (b"[1, 2]", 400, None), ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"), ({"prompt": [1, "a"]}, 400, "prompt"), ({"prompt": []}, 400, "prompt"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt"), ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"), ({"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ({"prompt": [9] * 200}, 400, "prompt"), ({"prompt": [9, 9], "max_tokens": 200}, 400, "max_tokens"),
    ({"prompt": [99999]}, 400, None), ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"), ({"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"), ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo"), ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"), ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "repetition_penalty": 1.2, "presence_penalty": 0.5}, 400, None),
]


def test_bad_requests_get_their_status_and_server_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body, status, param in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post("/v1/completions", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
            if param is not None:
                assert err["param"] == param, (body, err)
        r = c.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["message"]
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    wait_idle(server.url)


def test_overload_gets_503(llm):
    with serving(llm, kv_cache_tokens=1024, max_num_seqs=1, max_queue=1) as srv:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = {"prompt": [10, 11, 12], "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

        outs = asyncio.run(asyncio.wait_for(run(), 60))
        codes = [r.status_code for r in outs]
        assert set(codes) == {200, 503}, codes
        bad = next(r for r in outs if r.status_code == 503)
        assert bad.json()["error"]["code"] == "overloaded" and bad.headers["retry-after"] == "1"
        assert all(len(r.json()["choices"][0]["token_ids"]) == 40 for r in outs if r.status_code == 200)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        # a non-streaming client that gives up while queued has its request aborted
        before = metrics(srv.url)
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": [5], "max_tokens": 120, "ignore_eos": True, "stream": True}) as a:
            next(a.iter_lines())
            with pytest.raises(httpx.TimeoutException):
                httpx.post(srv.url + "/v1/completions", timeout=0.2,
                           json={"prompt": [6], "max_tokens": 120, "ignore_eos": True})
        after = wait_idle(srv.url)
        key = 'ftmoe_requests_total{finish_reason="%s"}'
        assert after.get(key % "length", 0) - before.get(key % "length", 0) <= 1
        assert after.get(key % "abort", 0) - before.get(key % "abort", 0) >= 1


def test_disconnect_mid_stream_frees_blocks(server):
    before = metrics(server.url)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
        lines = (x for x in r.iter_lines() if x)
        for _ in range(3):
            assert next(lines).startswith("data: {")
        assert metrics(server.url)["ftmoe_kv_blocks_used"] > 0
    after = wait_idle(server.url)
    key = 'ftmoe_requests_total{finish_reason="abort"}'
    assert after[key] == before.get(key, 0) + 1


def test_api_key_and_no_tokenizer(llm):
    with serving(llm, tokenizer=None, api_key="s3cret", kv_cache_tokens=512) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5]}, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        r = c.completions.create(model="tiny", prompt=[5, 6], max_tokens=3, logprobs=1)
        assert r.choices[0].text == "" and len(r.choices[0].token_ids) == 3
        assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in r.choices[0].token_ids]
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            c.completions.create(model="tiny", prompt="hello", max_tokens=3)
        with pytest.raises(openai.BadRequestError, match="need a tokenizer"):
            c.completions.create(model="tiny", prompt=[5], max_tokens=3, stop="x")


def test_bench_serving(server):
    r = run_bench_serving(server.url, num_requests=20, request_rate=200.0, prompt_len_range=(4, 32), max_tokens=8,
                          seed=0, model=None, timeout=30, max_duration=60)
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (20, 0, 160), r["errors"]
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and 0 < r["median_itl_ms"] <= r["p99_itl_ms"]
    assert r["mean_tpot_ms"] > 0 and r["request_throughput"] > 0 and r["output_throughput"] > 0
    assert 4 * 20 <= r["total_input_tokens"] <= 32 * 20
    json.dumps(r)
    r = run_bench_serving(server.url, num_requests=6, request_rate=float("inf"), prompt_len_range=(4, 8), max_tokens=5,
                          seed=1, model=None, timeout=30, max_duration=60,
                          sampling={"temperature": 0.8, "top_p": 0.9, "top_k": 40})     # sampled traffic
    assert (r["completed"], r["total_output_tokens"]) == (6, 30), r["errors"]


def test_bench_serving_cli_several_rates(server, tmp_path, capsys):
    from ftmoe.cli import main

    path = tmp_path / "rates.json"
    argv = ["bench", "serving", "--base-url", server.url, "--request-rate", "50,inf", "--num-requests", "4,6",
            "--prompt-len", "8:16", "--max-tokens", "4", "--warmup", "3", "--timeout", "30", "--max-duration", "60",
            "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmup: 3/3 requests" in out and out.count("Serving Benchmark Result") == 2
    summary = out[out.index("Serving benchmark summary"):].splitlines()
    assert summary[3].split()[:2] == ["50", "4/4"] and summary[4].split()[:2] == ["inf", "6/6"]
    runs = json.loads(path.read_text())
    assert [(r["request_rate"], r["completed"], r["total_output_tokens"], r["prompt_len"]) for r in runs] == \
        [(50.0, 4, 16, [8, 16]), (float("inf"), 6, 24, [8, 16])]
    assert all(8 * r["completed"] <= r["total_input_tokens"] <= 16 * r["completed"] for r in runs)
    # one rate: the JSON is that rate's dict, as before
    assert main(argv[:4] + ["--request-rate", "10", "--num-requests", "2", "--prompt-len", "8:16", "--max-tokens", "2", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["completed"] == 2


def test_bench_serving_cli_errors(tmp_path, capsys):
    from ftmoe.cli import main

    with socket.socket() as s:            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    path = tmp_path / "dead.json"
    assert main(["bench", "serving", "--base-url", url, "--request-rate", "1,inf", "--json", str(path)]) == 1
    runs = json.loads(path.read_text())
    assert [r["request_rate"] for r in runs] == [1.0, float("inf")] and all("ConnectError" in r["error"] for r in runs)
    out = capsys.readouterr()
    assert "rate inf/s: failed: ConnectError" in out.err and "    inf  error: ConnectError" in out.out
    assert main(["bench", "serving", "--base-url", url, "--request-rate", "1,2,4", "--num-requests", "3,4"]) == 1
    assert "3 rates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "serving", "--request-rate", "1,x"])
    assert "comma-separated numbers" in capsys.readouterr().err


def test_serve_option_errors(model_dir, capsys):
    """serve's engine options are checked before anything loads: one line, exit status 1."""
    from ftmoe.cli import main

    assert main(["serve", "--model", model_dir, "--decode-chunk", "0"]) == 1
    assert capsys.readouterr().err.strip() == "ftmoe: error: --decode-chunk must be 1..32, found 0"
    assert main(["serve", "--model", model_dir, "--max-num-seqs", "0"]) == 1
    assert capsys.readouterr().err.strip() == "ftmoe: error: --max-num-seqs must be >= 1, found 0"


# ---- the serve command: start-up, SIGTERM drains in-flight streams ----------------------
def test_serve_subprocess_sigterm_drains(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ftmoe.entrypoints.serve", "serve", "--model", model_dir, "--port", str(port),
           "--served-model-name", "tiny", "--log-level", "warning", "--kv-cache-tokens", "512"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "serve did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = (x for x in r.iter_lines() if x)
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]" and len(rest) == 100   # 99 more tokens, then [DONE]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
