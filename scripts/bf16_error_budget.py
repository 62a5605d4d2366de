"""How much of the fast path's bf16 error is bf16 itself: fast (kernels) vs fp32 reference, vs the
bf16 reference model, on the tiny synthetic model. Usage: python3 scripts/bf16_error_budget.py"""
import tempfile

import torch

from ftmoe.convert import convert
from ftmoe.fast_model import FastGPTMoE
from ftmoe.kv_cache import KVCache
from ftmoe.loader import load_model
from ftmoe.synthetic import PRESETS, save_megatron_checkpoint

d = tempfile.mkdtemp()
ck = save_megatron_checkpoint(d + "/ck", PRESETS["tiny"], seed=1, dtype=torch.float32)
md = convert(ck, d + "/out", tp=1, dtype="fp32", progress=False)
ref32 = load_model(md, "float32", "cuda")
ref16 = load_model(md, "bfloat16", "cuda")
fast = FastGPTMoE(ref16)
seq = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(0)).cuda()
want = ref32(seq)[0]
cache = KVCache.for_model(ref16.config, 256, dtype=torch.bfloat16, device="cuda")
cache.add(0)
got = fast(seq, cache.prepare([0], [80]), cache, last_only=False)[0]
b16 = ref16(seq)[0]
rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
print(f"fast vs fp32 {rel(got, want):.4f}  bf16-ref vs fp32 {rel(b16, want):.4f}  fast vs bf16-ref {rel(got, b16):.4f}")
