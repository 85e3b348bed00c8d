"""The benchmark: a matrix of settings, each measured in a fresh process, in one report.

Default on a GPU: LMDeploy fp16, W4A16, KV int8, W4A16 + KV int8, and transformers fp16. On a CPU:
llama.cpp F16 and Q4_1 with transformers bf16 for a recipe served by llama.cpp; otherwise
transformers bf16 and transformers W4A16 (HQQ 4-bit). Each setting's result is written whole to
OUT/SETTING.json, so a rerun resumes where a killed benchmark stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

from deploy.errors import KitError
from deploy.recipe import Recipe, load_recipe, parse_recipe

console = Console(stderr=True)

SETTINGS = {
    # label: (engine family, weights, kv cache)
    "lmdeploy-fp16": ("lmdeploy", "none", "none"),
    "lmdeploy-w4a16": ("lmdeploy", "w4a16", "none"),
    "lmdeploy-kv8": ("lmdeploy", "none", "int8"),
    "lmdeploy-kv4": ("lmdeploy", "none", "int4"),
    "lmdeploy-w4a16-kv8": ("lmdeploy", "w4a16", "int8"),
    "lmdeploy-w4a16-kv4": ("lmdeploy", "w4a16", "int4"),
    # Blocked FP8 weights (builder/fp8.py): TurboMind on Hopper and newer, bfloat16 activations.
    "lmdeploy-fp8": ("lmdeploy", "fp8", "none"),
    "lmdeploy-fp8-kv8": ("lmdeploy", "fp8", "int8"),
    # LMDeploy's PyTorch engine where `auto` picks TurboMind: the sixth row of the flagship table.
    "lmdeploy-pytorch-fp16": ("lmdeploy-pytorch", "none", "none"),
    # llama.cpp, the CPU engine: the recipe's GGUF (F16 for the bundled model), or one the kit writes.
    "llamacpp-f16": ("llamacpp", "none", "none"),
    "llamacpp-q8_0": ("llamacpp", "q8_0", "none"),
    "llamacpp-q4_1": ("llamacpp", "q4_1", "none"),
    "llamacpp-q4_0": ("llamacpp", "q4_0", "none"),  # fastest 4-bit on AVX2, fails the gate on SmolLM2
    "transformers-fp16": ("transformers", "none", "none"),
    "transformers-bf16": ("transformers", "none", "none"),
    "transformers-w4a16": ("transformers", "w4a16", "none"),
}
GPU_DEFAULT = ["lmdeploy-fp16", "lmdeploy-w4a16", "lmdeploy-kv8", "lmdeploy-w4a16-kv8",
               "transformers-fp16"]
CPU_DEFAULT = ["transformers-bf16", "transformers-w4a16"]
# A recipe served by llama.cpp is measured on llama.cpp, against the Hugging Face baseline.
LLAMACPP_DEFAULT = ["llamacpp-f16", "llamacpp-q4_1", "transformers-bf16"]

PROFILES = {
    "gpu": {"decode_tokens": 128, "offline_prompts": 32, "offline_tokens": 64,
            "concurrency": [1, 8, 32, 64], "requests_per_slot": 2, "serve_tokens": 64,
            "quality_prompts": 16, "quality_tokens": 32},
    "cpu": {"decode_tokens": 64, "offline_prompts": 4, "offline_tokens": 32,
            "concurrency": [1, 2, 4, 8], "requests_per_slot": 4, "serve_tokens": 64,
            "quality_prompts": 8, "quality_tokens": 24},
    "smoke": {"decode_tokens": 12, "offline_prompts": 2, "offline_tokens": 8,
              "concurrency": [1, 2], "requests_per_slot": 1, "serve_tokens": 8,
              "quality_prompts": 3, "quality_tokens": 8},
}
FIXED_CACHE_RATIO = 0.2  # one stated KV setting for every LMDeploy row, so memory compares


class BenchError(KitError):
    """A setting failed to measure; the message carries the end of its log."""


def has_gpu() -> bool:
    from deploy.engines.hardware import lmdeploy_installed, visible_gpus

    return lmdeploy_installed() and visible_gpus() > 0


def default_settings(base: Recipe, gpu: bool) -> list[str]:
    if gpu:
        return GPU_DEFAULT
    return LLAMACPP_DEFAULT if base.engine.backend == "llamacpp" else CPU_DEFAULT


def setting_recipe(base: Recipe, label: str) -> Recipe:
    """The base recipe with this setting's engine, weights and KV cache."""
    family, weights, kv = SETTINGS[label]
    data = base.model_dump(exclude={"publish"})
    engine = data["engine"]
    if family.startswith("lmdeploy"):
        if family != "lmdeploy":
            engine["backend"] = family  # this backend whatever the recipe says
        elif not str(engine["backend"]).startswith("lmdeploy"):
            engine["backend"] = "auto"
        if engine.get("kv_cache_gib") is None:
            engine["cache_max_entry_count"] = engine.get("cache_max_entry_count") or FIXED_CACHE_RATIO
        if weights == "fp8":  # TurboMind's FP8 GEMMs take bfloat16 activations only
            engine["dtype"] = "bfloat16"
    elif family == "llamacpp":
        engine.update(backend="llamacpp", cache_max_entry_count=None, kv_cache_gib=None)
    else:
        engine.update(backend="transformers", cache_max_entry_count=None, kv_cache_gib=None)
        engine["dtype"] = "float16" if label.endswith("fp16") else "auto"
    data["quantization"].update(weights=weights, kv_cache=kv)
    # Settings with the same weights share one build (the KV cache is chosen at serving time).
    data["name"] = f"{base.name}-{family.split('-')[0]}-{weights}"
    data["serve"]["mode"] = "api"
    recipe = parse_recipe(data)
    recipe._base_dir = base._base_dir
    return recipe


