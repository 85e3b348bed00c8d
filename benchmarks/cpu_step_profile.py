"""Where the kit's llama.cpp engine spends eight concurrent streams' time: inside `llama_decode`
(llama.cpp's own work) or in the kit's step loop around it (filling the batch, picking tokens,
handing them over), on this CPU.

Usage: python -m benchmarks.cpu_step_profile [--runs 3] [--tokens 64] [--out docs/data/cpu-step-profile.json]

The engine is the one the server runs (LlamaCppEngine on the default F16 GGUF, max_batch_size 8),
asked through Engine.stream_chat like benchmarks/cpu_runtimes.py, with eight prompts that all run
to `--tokens` (a story each, no early end), so that every decode step has eight rows. The
batcher's `llama_decode` is wrapped to time each call and count its tokens; a step with more
tokens than rows is one that prefills prompts. Then one stream alone, the same way, for the
ratio. Raw numbers per run: wall time, time in llama_decode by kind of step, and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks._common import cpu_name
from benchmarks.cpu_runtimes import LONG, KitRow

NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal")


class TimedLib:
    """llama_cpp with `llama_decode` timed; everything else passes through."""

    def __init__(self, lib):
        self._lib, self.calls = lib, []

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def llama_decode(self, ctx, batch):
        started = time.perf_counter()
        status = self._lib.llama_decode(ctx, batch)
        self.calls.append((batch.n_tokens, time.perf_counter() - started))
        return status


def one_round(row: KitRow, timed: TimedLib, prompts: list[str], tokens: int) -> dict:
    timed.calls.clear()
    answers, wall = row.answer(prompts, tokens)
    rows = len(prompts)
    decode = [s for n, s in timed.calls if n <= rows]
    prefill = [s for n, s in timed.calls if n > rows]
    generated = sum(count for _, _, count in answers)
    return {"streams": rows, "tokens": generated, "wall_s": round(wall, 4),
            "tok_s": round(generated / wall, 1),
            "decode_steps": len(decode), "decode_s": round(sum(decode), 4),
            "decode_step_ms_mean": round(1000 * statistics.mean(decode), 2) if decode else None,
            "prefill_steps": len(prefill), "prefill_s": round(sum(prefill), 4),
            "outside_llama_decode_s": round(wall - sum(decode) - sum(prefill), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/data/cpu-step-profile.json"))
    args = parser.parse_args()
    from deploy.builder.sources import bundled_model_dir
    from deploy.engines.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(bundled_model_dir("SmolLM2-135M-Instruct", False), session_len=2048,
                            max_batch_size=8)
    timed = TimedLib(engine._batcher._lib)
    engine._batcher._lib = timed  # read by the model thread at its next step
    row = KitRow(engine)
    prompts = [f"{LONG} Call the dragon {name}." for name in NAMES]
    row.answer(prompts[:1], 8)  # warm-up: first-call costs
    runs = []
    for run in range(args.runs):
        result = {"run": run + 1, "one": one_round(row, timed, prompts[:1], args.tokens),
                  "eight": one_round(row, timed, prompts, args.tokens)}
        result["eight_over_one"] = round(result["eight"]["tok_s"] / result["one"]["tok_s"], 2)
        runs.append(result)
        print(json.dumps(result), flush=True)
    engine.close()
    report = {"what": __doc__.splitlines()[0], "cpu": cpu_name(), "tokens": args.tokens,
              "date": time.strftime("%Y-%m-%d"), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
