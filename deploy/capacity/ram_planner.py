"""Will this recipe fit this machine's memory on a CPU engine? Predicted from config.json alone (and
the GGUF's size, where the file is here).

The model of what a CPU server holds (its resident set, what `docker stats` shows and what a memory
limit counts):
    llama.cpp     base + weights + KV + working
      weights     the GGUF, mapped and read whole
      KV          fp16 K and V for session_len tokens of each of max_batch_size sequences, plus one
                  for scoring (sizing.llamacpp_kv_cells): allocated and cleared when the engine
                  starts, so it is resident before the first request
      working     llama.cpp's compute buffer, sized for one step's tokens: their logits (4-byte
                  floats over the vocabulary) dominate it
    transformers  base + weights + KV + working, at full sessions (the KV grows as they fill)
      working     what prefills and requests joining the batch hold beside the KV (copies of the
                  batch's cache, the allocator's arenas): 3x the KV, an upper bound over the 1.2x
                  to 2.6x measured with the sessions nearly full
    base          the server process without the model: Python, the HTTP server, the engine's
                  libraries, and Gradio in `gradio` mode; measured (docs/planner.md, "On a CPU")
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.engines.sizing import (
    DTYPE_BYTES,
    kv_bytes_per_token,
    llamacpp_batch_tokens,
    llamacpp_kv_cells,
    weight_bytes,
)
from deploy.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)
GIB = 2**30
MIB = 2**20
# The server's resident set without its model: `python -m deploy serve` on the bundled model at
# engine.session_len 512 and max_batch_size 1, its peak after eight answers less the weights (and,
# for llama.cpp, its KV and compute buffer); AMD EPYC (AVX2, AVX-512, AVX512-BF16), Python 3.11,
# llama-cpp-python 0.3.36, torch 2.13.0+cpu; raw: docs/data/cpu-ram-plan.json, 3 starts each.
BASE_BYTES = {
    ("llamacpp", "api"): 75 * MIB,
    ("llamacpp", "gradio"): 154 * MIB,
    ("transformers", "api"): 452 * MIB,
    ("transformers", "gradio"): 516 * MIB,
}
LOGIT_BYTES = 4  # llama.cpp keeps logits as 32-bit floats
TRANSFORMERS_WORKING_PER_KV = 3  # measured: docs/data/cpu-ram-plan.json, the "filled" settings
HEADROOM = 0.9  # plan to use at most this share of the memory: the OS, page cache and other work


@dataclass
class RamPlan:
    machine: str
    ram_bytes: int
    backend: str
    mode: str
    base_bytes: int
    weight_bytes: int
    weights_from: str
    kv_bytes_per_token: int
    kv_cache_bytes: int
    working_bytes: int
    rss_bytes: int
    fits: bool
    session_len: int  # the recipe's, capped at what the model was trained for (as the engines do)
    sessions: int  # full sessions the KV covers: llama.cpp's allocation, or the wanted ones
    sessions_that_fit: int
    kv_allocated_at_start: bool
    advice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"device": "cpu", **asdict(self)}


def this_machine() -> tuple[str, int]:
    """This machine as a plan's memory: its RAM, or its cgroup's memory limit where lower."""
    from deploy.engines.hardware import usable_ram

    total, why = usable_ram()
    return f"this machine, {why}", total


def parse_ram(text: str) -> tuple[str, int]:
    """A memory size such as 16, 16G, 16GiB (gibibytes) or 512M, 512MiB (mebibytes)."""
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(G|GB|GIB|M|MB|MIB)?", text.strip().upper())
    if not size:
        raise RecipeError(f"--ram {text!r} is not a size: write it as 16GiB or 512MiB.")
    unit = MIB if (size.group(2) or "G").startswith("M") else GIB
    return f"a machine with {text.strip()}", int(float(size.group(1)) * unit)


def is_cpu_recipe(recipe: Recipe, gpu_here: bool) -> bool:
    """llama.cpp always runs on the CPU; transformers does where no GPU is found."""
    backend = recipe.engine.backend
    return backend == "llamacpp" or (backend == "transformers" and not gpu_here)


def plan_ram(recipe: Recipe, config: dict, ram: tuple[str, int], gguf: Path | None = None,
             sessions: int | None = None) -> RamPlan:
    """The prediction for a machine of `ram` = (name, bytes). `gguf`: the model's GGUF, when it is
    here, whose size is then the weights' (else the arithmetic of sizing.weight_bytes)."""
    name, total = ram
    engine, quant = recipe.engine, recipe.quantization
    backend = "llamacpp" if engine.backend == "llamacpp" else "transformers"
    mode = "gradio" if recipe.serve.mode == "gradio" else "api"
    base = BASE_BYTES[(backend, mode)]
    session_len = min(engine.session_len, config.get("max_position_embeddings") or engine.session_len)
    if gguf is not None and gguf.is_file():
        weights, weights_from = gguf.stat().st_size, f"the file {gguf.name}"
    else:
        dtype = "float16" if backend == "llamacpp" else engine.dtype
        weights = weight_bytes(config, quant.weights, dtype, quant.group_size)
        weights_from = "config.json"
    # llama.cpp's KV is fp16; the transformers engine keeps it in the weights' dtype
    per_token = kv_bytes_per_token(config, "none", 2 if backend == "llamacpp" else DTYPE_BYTES[engine.dtype])
    per_session = per_token * session_len
    if backend == "llamacpp":
        wanted = engine.max_batch_size
        kv = per_token * llamacpp_kv_cells(session_len, wanted)
        working = llamacpp_batch_tokens(wanted) * config["vocab_size"] * LOGIT_BYTES
        # the scoring sequence's KV is allocated beside the sessions
        fit = (int(total * HEADROOM) - base - weights - working) // per_session - 1
    else:
        wanted = sessions or engine.max_batch_size
        kv = per_session * wanted
        working = kv * TRANSFORMERS_WORKING_PER_KV
        fit = (int(total * HEADROOM) - base - weights) // (per_session * (1 + TRANSFORMERS_WORKING_PER_KV))
    rss = base + weights + kv + working
    result = RamPlan(name, total, backend, mode, base, weights, weights_from, per_token, kv, working,
                     rss, rss <= total * HEADROOM, session_len, wanted, max(0, fit),
                     backend == "llamacpp")
    result.advice = _advice(result)
    return result


