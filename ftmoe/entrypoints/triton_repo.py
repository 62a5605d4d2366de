"""A classic Triton model repository for ftmoe, and the CLI glue for Triton serving.

In:  a converted model folder (`<out>/<t>-gpu/` or its parent) and an output folder.
Out: `write_model_repository` -> `<repo>/<name>/config.pbtxt` (backend "python", FT's GPT
     tensors from `triton_server.INPUTS/OUTPUTS`, `model_transaction_policy { decoupled }`,
     FT's parameters `model_checkpoint_path`, `data_type`, `tensor_para_size`,
     `pipeline_para_size`, plus `device` and `ftmoe_path`) and `<repo>/<name>/1/model.py`
     (a `TritonPythonModel` calling `triton_server.infer_batch` / `infer_stream`: the same
     request mapping as `serve_triton`). Returns the model folder.
     `bundled_tritonserver` -> (argv, env) running pytriton's tritonserver binary on a repository.
     `add_triton_parsers` / `run_triton_repo`: the `ftmoe triton-repo` command;
     `add_triton_serve_arguments` / `run_triton_serve`: flags and body of `ftmoe serve --triton`.

Triton's python stub ignores PYTHONPATH, so model.py puts `ftmoe_path` (where this ftmoe was
imported from) first on sys.path; torch and numpy must be installed for the Python that the
stub embeds (in NVIDIA's containers: `pip install` ftmoe's dependencies there).
"""
from __future__ import annotations

import os
import shutil
import sys

from ..errors import FtmoeError
from .triton_server import INPUTS, OUTPUTS, stub_env

_TYPES = {"uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "int32": "TYPE_INT32",
          "float32": "TYPE_FP32", "bool": "TYPE_BOOL"}
DATA_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

MODEL_PY = '''"""Triton python-backend model serving ftmoe with FasterTransformer's GPT tensors.

Written by `ftmoe triton-repo`. In: config.pbtxt parameters (model_checkpoint_path, data_type,
tensor_para_size, pipeline_para_size, device, ftmoe_path) and requests with FT's GPT inputs.
Out: FT's GPT outputs; decoupled: one response per decoding step. A bad request gets an error
response. The stub ignores PYTHONPATH: ftmoe_path is put first on sys.path.
"""
import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if p.get("ftmoe_path") and p["ftmoe_path"] not in sys.path:
            sys.path.insert(0, p["ftmoe_path"])
        from ftmoe.entrypoints import triton_server
        from ftmoe.entrypoints.triton_repo import DATA_TYPES
        from ftmoe.llm import LLM

        self.ts = triton_server
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        llm = LLM(p["model_checkpoint_path"], dtype=DATA_TYPES[p.get("data_type", "fp32")],
                  device=p.get("device", "cpu"), tp=int(p.get("tensor_para_size", "1")),
                  pp=int(p.get("pipeline_para_size", "1")))
        self.backend = triton_server.LLMBackend(llm)

    def _inputs(self, request):
        tensors = ((n, pb_utils.get_input_tensor_by_name(request, n)) for n, *_ in self.ts.INPUTS)
        return {n: t.as_numpy() for n, t in tensors if t is not None}

    @staticmethod
    def _response(tensors):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])

    @staticmethod
    def _error(e):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))

    def execute(self, requests):
        responses = []
        for request in requests:
            if not self.decoupled:
                try:
                    responses.append(self._response(self.ts.infer_batch(self.backend, self._inputs(request))))
                except Exception as e:  # noqa: BLE001 - every failure becomes this request's error
                    responses.append(self._error(e))
                continue
            sender = request.get_response_sender()
            try:
                for tensors in self.ts.infer_stream(self.backend, self._inputs(request)):
                    sender.send(self._response(tensors))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # noqa: BLE001
                sender.send(self._error(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None if self.decoupled else responses

    def finalize(self):
        self.backend.llm.close()
'''


def _tensor(name: str, dtype, dims: tuple, optional: bool | None) -> str:
    lines = [f'    name: "{name}"', f"    data_type: {_TYPES[dtype.__name__.rstrip('_')]}",
             f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
    if dims == (1,):
        lines.append("    reshape: { shape: [ ] }")           # as FT's config: a scalar per request
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(name: str, model_dir: str, decoupled: bool = False, max_batch_size: int = 64,
                 data_type: str = "fp32", device: str = "cpu", tensor_para_size: int = 1,
                 pipeline_para_size: int = 1, ftmoe_path: str | None = None) -> str:
    """The config.pbtxt text (FT's gpt config layout, backend "python")."""
    import ftmoe

    ftmoe_path = ftmoe_path or os.path.dirname(os.path.dirname(os.path.abspath(ftmoe.__file__)))
    params = {"model_type": "GPT-MoE", "model_checkpoint_path": model_dir, "data_type": data_type,
              "tensor_para_size": str(tensor_para_size), "pipeline_para_size": str(pipeline_para_size),
              "device": device, "ftmoe_path": ftmoe_path}
    ins = ",\n".join(_tensor(n, d, s, o) for n, d, s, o in INPUTS)
    outs = ",\n".join(_tensor(n, d, s, None) for n, d, s in OUTPUTS)
    text = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
            f"model_transaction_policy {{\n  decoupled: {'True' if decoupled else 'False'}\n}}",
            f"input [\n{ins}\n]", f"output [\n{outs}\n]",
            # KIND_CPU as in FT's config: one instance; the model places itself on `device`
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]"]
    text += [f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: {_quote(v)}\n  }}\n}}'
             for k, v in params.items()]
    return "\n".join(text) + "\n"


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_model_repository(model_dir: str, out_repo: str, model_name: str = "ftmoe_gpt",
                           decoupled: bool = False, max_batch_size: int = 64, data_type: str = "fp32",
                           device: str = "cpu", tensor_para_size: int = 1, pipeline_para_size: int = 1,
                           ftmoe_path: str | None = None, checkpoint_path: str | None = None) -> str:
    """Write `<out_repo>/<model_name>/{config.pbtxt, 1/model.py}`; returns the model folder.
    checkpoint_path / ftmoe_path: the model folder / the folder holding the ftmoe package as the
    server will see them (e.g. inside a container); default: this machine's absolute paths."""
    from ..loader import resolve_model_dir

    if data_type not in DATA_TYPES:
        raise FtmoeError(f"data_type must be one of {sorted(DATA_TYPES)}, found {data_type!r}")
    model_dir = checkpoint_path or os.path.abspath(resolve_model_dir(model_dir))
    folder = os.path.join(out_repo, model_name)
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    with open(os.path.join(folder, "config.pbtxt"), "w") as f:
        f.write(config_pbtxt(model_name, model_dir, decoupled, max_batch_size, data_type, device,
                             tensor_para_size, pipeline_para_size, ftmoe_path))
    with open(os.path.join(folder, "1", "model.py"), "w") as f:
        f.write(MODEL_PY)
    return folder


