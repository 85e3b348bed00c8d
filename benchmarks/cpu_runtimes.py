"""CPU runtimes for the bundled SmolLM2-135M-Instruct, measured side by side on this machine.

Usage: python -m benchmarks.cpu_runtimes [--runs 3] [--tokens 64] [--out docs/data/cpu-runtimes.json]

Rows, each `--runs` times, rounds alternating so that every row sees the same minutes:
- the kit's engines through the Engine interface the server uses: transformers (bf16, the default
  dtype; the old default) and llama.cpp on the F16 GGUF (the new default) and on the Q4_1 GGUF;
- llama.cpp's own high-level `Llama` on the same GGUFs, one stream (the issue's reference speed);
- OpenVINO GenAI's ContinuousBatchingPipeline on the same GGUFs, where `openvino_genai` imports.
Each row: one stream (greedy, `--tokens` new tokens, EOS ignored where the runtime allows), then
eight different prompts at once: aggregate tok/s, first-token p50 and max, and how many of the
eight greedy answers equal the same prompt answered alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks._common import bundled_gguf, cpu_name

QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Explain photosynthesis briefly.",
             "Write a haiku about rain.", "What is 12 times 7?", "Who wrote Hamlet?",
             "Give me a tip for learning Python.", "Describe the moon in one sentence."]
LONG = "Write a long story about a dragon who learns to cook."  # the one stream: no early EOS


class KitRow:
    """One of the kit's engines: answers through Engine.stream_chat, as the server asks."""

    def __init__(self, engine):
        self.engine = engine

    async def _one(self, question: str, tokens: int, t0: float):
        from deploy.engines import GenerationParams

        first, text, count = None, [], 0
        async for delta in self.engine.stream_chat([{"role": "user", "content": question}],
                                                   GenerationParams(max_tokens=tokens)):
            if first is None and delta.text:
                first = time.perf_counter() - t0
            text.append(delta.text)
            count = delta.completion_tokens or count
        return "".join(text), first, count

    def answer(self, questions: list[str], tokens: int):
        async def run():
            t0 = time.perf_counter()
            out = await asyncio.gather(*[self._one(q, tokens, t0) for q in questions])
            return out, time.perf_counter() - t0
        return asyncio.run(run())


class LlamaOwnRow:
    """llama-cpp-python's `Llama`: one sequence, llama.cpp's own sampling loop."""

    def __init__(self, gguf: Path, tokenizer):
        from llama_cpp import Llama

        # Every core, as the kit's engine uses (Llama's default is half of them).
        threads = os.cpu_count()
        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.tokenizer = tokenizer

    def answer(self, questions: list[str], tokens: int):
        from deploy.engines.chat_format import encode_chat

        assert len(questions) == 1, "llama-cpp-python's Llama runs one sequence"
        ids = encode_chat(self.tokenizer, [{"role": "user", "content": questions[0]}])
        t0 = time.perf_counter()
        first, out = None, []
        for token in self.llm.generate(ids, temp=0.0, reset=True):
            first = first if first is not None else time.perf_counter() - t0
            if token == self.llm.token_eos() or len(out) >= tokens:
                break
            out.append(token)
        return [(self.tokenizer.decode(out), first, len(out))], time.perf_counter() - t0


class OpenVINORow:
    """OpenVINO GenAI's continuous-batching pipeline, stepped by hand like its own server."""

    def __init__(self, gguf: Path, tokenizer):
        import openvino_genai as og

        config = og.SchedulerConfig()
        config.cache_size, config.max_num_batched_tokens, config.max_num_seqs = 1, 256, 16
        self.og, self.tokenizer = og, tokenizer
        self.pipe = og.ContinuousBatchingPipeline(str(gguf), config, "CPU")

    def answer(self, questions: list[str], tokens: int):
        import numpy as np
        import openvino as ov

        from deploy.engines.chat_format import encode_chat

        config = self.og.GenerationConfig()
        config.max_new_tokens = tokens
        t0, handles = time.perf_counter(), []
        for i, q in enumerate(questions):
            ids = encode_chat(self.tokenizer, [{"role": "user", "content": q}])
            handles.append(self.pipe.add_request(i, ov.Tensor(np.array([ids], dtype=np.int64)), config))
        first, out = [None] * len(questions), [[] for _ in questions]
        while self.pipe.has_non_finished_requests():
            self.pipe.step()
            for i, handle in enumerate(handles):
                if handle.can_read():
                    for piece in handle.read().values():
                        out[i].extend(piece.generated_ids)
                    first[i] = first[i] if first[i] is not None or not out[i] else time.perf_counter() - t0
        wall = time.perf_counter() - t0
        return [(self.tokenizer.decode(o, skip_special_tokens=True), f, len(o))
                for o, f in zip(out, first, strict=True)], wall


