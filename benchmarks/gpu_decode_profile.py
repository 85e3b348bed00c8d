"""Batch-1 decode on Hopper per weight format, in LMDeploy's own pipeline (TurboMind, or the
PyTorch engine for the pt- settings): tok/s and a
kernel profile, to find what holds FP8 at 1.14x fp16 and W4A16 under fp16 (issue #33, items 1-2).

Usage (GPU machine, TurboMind staged for the settings without pt-; `bash tools/device_run.sh
decodeprofile` does this):
  python -m benchmarks.gpu_decode_profile --model DIR --out OUT [--settings a,b] [--deadline S]

The fp16 folder DIR is copied into the other formats once: FP8 by the kit's own converter
(deploy/builder/fp8.py, run on the GPU), W4A16 as a random AWQ checkpoint
(`random_awq`: the layout `lmdeploy lite auto_awq` writes, with random packed weights: the
kernels' speed does not depend on the values, and a calibrated build costs 148 s of device time).
Each setting then runs in its own process: the
pipeline starts, answers one warm-up, then 3 greedy 128-token answers are timed (decode tok/s from
the first streamed token to the last), and one 64-token answer runs under torch.profiler (CUPTI
records every kernel in the process, TurboMind's included). From the trace: the GPU's busy time
(the union of kernel intervals) against the span, kernels per token, and the time per kernel
family. Settings are run in order while the deadline leaves room; each writes OUT/SETTING.json at
once, so a cut call still brings back what finished. Random weights: speed and memory are real,
text is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a long essay about the history of the printing press and its effect on Europe."
# TurboMind measures its GEMM kernels at every engine start (TurboMind::Impl::WarmUp), but only for
# batch sizes 8, 16, 32, ... (GetDefaultTuningGenerators in src/turbomind/kernels/gemm/tuner/
# params.cc), sampling a few kernels per cluster. TM_GEMM_TUNE replaces those parameters
# (ParseTuningParams there): here the sequence is 1, 2, 4, 8, 16, 32, 64 (and the engine's largest
# forward size, which TurboMind always adds), and every candidate kernel, split count and swizzle is
# measured (clusters=0: Sampler::Run then measures every spec). Batch 1 decode is what this script
# times; the short sequence keeps the exhaustive search within a setting's time limit.
# ParseArgsList's pattern takes `[.*]` and `(.*)` greedily, so one list is in brackets and the
# other in parentheses. TM_LOG_LEVEL=INFO makes TurboMind log the sequence it tuned, so the log
# shows the variable was read.
TUNED = {"TM_GEMM_TUNE": "max_splits=16,max_waves=32,swizzle=(0,1,2,3,4),clusters=0,min_iter=2,"
                         "max_iter=10,max_time=0.5,seq=[1-2-1,8-16-8,64]",
         "TM_LOG_LEVEL": "INFO"}
# name: (folder, engine dtype, extra engine-config fields, extra environment, engine)
# In the order they run: the tuned ones last, as TurboMind's GEMM tuning lengthens the warm-up.
# The "pt-" ones run LMDeploy's PyTorch engine (decode in CUDA graphs), which needs no TurboMind
# libraries: its blocked-FP8 linear picks DeepGEMM, then a Gluon kernel on Hopper, then plain
# Triton (lmdeploy/pytorch/backends/cuda/blockedf8_modules.py, LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND);
# its AWQ linear uses TurboMind's kernel when TurboMind loads, Triton otherwise.
TRITON_FP8 = {"LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND": "triton"}
PIECEWISE = {"piecewise_cudagraph_max_tokens": 256}
SETTINGS = {
    "fp16": ("fp16", "float16", {}, {}, "turbomind"),
    "fp8": ("fp8", "bfloat16", {}, {}, "turbomind"),
    "awq-g128": ("awq-g128", "float16", {}, {}, "turbomind"),
    "fp8-gemm-fp8": ("fp8", "bfloat16", {"gemm_input_dtype": "float8_e4m3"}, {}, "turbomind"),
    "bf16": ("fp16", "bfloat16", {}, {}, "turbomind"),
    "awq-g64": ("awq-g64", "float16", {}, {}, "turbomind"),
    "fp8-tuned": ("fp8", "bfloat16", {}, TUNED, "turbomind"),
    "awq-g128-tuned": ("awq-g128", "float16", {}, TUNED, "turbomind"),
    "pt-fp16": ("fp16", "float16", {}, {}, "pytorch"),
    "pt-bf16": ("fp16", "bfloat16", {}, {}, "pytorch"),
    "pt-fp8": ("fp8", "bfloat16", {}, {}, "pytorch"),
    "pt-fp8-triton": ("fp8", "bfloat16", {}, TRITON_FP8, "pytorch"),
    "pt-fp8-f16": ("fp8", "float16", {}, {}, "pytorch"),
    "pt-awq-g128": ("awq-g128", "float16", {}, {}, "pytorch"),
    # The engine in a process of its own, as LMDeploy's api_server and the kit's server run it (the
    # profiler then sees no kernels: they run in the other process).
    "pt-fp16-mp": ("fp16", "float16", {"enable_mp_engine": True}, {}, "pytorch"),
    "pt-fp8-mp": ("fp8", "bfloat16", {"enable_mp_engine": True}, {}, "pytorch"),
    # Prefill in piecewise CUDA graphs (captured token buckets up to 256; attention stays eager)
    # instead of eager mode: does the first token come sooner?
    "pt-fp16-pcg": ("fp16", "float16", PIECEWISE, {}, "pytorch"),
    "pt-fp8-pcg": ("fp8", "bfloat16", PIECEWISE, {}, "pytorch"),
}
SETTING_LIMIT_S = 240  # one setting's process: start, warm-up, 3 answers, the profiled one
HBM_BYTES_PER_S = 4.8e12  # the H200's memory bandwidth (NVIDIA's data sheet)


# -- the checkpoints --------------------------------------------------------------------------------

def random_awq(source: Path, out: Path, group: int) -> Path:
    """An AWQ (GEMM layout, 4-bit, zero point) copy of `source` with random packed weights, in the
    layout TurboMind reads (lmdeploy/turbomind/weight_format.py, AWQFormat): per `*_proj` layer
    qweight int32 [in, out/8], qzeros int32 [in/group, out/8], scales fp16 [in/group, out]."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deploy.atomic import atomic_dir, copy_model_files

    if (out / "config.json").is_file():
        return out
    generator = torch.Generator().manual_seed(0)
    with atomic_dir(out) as work:
        weight_map = {}
        for shard in sorted(source.glob("*.safetensors")):
            tensors = {}
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    if not (name.endswith("_proj.weight") and len(shape) == 2):
                        tensors[name] = f.get_tensor(name)
                        continue
                    rows, cols = shape  # [out, in]
                    stem = name[: -len(".weight")]
                    tensors[stem + ".qweight"] = torch.randint(
                        -2**31, 2**31 - 1, (cols, rows // 8), dtype=torch.int32, generator=generator)
                    # Every zero point 8, packed eight to an int32 (0x88888888).
                    tensors[stem + ".qzeros"] = torch.full((cols // group, rows // 8), -2004318072,
                                                           dtype=torch.int32)
                    tensors[stem + ".scales"] = (torch.rand((cols // group, rows), generator=generator)
                                                 * 2e-3).half()
            save_file(tensors, work / shard.name, metadata={"format": "pt"})
            weight_map.update({name: shard.name for name in tensors})
        copy_model_files(source, work, skip=("config.json", "model.safetensors.index.json"))
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                         "zero_point": True, "version": "gemm"}
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (source / "model.safetensors.index.json").is_file():
            (work / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    return out


def prepare(model: Path, root: Path, folders: set[str]) -> dict:
    """The folders the chosen settings need, made once; returns seconds spent per folder."""
    import torch

    from deploy.builder.fp8 import fp8_quantize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spent, paths = {}, {"fp16": model}
    for folder in sorted(folders - {"fp16"}):
        started = time.perf_counter()
        target = root / folder
        if folder == "fp8":
            if not (target / "config.json").is_file():
                fp8_quantize(model, target, device=device)
        else:
            random_awq(model, target, int(folder.rsplit("-g", 1)[1]))
        spent[folder] = round(time.perf_counter() - started, 1)
        paths[folder] = target
        print(f"[decode-profile] {folder} ready in {spent[folder]} s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()  # the settings' engines run in other processes
    return {"seconds": spent, "paths": {k: str(v) for k, v in paths.items()}}


# -- the trace ----------------------------------------------------------------------------------------

def family(kernel: str) -> str:
    name = kernel.lower()
    for word, label in (("gemm", "gemm"), ("gemv", "gemm"), ("attention", "attention"),
                        ("attn", "attention"), ("decoding", "attention"), ("norm", "norm"),
                        ("rope", "rope"), ("sampl", "sampling"), ("topk", "sampling"),
                        ("softmax", "sampling"), ("activation", "activation"), ("silu", "activation"),
                        ("memcpy", "copy"), ("memset", "copy")):
        if word in name:
            return label
    return "other"


def kernel_summary(trace: dict, tokens: int) -> dict:
    """Busy time (the union of kernel intervals) against the span, per generated token, and the
    time per kernel family and for the 12 costliest kernels."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not events:
        return {"kernels": 0, "note": "the profiler recorded no kernels"}
    events.sort(key=lambda e: e["ts"])
    busy, start, end = 0.0, events[0]["ts"], events[0]["ts"]
    for e in events:
        if e["ts"] > end:
            busy += end - start
            start = e["ts"]
        end = max(end, e["ts"] + e["dur"])
    busy += end - start
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    families, names = {}, {}
    for e in events:
        families[family(e["name"])] = families.get(family(e["name"]), 0.0) + e["dur"]
        total, count = names.get(e["name"], (0.0, 0))
        names[e["name"]] = (total + e["dur"], count + 1)
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:12]
    return {"kernels": len(events), "kernels_per_token": round(len(events) / tokens, 1),
            "span_ms": round(span / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
            "busy_fraction": round(busy / span, 3) if span else None,
            "busy_us_per_token": round(busy / tokens, 1), "span_us_per_token": round(span / tokens, 1),
            "family_us_per_token": {k: round(v / tokens, 1) for k, v in
                                    sorted(families.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "us_per_token": round(t / tokens, 1), "calls": c,
                     "mean_us": round(t / c, 2)} for n, (t, c) in top]}


# -- one setting, in its own process ----------------------------------------------------------------

def answer(pipe, tokens: int) -> dict:
    """One greedy answer of exactly `tokens` tokens (EOS ignored), timed from the first streamed
    token to the last."""
    from lmdeploy import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True, top_k=1)
    started = time.perf_counter()
    first = last = None
    chunks = 0
    for response in pipe.stream_infer([PROMPT], gen_config=config):
        chunks += 1
        if first is None and response.generate_token_len > 0:
            first = time.perf_counter()
        last = response
    ended = time.perf_counter()
    if first is None or last.finish_reason == "error":
        raise RuntimeError(f"the pipeline answered no tokens: {last}")
    return {"tokens": tokens, "reported_tokens": last.generate_token_len, "chunks": chunks,
            "finish_reason": last.finish_reason, "ttft_s": round(first - started, 4),
            "total_s": round(ended - started, 4),
            "decode_tok_s": round((tokens - 1) / (ended - first), 1)}


def engine_config(engine: str, dtype: str, extra: dict):
    """A setting's engine config: TurbomindEngineConfig or PytorchEngineConfig, same sizes."""
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    kind = PytorchEngineConfig if engine == "pytorch" else TurbomindEngineConfig
    return kind(dtype=dtype, session_len=4096, max_batch_size=64, cache_max_entry_count=0.2, **extra)


def fp8_providers() -> dict:
    """Which blocked-FP8 GEMMs the PyTorch engine can pick here (its choice is logged at debug
    level only); the profile's kernel names then show the one it ran."""
    requested = os.environ.get("LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND", "auto")
    try:  # private helpers of LMDeploy 0.18: a missing one must not lose the measurement
        from lmdeploy.pytorch.backends.cuda import blockedf8_modules as f8

        return {"deep_gemm": f8._has_deep_gemm(), "gluon": f8._has_gluon(), "requested": requested}
    except Exception as exc:
        return {"requested": requested, "error": repr(exc)}


def one(name: str, folder: Path, out: Path) -> dict:
    import torch
    from lmdeploy import pipeline

    _, dtype, extra, env, engine = SETTINGS[name]
    started = time.perf_counter()
    pipe = pipeline(str(folder), backend_config=engine_config(engine, dtype, extra))
    result = {"setting": name, "engine": engine, "folder": str(folder), "dtype": dtype,
              "engine_extra": extra, "env": {k: os.environ.get(k) for k in env},
              "start_s": round(time.perf_counter() - started, 1)}
    if engine == "pytorch":
        result["fp8_providers"] = fp8_providers()
    free, total = torch.cuda.mem_get_info()
    result["gpu_used_gib"] = round((total - free) / 2**30, 2)
    result["warmup"] = answer(pipe, 32)
    result["runs"] = [answer(pipe, 128) for _ in range(3)]
    speeds = [r["decode_tok_s"] for r in result["runs"]]
    result["decode_tok_s"] = {"min": min(speeds), "max": max(speeds)}
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    result["weight_gb"] = round(weight_bytes / 1e9, 2)
    # Reading every weight once per token at full bandwidth: the ceiling batch 1 can approach.
    result["bandwidth_ceiling_tok_s"] = round(HBM_BYTES_PER_S / weight_bytes, 1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = answer(pipe, 64)
    trace_file = out / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace_file))
    result["profiled"] = profiled
    result["profile"] = kernel_summary(json.loads(trace_file.read_text()), profiled["tokens"])
    trace_file.unlink()  # tens of MB; the summary is what comes back
    return result


def run_settings(names: list[str], paths: dict, out: Path, deadline: float) -> dict:
    results = {}
    for name in names:
        left = deadline - time.monotonic()
        if left < 45:
            results[name] = {"skipped": f"{left:.0f} s left before the deadline"}
            continue
        env = dict(os.environ, LMDEPLOY_ENABLE_CHECK_ENV="0", **SETTINGS[name][3])
        log = out / f"{name}.log"
        command = [sys.executable, "-m", "benchmarks.gpu_decode_profile", "--one", name,
                   "--folder", paths[SETTINGS[name][0]], "--out", str(out)]
        try:
            with log.open("w") as sink:
                code = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=min(SETTING_LIMIT_S, left - 10)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        file = out / f"{name}.json"
        results[name] = json.loads(file.read_text()) if file.is_file() else {"failed": code}
        print(f"[decode-profile] {name}: {results[name].get('decode_tok_s', results[name])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the fp16 folder (random Llama-2-7B shapes)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--deadline", type=float, default=380, help="seconds for the whole run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = one(args.one, args.folder, args.out)
        (args.out / f"{args.one}.json").write_text(json.dumps(result, indent=2) + "\n")
        # The result is written; an engine's teardown can take longer than the measuring did.
        os._exit(0)
    deadline = time.monotonic() + args.deadline
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    made = prepare(args.model, args.model.parent, {SETTINGS[n][0] for n in names})
    report = {"what": "LMDeploy 0.18 pipeline, TurboMind or the PyTorch engine (pt-), batch 1, "
                      "greedy, 128-token answers x3 and one 64-token answer profiled; RANDOM "
                      "weights (Llama-2-7B shapes)",
              "prepared": made, "results": run_settings(names, made["paths"], args.out, deadline)}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # the report matters more than the name
        report["gpu"] = f"unknown ({exc})"
    (args.out / "decode-profile.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
