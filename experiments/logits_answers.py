"""Prompt logits and later answers on LMDeploy's PyTorch engine: does asking for logits cut the
next answers short?

Usage: python -m experiments.logits_answers --model DIR --out FILE [--kv int8]

Seen on the H100 (LMDeploy 0.18): in the builder's gate, which alternated `chat` and
`prompt_logits` (LMDeploy's `async_get_logits`: zero new tokens, all logits), the PyTorch engine's
answers after the first came back with 2 tokens and finish "length" though 32 were asked for. Its
PyTorch engine refuses logits with any other max_new_tokens ("only support output_logits='all'
with max_new_tokens=0"). This script, through the kit's own LMDeployEngine on the PyTorch
backend, asks for 32 tokens on each of 4 prompts, in two fresh engines:
- `interleaved`: each answer followed by the logits of its sequence, as the gate did;
- `answers_first`: the 4 answers, then the 4 sequences' logits, as the gate and benchmark now do;
and records every answer's token count and finish, and what in each sequence's logits is not finite
(NaN, +inf, -inf).
Writes FILE (JSON). Random weights: the text means nothing; the counts do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "Explain what a GPU is in one sentence."]


async def run(engine, way: str) -> dict:
    from deploy.engines import GenerationParams
    from deploy.engines.chat_format import encode_chat

    params = GenerationParams(max_tokens=32)
    counts, values, pending = [], [], []

    async def logits_of(messages, text) -> dict:
        ids = encode_chat(engine.tokenizer, messages) + engine.tokenizer(
            text, add_special_tokens=False)["input_ids"]
        return not_finite((await engine.prompt_logits([ids]))[0])

    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        answer = await engine.chat(messages, params)
        counts.append([answer.completion_tokens, answer.finish_reason])
        if way == "interleaved":
            values.append(await logits_of(messages, answer.text))
        else:
            pending.append((messages, answer.text))
    for messages, text in pending:
        values.append(await logits_of(messages, text))
    return {"answers": counts, "logits_finite": not any(v["nan"] or v["inf"] or v["neg_inf"] for v in values),
            "logits": values}


def not_finite(logits) -> dict:
    """What in one sequence's logits (positions x vocabulary) is not a finite number: NaN (the
    computation broke), +inf, or -inf (a row masked out, which a softmax turns into 0)."""
    import torch

    bad = ~logits.isfinite()
    return {"positions": int(logits.shape[0]), "positions_not_finite": int(bad.any(-1).sum()),
            "nan": int(logits.isnan().sum()), "inf": int((logits == float("inf")).sum()),
            "neg_inf": int((logits == float("-inf")).sum()),
            "all_nan_positions": int(logits.isnan().all(-1).sum()), "dtype": str(logits.dtype),
            "max_abs_finite": float(torch.where(bad, 0, logits).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kv", default="none", choices=["none", "int8", "int4"])
    args = parser.parse_args()
    from deploy.engines.config import EngineConfig
    from deploy.engines.lmdeploy_engine import LMDeployEngine

    results = {}
    for way in ("interleaved", "answers_first"):
        started = time.perf_counter()
        engine = LMDeployEngine(args.model, EngineConfig(
            backend="lmdeploy-pytorch", dtype="float16", session_len=2048, max_batch_size=8,
            cache_max_entry_count=0.2, kv_cache=args.kv, trust_remote_code=True))
        try:
            got = asyncio.run(run(engine, way))
        finally:
            engine.close()
        results[way] = {**got, "seconds": round(time.perf_counter() - started, 1)}
        print(way, results[way], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": str(args.model),
                                    "kv_cache": args.kv, **results}, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