def run_bench(recipe_path: Path, tasks: Path | None, settings: list[str] | None, out: Path,
              profile: str | None = None, force: bool = False, report_only: bool = False,
              repeats: int = 1) -> Path:
    from deploy.bench.report import write_report
    from deploy.recipe.tasks import default_tasks_file, load_tasks

    if report_only:  # e.g. results measured on a GPU machine, reported here
        base = load_recipe(recipe_path, check_files=False)
        settings = settings or [p.stem for p in sorted(out.glob("*.json")) if p.stem in SETTINGS]
        results = [json.loads((out / f"{s}.json").read_text()) for s in settings]
        profile = profile or ("gpu" if results[0]["memory"]["gpus"] else "cpu")
        return write_report(out, settings, base, profile)
    base = load_recipe(recipe_path)
    tasks = tasks or default_tasks_file()
    load_tasks(tasks)  # a bad task file fails now, not in every worker
    gpu = has_gpu()
    settings = settings or default_settings(base, gpu)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        from deploy.recipe import RecipeError

        raise RecipeError(f"Unknown setting(s) {unknown}; choose from: {', '.join(SETTINGS)}.")
    missing = [s for s in settings if not (out / f"{s}.json").is_file()]
    if not gpu and any(SETTINGS[s][0].startswith("lmdeploy") for s in missing):
        from deploy.recipe import RecipeError

        raise RecipeError("LMDeploy settings need LMDeploy and an NVIDIA GPU; on this machine run "
                          f"the transformers ones: {', '.join(CPU_DEFAULT)}.")
    profile = profile or ("gpu" if gpu else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    reference = out / ".reference-logits.pt"
    for number, label in enumerate(settings, 1):
        result_path = out / f"{label}.json"
        if result_path.is_file() and not force:
            console.print(f"[{number}/{len(settings)}] {label}: measured earlier, kept")
            continue
        first = number == 1
        if first and reference.exists():
            reference.unlink()  # the reference is the first setting's: re-measured with it
        spec_file = write_spec(out, label, setting_recipe(base, label), tasks, result_path,
                               {**PROFILES[profile], "repeats": repeats}, reference, first)
        started = time.perf_counter()
        with console.status(f"[{number}/{len(settings)}] {label}: measuring in a fresh process ..."), \
                (out / "logs" / f"{label}.log").open("w") as log:
            code = subprocess.call([sys.executable, "-m", "deploy.bench.worker", str(spec_file)],
                                   stdout=log, stderr=subprocess.STDOUT)
        if code:
            tail = (out / "logs" / f"{label}.log").read_text()[-2000:]
            raise BenchError(f"The {label} setting failed (exit {code}); its log ends:\n{tail}\n"
                             f"Fix it and rerun: finished settings are kept.")
        console.print(f"[{number}/{len(settings)}] {label}: done in {time.perf_counter() - started:.0f}s")
    return write_report(out, settings, base, profile)


def write_spec(out: Path, label: str, recipe: Recipe, tasks: Path, result: Path, profile: dict,
               reference: Path, is_reference: bool) -> Path:
    """OUT/recipes/LABEL.yaml and the worker's spec, OUT/logs/LABEL.spec.json. The reference
    setting saves its logits to `reference`; every other setting is compared with them."""
    recipe_file = out / "recipes" / f"{label}.yaml"
    recipe_file.write_text(yaml.safe_dump(portable_recipe(recipe), allow_unicode=True))
    spec = {"label": label, "recipe": str(recipe_file), "tasks": str(tasks), "out": str(result),
            "profile": profile, "reference": None if is_reference else str(reference),
            "save_reference": str(reference) if is_reference else None}
    spec_file = out / "logs" / f"{label}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    return spec_file


def portable_recipe(recipe: Recipe) -> dict:
    """The setting's recipe as YAML, with relative paths made absolute (it lives elsewhere)."""
    data = recipe.model_dump(exclude={"publish"})
    if data["model"]["path"]:
        data["model"]["path"] = str(recipe.resolve(data["model"]["path"]))
    for section, key in (("calibration", "file"), ("verify", "tasks")):
        value = data["quantization"][section][key]
        if value:
            data["quantization"][section][key] = str(recipe.resolve(value))
    if data["model"]["chat_template"] and "{" not in data["model"]["chat_template"]:
        data["model"]["chat_template"] = str(recipe.resolve(data["model"]["chat_template"]))
    return data
