"""LoRA adapters (PEFT, and XTuner's `hf` export, which is PEFT's layout) merged into the base model
before quantization, so the fine-tuned assistant is served and quantized like any other model."""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.atomic import atomic_dir
from deploy.recipe import Recipe, RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def adapter_dir(recipe: Recipe) -> Path:
    """The adapter's folder: a local path (relative to the recipe), else a Hugging Face repo id."""
    value = recipe.model.adapter
    local = recipe.resolve(value)
    if local.is_dir():
        folder = local
    else:
        from huggingface_hub import snapshot_download

        from deploy.builder.sources import hub_errors

        with hub_errors(value, None):
            folder = Path(snapshot_download(value))
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"model.adapter {value!r} has no adapter_config.json: point it at a PEFT "
                          "LoRA adapter folder (XTuner: the `xtuner convert pth_to_hf` output).")
    return folder


def merge_adapter(recipe: Recipe, base_dir: Path, out_dir: Path) -> Path:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_dir(recipe)
    config = PeftConfig.from_pretrained(adapter)
    if str(config.peft_type).split(".")[-1].upper() != "LORA":
        raise RecipeError(f"model.adapter is a {config.peft_type} adapter; only LoRA can be merged.")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(recipe.engine.dtype, torch.float16)
    if recipe.engine.dtype == "auto" and not torch.cuda.is_available():
        dtype = torch.bfloat16
    trust = recipe.model.trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=trust)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0][:300]
        raise RecipeError(
            f"The adapter {recipe.model.adapter!r} does not fit this base model: it was trained on "
            f"{config.base_model_name_or_path!r}, and loading it said: {detail}. Use the base model "
            "the adapter was trained on."
        ) from None
    with atomic_dir(out_dir) as work:
        merged.save_pretrained(work, safe_serialization=True)
        # A fine-tune may ship its own tokenizer or chat template; otherwise the base's is kept.
        source = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES[:2]) else base_dir
        AutoTokenizer.from_pretrained(source, trust_remote_code=trust).save_pretrained(work)
        for extra in ("generation_config.json", "chat_template.jinja"):
            for folder in (adapter, base_dir):
                if (folder / extra).is_file() and not (work / extra).is_file():
                    shutil.copy(folder / extra, work / extra)
    return out_dir
