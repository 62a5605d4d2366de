"""Compile, for a GPU architecture and without a GPU, every distinct Triton launch that a tiny
model's fast path makes, to catch what Triton's CPU interpreter accepts and the compiler does not.

The interpreter runs a kernel's Python body as numpy: it does not type-check control flow (a
variable that is a scalar before a runtime `if` and a block inside it compiles to an error), nor
lower anything, so CPU-only work can reach a GPU call that fails at its first compile and costs
device time. This script:
1. records (in a subprocess under TRITON_INTERPRET=1) each launch's kernel, argument types
   (pointer dtypes, integer widths, tensor descriptors' block shapes, 16-byte alignment) and
   constexpr values while a tiny fp16 model prefills and decodes (batches 1, 3 and 40; 40 takes the
   aligned expert path) with the switches in --env set, the persistent expert GEMMs, the LN
   weights after the wait, and the greedy chunks' kernels (the tensor-parallel merge too);
2. compiles each distinct launch for sm_<--arch> (default 90) with every fp16 pointer made bf16
   (the production dtype, which the interpreter cannot run; --fp16: as recorded too), and kernels
   with a USE_PDL switch also in PDL mode 1, printing registers, spills and shared memory.
Exit status 1 if any compile fails. The shapes are the tiny model's, so the block sizes are not the
real ones: this checks that the code compiles, not what it costs (scripts/kernel_resources.py on a
GPU does that).
With --preset (e.g. gpt-moe-0.35b-64e) it records that preset's real shapes instead, on the meta
device without running a kernel (decode at --batches, their greedy kernels, a --prefill), launched
as on --gpu (its tuned table, its SMs, PDL where a step allows it): the production kernels'
registers, shared memory and programs per SM, as scripts/kernel_resources.py reports them on a GPU.
Usage: python3 scripts/aot_check.py [--arch 90] [--fp16] [--json out.json] [--env FTMOE_GEMV=0 ...]
       python3 scripts/aot_check.py --preset gpt-moe-0.35b-64e [--batches 1,8,64,256] [--prefill 8x512]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from kernel_resources import per_sm  # noqa: E402  (programs of a kernel one Hopper SM holds)

_DT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int8": "i8", "int16": "i16",
       "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")


# ---- 1. recording, under the interpreter -----------------------------------------------------
def describe(arg) -> dict | None:
    """One argument as JSON: a pointer's dtype and 16-byte alignment, an int, float or bool's value,
    a tensor descriptor's dtype and block shape; None where it cannot be described."""
    import torch

    if isinstance(arg, torch.Tensor):
        return {"ptr": _DT[str(arg.dtype).split(".")[1]], "aligned": arg.data_ptr() % 16 == 0}
    if type(arg).__name__ == "TensorDescriptor":
        return {"desc": _DT[str(arg.base.dtype).split(".")[1]], "block": list(arg.block_shape)}
    if isinstance(arg, bool) or arg is None:
        return {"value": arg}
    if isinstance(arg, int):
        return {"int": arg}
    if isinstance(arg, float):
        return {"float": arg}
    if hasattr(arg, "value") and not callable(arg.value):     # tl.constexpr
        return {"value": arg.value}
    if hasattr(arg, "name") and type(arg).__name__ == "dtype":   # a tl dtype passed as a constexpr
        return {"tl_dtype": arg.name}
    return None


class Recorder:
    """Wraps the interpreter's launch to keep one description per distinct launch; dry: without
    running the kernel (a model on the meta device: shapes only)."""

    def __init__(self, dry: bool = False):
        self.launches: dict[str, dict] = {}
        self.skipped: set[str] = set()
        self.dry = dry

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._cls, self._orig = InterpretedFunction, InterpretedFunction.run
        rec = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            rec.add(fn_self.fn, args, kwargs)
            if not rec.dry:
                return rec._orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig

    def add(self, fn, args, kwargs) -> None:
        names = list(inspect.signature(fn).parameters)
        where = f"{fn.__module__}.{fn.__name__}"
        desc = {"kernel": where, "args": {}, "options": {}}
        for name, a in [*zip(names, args), *((k, v) for k, v in kwargs.items() if k in names)]:
            d = describe(a)
            if d is None:
                self.skipped.add(f"{where} ({name}: {type(a).__name__})")
                return
            desc["args"][name] = d
        desc["options"] = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        self.launches.setdefault(json.dumps(desc, sort_keys=True), desc)