def measure(row, tokens: int, concurrent: bool) -> dict:
    row.answer([QUESTIONS[0]], 8)  # warm-up: first-call costs are not the runtime's speed
    one, wall = row.answer([LONG], tokens)
    figures = {"one_stream_tok_s": one[0][2] / wall, "one_stream_ttft_s": one[0][1]}
    if not concurrent:
        return figures
    alone = [row.answer([q], tokens)[0][0][0] for q in QUESTIONS]
    together, wall = row.answer(QUESTIONS, tokens)
    firsts = sorted(f for _, f, _ in together)
    figures.update(
        eight_streams_tok_s=sum(c for _, _, c in together) / wall,
        eight_ttft_p50_s=statistics.median(firsts), eight_ttft_max_s=firsts[-1],
        eight_identical_to_alone=sum(t == a for (t, _, _), a in zip(together, alone, strict=True)))
    return figures


def rows(model_dir: Path, only: set[str] | None):
    """(name, factory, measures concurrency) for every row this machine can run."""
    import importlib.util

    from deploy.engines.chat_format import load_tokenizer
    from deploy.engines.llamacpp_engine import find_gguf

    f16 = find_gguf(model_dir)
    q4 = bundled_gguf(model_dir, "Q4_1")
    tokenizer = load_tokenizer(model_dir)

    def kit(backend, gguf=None):
        def load():
            if backend == "transformers":
                from deploy.engines.transformers_engine import TransformersEngine
                return KitRow(TransformersEngine(model_dir, dtype="bfloat16", max_batch_size=8))
            from deploy.engines.llamacpp_engine import LlamaCppEngine
            folder = model_dir if gguf == f16 else q4.parent
            return KitRow(LlamaCppEngine(folder, session_len=2048, max_batch_size=8))
        return load

    found = [("kit transformers bf16", kit("transformers"), True),
             ("kit llamacpp F16", kit("llamacpp", f16), True),
             ("kit llamacpp Q4_1", kit("llamacpp", q4), True),
             ("llama.cpp own F16", lambda: LlamaOwnRow(f16, tokenizer), False),
             ("llama.cpp own Q4_1", lambda: LlamaOwnRow(q4, tokenizer), False)]
    if importlib.util.find_spec("openvino_genai"):
        found += [("openvino-genai Q4_1", lambda: OpenVINORow(q4, tokenizer), True),
                  ("openvino-genai F16", lambda: OpenVINORow(f16, tokenizer), True)]
    return [r for r in found if not only or r[0] in only]


def _versions() -> dict:
    names = ("llama-cpp-python", "torch", "transformers", "openvino-genai")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:  # not installed here: the row is absent too
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", action="append", help="a row's name; repeat for several")
    parser.add_argument("--out", type=Path, default=Path("docs/data/cpu-runtimes.json"))
    args = parser.parse_args()
    from deploy.builder.sources import bundled_model_dir

    model_dir = bundled_model_dir("SmolLM2-135M-Instruct")
    plan = rows(model_dir, set(args.only or ()))
    results: dict[str, list] = {name: [] for name, _, _ in plan}
    for run in range(args.runs):
        for name, load, concurrent in plan:  # one row loaded at a time, rows alternating
            row = load()
            results[name].append(measure(row, args.tokens, concurrent))
            print(f"run {run + 1} {name}: {json.dumps(results[name][-1])}", flush=True)
            engine = getattr(row, "engine", None)
            if engine is not None:
                engine.close()
            del row
    report = {"machine": cpu_name(), "cores": os.cpu_count(), "versions": _versions(),
              "tokens": args.tokens, "one_stream_prompt": LONG, "runs": args.runs, "questions": QUESTIONS,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
