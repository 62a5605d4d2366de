"""`ftmoe` command line: convert, info, generate, demo.

In:  argv. Out: the command's output on stdout, progress on stderr; a user mistake prints
one line `ftmoe: error: ...` and exits 1 (argparse usage errors exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import FtmoeError


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Megatron-DeepSpeed checkpoint -> FasterTransformer c-model folder")
    p.add_argument("-i", "--input-dir", "-input_dir", dest="input_dir", required=True,
                   help="checkpoint folder (mp_rank_00_model_states.pt + expert files)")
    p.add_argument("-o", "--saved-dir", "-saved_dir", "--output-dir", dest="saved_dir", required=True,
                   help="output folder; the model goes to <dir>/<N>-gpu")
    p.add_argument("--tp", "--infer-gpu-num", "-infer_gpu_num", "-i_g", dest="tp", type=int, default=1,
                   help="tensor-parallel size N of the output (default 1)")
    p.add_argument("--dtype", "--weight-data-type", "-weight_data_type", dest="dtype", default="fp16",
                   choices=["fp16", "fp32", "bf16"], help="weight data type of the output (default fp16)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with tokenizer.json (JiebaBPE) or vocab.json + merges.txt; copied, and "
                        "start_id/end_id taken from its <|endoftext|>")
    p.add_argument("--vocab-path", default=None, help="FT alias: GPT-2 vocab.json (needs --merges-path)")
    p.add_argument("--merges-path", default=None, help="FT alias: GPT-2 merges.txt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a converted model")
    p.add_argument("--model", required=True, help="converted <N>-gpu folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--min-length", type=int, default=0)
    p.add_argument("--beam-width", type=int, default=1)
    p.add_argument("--len-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    _add_parallel(p)


def _add_parallel(p) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (experts split, attention data-parallel)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (layers split into stages)")
    p.add_argument("--micro-batches", type=int, default=None, help="pipeline micro-batches (default: min(batch, pp))")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent rank is an error")


def _cmd_convert(a) -> int:
    import tempfile

    from .convert import convert

    with tempfile.TemporaryDirectory(prefix="ftmoe-tokenizer-") as staging:
        tok_dir = a.tokenizer_dir
        if a.vocab_path or a.merges_path:
            tok_dir = _ft_vocab_dir(a.vocab_path, a.merges_path, staging)
        convert(a.input_dir, a.saved_dir, tp=a.tp, dtype=a.dtype, tokenizer_dir=tok_dir, progress=not a.quiet)
    return 0


def _ft_vocab_dir(vocab: str | None, merges: str | None, staging: str) -> str:
    """FT's --vocab-path/--merges-path: stage the pair as a tokenizer folder (removed after use)."""
    import shutil

    if not (vocab and merges):
        raise FtmoeError("--vocab-path and --merges-path must be given together")
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise FtmoeError(f"{path}: not found")
    shutil.copyfile(vocab, os.path.join(staging, "vocab.json"))
    shutil.copyfile(merges, os.path.join(staging, "merges.txt"))
    return staging


def _cmd_info(a) -> int:
    from .config import ModelConfig
    from .ftformat import torch_dtype_of
    from .loader import check_files, resolve_model_dir

    d = resolve_model_dir(a.model)
    cfg = ModelConfig.from_dir(d)
    plan = check_files(d, cfg)
    size = sum(os.path.getsize(p) for _, paths in plan for p in paths)
    expert_bytes = sum(os.path.getsize(p) for s, paths in plan if ".experts." in s.name for p in paths)
    counts = cfg.param_counts()
    info = {"model_dir": d, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in cfg.__dict__.items()},
            "hidden_size": cfg.hidden_size, "parameters": counts,
            "files": sum(len(p) for _, p in plan), "bytes": size, "expert_bytes": expert_bytes,
            "weight_dtype": str(torch_dtype_of(cfg.weight_data_type)).replace("torch.", "")}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model      {d}")
    for k, v in info["config"].items():
        print(f"  {k:<20} {v}")
    print(f"parameters {counts['total'] / 1e6:,.2f} M total, {counts['active_per_token'] / 1e6:,.2f} M active "
          f"per token, {counts['experts'] / 1e6:,.2f} M in experts")
    print(f"files      {info['files']} files, {size / 2**20:,.1f} MiB ({expert_bytes / 2**20:,.1f} MiB experts), "
          f"{info['weight_dtype']}")
    return 0


