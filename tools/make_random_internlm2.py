"""A random-weight checkpoint of the InternLM2 architecture, with no hub code: config.json, weights in
safetensors shards, and a tokenizer copied from TOKDIR.

Usage: python tools/make_random_internlm2.py OUTDIR TOKDIR [--size tiny|small|7b] [--vocab N]
                                               [--no-rope-parameters] [--modeling]
                                               [--kv-heads N] [--rope-theta X] [--layers N]

Written from the architecture as InternLM2-chat-7B publishes it (config.json and weight names):
- 7b: hidden 4096, 32 layers, 32 query heads and 8 KV heads (GQA), MLP 14336, vocab 92544,
  RoPE theta 1e6; small: hidden 1024, 4 layers, 8 heads, 2 KV heads, MLP 2816; tiny (CPU tests):
  hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 160.
- Attention packs query, key and value into one `attention.wqkv` matrix, grouped per KV head:
  for each KV head, its (heads / kv_heads) query heads, then its key, then its value. The MLP is
  `feed_forward.w1` (gate), `w3` (up) and `w2` (down); the embedding is `model.tok_embeddings`,
  the head `output`.
--vocab sets the embedding rows (default: 92544 for 7b, the tokenizer's size for small); a
tokenizer smaller than the vocabulary just never uses the upper rows. `--no-rope-parameters` leaves
out transformers 5's `rope_parameters`, as the published config.json does. `--modeling` adds the
project's own transformers implementation (tests/fixtures/internlm2_hf/, no hub code) with an `auto_map`,
as published checkpoints add theirs: AWQ calibration and the transformers engine then load it with
trust_remote_code.
Random weights give real speed and memory, not real text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
    "7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
}
SHARD_BYTES = 4 * 2**30
MODELING = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "internlm2_hf"
AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2Model",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}


def config(size: str, vocab: int, rope_parameters: bool, modeling: bool = False,
           kv_heads: int | None = None, theta: float = 1_000_000, layers: int | None = None) -> dict:
    shape = {**SHAPES[size], **({"num_key_value_heads": kv_heads} if kv_heads else {}),
             **({"num_hidden_layers": layers} if layers else {})}
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": vocab,
           **shape, "hidden_act": "silu", "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-5, "rope_theta": theta, "rope_scaling": None, "bias": False,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "torch_dtype": "float16", "attn_implementation": "eager", "initializer_range": 0.02,
           "use_cache": True}
    if rope_parameters:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if modeling:
        cfg["auto_map"] = AUTO_MAP
    return cfg


def tensors(cfg: dict, device: str):
    """Yields (name, tensor) in file order, random normal * 0.02 in fp16 (norms are ones)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = h // heads
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).half().cpu()

    yield "model.tok_embeddings.weight", rand(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "attention.wqkv.weight", rand((heads + 2 * kv) * head_dim, h)
        yield p + "attention.wo.weight", rand(h, heads * head_dim)
        yield p + "feed_forward.w1.weight", rand(inter, h)
        yield p + "feed_forward.w3.weight", rand(inter, h)
        yield p + "feed_forward.w2.weight", rand(h, inter)
        yield p + "attention_norm.weight", torch.ones(h, dtype=torch.float16)
        yield p + "ffn_norm.weight", torch.ones(h, dtype=torch.float16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.float16)
    yield "output.weight", rand(cfg["vocab_size"], h)


def save_sharded(out: Path, named) -> int:
    shards, current, size, total = [], {}, 0, 0
    for name, t in named:
        if current and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
        total += t.numel()
    shards.append(current)
    index = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        index.update({name: fname for name in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": index}, indent=1))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("tokdir", type=Path)
    parser.add_argument("--size", choices=sorted(SHAPES), default="small")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--no-rope-parameters", action="store_true")
    parser.add_argument("--kv-heads", type=int, help="KV heads instead of the size's (e.g. = heads: no GQA)")
    parser.add_argument("--rope-theta", type=float, default=1_000_000)
    parser.add_argument("--layers", type=int, help="decoder layers instead of the size's")
    parser.add_argument("--modeling", action="store_true",
                        help="add tests/fixtures/internlm2_hf/ (transformers code) and its auto_map")
    args = parser.parse_args()
    started = time.time()
    tok_vocab = len(json.loads((args.tokdir / "tokenizer.json").read_text())["model"]["vocab"])
    vocab = args.vocab or (92544 if args.size == "7b" else tok_vocab)
    cfg = config(args.size, vocab, not args.no_rope_parameters, args.modeling, args.kv_heads, args.rope_theta,
                 args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = save_sharded(args.out, tensors(cfg, device))
    for f in args.tokdir.iterdir():
        shutil.copy(f, args.out)
    if args.modeling:
        for f in ("configuration_internlm2.py", "modeling_internlm2.py"):
            shutil.copy(MODELING / f, args.out / f)
    print(f"made {args.out}: InternLM2 {args.size}, {total / 1e6:.0f}M parameters, vocab {vocab}, "
          f"in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
