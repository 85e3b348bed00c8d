"""How llama.cpp itself scales from one sequence to eight on this CPU, without the kit.

Usage: python -m benchmarks.cpu_batch_scaling [--runs 3] [--steps 48] [--context 32] [--files F16,Q8_0,Q4_1]
           [--out docs/data/cpu-batch-scaling.json]

Issue #34 asks for 8 concurrent streams at 4x one stream in aggregate. The kit's llama.cpp engine
reaches about 2x. This measures the ceiling under it: bare `llama_decode` calls through
llama-cpp-python's low-level API on the bundled model (the F16 GGUF the default recipe serves, and
the Q8_0 and Q4_1 files written from it), with B sequences each decoding one token per call, B in
1, 2, 4, 8. No sampling, no detokenizing, no HTTP: tokens per second of decode calls alone. Rounds
alternate the files so that each sees the same minutes. The same context settings as the engine
(non-unified KV cache, one stream per sequence, threads = cores). `--context` sets how many tokens
each sequence holds before the timed steps (default 32): attention's share of a step grows with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks._common import bundled_gguf, cpu_name

BATCHES = (1, 2, 4, 8)
PROMPT_TOKENS = 32


def context(lib, model, sequences: int, threads: int, prompt_tokens: int = PROMPT_TOKENS):
    params = lib.llama_context_default_params()
    params.n_batch = params.n_ubatch = max(prompt_tokens * sequences, 64)
    params.n_seq_max = sequences
    params.n_ctx = (512 + prompt_tokens) * sequences
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    return lib.llama_init_from_model(model, params)


def decode_rate(lib, model, sequences: int, steps: int, threads: int,
                prompt_tokens: int = PROMPT_TOKENS) -> float:
    """Tokens per second over `steps` decode calls of `sequences` rows each, after each sequence
    was prefilled with the same `prompt_tokens` tokens."""
    ctx = context(lib, model, sequences, threads, prompt_tokens)
    batch = lib.llama_batch_init(max(prompt_tokens * sequences, 64), 0, 1)
    try:
        def fill(rows):
            batch.n_tokens = 0
            for token, position, seq, logits in rows:
                i = batch.n_tokens
                batch.token[i], batch.pos[i] = token, position
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, logits
                batch.n_tokens = i + 1
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        fill([(100 + t % 1000, t, s, t == prompt_tokens - 1) for s in range(sequences)
              for t in range(prompt_tokens)])
        started = time.perf_counter()
        for step in range(steps):
            fill([(200 + step, prompt_tokens + step, s, True) for s in range(sequences)])
        return sequences * steps / (time.perf_counter() - started)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)


def files(model_dir: Path) -> dict[str, Path]:
    from deploy.engines.llamacpp_engine import find_gguf

    return {"F16": find_gguf(model_dir), "Q8_0": bundled_gguf(model_dir, "Q8_0"),
            "Q4_1": bundled_gguf(model_dir, "Q4_1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--context", type=int, default=PROMPT_TOKENS,
                        help="tokens each sequence holds before the timed steps")
    parser.add_argument("--files", default="F16,Q8_0,Q4_1", help="which of the GGUF files to measure")
    parser.add_argument("--out", type=Path, default=Path("docs/data/cpu-batch-scaling.json"))
    args = parser.parse_args()
    import llama_cpp as lib

    from deploy.builder.sources import bundled_model_dir

    lib.llama_backend_init()
    threads = os.cpu_count() or 1
    models = {name: lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
              for name, path in files(bundled_model_dir("SmolLM2-135M-Instruct", False)).items()
              if name in args.files.split(",")}
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in models}
    for run in range(args.runs):
        for name, model in models.items():
            for sequences in BATCHES:
                rate = decode_rate(lib, model, sequences, args.steps, threads, args.context)
                rates[name][sequences].append(round(rate, 1))
                print(f"run {run + 1} {name} x{sequences}: {rate:.1f} tok/s", flush=True)
    summary = {}
    for name, by_batch in rates.items():
        one = statistics.median(by_batch[1])
        summary[name] = {str(b): {"tok_s": runs, "median": statistics.median(runs),
                                  "x_one": round(statistics.median(runs) / one, 2)}
                         for b, runs in by_batch.items()}
    report = {"what": f"bare llama_decode, B sequences one token each per call, after a {args.context}-"
                      "token prefill; bundled SmolLM2-135M-Instruct (real weights)",
              "context": args.context,
              "cpu": cpu_name(), "threads": threads, "steps": args.steps, "runs": args.runs,
              "llama_cpp_python": lib.__version__, "date": time.strftime("%Y-%m-%d"),
              "results": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, by_batch in summary.items():
        print(name, {b: (v["median"], v["x_one"]) for b, v in by_batch.items()})


if __name__ == "__main__":
    main()
