"""Writes OUT/old_table.json: this GPU's kernel table with the QKV GEMM at 32 / 64 rows on cuBLAS
(the sixteenth session's entries), for `scripts/ab_decode.py table=OUT/old_table.json` A/Bs
(rounds 35 and 36). Usage: python3 scripts/old_qkv_table.py OUT"""
import json
import sys

import torch

name = "NVIDIA_H100_80GB_HBM3" if "H200" not in torch.cuda.get_device_name() else "NVIDIA_H200"
t = json.load(open(f"ftmoe/kernels/configs/{name}.json"))
for m in ("32", "64"):
    t["dense:N=3072,K=1024,dtype=bf16"][m] = {"backend": "cublas"}
json.dump(t, open(f"{sys.argv[1]}/old_table.json", "w"), indent=1)
