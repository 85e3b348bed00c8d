"""Why did LMDeploy's PyTorch engine answer 1-2 tokens where 32 were asked (the flagship issue)?

On the lent GPU: `python -m experiments.short_answers --model /tmp/xlab-models/7b --out DIR`.
For the benchmark's first task prompts it asks each backend for 32 greedy tokens through the kit
and records each answer's token ids, its finish reason, and which of them are stop ids; then the
same prompts straight through LMDeploy's pipeline with no stop ids at all. Writes DIR/short.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from deploy.engines import GenerationParams
from deploy.recipe import parse_recipe
from deploy.recipe.tasks import default_tasks_file, load_tasks
from deploy.serve.assistant import Assistant


def through_kit(model: str, backend: str, prompts: list[str]) -> dict:
    recipe = parse_recipe({"name": f"short-{backend}", "model": {"source": "local", "path": model},
                           "engine": {"backend": backend, "dtype": "float16", "session_len": 4096,
                                      "max_batch_size": 8, "cache_max_entry_count": 0.2}})
    rows = []

    async def run(assistant: Assistant) -> None:
        engine = assistant.engine
        for prompt in prompts:
            ids = engine.encode(assistant.messages([{"role": "user", "content": prompt}]))
            tokens, finish = 0, None
            async for delta in engine.stream_tokens(ids, GenerationParams(max_tokens=32, logprobs=None)):
                finish = delta.finish_reason or finish
                if delta.finish_reason:
                    tokens = delta.completion_tokens
            rows.append({"prompt": prompt[:40], "completion_tokens": tokens, "finish": finish,
                         "prompt_tokens": len(ids)})

    with Assistant.from_recipe(recipe, force=True) as assistant:
        asyncio.run(run(assistant))
        stop_ids = getattr(assistant.engine, "stop_ids", None)
    return {"backend": backend, "stop_ids": stop_ids, "answers": rows}


def raw_pipeline(model: str, prompts: list[str]) -> dict:
    """LMDeploy alone, no kit, no stop ids: the token ids it generates and why it stopped."""
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    pipe = pipeline(model, backend_config=PytorchEngineConfig(cache_max_entry_count=0.2,
                                                              session_len=4096))
    rows = []
    for ignore_eos in (False, True):
        config = GenerationConfig(max_new_tokens=32, do_sample=False, ignore_eos=ignore_eos)
        for out in pipe([[{"role": "user", "content": p}] for p in prompts], gen_config=config):
            rows.append({"ignore_eos": ignore_eos, "tokens": len(out.token_ids),
                         "finish": out.finish_reason, "first_ids": out.token_ids[:4],
                         "last_ids": out.token_ids[-2:], "text": out.text[:60]})
    pipe.close()
    return {"backend": "lmdeploy-pytorch pipeline (its own chat template)", "answers": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default="lmdeploy-pytorch,lmdeploy-turbomind")
    args = parser.parse_args()
    prompts = [t.prompt for t in load_tasks(default_tasks_file(), 6)]
    result = {"runs": [through_kit(args.model, b, prompts) for b in args.backends.split(",")]}
    result["runs"].append(raw_pipeline(args.model, prompts))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "short.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
