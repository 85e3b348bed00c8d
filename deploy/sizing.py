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