def workload() -> None:
    """A tiny fp16 model's prefill and decode steps through the fast path (the aligned expert path
    at 40 rows, the persistent expert GEMMs, the greedy kernels), with the CPU's switches."""
    import torch

    from ftmoe import fast_model
    from ftmoe.bench import config_of, random_model
    from ftmoe.fast_model import FastGPTMoE
    from ftmoe.kernels import advance, routing
    from ftmoe.kv_cache import KVCache

    torch.manual_seed(0)
    cfg = config_of("tiny")
    model = random_model(cfg, torch.float16, "cpu", seed=0)
    fast = FastGPTMoE(model)

    def run(B: int, ctx: int) -> None:
        cache = KVCache.for_model(cfg, B * (ctx + 16), block_size=16, dtype=torch.float16)
        seqs = list(range(B))
        for s in seqs:
            cache.add(s)
        ids = torch.randint(0, cfg.vocab_size, (B, ctx))
        fast(ids, cache.prepare(seqs, [ctx] * B), cache, last_only=True)              # prefill
        tok = torch.randint(0, cfg.vocab_size, (B, 1))
        fast(tok, cache.prepare(seqs, [1] * B), cache, last_only=True)                # decode

    run(1, 5)
    run(3, 9)
    run(40, 2)
    for switch, value, B in (("FTMOE_MOE_PERSISTENT", "1", 40), ("FTMOE_LN_PRELOAD", "0", 3)):
        os.environ[switch] = value                                  # switches set the other way
        run(B, 2)
        del os.environ[switch]
    routing.moe_align(torch.randint(0, cfg.expert_num, (300,), dtype=torch.int32), cfg.expert_num, 16)  # sorted align
    B, V, tp = 3, 300, 2
    bs, nb = 16, 4
    s = advance.step_inputs(torch.zeros((4 + nb) * B + 1, dtype=torch.int32), B, nb)
    toks, lps = torch.zeros(8, B, dtype=torch.long), torch.zeros(8, B)
    logits = torch.randn(B, V).half()
    for lp in (None, lps):
        advance.greedy_advance(logits, toks, lp, s, bs, advance.GreedyWork(B, V, "cpu"))
        parts = torch.zeros(tp, 3, B)
        advance.greedy_advance(logits, toks, lp, s, bs, advance.GreedyWork(B, V, "cpu"), part=parts[0])
        advance.greedy_merge(parts, toks, lp, s, bs, V * tp)
    assert fast_model.SMALL_BATCH_SLOTS < 40 * cfg.moe_k


