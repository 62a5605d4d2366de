"""The GPU scripts' host-side logic. scripts/ab_decode.py's switches: each variant sets what it
names while its graphs are captured, and everything is restored afterwards, so the next variant
starts clean; scripts/critical_path.py's accounting of a step's kernels."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from ftmoe.kernels import attention, configs, pdl, routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ab_decode", os.path.join(ROOT, "scripts", "ab_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_switches_apply_and_restore(ab, tmp_path, monkeypatch):
    monkeypatch.delenv("FTMOE_ATTN_SPLIT", raising=False)
    monkeypatch.setenv("FTMOE_GATE", "cublas")
    table = tmp_path / "t.json"
    entry = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    table.write_text(json.dumps({configs.shape_key(3, 40, 24, "bf16"): {"1": entry}}))
    rows, cfg_dir = pdl.MAX_ROWS, configs.CONFIG_DIR
    before = configs.get_config(3, 40, 24, "bf16", 1, "Probe GPU")
    with ab.switches(f"pdl=4096,gate=triton,attn=0,table={table}", "Probe GPU"):
        assert pdl.MAX_ROWS == 4096
        assert routing.gate_backend(8) == "triton" and attention.num_splits(16) == 1
        assert configs.get_config(3, 40, 24, "bf16", 1, "Probe GPU") == entry
    assert (pdl.MAX_ROWS, configs.CONFIG_DIR) == (rows, cfg_dir)
    assert os.environ["FTMOE_GATE"] == "cublas" and "FTMOE_ATTN_SPLIT" not in os.environ
    assert configs.get_config(3, 40, 24, "bf16", 1, "Probe GPU") == before
    with ab.switches("base", "Probe GPU"):
        assert pdl.MAX_ROWS == rows
    with pytest.raises(SystemExit, match="unknown switch"), ab.switches("warp=9", "Probe GPU"):
        pass
    assert pdl.MAX_ROWS == rows


def test_skip_switch_knocks_kernels_out_and_restores(ab):
    """skip=ln+attn+gate replaces those kernels in the model's step by stand-ins (timing only) and
    puts the originals back afterwards; an unknown part is an error."""
    from ftmoe import fast_model

    before = (fast_model.add_layernorm, fast_model.decode_attention, fast_model.gate_topk)
    with ab.switches("skip=ln+attn+gate", "Probe GPU"):
        assert fast_model.add_layernorm is not before[0] and fast_model.gate_topk is not before[2]
        x = torch.randn(3, 8)
        assert fast_model.add_layernorm(x, None, None, 1e-5)[1] is x
        probs, ids = fast_model.gate_topk(x, torch.zeros(8, 5), 2)
        assert ids.tolist() == [[0, 1], [2, 3], [4, 0]] and probs.shape == (3, 2)
        assert fast_model.decode_attention(torch.zeros(3, 3, 4, 16)).shape == (3, 4, 16)
    assert (fast_model.add_layernorm, fast_model.decode_attention, fast_model.gate_topk) == before
    with pytest.raises(SystemExit, match="skip: expected ln, attn or gate, found 'mlp'"), \
            ab.switches("skip=mlp", "Probe GPU"):
        pass
    assert (fast_model.add_layernorm, fast_model.decode_attention, fast_model.gate_topk) == before


def test_serving_host_overhead_script():
    """scripts/serving_host_overhead.py: a real server over the stand-in model; each stream gets
    every token and the TPOT it reports is at least what the stand-in's steps allow."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "serving_host_overhead.py"), "--step-ms", "2",
                          "--chunk", "4", "--clients", "2", "--tokens", "24"],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"--decode-chunk 4 \(overlapped\), 2 stream\(s\) of (\d+) tokens: TPOT ([\d.]+) ms", out.stdout)
    assert m, out.stdout
    # the first token a stream sees may come with the first chunk's 4: the other 19 take >= 19 steps
    assert int(m.group(1)) == 24 and float(m.group(2)) >= 0.97 * 2 * (24 - 1 - 4) / (24 - 1)


def test_critical_path_counts_each_kernels_advance_of_the_frontier(capsys):
    """scripts/critical_path.py: a kernel that ends inside the kernels before it (launched early
    under PDL) adds nothing; one that ends past them adds only what sticks out; the span is first
    start to last end (the advances add up to it), and the gap is from one replay's last end to
    the next one's first start."""
    spec = importlib.util.spec_from_file_location("critical_path", os.path.join(ROOT, "scripts", "critical_path.py"))
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    one = [("qkv", 0.0, 5.0), ("attn", 1.0, 7.0), ("merge", 6.0, 6.5), ("qkv", 7.5, 9.0)]
    cp.report("probe", [one, [(n, s + 20, e + 20) for n, s, e in one]], detail=4)
    out = capsys.readouterr().out
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in ("qkv", "attn", "merge")}
    # per step, mean duration, mean advance, advance per step (an idle gap counts to the kernel after it)
    assert rows["qkv"] == [2.0, 3.25, 3.5, 7.0]
    assert rows["attn"] == [1.0, 6.0, 2.0, 2.0] and rows["merge"] == [1.0, 0.5, 0.0, 0.0]
    assert sum(r[3] for r in rows.values()) == 9.0    # the advances add up to the span
    assert "span 9.0 us" in out and "end 11.0 us" in out
    cp.report("empty", [], 0)
    assert "no kernel events" in capsys.readouterr().out


