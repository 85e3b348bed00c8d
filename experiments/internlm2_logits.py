"""Which part of InternLM2 does LMDeploy's PyTorch engine read differently? Its logits against the
project's transformers implementation (tests/fixtures/internlm2_hf/), on small InternLM2 checkpoints that
differ in one thing each.

Usage: python -m experiments.internlm2_logits --tok TOKDIR --models DIR --out FILE

The benchmark on InternLM2-7B shapes (docs/bench/h100-turbomind-internlm2) found the PyTorch
engine agreeing with TurboMind on 1.9% of next tokens, while the transformers implementation
agreed with TurboMind on 97.6%. Variants (random weights, `small` shapes, fp16 on the GPU):
- `gqa`: as published (8 query heads share 2 KV heads; RoPE theta 1e6);
- `mha`: 8 KV heads, so the packed `wqkv` groups hold one query head each;
- `theta1e4`: GQA with RoPE theta 10,000 (Llama-2's);
- `vocab92544`, `layers32`: InternLM2-7B's vocabulary, or its depth, on small shapes;
- `7b`: InternLM2-7B's shapes whole.
For each: top-1 agreement and mean KL(transformers || PyTorch engine) over every position of 4
sequences of 64 random token ids, asked of the engine in one request and then one request per
sequence (as the benchmark's quality pass asked). Writes FILE (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {"gqa": [], "mha": ["--kv-heads", "8"], "theta1e4": ["--rope-theta", "10000"],
            # What else differs at 7B, where the engine disagreed: the vocabulary, depth, all of it.
            "vocab92544": ["--vocab", "92544"], "layers32": ["--layers", "32"], "7b": ["--size", "7b"]}


def make(models: Path, tok: Path, name: str, extra: list[str]) -> Path:
    out = models / f"internlm2-small-{name}"
    if not (out / "config.json").is_file():
        maker = ROOT / "tools" / "make_random_internlm2.py"
        subprocess.run([sys.executable, str(maker), str(out), str(tok), "--size", "small", "--modeling",
                        *extra], check=True)
    return out


def compare(model: Path, seqs: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from deploy.engines.config import EngineConfig
    from deploy.engines.lmdeploy_engine import LMDeployEngine

    hf = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, dtype=torch.float16)
    hf = hf.cuda().eval()
    with torch.no_grad():
        ref = [hf(torch.tensor([s], device="cuda"), use_cache=False).logits[0].float().cpu() for s in seqs]
    del hf
    torch.cuda.empty_cache()
    engine = LMDeployEngine(model, EngineConfig(backend="lmdeploy-pytorch", dtype="float16", session_len=2048,
                                                max_batch_size=8, cache_max_entry_count=0.2,
                                                trust_remote_code=True))

    async def both():  # one request for all sequences, then one request per sequence
        together = await engine.prompt_logits(seqs)
        return together, [(await engine.prompt_logits([s]))[0] for s in seqs]

    try:
        together, one_by_one = asyncio.run(both())
    finally:
        engine.close()
    return {"one_request": against(ref, together), "one_request_each": against(ref, one_by_one)}


def against(ref: list, got: list) -> dict:
    import torch

    agree = kl = n = 0.0
    per_sequence = []
    for r, g in zip(ref, got, strict=True):
        p, q = torch.log_softmax(r, -1), torch.log_softmax(g[:len(r)], -1)
        matched = float((r.argmax(-1) == g[:len(r)].argmax(-1)).sum())
        per_sequence.append(matched / len(r))
        agree += matched
        kl += float((p.exp() * (p - q)).sum())
        n += len(r)
    return {"top1_agreement": agree / n, "mean_kl": kl / n, "positions": int(n),
            "per_sequence_top1": per_sequence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tok", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    import torch

    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(100, 30000, (4, 64), generator=gen).tolist()
    results = {}
    for name in args.variants.split(","):
        extra = VARIANTS[name]
        started = time.perf_counter()
        results[name] = {**compare(make(args.models, args.tok, name, extra), seqs),
                         "seconds": round(time.perf_counter() - started, 1)}
        print(name, results[name], flush=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
