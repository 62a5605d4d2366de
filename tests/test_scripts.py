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