def test_kernel_resources_programs_per_sm():
    """scripts/kernel_resources.py: programs of one kernel an H100 SM holds, and the limit."""
    spec = importlib.util.spec_from_file_location("kernel_resources", os.path.join(ROOT, "scripts", "kernel_resources.py"))
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    assert kr.per_sm(213, 8, 65536) == (1, "registers")      # 213 x 256 threads: 54.5K of 64K registers
    assert kr.per_sm(128, 8, 1024) == (2, "registers")
    assert kr.per_sm(96, 4, 16384) == (5, "registers")       # 96 x 32 = 3072 per warp, 12288 a program
    assert kr.per_sm(32, 4, 100 * 1024) == (2, "shared")
    assert kr.per_sm(16, 1, 0) == (32, "programs")
    assert kr.per_sm(16, 16, 0) == (4, "threads")


def _aot_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, extra.get("PYTHONPATH")])))
    return env


def _aot_ready() -> None:
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no ptxas: it cannot compile for a GPU here")


def test_aot_check_compiles_every_launch_for_sm90(tmp_path, monkeypatch):
    """scripts/aot_check.py: every distinct launch a tiny fp16 model's fast path makes in the
    interpreter (prefill, decode at 1 / 3 / 40 rows, the persistent expert GEMMs, the greedy
    kernels with the TP merge) compiles for sm_90 in bf16 and PDL mode, none skipped; the
    interpreter does not type-check what the compiler rejects."""
    import subprocess
    import sys

    _aot_ready()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))      # compiled here, not found in a cache
    monkeypatch.delenv("FTMOE_ATTN_SPLIT", raising=False)                  # the GPU's attention splits
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_check.py"), "--json", str(out)],
                       env=_aot_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["arch"] == 90 and not got["skipped"]
    assert all("error" not in x["result"] and x["result"]["shared"] >= 0 for x in got["results"])
    kernels = {x["kernel"].rsplit(".", 1)[1] for x in got["results"]}
    assert {"_greedy_kernel", "_greedy_merge_kernel", "_fused_moe_kernel", "_fused_moe_persistent_kernel",
            "_gemv_kernel", "_decode_attention_kernel", "_topk_align_kernel", "_add_layernorm_kernel"} <= kernels
    assert any(x["label"] == "bf16, PDL" for x in got["results"])
    assert " 0 failed" in r.stdout


def test_aot_check_dry_run_at_the_real_shapes(tmp_path, monkeypatch):
    """scripts/aot_check.py --preset: the 0.35B-MoE-64 shapes on the meta device (no memory, no
    kernel run), launched as on an H100 (its table, 132 SMs, PDL): decode at 1 and 64 rows compiles
    for sm_90, with the real sizes in the launches (H = 1024, F = 4096, 64 experts, V = 51,200), the
    TMA GEMV at 1 row, the aligned expert GEMMs at 64, and each kernel's programs per SM."""
    import subprocess
    import sys

    _aot_ready()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_check.py"), "--preset", "gpt-moe-0.35b-64e",
                        "--batches", "1,64", "--prefill", "none", "--json", str(out)],
                       env=_aot_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    ints = lambda x: {k: v["int"] for k, v in x["args"].items() if "int" in v}      # noqa: E731
    moe = [x for x in res if x["kernel"].endswith("._fused_moe_kernel")]
    assert any(ints(x).get("N") == 4096 and ints(x).get("K") == 1024 for x in moe)             # expert W1
    assert any(not x["args"]["DENSE"]["value"] and not x["args"]["PER_SLOT"]["value"] for x in moe)   # aligned
    assert any(x["kernel"].endswith("._gemv_kernel") and x["args"]["TMA"]["value"] for x in res)
    assert any(x["kernel"].endswith("._greedy_kernel") and ints(x).get("V") == 51200 for x in res)
    assert any(x["label"] == "as run" and x["args"].get("USE_PDL") == {"int": 1} for x in res)     # recorded so
    assert all(x["result"]["per_sm"] >= 1 and x["result"]["limit"] for x in res)


def test_aot_check_reports_a_kernel_that_does_not_compile(tmp_path, monkeypatch):
    """A kernel the interpreter runs but the compiler rejects (a scalar redefined as a block in a
    runtime branch) is a FAIL line and exit status 1; a good kernel beside it compiles."""
    import subprocess
    import sys

    _aot_ready()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "aot_bad_kernels.py").write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef bad(X, n, BLOCK: tl.constexpr):\n"
        "    acc = 0.0\n    if n > 3:\n        acc = tl.load(X + tl.arange(0, BLOCK))\n    tl.store(X, tl.sum(acc, 0))\n\n"
        "@triton.jit\ndef good(X, n, BLOCK: tl.constexpr):\n"
        "    tl.store(X + tl.arange(0, BLOCK), tl.load(X + tl.arange(0, BLOCK)) * n)\n")
    launch = {"args": {"X": {"ptr": "fp32", "aligned": True}, "n": {"int": 5}, "BLOCK": {"int": 16}},
              "options": {"num_warps": 4}}
    rec = tmp_path / "launches.json"
    rec.write_text(json.dumps({"launches": [dict(launch, kernel="aot_bad_kernels.bad"),
                                            dict(launch, kernel="aot_bad_kernels.good")], "skipped": []}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_check.py"), "--launches", str(rec)],
                       env=_aot_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL aot_bad_kernels.bad" in r.stdout and "ok   good" in r.stdout and "1 compiled, 1 failed" in r.stdout
