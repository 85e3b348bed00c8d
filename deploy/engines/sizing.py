"""Memory arithmetic from a model's config alone: KV-cache bytes per token and per block.

One place for the formulas that the engines' /memory report, the planner and the benchmark share.
The KV layouts follow LMDeploy's PyTorch engine: int8 stores one byte per element and int4 half a
byte, each plus an fp16 scale and zero point per token, head and K/V.
"""

from __future__ import annotations

from typing import Any

KV_ELEMENT_BYTES = {"none": 2.0, "int8": 1.0, "int4": 0.5}
KV_SCALE_BYTES = {"none": 0, "int8": 4, "int4": 4}  # fp16 scale + fp16 zero, per head and K/V


def _get(config: Any, name: str, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Hugging Face config object or config.json dict."""
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or _get(config, "hidden_size") // heads
    return _get(config, "num_hidden_layers"), kv_heads, head_dim


def kv_bytes_per_token(config: Any, kv_cache: str = "none", dtype_bytes: float = 2.0) -> int:
    """K and V for every layer: layers x kv_heads x (head_dim x bytes + scales) x 2."""
    layers, kv_heads, head_dim = attention_shape(config)
    element = dtype_bytes if kv_cache == "none" else KV_ELEMENT_BYTES[kv_cache]
    per_head = head_dim * element + KV_SCALE_BYTES[kv_cache]
    return int(layers * kv_heads * per_head * 2)


DTYPE_BYTES = {"auto": 2, "float16": 2, "bfloat16": 2, "float32": 4}
# Bytes per block of 32 weights: q8_0 is 32 int8 and an f16 scale; q4_1 is 32 nibbles, an f16
# scale and an f16 minimum; q4_0 the same without the minimum (ggml-common.h).
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_1": 20, "q4_0": 18}


LLAMACPP_CHUNK = 256  # prompt tokens llama.cpp's engine prefills in one step beside its decode rows


def llamacpp_batch_tokens(max_batch_size: int) -> int:
    """Tokens in one llama_decode of the engine (llamacpp_batcher.py): a decode row per sequence
    plus a chunk of prompt. llama.cpp sizes its compute buffer for this many."""
    return LLAMACPP_CHUNK + max_batch_size


def llamacpp_kv_cells(session_len: int, max_batch_size: int) -> int:
    """Tokens of fp16 KV cache llama.cpp allocates when it starts: session_len for each of
    max_batch_size sequences, plus one sequence kept for scoring (llamacpp_batcher.py)."""
    return session_len * (max_batch_size + 1)


def parameter_counts(config: Any) -> dict[str, int]:
    """Parameters of a Llama-family decoder by kind: `linear` (what AWQ quantizes) and `other`."""
    layers, kv_heads, head_dim = attention_shape(config)
    hidden = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    inter = _get(config, "intermediate_size")
    vocab = _get(config, "vocab_size")
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter  # gate, up, down
    embeddings = vocab * hidden * (1 if _get(config, "tie_word_embeddings", False) else 2)
    norms = (2 * layers + 1) * hidden
    return {"linear": layers * (attention + mlp), "other": embeddings + norms}


def weight_bytes(config: Any, weights: str = "none", dtype: str = "auto", group_size: int = 128) -> int:
    """Bytes of the weights on the GPU. AWQ W4A16: int4 linears plus an fp16 scale and a packed
    int4 zero point per group; FP8: a byte per linear weight plus its blocks' multipliers; GGUF
    q8_0/q4_1 (llama.cpp, in RAM): the linears' blocks; embeddings, lm_head and norms stay fp16."""
    counts = parameter_counts(config)
    if weights == "none":
        return (counts["linear"] + counts["other"]) * DTYPE_BYTES[dtype]
    if weights == "fp8":  # one byte per linear weight, a float32 multiplier per 128x128 block
        return int(counts["linear"] * (1 + 4 / 128**2) + counts["other"] * 2)
    if weights in GGUF_BLOCK_BYTES:  # the linears in blocks of 32; the rest counted as f16, an upper
        # bound (llama.cpp's quantize may store the embeddings smaller too)
        return int(counts["linear"] * GGUF_BLOCK_BYTES[weights] / 32 + counts["other"] * 2)
    linear = counts["linear"]
    groups = linear / group_size
    return int(linear * 0.5 + groups * 2 + groups * 0.5 + counts["other"] * 2)