def _cmd_generate(a) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    if a.prompt_ids:
        try:
            prompts = [[int(x) for x in s.split(",") if x.strip()] for s in a.prompt_ids]
        except ValueError:
            raise FtmoeError(f"--prompt-ids must be comma-separated integers, found {a.prompt_ids!r}") from None
    else:
        prompts = a.prompt
    params = SamplingParams(max_new_tokens=a.max_new_tokens, top_k=a.top_k, top_p=a.top_p,
                            temperature=a.temperature, repetition_penalty=a.repetition_penalty,
                            presence_penalty=a.presence_penalty, min_length=a.min_length,
                            beam_width=a.beam_width, len_penalty=a.len_penalty, seed=a.seed,
                            return_log_probs=a.json)
    with LLM(a.model, dtype=a.dtype, device=a.device, tp=a.tp, ep=a.ep, pp=a.pp, micro_batches=a.micro_batches,
             timeout_s=a.timeout) as llm:
        return _generate_with(llm, a, prompts, params)


def _generate_with(llm, a, prompts, params) -> int:
    if a.stream:
        if len(prompts) != 1:
            raise FtmoeError("--stream takes exactly one prompt")
        for chunk in llm.stream(prompts[0], params):
            sys.stdout.write(chunk.text_delta if chunk.text_delta is not None else f"{chunk.token_id} ")
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    new_tokens = 0
    for i, o in enumerate(outs):
        beams = isinstance(o.sequence_length, list)
        ids = o.output_ids[0] if beams else o.output_ids          # best beam first
        seq_len = o.sequence_length[0] if beams else o.sequence_length
        text = o.text[0] if beams and o.text is not None else o.text
        new_tokens += seq_len - o.prompt_length
        if a.json:
            print(json.dumps({"index": i, "output_ids": ids, "text": text, "sequence_length": seq_len,
                              "prompt_length": o.prompt_length,
                              "cum_log_probs": o.cum_log_probs[0] if beams else o.cum_log_probs,
                              "output_log_probs": o.output_log_probs[0] if beams else o.output_log_probs,
                              "finish_reason": o.finish_reason[0] if beams else o.finish_reason},
                             ensure_ascii=False))
        else:
            print(text if text is not None else " ".join(map(str, ids)))
    print(f"[{len(outs)} prompt(s), {new_tokens} new tokens in {dt:.2f} s, {new_tokens / max(dt, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftmoe", description="Megatron-DeepSpeed GPT-MoE inference, "
                                     "FasterTransformer-compatible")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_convert(sub)
    p = sub.add_parser("info", help="print a converted model's config, parameter counts and file sizes")
    p.add_argument("model", help="converted <N>-gpu folder")
    p.add_argument("--json", action="store_true")
    _add_generate(sub)
    p = sub.add_parser("bench", help="GPU decode/prefill speed beside the hardware floor and eager PyTorch")
    p.add_argument("--preset", default="gpt-moe-0.35b-64e", help="random weights at these shapes "
                   "(gpt-moe-0.35b-64e, gpt-moe-1.3b-32e, gpt-moe-1.3b-64e)")
    p.add_argument("--model", default=None, help="a converted <N>-gpu folder instead of random weights")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--prefill", default="8x512", help="BxT, or 'none'")
    p.add_argument("--no-eager", action="store_true", help="skip the eager pure-torch baseline")
    p.add_argument("--no-latency", action="store_true", help="skip the FT-style end-to-end latency table")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", action="store_true", help="print per-kernel GPU times of a decode step")
    p.add_argument("--prefill-graphs", action="store_true", help="also time prefill replayed from CUDA graphs "
                   "(generate/serve use them unless FTMOE_PREFILL_GRAPHS=0)")
    p.add_argument("--greedy-chunk", type=int, default=16, help="also time decode steps run N at a time back "
                   "to back, as greedy generate runs them (0: skip)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--distributed", action="store_true", help="time whole serving steps through the "
                   "multi-process runner even at tp=ep=pp=1 (the one-GPU row of a scaling table)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (tiny preset; no floors)")
    p = sub.add_parser("tune", help="search fused-MoE kernel tile configs for this GPU (writes JSON)")
    p.add_argument("--preset", default="gpt-moe-0.35b-64e")
    p.add_argument("--model", default=None, help="take the shapes from a converted folder")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--m", default="1,8,32,64,256,1024,4096", help="routed-slot counts to tune for")
    p.add_argument("--out", default=None, help="JSON path (default: the package's configs folder)")
    p.add_argument("--no-dense", action="store_true", help="skip timing the dense GEMMs (Triton vs cuBLAS)")
    p.add_argument("--no-moe", action="store_true", help="skip the fused-MoE tiles (keep the table's)")
    p.add_argument("--in-step", default=None, metavar="BATCHES",
                   help="instead of timing kernels alone, refine the existing table's entries for these decode "
                        "batches (e.g. 1,2,4,8,16) by timing whole decode steps replayed from CUDA graphs")
    p.add_argument("--dense-m", default="1,2,4,8,16,32,64,128,256",
                   help="batch sizes at which the dense GEMMs are timed (Triton vs cuBLAS)")
    p = sub.add_parser("demo", help="build the small embedded model, convert it and generate")
    p.add_argument("--workdir", default="demo_out")
    from .entrypoints.bench_serving import add_bench_serving_args
    from .entrypoints.serve import add_serve_parser
    from .entrypoints.triton_repo import add_triton_parsers, add_triton_serve_arguments

    add_triton_serve_arguments(add_serve_parser(sub))      # `ftmoe serve --triton`: Triton Inference Server
    add_triton_parsers(sub)                                # `ftmoe triton-repo`
    add_bench_serving_args(sub.add_parser("bench-serving", help="load-test a running server (also: ftmoe bench serving)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serving"]:          # `ftmoe bench serving ...` = `ftmoe bench-serving ...`
        argv = ["bench-serving"] + argv[2:]
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "convert":
            return _cmd_convert(a)
        if a.cmd == "info":
            return _cmd_info(a)
        if a.cmd == "generate":
            return _cmd_generate(a)
        if a.cmd == "bench":
            from .bench import run_bench

            if a.preset not in __import__("ftmoe.synthetic", fromlist=["PRESETS"]).PRESETS:
                raise FtmoeError(f"--preset must be one of the presets, found '{a.preset}'")
            try:
                batches = tuple(int(b) for b in a.batches.split(","))
                prefill = None if a.prefill == "none" else tuple(int(v) for v in a.prefill.lower().split("x"))
            except ValueError:
                raise FtmoeError(f"--batches/--prefill malformed: {a.batches!r}, {a.prefill!r}") from None
            if not 0 <= a.greedy_chunk <= 32:
                raise FtmoeError(f"--greedy-chunk must be 0..32 steps, found {a.greedy_chunk}")
            if a.tp * a.ep * a.pp > 1 or a.distributed:
                from .bench_parallel import run_parallel_bench
                from .distributed import ParallelConfig

                run_parallel_bench(ParallelConfig(a.tp, a.ep, a.pp), a.preset, a.model, a.dtype, a.device, batches,
                                   a.ctx, min(a.iters, 20), a.json, prefill=prefill,
                                   greedy_chunk=a.greedy_chunk)
                return 0
            run_bench(a.preset, a.model, a.dtype, batches, a.ctx, prefill, not a.no_eager, not a.no_latency,
                      a.iters, a.json, profile=a.profile, device=a.device, prefill_graphs=a.prefill_graphs,
                      greedy_chunk=a.greedy_chunk)
            return 0
        if a.cmd == "tune":
            import torch

            from .bench import config_of
            from .config import ModelConfig
            from .loader import parse_dtype, resolve_model_dir
            from .tune import dense_shapes, model_shapes, run_tune

            if a.in_step is not None:
                try:
                    batches = [int(b) for b in a.in_step.split(",")]
                except ValueError:
                    batches = []
                if not batches or min(batches) < 1:
                    raise FtmoeError(f"--in-step: expected comma-separated batch sizes >= 1, found {a.in_step!r}")
            if not torch.cuda.is_available():
                raise FtmoeError("ftmoe tune needs a CUDA GPU")
            cfg = ModelConfig.from_dir(resolve_model_dir(a.model)) if a.model else config_of(a.preset)
            if a.in_step is not None:
                from .tune import run_tune_in_step

                model = None
                if a.model:
                    from .loader import load_model

                    model = load_model(resolve_model_dir(a.model), dtype=parse_dtype(a.dtype), device="cuda")
                run_tune_in_step(cfg, parse_dtype(a.dtype), batches, a.out, model=model)
                return 0
            run_tune([] if a.no_moe else model_shapes(cfg), parse_dtype(a.dtype), tuple(int(m) for m in a.m.split(",")),
                     a.out, dense=[] if a.no_dense else dense_shapes(cfg),
                     dense_ms=tuple(int(m) for m in a.dense_m.split(",")))
            return 0
        if a.cmd == "serve":
            if a.triton:
                from .entrypoints.triton_repo import run_triton_serve

                return run_triton_serve(a)
            from .entrypoints.serve import run_serve

            return run_serve(a)
        if a.cmd == "triton-repo":
            return a.handler(a)
        if a.cmd == "bench-serving":
            from .entrypoints.bench_serving import run_bench_serving_cli

            return run_bench_serving_cli(a)
        if a.cmd == "demo":
            from .demo import run_demo

            return run_demo(a.workdir)
    except FtmoeError as e:
        print(f"ftmoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ftmoe: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