def _advice(p: RamPlan) -> list[str]:
    if p.fits:
        return []
    share = f"{HEADROOM:.0%} of {p.machine} ({p.ram_bytes / GIB:.1f} GiB)"
    if p.sessions_that_fit == 0:
        smaller = ("quantization.weights q8_0 or q4_1" if p.backend == "llamacpp"
                   else "quantization.weights w4a16")
        return [f"The weights and buffers ({(p.base_bytes + p.weight_bytes + p.working_bytes) / GIB:.1f}"
                f" GiB) leave no room for one session of {p.session_len} tokens in {share}: use "
                f"{smaller}, a shorter engine.session_len, or a machine with more memory."]
    field_ = "engine.max_batch_size" if p.backend == "llamacpp" else "engine.max_batch_size (or --sessions)"
    return [f"{p.sessions} sessions of {p.session_len} tokens need {p.kv_cache_bytes / GIB:.1f} GiB of KV "
            f"cache; {share} holds {p.sessions_that_fit}: set {field_} to {p.sessions_that_fit} or "
            "less, or a shorter engine.session_len."]


def render_ram(recipe: Recipe, p: RamPlan) -> str:
    kv_when = ("allocated at start" if p.kv_allocated_at_start
               else "at full sessions; it grows as they fill")
    lines = [
        f"{recipe.name} on {p.machine} ({p.ram_bytes / GIB:.1f} GiB), {p.backend} on the CPU, "
        f"serve.mode {p.mode}:",
        f"  server process     {p.base_bytes / GIB:8.2f} GiB (Python, HTTP server, libraries)",
        f"  weights            {p.weight_bytes / GIB:8.2f} GiB (from {p.weights_from})",
        f"  KV per token       {p.kv_bytes_per_token / 1024:8.1f} KiB",
        f"  KV cache           {p.kv_cache_bytes / GIB:8.2f} GiB for {p.sessions} sessions of "
        f"{p.session_len} tokens ({kv_when})",
    ]
    lines.append(f"  working memory     {p.working_bytes / GIB:8.2f} GiB (" + (
        "llama.cpp's compute buffer: one step's logits)" if p.backend == "llamacpp"
        else "prefills and joins: copies of the batch's KV)"))
    lines += [
        f"  resident set       {p.rss_bytes / GIB:8.2f} GiB of {HEADROOM:.0%} x "
        f"{p.ram_bytes / GIB:.1f} GiB: {'fits' if p.fits else 'does NOT fit'}",
        f"  full sessions      {p.sessions_that_fit:8d} would fit ({p.sessions} asked for)",
    ]
    lines += [f"  ! {a}" for a in p.advice]
    return "\n".join(lines)


def preflight(recipe: Recipe, config: dict, ram: tuple[str, int], gguf: Path | None) -> str | None:
    """Before a CPU engine loads: an error sentence where llama.cpp's KV alone would take more
    memory than there is (the kernel would kill the server while it clears that KV, with no word
    why), else None. Between 90% and 100% the plan's advice is logged as a warning; transformers'
    plan is an upper bound, so it only warns."""
    p = plan_ram(recipe, config, ram, gguf)
    if p.fits:
        return None
    advice = " ".join(p.advice)
    if p.backend == "llamacpp" and p.rss_bytes > p.ram_bytes:
        change = (f"set engine.max_batch_size to {p.sessions_that_fit} or less, or a shorter "
                  "engine.session_len" if p.sessions_that_fit else
                  "use quantization.weights q8_0 or q4_1, a shorter engine.session_len, or a "
                  "machine with more memory")
        return (f"{recipe.name} would hold {p.rss_bytes / GIB:.1f} GiB on llama.cpp, whose KV cache for "
                f"{p.sessions} sessions of {p.session_len} tokens ({p.kv_cache_bytes / GIB:.1f} GiB) is "
                f"allocated at start, but {p.machine} has {p.ram_bytes / GIB:.1f} GiB: {change}. "
                "`python -m deploy plan RECIPE` shows the sizes.")
    log.warning(
        "%s may hold %.1f GiB, more than %d%% of the %.1f GiB of %s: %s", recipe.name,
        p.rss_bytes / GIB, HEADROOM * 100, p.ram_bytes / GIB, p.machine, advice)
    return None
