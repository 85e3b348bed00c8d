"""A recipe's build record: its work folder, manifest.json, and the model folder to serve.

Serving, images and app bundles find built weights only through `built_model_dir`, so the rules for
which folder is "the built model", and whether it may be served, live here alone: weights this kit
quantized are served only once the quality gate has passed on exactly those files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from deploy import home
from deploy.builder.sources import model_dir
from deploy.engines import HQQ_MARKER
from deploy.errors import KitError
from deploy.home import build_dir
from deploy.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


class GateRefusal(KitError):
    """Quantized weights that failed the quality gate, or were never checked by it."""

    exit_code = 6


# What a failed gate can try next, per weight format. AWQ and HQQ groups can shrink; a GGUF type's
# blocks and FP8's are fixed, so there the next try is a less lossy format.
GATE_RETRY = {
    "w4a16": "a smaller quantization.group_size",
    "q4_0": "quantization.weights q4_1 (4-bit with a minimum per block) or q8_0",
    "q4_1": "quantization.weights q8_0",
    "q8_0": "quantization.weights none (the unquantized model)",
    "fp8": "quantization.weights w4a16, or none (the unquantized model)",
}


def gate_retry(weights: str) -> str:
    return GATE_RETRY.get(weights, "another quantization.weights format")


def work_dir(recipe: Recipe) -> Path:
    return build_dir(recipe.name)


def manifest_path(recipe: Recipe) -> Path:
    return work_dir(recipe) / "manifest.json"


def read_manifest(recipe: Recipe) -> dict:
    path = manifest_path(recipe)
    return json.loads(path.read_text()) if path.is_file() else {"recipe": recipe.name, "steps": {}}


def built_model_dir(recipe: Recipe, *, force: bool = False) -> Path:
    """The folder to serve: the quantized one for a quantized recipe, else the fetched one.
    Weights published already quantized are served as fetched, with no build needed. Weights the
    kit quantized must have passed the gate (`check_gate`); `force` serves them anyway."""
    check_gate(recipe, force=force)
    steps = read_manifest(recipe)["steps"]
    if recipe.quantization.weights == "none" and not recipe.model.adapter:
        return model_dir(recipe)
    for name in ("quantize", "merge"):  # the last step that produced a model
        folder = steps.get(name, {}).get("outputs", {}).get("model_dir")
        if folder and Path(folder).is_dir():
            _warn_if_changed(recipe, steps)
            return Path(folder)
    if recipe.model.source != "bundled":
        fetched = model_dir(recipe)
        if already_quantized(fetched):
            return fetched
    raise RecipeError(
        f"{recipe.name} merges an adapter or quantizes its weights and has not been built: run "
        "`python -m deploy build RECIPE` first (make deploy does)."
    )


def changed_since_build(recipe: Recipe, steps: dict) -> list[str]:
    """The recipe fields that differ from those the recorded build steps read, as dotted paths."""
    recorded = {name: step.get("inputs", {}) for name, step in steps.items()}
    now = {
        "model": recipe.model.model_dump(include={"source", "id", "path", "revision"}),
        "model.adapter": recipe.model.adapter,
        "quantization.weights": recipe.quantization.weights,
        "quantization.group_size": recipe.quantization.group_size,
        "quantization.calibration": recipe.quantization.calibration.model_dump(),
        "quantization.verify": recipe.quantization.verify.model_dump(),
    }
    then = {
        "model": recorded.get("fetch", {}).get("model"),
        "model.adapter": recorded.get("merge", {}).get("adapter", recipe.model.adapter),
        "quantization.weights": recorded.get("quantize", {}).get("weights"),
        "quantization.group_size": recorded.get("quantize", {}).get("group_size"),
        "quantization.calibration": {k: v for k, v in (recorded.get("quantize", {}).get("calibration")
                                                      or {}).items() if k != "text"} or None,
        "quantization.verify": recorded.get("verify", {}).get("verify"),
    }
    changed = []
    for field, value in now.items():
        old = then[field]
        if old is None:  # that step did not run, or did not read this field (HQQ: no calibration)
            continue
        if isinstance(value, dict):
            changed += [f"{field}.{key}" for key in value if key in old and old[key] != value[key]]
        elif old != value:
            changed.append(field)
    return changed


def _warn_if_changed(recipe: Recipe, steps: dict) -> None:
    changed = changed_since_build(recipe, steps)
    if changed:
        log.warning("%s: serving the last verified build, but the recipe changed since it was built "
                    "(%s): run `python -m deploy build RECIPE` to rebuild with the recipe as it is now",
                    recipe.name, ", ".join(changed))


def already_quantized(folder: Path) -> bool:
    """Weights published already quantized (by this kit or LMDeploy) are served as they are."""
    config = json.loads((folder / "config.json").read_text())
    return (folder / HQQ_MARKER).is_file() or "quantization_config" in config


def check_gate(recipe: Recipe, *, force: bool = False) -> None:
    """Raise GateRefusal unless the weights the build quantized passed the quality gate, checked
    on these very files (the gate's recorded fingerprints equal the quantize step's). Reads only
    the manifest, so it is cheap enough to run before a server starts."""
    if recipe.quantization.weights == "none":
        return
    steps = read_manifest(recipe)["steps"]
    quantize = steps.get("quantize")
    # Every method the builder quantizes with (awq, hqq, fp8, gguf) is gated; only a recipe not
    # built yet (built_model_dir says so) or weights published already quantized pass here.
    if not quantize or quantize["outputs"].get("method") in (None, "prequantized"):
        return
    folder = quantize["outputs"]["model_dir"]
    if not recipe.quantization.verify.enabled:
        log.warning("serving %s unchecked: quantization.verify.enabled is false in the recipe", folder)
        return
    verify = steps.get("verify")
    if verify is None or verify["inputs"].get("quantized_fingerprints") != quantize["fingerprints"]:
        problem = "were never checked by the quality gate"
        fix = "Run `python -m deploy build RECIPE` to run the gate"
    elif not verify["outputs"].get("passed") and verify["outputs"].get("top1_agreement") is None:
        # The gate ran but could not score (pipeline._unscored: the candidate's logits were NaN).
        out = verify["outputs"]
        problem = (f"could not be scored by the quality gate ({out.get('reason', 'no reason recorded')}; "
                   f"report: {out['report']})")
        fix = ("Build them on an engine whose logits can be scored: engine.backend: "
               "lmdeploy-turbomind, or auto where TurboMind loads")
    elif not verify["outputs"].get("passed"):
        out, gate = verify["outputs"], recipe.quantization.verify
        problem = (f"failed the quality gate (top-1 agreement {out['top1_agreement']:.3f}, at least "
                   f"{gate.min_top1_agreement} needed; mean KL {out['mean_kl']:.4f}, at most "
                   f"{gate.max_mean_kl} allowed; report: {out['report']})")
        fix = (f"Try {gate_retry(recipe.quantization.weights)} and build again, or relax "
               "quantization.verify if the answers in the report look right")
    else:
        return
    if force:
        log.warning("SERVING UNCHECKED WEIGHTS: %s %s; --force was given", folder, problem)
        return
    raise GateRefusal(
        f"The quantized weights of {recipe.name} in {folder} {problem}, so they are not served. "
        f"{fix}. To serve them anyway, pass --force, or set quantization.verify.enabled: false in "
        "the recipe to switch the gate off."
    )


def local_gguf(recipe: Recipe) -> Path | None:
    """The GGUF a llama.cpp server of this recipe would load, where it is already on this machine
    (built, fetched, or the bundled model's F16); None otherwise. Fetches and builds nothing, so
    the planner can read the file's size offline."""
    if recipe.quantization.weights != "none" or recipe.model.adapter:
        steps = read_manifest(recipe)["steps"]
        folders = [steps.get(name, {}).get("outputs", {}).get("model_dir") for name in ("quantize", "merge")]
    elif recipe.model.source == "bundled":
        folders = [home.bundled_model_dir(recipe.model.bundled_name)]
    elif recipe.model.source == "local":
        folders = [recipe.resolve(recipe.model.path)]
    else:
        folders = []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf")) if folder and Path(folder).is_dir() else []
        if len(found) == 1:  # the engine refuses a folder of several (llamacpp_engine.find_gguf)
            return found[0]
    return None
