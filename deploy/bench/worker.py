"""One benchmark setting, measured in a fresh process: `python -m deploy.bench.worker SPEC.json`.

Loads the setting's assistant, serves it on loopback with the kit's own server, and measures:
start time, batch-1 decode, offline throughput, serving at each concurrency through the OpenAI API
(from a client in its own process: deploy/bench/load.py says why), memory (/memory's report, with
the planner's prediction), and quality against the reference setting's logits on the task
prompts. Engine-direct work runs on the server's event loop, because an LMDeploy engine is bound
to the loop that first uses it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from deploy.bench.load import serving_rows_apart
from deploy.bench.scoring import score
from deploy.builder.gate import UnscorableLogits, agreement, scorable
from deploy.builder.pipeline import build
from deploy.capacity.memory import memory_report
from deploy.engines import GenerationParams
from deploy.recipe import load_recipe
from deploy.recipe.tasks import load_tasks
from deploy.serve.app import create_app
from deploy.serve.assistant import Assistant
from deploy.serve.config import serve_config
from deploy.serve.run import ServerThread


async def _decode(assistant: Assistant, prompt: str, tokens: int) -> dict:
    params = GenerationParams(max_tokens=tokens)
    start = time.perf_counter()
    first = last = None
    async for delta in assistant.astream([{"role": "user", "content": prompt}], params):
        if first is None and delta.text:
            first = time.perf_counter()
        last = delta
    end = time.perf_counter()
    first = first or end
    return {"ttft_ms": (first - start) * 1000, "tokens": last.completion_tokens,
            "decode_tok_per_s": (last.completion_tokens - 1) / (end - first) if end > first else None}


async def _offline(assistant: Assistant, prompts: list[str], tokens: int) -> dict:
    params = GenerationParams(max_tokens=tokens)
    start = time.perf_counter()
    answers = await asyncio.gather(*(assistant.achat([{"role": "user", "content": p}], params)
                                     for p in prompts))
    seconds = time.perf_counter() - start
    produced = sum(a.completion_tokens for a in answers)
    return {"prompts": len(prompts), "tokens": produced, "seconds": seconds,
            "tok_per_s": produced / seconds}


async def _quality(assistant: Assistant, tasks, tokens: int, reference: dict | None) -> tuple[dict, dict]:
    """This setting's answers and scores, and its logits against the reference setting's.

    The reference setting (the first) records its answers' token sequences and next-token
    distributions, then is measured like every other setting: a second logits pass over the same
    sequences, compared with the record. It shows the engine's own run-to-run noise, which is the
    floor for the other rows; it is not assumed to be 1.0."""
    import torch

    from deploy.engines.chat_format import encode_chat

    engine = assistant.engine
    params = GenerationParams(max_tokens=tokens)
    answers, scores, rows = [], [], []
    # Every answer before any logits: on LMDeploy's PyTorch engine, answers asked for after a
    # logits request came back with 2 tokens (docs/data/gpu-2026-11-26-logits/).
    for task in tasks:
        answer = await assistant.achat(task.messages(), params)
        answers.append(answer.text)
        if task.reference:
            scores.append(score(answer.text, task.reference))
    agree = positions = 0
    kl = 0.0
    unscored = None
    try:  # NaN logits anywhere give no numbers, rather than a top-1 of 0
        if reference is None:  # this is the reference: record its sequences and distributions
            for task, text in zip(tasks, answers, strict=True):
                prompt = encode_chat(engine.tokenizer, assistant.messages(task.messages()))
                ids = prompt + (engine.tokenizer(text, add_special_tokens=False)["input_ids"]
                                or [engine.tokenizer.eos_token_id])
                logits = scorable((await engine.prompt_logits([ids]))[0], engine)
                rows.append({"ids": ids, "start": len(prompt) - 1, "logprobs": torch.log_softmax(
                    logits[len(prompt) - 1:len(ids) - 1], -1).half()})
        elif reference.get("not_scored"):
            raise UnscorableLogits(f"the reference setting has no record: {reference['not_scored']}")
        for row in reference["rows"] if reference is not None else rows:
            logits = scorable((await engine.prompt_logits([row["ids"]]))[0], engine)
            q = torch.log_softmax(logits[row["start"]:len(row["ids"]) - 1].float(), -1)
            matched, row_kl, count = agreement(row["logprobs"], q)
            agree, kl, positions = agree + matched, kl + row_kl, positions + count
    except UnscorableLogits as exc:
        agree = positions = 0
        unscored = str(exc)
        if reference is None and len(rows) < len(tasks):  # the record itself is incomplete
            rows = []
    quality = {
        "prompts": len(tasks),
        "top1_agreement": agree / positions if positions else None,
        "mean_kl": kl / positions if positions else None,
        "compared_positions": positions,
        **({"not_scored": unscored} if unscored else {}),
        "scored": len(scores),
        **{k: sum(s[k] for s in scores) / len(scores) for k in ("exact", "contains", "rouge_l")
           if scores},
        "answers": [{"prompt": t.prompt, "answer": a} for t, a in zip(tasks, answers, strict=True)],
    }
    return quality, {"rows": rows, **({"not_scored": unscored} if unscored and not rows else {})}


def measure(spec: dict) -> dict:
    import torch

    profile = spec["profile"]
    recipe = load_recipe(spec["recipe"])
    result: dict = {"setting": spec["label"], "recipe": recipe.name,
                    "weights": recipe.quantization.weights, "kv_cache": recipe.quantization.kv_cache}
    started = time.perf_counter()
    if recipe.quantization.weights != "none":
        build(recipe, gate=False)
    result["build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    # The benchmark built without the gate (it measures quality itself, against the reference).
    assistant = Assistant.from_recipe(recipe, force=True)
    result["load_s"] = time.perf_counter() - started
    result["engine"] = assistant.engine.name
    tasks = load_tasks(Path(spec["tasks"]), profile["quality_prompts"])
    prompts = [t.prompt for t in load_tasks(Path(spec["tasks"]))]
    try:
        with ServerThread(create_app(serve_config(recipe), assistant, ui=False)) as server:
            started = time.perf_counter()
            server.call(assistant.achat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=4)))
            result["first_request_s"] = time.perf_counter() - started
            result["start_to_first_token_s"] = result["load_s"] + result["first_request_s"]
            # The first pass at a new batch shape pays one-time costs (LMDeploy captures CUDA
            # graphs and compiles kernels per shape): warm up each measurement before timing it,
            # and take the median of three batch-1 runs.
            runs = [server.call(_decode(assistant, prompts[0], profile["decode_tokens"]))
                    for _ in range(3)]
            result["decode"] = sorted(runs, key=lambda r: r["decode_tok_per_s"] or 0)[1]
            result["decode_runs"] = [r["decode_tok_per_s"] for r in runs]
            offline = [prompts[i % len(prompts)] for i in range(profile["offline_prompts"])]
            server.call(_offline(assistant, offline, 4))
            result["offline"] = server.call(_offline(assistant, offline, profile["offline_tokens"]))
            result["memory"] = memory_report(assistant.engine, recipe)
            if torch.cuda.is_available():
                result["memory"]["torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            result["serving"] = serving_rows_apart(server.url + "/v1", recipe.name, prompts, profile)
            reference = None
            if spec.get("reference") and Path(spec["reference"]).is_file():
                reference = torch.load(spec["reference"])
            quality, ours = server.call(_quality(assistant, tasks, profile["quality_tokens"], reference))
            result["quality"] = quality
            if spec.get("save_reference"):
                torch.save(ours, spec["save_reference"])
    finally:
        assistant.close()
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = measure(spec)
    out = Path(spec["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    tmp.replace(out)  # a setting's result appears whole or not at all: resume relies on it


if __name__ == "__main__":  # LMDeploy's start-up check spawns processes that re-import this
    main()
