"""First-token latency and decode speed of a recipe's model, through the kit's own Assistant.

Usage: python -m benchmarks.measure_latency [RECIPE] [--runs N] [--tokens N]
Prints one Markdown table row per prompt, and the medians. Speeds on shared CPUs are noisy:
quote the median of several runs and name the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

from deploy.engines import GenerationParams
from deploy.serve.assistant import Assistant

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in two sentences.",
]


async def measure(assistant: Assistant, prompt: str, tokens: int) -> tuple[float, float, int]:
    params = GenerationParams(max_tokens=tokens)
    start = time.perf_counter()
    first = None
    last = None
    async for delta in assistant.astream([{"role": "user", "content": prompt}], params):
        if first is None and delta.text:
            first = time.perf_counter()
        last = delta
    end = time.perf_counter()
    decoded = last.completion_tokens - 1  # tokens after the first
    return first - start, decoded / (end - first) if end > first else 0.0, last.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2-cpu.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    started = time.perf_counter()
    assistant = Assistant.from_recipe(args.recipe)
    load = time.perf_counter() - started
    asyncio.run(measure(assistant, "Hi", 4))  # warm-up
    ttfts, speeds = [], []
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; engine "
          f"{assistant.engine.name}; load {load:.1f}s")
    print("| prompt | first token (ms) | decode tok/s | tokens |\n|---|---|---|---|")
    for _ in range(args.runs):
        for prompt in PROMPTS:
            ttft, speed, n = asyncio.run(measure(assistant, prompt, args.tokens))
            ttfts.append(ttft)
            speeds.append(speed)
            print(f"| {prompt[:40]} | {ttft * 1000:.0f} | {speed:.1f} | {n} |")
    print(f"\nmedian first-token latency {statistics.median(ttfts) * 1000:.0f} ms, "
          f"median decode {statistics.median(speeds):.1f} tok/s over {len(speeds)} requests")
    assistant.close()


if __name__ == "__main__":
    main()
