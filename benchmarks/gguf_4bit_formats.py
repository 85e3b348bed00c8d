"""Which 4-bit GGUF type the CPU recipe should write: llama.cpp's speed on each, and the kit's quality
gate against the F16 original.

Usage: python -m benchmarks.gguf_4bit_formats [--runs 3] [--types Q4_1,Q4_0,IQ4_NL,Q4_K_M]
           [--out docs/data/gguf-4bit-formats.json]

`smollm2-cpu-q4` writes Q4_1, on which llama.cpp computes each of a batch's rows on its own (its
tiled kernels do not cover Q4_1 on AVX2), so eight streams gain little over one. Q4_0 and IQ4_NL are
repacked at load into llama.cpp's interleaved layouts (`q4_0_8x8`, `iq4_nl_8x8`) for AVX2 batched
kernels; Q4_K_M is the type issue #34 names. Each type is written from the bundled model's F16 GGUF
by llama.cpp (the builder's own write), then:
- the gate: the kit's comparison (deploy/builder/gate.py) with `smollm2-cpu-q4`'s verify settings,
  the F16 file as the reference, both on the kit's llama.cpp engine: top-1 agreement, mean KL, and
  whether the recipe's thresholds pass it;
- speed: bare `llama_decode` tok/s with 1 and 8 sequences (benchmarks/cpu_batch_scaling.py's
  loop), F16 beside them, the types alternating within each of `--runs` rounds.
Each file's tensor types are counted, since llama.cpp falls back to another type where a row's
width does not divide the type's block (SmolLM2's 576 does not divide Q4_K's 256).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from benchmarks._common import ROOT, bundled_gguf, cpu_name
from benchmarks.cpu_batch_scaling import decode_rate

SEQUENCES = (1, 8)


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def gate_scores(f16_dir: Path, folders: dict[str, Path]) -> dict[str, dict]:
    from deploy.builder.gate import compare_with, reference_rows
    from deploy.engines import engine_config, load_engine
    from deploy.recipe import load_recipe
    from deploy.recipe.tasks import load_tasks

    recipe = load_recipe(ROOT / "recipes" / "smollm2-cpu-q4.yaml")
    verify = recipe.quantization.verify
    tasks = load_tasks(None, verify.prompts)
    config = replace(engine_config(recipe), weights="none")
    reference = load_engine(config, f16_dir)
    try:
        rows = asyncio.run(reference_rows(reference, reference.tokenizer, tasks, verify.answer_tokens))
    finally:
        reference.close()
    scores = {}
    for name, folder in folders.items():
        candidate = load_engine(config, folder)
        try:
            result = asyncio.run(compare_with(candidate, rows, tasks, verify.answer_tokens))
        finally:
            candidate.close()
        passed = (result.top1_agreement >= verify.min_top1_agreement
                  and result.mean_kl <= verify.max_mean_kl)
        scores[name] = {"top1_agreement": round(result.top1_agreement, 3),
                        "mean_kl": round(result.mean_kl, 4), "positions": result.positions,
                        "passes_the_gate": passed}
        print(f"gate {name}: top-1 {result.top1_agreement:.3f}, mean KL {result.mean_kl:.4f}, "
              f"{'passes' if passed else 'fails'}", flush=True)
    return {"settings": {"recipe": "recipes/smollm2-cpu-q4.yaml", "prompts": verify.prompts,
                         "answer_tokens": verify.answer_tokens,
                         "min_top1_agreement": verify.min_top1_agreement,
                         "max_mean_kl": verify.max_mean_kl},
            "scores": scores}


def speeds(files: dict[str, Path], runs: int, threads: int) -> dict[str, dict]:
    import llama_cpp as lib

    lib.llama_backend_init()
    models = {name: lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
              for name, path in files.items()}
    rates = {name: {n: [] for n in SEQUENCES} for name in models}
    for run in range(runs):
        for name, model in models.items():
            for n in SEQUENCES:
                rate = round(decode_rate(lib, model, n, 48, threads), 1)
                rates[name][n].append(rate)
                print(f"run {run + 1} {name} x{n}: {rate} tok/s", flush=True)
    for model in models.values():
        lib.llama_model_free(model)
    out = {}
    for name, by_n in rates.items():
        one, eight = statistics.median(by_n[1]), statistics.median(by_n[8])
        out[name] = {"1": by_n[1], "8": by_n[8], "eight_over_one_medians": round(eight / one, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--types", default="Q4_1,Q4_0,IQ4_NL,Q4_K_M")
    parser.add_argument("--out", type=Path, default=Path("docs/data/gguf-4bit-formats.json"))
    args = parser.parse_args()
    import llama_cpp

    from deploy.builder.sources import bundled_model_dir
    from deploy.engines.hardware import usable_cpus
    from deploy.engines.llamacpp_engine import find_gguf

    f16_dir = bundled_model_dir("SmolLM2-135M-Instruct", False)
    quantized = {name: bundled_gguf(f16_dir, name) for name in args.types.split(",")}
    folders = {name: path.parent for name, path in quantized.items()}
    files = {"F16": find_gguf(f16_dir), **quantized}
    gate = gate_scores(f16_dir, folders)
    threads = usable_cpus()[0]
    report = {
        "what": "4-bit GGUF types of the bundled SmolLM2-135M-Instruct (real weights), each written "
                "from its F16 GGUF by llama.cpp: the kit's quality gate against F16, and bare "
                "llama_decode tok/s with 1 and 8 sequences after a 32-token prefill",
        "cpu": cpu_name(), "threads": threads, "runs": args.runs,
        "llama_cpp_python": llama_cpp.__version__,
        "compiled_for": llama_cpp.llama_print_system_info().decode().strip(),
        "date": time.strftime("%Y-%m-%d"),
        "files": {name: {"bytes": path.stat().st_size, "tensor_types": tensor_types(path)}
                  for name, path in files.items()},
        "gate": gate,
        "decode_tok_s": speeds(files, args.runs, threads),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["decode_tok_s"], indent=1))


if __name__ == "__main__":
    main()
