"""Will this recipe fit this GPU, and with what KV budget? Predicted from config.json alone.

The model of LMDeploy's allocation (PyTorch engine, 0.18) is:
    free    = GPU total - weights - start-up overhead (CUDA context, allocator, CUDA graphs)
    runtime = (max_prefill_token_num + 2 x max_batch_size) x vocab x 2 bytes   (logits buffers)
    KV      = cache_max_entry_count x (free - runtime), in whole blocks of 64 tokens
    used    = weights + overhead + runtime + KV                                  (what nvidia-smi shows)
The overhead constant was measured on the H100 (docs/planner.md); the rest is arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from deploy.engines.sizing import kv_bytes_per_token, weight_bytes
from deploy.recipe import Recipe, RecipeError

GIB = 2**30
MIB = 2**20
BLOCK_TOKENS = 64
OVERHEAD_BYTES = int(1.2 * GIB)  # measured: H100, LMDeploy 0.18 PyTorch engine, 7B fp16
MAX_PREFILL_TOKENS = 8192  # LMDeploy's default max_prefill_token_num
DEFAULT_RATIO = 0.8

# Memory as NVML reports it (total), per card.
GPUS = {
    "T4": 15360 * MIB,
    "A10": 23028 * MIB,
    "A100-40G": 40960 * MIB,
    "A100-80G": 81920 * MIB,
    "H100": 81559 * MIB,
    "H200": 143771 * MIB,
}


@dataclass
class Plan:
    gpu: str
    gpu_total_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    overhead_bytes: int
    runtime_bytes: int
    fits: bool
    kv_cache_bytes: int = 0
    kv_blocks: int = 0
    kv_capacity_tokens: int = 0
    sessions_that_fit: int = 0
    nvidia_smi_used_bytes: int = 0
    cache_setting: str = ""
    wanted_sessions: int = 0
    ratio_for_wanted: float | None = None
    kv_gib_for_wanted: float | None = None
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_gpu(text: str | None) -> tuple[str, int]:
    """A GPU from the table by name (case and dashes ignored), or a size such as 24, 24G, 24GiB."""
    if text is None:
        return "H100", GPUS["H100"]
    key = text.upper().replace("_", "-")
    for name, total in GPUS.items():
        if key in (name.upper(), name.upper().replace("-", "")):
            return name, total
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(G|GB|GIB)?", key)
    if size:
        return f"{size.group(1)} GiB GPU", int(float(size.group(1)) * GIB)
    raise RecipeError(
        f"--gpu {text!r} is neither a known GPU ({', '.join(GPUS)}) nor a size such as 24 or 24GiB."
    )


def plan(recipe: Recipe, config: dict, gpu: str | None = None, sessions: int | None = None,
         gpu_total: tuple[str, int] | None = None) -> Plan:
    """The prediction for a GPU named in the table or sized (`gpu`), or a measured (name, bytes)."""
    name, total = gpu_total or parse_gpu(gpu)
    engine, quant = recipe.engine, recipe.quantization
    weights = weight_bytes(config, quant.weights, engine.dtype, quant.group_size)
    per_token = kv_bytes_per_token(config, quant.kv_cache)
    per_block = per_token * BLOCK_TOKENS
    tp = engine.tp
    runtime = (MAX_PREFILL_TOKENS + 2 * engine.max_batch_size) * config["vocab_size"] * 2
    # With tensor parallelism each GPU holds 1/tp of the weights and of the KV heads.
    free = total - weights // tp - OVERHEAD_BYTES
    result = Plan(gpu=name, gpu_total_bytes=total, weight_bytes=weights,
                  kv_bytes_per_token=per_token, overhead_bytes=OVERHEAD_BYTES,
                  runtime_bytes=runtime, fits=free - runtime > 16 * per_block / tp)
    wanted = sessions or engine.max_batch_size
    result.wanted_sessions = wanted
    if not result.fits:
        result.advice.append(
            f"The weights alone ({weights / GIB:.1f} GiB{' over ' + str(tp) + ' GPUs' if tp > 1 else ''})"
            f" do not fit a {name} ({total / GIB:.1f} GiB) with room for a KV cache: use "
            "quantization.weights: w4a16, a bigger GPU, or engine.tp > 1."
        )
        return result
    if engine.kv_cache_gib is not None:
        blocks = int(engine.kv_cache_gib * GIB // (per_block / tp))
        result.cache_setting = f"kv_cache_gib {engine.kv_cache_gib}"
    else:
        ratio = engine.cache_max_entry_count or DEFAULT_RATIO
        blocks = int(ratio * (free - runtime) // (per_block / tp))
        result.cache_setting = f"cache_max_entry_count {ratio}"
    result.kv_blocks = blocks
    result.kv_capacity_tokens = blocks * BLOCK_TOKENS
    result.kv_cache_bytes = int(blocks * per_block / tp)
    result.sessions_that_fit = result.kv_capacity_tokens // engine.session_len
    result.nvidia_smi_used_bytes = weights // tp + OVERHEAD_BYTES + runtime + result.kv_cache_bytes
    if result.nvidia_smi_used_bytes > total:
        result.advice.append(
            f"{result.cache_setting} asks for more memory than the {name} has: lower it."
        )
    needed_blocks = math.ceil(wanted * engine.session_len / BLOCK_TOKENS)
    needed = needed_blocks * per_block / tp
    result.kv_gib_for_wanted = round(needed / GIB, 2)
    ratio_needed = needed / (free - runtime)
    if ratio_needed < 1:
        result.ratio_for_wanted = math.ceil(ratio_needed * 100) / 100
    else:
        smaller = {"none": "quantization.kv_cache int8 or int4, ", "int8": "quantization.kv_cache "
                   "int4, "}.get(quant.kv_cache, "")
        result.advice.append(
            f"{wanted} full sessions of {engine.session_len} tokens need {needed / GIB:.1f} GiB of KV "
            f"cache but only {(free - runtime) / GIB:.1f} GiB is free after the weights: use "
            f"{smaller}a shorter engine.session_len, or fewer sessions."
        )
    return result


def render(recipe: Recipe, p: Plan) -> str:
    lines = [
        f"{recipe.name} on {p.gpu} ({p.gpu_total_bytes / GIB:.1f} GiB), "
        f"weights {recipe.quantization.weights}, KV cache {recipe.quantization.kv_cache}, "
        f"tp {recipe.engine.tp}:",
        f"  weights            {p.weight_bytes / GIB:8.2f} GiB",
        f"  KV per token       {p.kv_bytes_per_token / 1024:8.1f} KiB",
    ]
    if p.fits:
        lines += [
            f"  KV cache           {p.kv_cache_bytes / GIB:8.2f} GiB at {p.cache_setting}"
            f" = {p.kv_blocks} blocks x {BLOCK_TOKENS} = {p.kv_capacity_tokens:,} tokens",
            f"  full sessions      {p.sessions_that_fit:8d} of {recipe.engine.session_len} tokens",
            f"  nvidia-smi used    {p.nvidia_smi_used_bytes / GIB:8.2f} GiB"
            f" (+{(p.overhead_bytes + p.runtime_bytes) / GIB:.2f} GiB CUDA context and buffers)",
        ]
        if p.ratio_for_wanted is not None:
            lines.append(
                f"  for {p.wanted_sessions} full sessions: cache_max_entry_count >= "
                f"{p.ratio_for_wanted} or kv_cache_gib: {p.kv_gib_for_wanted}"
            )
    lines += [f"  ! {a}" for a in p.advice]
    return "\n".join(lines)
