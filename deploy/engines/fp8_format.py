"""Blocked FP8 weights, the layout LMDeploy 0.18's TurboMind reads with `model_format='fp8'`
(lmdeploy/turbomind/weight_format.py): every `*_proj.weight` stored as float8_e4m3fn, with a
float32 `*_proj.weight_scale_inv` of shape [ceil(out/128), ceil(in/128)] holding the multiplier of
each 128x128 block, and `quantization_config` in config.json saying so. The builder writes it
(deploy/builder/fp8.py); the transformers engine reads it back by multiplying out, so that the
quality gate can score FP8's rounding on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
SCALE_SUFFIX = "_scale_inv"


def is_fp8_folder(model_dir: Path) -> bool:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "fp8"


def quantized_name(name: str, tensor: torch.Tensor) -> bool:
    """Whether the checkpoint tensor `name` is one FP8 stores in blocks: the weight of every linear
    layer inside the decoder layers, whatever the family calls it (Llama's `*_proj`, InternLM2's
    packed `wqkv`, `wo` and `w1`-`w3`). Inside a layer only linears are 2-D (norms are 1-D); the
    embeddings and the output head sit outside the layers and stay as they are, as TurboMind
    expects. A mixture-of-experts router (`gate.weight`) is a linear TurboMind keeps unquantized."""
    return (tensor.dim() == 2 and name.endswith(".weight") and ".layers." in name
            and not name.endswith(".gate.weight"))


def packed_qkv_misfit(model_config: dict) -> str | None:
    """Why TurboMind cannot read FP8 scales of this model's packed query/key/value matrix, or None.
    InternLM2 packs them into one `wqkv`, and TurboMind splits the block scales per head
    (lmdeploy/turbomind/models/internlm2.py, _split_qkv_gqa): a 128-row block must be one head."""
    if model_config.get("model_type") != "internlm2":
        return None
    heads = model_config.get("num_attention_heads") or 1
    head_dim = model_config.get("head_dim") or model_config.get("hidden_size", 0) // heads
    if head_dim % BLOCK == 0:
        return None
    return (f"its packed wqkv has heads of {head_dim} rows, and TurboMind reads FP8 block scales "
            f"of a packed wqkv only when each head is a multiple of {BLOCK} rows")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 per-block multiplier). Edge blocks of a dimension that is not
    a multiple of 128 (SmolLM2's 576) are scaled over the part that exists."""
    out, inp = weight.shape
    rows, cols = math.ceil(out / BLOCK), math.ceil(inp / BLOCK)
    padded = F.pad(weight.float(), (0, cols * BLOCK - inp, 0, rows * BLOCK - out))
    blocks = padded.view(rows, BLOCK, cols, BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    scaled = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = scaled.to(torch.float8_e4m3fn).view(rows * BLOCK, cols * BLOCK)[:out, :inp].contiguous()
    return q, scale_inv.float()


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    out, inp = q.shape
    scale = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out, :inp]
    return (q.float() * scale).to(dtype)


def load_dequantized(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """A transformers model from an FP8 folder, each block multiplied back into `dtype`: the
    values TurboMind computes with, on any device."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(shard))
    for name in [n for n in state if n.endswith(SCALE_SUFFIX)]:
        weight = name.removesuffix(SCALE_SUFFIX)
        state[weight] = dequantize(state[weight], state.pop(name), dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"{model_dir} does not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model