def bundled_tritonserver(repo: str, workdir: str, http_port: int = 8000, grpc_port: int = 8001,
                         metrics_port: int = 8002, address: str = "127.0.0.1",
                         exit_timeout_secs: int = 5) -> tuple[list[str], dict]:
    """(argv, env) that run pytriton's bundled tritonserver (2.51, CPU) on a classic repository.
    Copies the python backend plus this interpreter's stub into `workdir/backends` (as pytriton
    does); env puts pytriton's libs and this Python's libpython on LD_LIBRARY_PATH."""
    import pytriton

    root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = os.path.join(workdir, "backends")
    shutil.copytree(os.path.join(root, "backends"), backends, dirs_exist_ok=True)
    shutil.copy(os.path.join(root, "python_backend_stubs", ver, "triton_python_backend_stub"),
                os.path.join(backends, "python"))
    env = stub_env()
    libs = os.path.join(os.path.dirname(os.path.dirname(pytriton.__file__)), "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH", ""), libs) if p)
    argv = [os.path.join(root, "bin", "tritonserver"), f"--model-repository={os.path.abspath(repo)}",
            f"--backend-directory={backends}", f"--http-address={address}", f"--http-port={http_port}",
            f"--grpc-address={address}", f"--grpc-port={grpc_port}", f"--metrics-address={address}",
            f"--metrics-port={metrics_port}", f"--exit-timeout-secs={exit_timeout_secs}",
            "--allow-gpu-metrics=false"]
    return argv, env


# ---- command line ----------------------------------------------------------------------------------
def add_triton_parsers(subparsers) -> None:
    """Add `triton-repo` (`--model DIR --out REPO [--name] [--decoupled]`); handler: run_triton_repo."""
    p = subparsers.add_parser("triton-repo", help="write a Triton model repository (python backend, FT GPT tensors)")
    p.add_argument("--model", required=True, help="converted <N>-gpu folder")
    p.add_argument("--out", required=True, help="repository folder to write")
    p.add_argument("--name", default="ftmoe_gpt", help="model name (default ftmoe_gpt)")
    p.add_argument("--decoupled", action="store_true", help="stream one response per generated token")
    p.add_argument("--data-type", default="fp32", choices=sorted(DATA_TYPES), help="compute dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--tp", type=int, default=1, help="tensor_para_size")
    p.add_argument("--pp", type=int, default=1, help="pipeline_para_size")
    p.add_argument("--checkpoint-path", default=None, help="model folder as the server sees it (default: --model)")
    p.add_argument("--ftmoe-path", default=None, help="folder holding the ftmoe package as the server sees it "
                                                      "(default: this ftmoe's; model.py puts it on sys.path)")
    p.set_defaults(handler=run_triton_repo)


def run_triton_repo(args) -> int:
    folder = write_model_repository(args.model, args.out, args.name, args.decoupled, args.max_batch_size,
                                    args.data_type, args.device, args.tp, args.pp, args.ftmoe_path,
                                    args.checkpoint_path)
    print(folder)
    return 0


def add_triton_serve_arguments(p) -> None:
    """`ftmoe serve` flags for Triton (the serve parser has --model, --tokenizer, --host, --dtype,
    --device, --tp/--ep/--pp, --served-model-name; run_triton_serve reads them when present)."""
    p.add_argument("--triton", action="store_true", help="serve FT's GPT tensors through Triton Inference "
                                                         "Server (HTTP/gRPC) instead of the OpenAI API")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port (default 8002)")
    p.add_argument("--decoupled", action="store_true", help="Triton: stream one response per generated token")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton: largest batch one request may send")


def run_triton_serve(args) -> int:
    """Load `args.model` and serve it through tritonserver (pytriton) until interrupted."""
    import torch

    from ..llm import LLM
    from .triton_server import serve_triton

    device = getattr(args, "device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = getattr(args, "dtype", "auto")
    dtype = ("float16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
    name = getattr(args, "served_model_name", None) or getattr(args, "model_name", None) or "ftmoe_gpt"
    llm = LLM(args.model, dtype=dtype, device=device, tokenizer_dir=getattr(args, "tokenizer", None),
              tp=getattr(args, "tp", 1), ep=getattr(args, "ep", 1), pp=getattr(args, "pp", 1))
    with llm:
        serve_triton(llm, model_name=name, http_port=args.http_port, grpc_port=args.grpc_port,
                     metrics_port=args.metrics_port, decoupled=args.decoupled,
                     max_batch_size=args.max_batch_size, address=getattr(args, "host", "127.0.0.1"))
    return 0
