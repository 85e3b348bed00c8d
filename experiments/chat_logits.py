"""Why did the benchmark score LMDeploy's PyTorch engine at 1.9% top-1 agreement on InternLM2-7B
shapes, when the same engine agrees with the project's transformers implementation on 98.8-99.2% of
random-token positions (experiments/internlm2_logits.py)?

Usage: python -m experiments.chat_logits --model DIR --out FILE

The benchmark's quality pass (deploy/builder/gate.py) differs from that direct test in two ways: its
sequences are chat prompts followed by an answer, and the engine has answered those prompts before
it is asked for their logits. This separates them. Against transformers (DIR must carry the project's
code: make_random_internlm2.py --modeling), through the kit's own LMDeployEngine on the PyTorch
backend, fp16 on the GPU, one request per sequence, next-token top-1 agreement and mean KL over
every position of:
- `random_fresh`: 4 sequences of 64 random token ids, before anything else is asked;
- `chat_fresh`: 4 chat prompts rendered by the kit, each followed by 24 tokens of a fixed text;
- `chat_after_answers`: the same sequences again, after the engine answered the 4 prompts
  (32 tokens each), as the gate and the benchmark ask them;
- `random_after_answers`: the random sequences again, last;
- `chat_plain_ids`: the chat sequences with their special tokens (ids below 100) swapped for id 500;
- `chat_no_pad`, `chat_no_bos`: only id 2 (the config's pad_token_id, `<|im_end|>` here), or only
  id 1 (`<|im_start|>`), swapped for id 500;
- `random_lengths`: random ids again, in sequences of 37, 63, 65, 100 and 128 tokens (the others
  are 64 long: one KV block exactly).
Writes FILE (JSON). Random weights: agreement is only meaningful between two readings of the same
weights, which is what this compares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from experiments.internlm2_logits import against

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "Explain what a GPU is in one sentence."]
ANSWER = "The answer is short, and it is the same for every prompt so that only the prompt differs."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from deploy.engines import GenerationParams
    from deploy.engines.chat_format import encode_chat, load_tokenizer
    from deploy.engines.config import EngineConfig
    from deploy.engines.lmdeploy_engine import LMDeployEngine

    tokenizer = load_tokenizer(args.model, trust_remote_code=True)
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"][:24]
    chat = [encode_chat(tokenizer, [{"role": "user", "content": p}]) + answer for p in PROMPTS]
    gen = torch.Generator().manual_seed(0)
    random = torch.randint(100, 30000, (4, 64), generator=gen).tolist()
    plain = [[500 if t < 100 else t for t in s] for s in chat]
    no_pad = [[500 if t == 2 else t for t in s] for s in chat]
    no_bos = [[500 if t == 1 else t for t in s] for s in chat]
    lengths = [torch.randint(100, 30000, (n,), generator=gen).tolist() for n in (37, 63, 65, 100, 128)]

    hf = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float16)
    hf = hf.cuda().eval()
    with torch.no_grad():
        ref = {name: [hf(torch.tensor([s], device="cuda"), use_cache=False).logits[0].float().cpu()
                      for s in seqs] for name, seqs in (("chat", chat), ("random", random), ("plain", plain),
                                          ("lengths", lengths), ("no_pad", no_pad), ("no_bos", no_bos))}
    del hf
    torch.cuda.empty_cache()

    engine = LMDeployEngine(args.model, EngineConfig(backend="lmdeploy-pytorch", dtype="float16",
                                                     session_len=2048, max_batch_size=8,
                                                     cache_max_entry_count=0.2, trust_remote_code=True))

    async def one_each(seqs):
        return [(await engine.prompt_logits([s]))[0] for s in seqs]

    async def steps() -> dict:
        got = {"random_fresh": await one_each(random), "chat_fresh": await one_each(chat)}
        params = GenerationParams(max_tokens=32)
        tokens = [(await engine.chat([{"role": "user", "content": p}], params)).completion_tokens
                  for p in PROMPTS]
        got["chat_after_answers"] = await one_each(chat)
        got["random_after_answers"] = await one_each(random)
        got["chat_plain_ids"] = await one_each(plain)
        got["random_lengths"] = await one_each(lengths)
        got["chat_no_pad"] = await one_each(no_pad)
        got["chat_no_bos"] = await one_each(no_bos)
        return got, tokens

    started = time.perf_counter()
    try:
        got, tokens = asyncio.run(steps())
    finally:
        engine.close()
    source = {"random_fresh": "random", "chat_fresh": "chat", "chat_after_answers": "chat",
              "random_after_answers": "random", "chat_plain_ids": "plain", "random_lengths": "lengths",
              "chat_no_pad": "no_pad", "chat_no_bos": "no_bos"}
    results = {name: against(ref[source[name]], logits) for name, logits in got.items()}
    # The two readings of the chat sequences by the engine itself, before and after the answers.
    results["chat_fresh_vs_after"] = against(got["chat_fresh"], got["chat_after_answers"])
    report = {"date": time.strftime("%Y-%m-%d"), "model": str(args.model), "answer_tokens": tokens,
              "lengths": {"chat": [len(s) for s in chat], "random": [len(s) for s in random],
                          "random_lengths": [len(s) for s in lengths]},
              "rows_returned": {name: [int(t.shape[0]) for t in logits] for name, logits in got.items()},
              "seconds": round(time.perf_counter() - started, 1), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    for name, result in results.items():
        print(name, round(result["top1_agreement"], 4), round(result["mean_kl"], 5), flush=True)


if __name__ == "__main__":
    main()