def workload_dry(preset: str, batches: list[int], gpu: str, sms: int, prefill: tuple[int, int] | None) -> None:
    """A preset's real shapes on the meta device (no memory, no kernel run): decode steps at
    `batches` (their short-context variants and greedy-chunk kernels) and a B x T prefill, launched as on a Hopper GPU
    named `gpu` with `sms` SMs: its tuned table, its SM count, PDL where the step allows it."""
    import contextlib

    import torch

    from ftmoe.bench import config_of
    from ftmoe.fast_model import FastGPTMoE
    from ftmoe.kernels import advance, attention, fused_moe, gemv, norm, pdl, routing
    from ftmoe.kv_cache import KVCache
    from ftmoe.model import GPTMoE

    def hopper_launch(t):      # pdl.launch_kwargs where the device supports PDL
        mode = pdl._ALLOWED.get()
        if mode == pdl.EARLY and pdl._FEEDING.get():
            mode = pdl.FEED
        return {"USE_PDL": mode, "launch_pdl": True} if mode else {}

    with contextlib.ExitStack() as undo:
        for mod in (advance, attention, fused_moe, gemv, norm, routing):
            undo.callback(setattr, mod, "launch_kwargs", mod.launch_kwargs)
            mod.launch_kwargs = hopper_launch
        for mod in (gemv, fused_moe):
            undo.callback(setattr, mod, "sm_count", mod.sm_count)
            mod.sm_count = lambda device: sms
        cfg = config_of(preset)
        with torch.device("meta"):
            model = GPTMoE(cfg, torch.bfloat16)
        fast = FastGPTMoE(model)
        fast.device_name = gpu
        ctx = 128
        nb = -(-(ctx + 32) // 16)
        for B in batches:
            cache = KVCache.for_model(cfg, B * nb * 16, block_size=16, dtype=torch.bfloat16, device="meta")
            z = torch.zeros(B, dtype=torch.int32, device="meta")
            tables = torch.zeros(B, nb, dtype=torch.int32, device="meta")
            logits = fast.decode_step(z, z, tables, z, z, cache, fp32_logits=False)
            if attention.one_pass_differs(B * fast.heads):       # the short-context graphs' attention
                for c, _ in attention.ONE_PASS_TILES:
                    fast.decode_step(z, z, tables, z, z, cache, max_ctx=c)
            s = advance.step_inputs(torch.zeros((4 + nb) * B + 1, dtype=torch.int32, device="meta"), B, nb)
            toks = torch.zeros(32, B, dtype=torch.long, device="meta")
            advance.greedy_advance(logits, toks, None, s, 16, advance.GreedyWork(B, cfg.vocab_size, "meta"))
        if prefill:
            B, T = prefill
            cache = KVCache.for_model(cfg, B * T, block_size=16, dtype=torch.bfloat16, device="meta")
            seqs = list(range(B))
            for q in seqs:
                cache.add(q)
            meta = cache.prepare(seqs, [T] * B)
            fast.prefill(torch.zeros(B, T, dtype=torch.long, device="meta"), meta, cache, last_only=True, ragged=False)


def record(out: str, env: list[str], dry: dict | None = None) -> None:
    for kv in env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    with Recorder(dry=dry is not None) as rec:
        if dry is None:
            workload()
        else:
            workload_dry(**dry)
    with open(out, "w") as f:
        json.dump({"launches": list(rec.launches.values()), "skipped": sorted(rec.skipped)}, f)


# ---- 2. compiling, without the interpreter ------------------------------------------------------
def _variants(launches: list[dict], fp16: bool = False) -> list[tuple[str, dict]]:
    """(label, launch) to compile: each with its fp16 pointers / descriptors made bf16 (as recorded
    where it has none; fp16: both), and, once per kernel with a USE_PDL switch that ran without
    it, in PDL mode 1."""
    out, seen, pdl_done = [], set(), set()

    def add(label, d):
        key = json.dumps(d, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((label, d))

    for d in launches:
        bf = json.loads(json.dumps(d).replace('"fp16"', '"bf16"'))
        if fp16 or bf == d:
            add("as run", d)
        add("bf16", bf)
        pdl = d["args"].get("USE_PDL")      # recorded as {"int": mode} (or {"value": False})
        ran_pdl = pdl is not None and bool(next(iter(pdl.values())))
        if d["kernel"] not in pdl_done and not ran_pdl and _has_param(d["kernel"], "USE_PDL"):
            pdl_done.add(d["kernel"])
            p = json.loads(json.dumps(bf))
            p["args"]["USE_PDL"] = {"int": 1}
            p["options"]["launch_pdl"] = True
            add("bf16, PDL", p)
    return out


def _kernel(where: str):
    mod, _, name = where.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def _has_param(where: str, name: str) -> bool:
    return name in _kernel(where).arg_names


def compile_one(d: dict, arch: int) -> dict:
    """Compile one launch description; returns its kernel's resources (regs, spills, shared) or error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(d["kernel"])
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        a = d["args"].get(p.name)
        if p.is_constexpr:
            if a is None:
                v = p.default
                v = getattr(v, "value", v)
            elif "tl_dtype" in a:
                v = triton.language.dtype(a["tl_dtype"])
            else:
                v = next(iter(a.values()))
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        if a is None:
            raise ValueError(f"{d['kernel']}: argument {p.name} was not recorded")
        if "ptr" in a:
            sig[p.name] = "*" + a["ptr"]
            if a["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "desc" in a:
            sig[p.name] = f"tensordesc<{a['desc']}[{','.join(str(b) for b in a['block'])}]>"
        elif "int" in a:
            v = a["int"]
            if v == 1 and not p.do_not_specialize:          # as the JIT specializes it: a constant 1,
                sig[p.name], consts[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:      # or divisible by 16
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float" in a:
            sig[p.name] = "fp32"
        elif a.get("value") is None:              # None: the JIT makes it a constexpr
            sig[p.name], consts[p.name] = "constexpr", None
        else:                                     # a bool passed to a runtime parameter
            sig[p.name] = "i1"
    opts = {k: v for k, v in d["options"].items() if k in _OPTIONS}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
    res = {"regs": None, "spills": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            ru = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", ru)
        if m:
            res = {"regs": int(m.group(1)), "spills": int(m.group(2))}
    return dict(res, shared=k.metadata.shared, seconds=round(time.perf_counter() - t0, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", default=None, help="write the launches and their results here")
    ap.add_argument("--fp16", action="store_true", help="also compile the fp16 launches as recorded")
    ap.add_argument("--env", nargs="*", default=[], help="switches (NAME=VALUE) set while the launches are recorded")
    ap.add_argument("--launches", default=None, help="compile the launches recorded in this file (a --json "
                    "output, or the recording's own file) instead of recording them")
    ap.add_argument("--preset", default=None, help="record a preset's real shapes instead (e.g. gpt-moe-0.35b-64e): "
                    "a dry run on the meta device, launched as on --gpu")
    ap.add_argument("--batches", default="1,8,64,256", help="with --preset: decode batch sizes")
    ap.add_argument("--prefill", default="8x512", help="with --preset: BxT, or none")
    ap.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="with --preset: the GPU whose tuned table it uses")
    ap.add_argument("--sms", type=int, default=132, help="with --preset: that GPU's SMs")
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)      # (the recording subprocess)
    ap.add_argument("--dry", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.record:
        record(a.record, a.env, json.loads(a.dry) if a.dry else None)
        return 0
    dry = None
    if a.preset:
        dry = {"preset": a.preset, "batches": [int(b) for b in a.batches.split(",")], "gpu": a.gpu, "sms": a.sms,
               "prefill": None if a.prefill == "none" else [int(v) for v in a.prefill.lower().split("x")]}
    if a.launches:
        with open(a.launches) as f:
            recorded = json.load(f)
        if "results" in recorded:
            recorded = {"launches": [{k: r[k] for k in ("kernel", "args", "options")} for r in recorded["results"]],
                        "skipped": recorded.get("skipped", [])}
    else:
        with tempfile.TemporaryDirectory() as d:
            rec = os.path.join(d, "launches.json")
            env = dict(os.environ, TRITON_INTERPRET="1")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--record", rec, "--env", *a.env,
                                *(["--dry", json.dumps(dry)] if dry else [])], env=env)
            if r.returncode:
                print(f"aot_check: recording the launches failed (exit {r.returncode})", file=sys.stderr)
                return 1
            with open(rec) as f:
                recorded = json.load(f)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: run without TRITON_INTERPRET=1 (it compiles)", file=sys.stderr)
        return 1
    todo = _variants(recorded["launches"], a.fp16)
    print(f"{len(recorded['launches'])} distinct launches recorded, {len(todo)} to compile for sm_{a.arch}", flush=True)
    for s in recorded["skipped"]:
        print(f"  not compiled (an argument it cannot describe): {s}")
    results, failed = [], 0
    for label, d in todo:
        fn = _kernel(d["kernel"])
        consts = {p.name: next(iter(d["args"][p.name].values())) for p in fn.params
                  if p.is_constexpr and p.name in d["args"]}
        try:
            res = compile_one(d, a.arch)
            warps = d["options"].get("num_warps", 4)
            fit = ""
            if res["regs"] is not None:
                res["per_sm"], res["limit"] = per_sm(res["regs"], warps, res["shared"])
                fit = f" {res['per_sm']}/SM ({res['limit']})"
            print(f"ok   {d['kernel'].rsplit('.', 1)[1]:<34} {label:<10} regs {res['regs']} spills {res['spills']} "
                  f"smem {res['shared']} warps {warps}{fit} {consts}", flush=True)
        except Exception as e:       # a compile error: report it and go on
            failed += 1
            msg = str(e).strip().splitlines()
            res = {"error": msg[-1][:300] if msg else type(e).__name__}
            print(f"FAIL {d['kernel']} {label} {consts}: {res['error']}", flush=True)
        results.append(dict(d, label=label, result=res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "results": results, "skipped": recorded["skipped"]}, f, indent=1)
    print(f"{len(todo) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
