"""Container images from a recipe: the build context, `docker build`/`run` through the Docker SDK,
and a compose file for scale-out behind `lmdeploy serve proxy`.

The context is generated, never hand-kept: docker/Dockerfile.{cpu,gpu} (shipped inside the
package as templates/docker), the kit's source, its dependencies as the installed kit declares
them, the recipe rewritten for the container, and the weights when the recipe bakes them.
Secrets are passed to `docker run` by environment-variable name only.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from pathlib import Path

import yaml
from rich.console import Console

from deploy.atomic import link_or_copy
from deploy.recipe import Recipe, RecipeError

console = Console(stderr=True)
KIT = Path(__file__).resolve().parent.parent  # the deploy package, installed or in a checkout
TEMPLATES = Path(__file__).resolve().parent / "templates"  # the repository's docker/ and app/
CONTAINER_MODELS = "/models"


class ImageError(RuntimeError):
    """Docker is missing or refused; the message says what to do."""


def image_kind(recipe: Recipe) -> str:
    if recipe.docker.image != "auto":
        return recipe.docker.image
    return "cpu" if recipe.engine.backend == "transformers" else "gpu"


def image_tag(recipe: Recipe) -> str:
    return recipe.docker.tag or f"xlab-deploy/{recipe.name.lower()}:latest"


def container_port(recipe: Recipe) -> int:
    return 7860 if image_kind(recipe) == "cpu" else 23333


def needs_weights(recipe: Recipe) -> bool:
    """The bundled unquantized model ships inside the image's pip packages; others need a folder."""
    return not (recipe.model.source == "bundled" and recipe.quantization.weights == "none")


def container_recipe(recipe: Recipe) -> dict:
    """The recipe as the container sees it: weights at /models/NAME, listening on all interfaces."""
    data = recipe.model_dump()
    if needs_weights(recipe):
        data["model"].update(source="local", path=f"{CONTAINER_MODELS}/{recipe.name}", id=None,
                             revision=None)
    data["serve"].update(host="0.0.0.0", port=container_port(recipe))
    data["quantization"]["calibration"]["file"] = None  # building happens before the image
    data["quantization"]["verify"]["tasks"] = None
    template = data["model"]["chat_template"]
    if template and "{" not in template:  # a file path: inline it, the file is not in the image
        from deploy.recipe import chat_template_text

        data["model"]["chat_template"] = chat_template_text(recipe)
    return data


def requirements(kind: str) -> str:
    """The kit's own dependencies (no extras) as its installed metadata lists them, which
    pyproject.toml wrote; the GPU base image brings torch and LMDeploy."""
    declared = importlib.metadata.requires("xlab-deploy") or []
    deps = [d for d in declared if "extra ==" not in d
            and not (kind == "gpu" and d.startswith("torch"))]
    return "\n".join(deps) + "\n"


def copy_kit(out: Path) -> None:
    """The kit's source into `out/deploy`, without the templates or bytecode."""
    shutil.copytree(KIT, out / "deploy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "templates"))


def build_context(recipe: Recipe, out: Path, model_folder: Path | None = None) -> Path:
    """Write a complete `docker build` context for the recipe into `out` (replaced if present)."""
    kind = image_kind(recipe)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(TEMPLATES / "docker" / f"Dockerfile.{kind}", out / "Dockerfile")
    copy_kit(out)
    (out / "requirements.txt").write_text(requirements(kind))
    (out / "recipe.yaml").write_text(yaml.safe_dump(container_recipe(recipe), allow_unicode=True,
                                                    sort_keys=False))
    (out / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n")
    models = out / "models"
    models.mkdir()
    if recipe.docker.weights == "bake" and needs_weights(recipe):
        if model_folder is None:
            raise RecipeError("docker.weights is 'bake' but the model is not built: run "
                              "`python -m deploy build RECIPE` first.")
        shutil.copytree(model_folder, models / recipe.name, copy_function=link_or_copy)
    else:
        (models / ".keep").write_text("")  # COPY needs the folder; mounted weights land here
    return out


def _client():
    import docker
    from docker.errors import DockerException

    try:
        return docker.from_env()
    except DockerException as exc:
        raise ImageError(
            f"No Docker engine is reachable ({exc.__class__.__name__}). Start Docker (or set "
            "DOCKER_HOST), or build the generated context yourself with `docker build`."
        ) from None


def build_image(recipe: Recipe, context: Path) -> str:
    client = _client()
    tag = image_tag(recipe)
    for chunk in client.api.build(path=str(context), tag=tag, rm=True, decode=True):
        if "stream" in chunk:
            console.print(chunk["stream"].rstrip(), markup=False, highlight=False)
        if "error" in chunk:
            raise ImageError(f"docker build failed: {chunk['error'].strip()}")
    return tag


def run_container(recipe: Recipe, model_folder: Path | None, port: int | None = None,
                  timeout: float = 900) -> str:
    """Start the image detached and wait until its HEALTHCHECK says healthy; return the id."""
    from docker.types import DeviceRequest

    client = _client()
    inner = container_port(recipe)
    host_port = port or recipe.serve.port
    kwargs: dict = {
        "detach": True,
        "name": f"xlab-{recipe.name.lower()}",
        "ports": {f"{inner}/tcp": (recipe.serve.host, host_port)},
        "environment": _environment(recipe),
    }
    if image_kind(recipe) == "gpu":
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if recipe.docker.weights == "mount" and needs_weights(recipe):
        if model_folder is None:
            raise RecipeError("The model is not built: run `python -m deploy build RECIPE` first.")
        kwargs["volumes"] = {str(model_folder): {"bind": f"{CONTAINER_MODELS}/{recipe.name}",
                                                 "mode": "ro"}}
    container = client.containers.run(image_tag(recipe), **kwargs)
    console.print(f"started {container.name}; waiting for it to become healthy ...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs.get("State", {})
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            console.print(f"healthy: http://{recipe.serve.host}:{host_port}")
            return container.id
        if state.get("Status") in ("exited", "dead") or health == "unhealthy":
            break
        time.sleep(2)
    logs = container.logs(tail=50).decode(errors="replace")
    raise ImageError(f"{container.name} did not become healthy; its last log lines:\n{logs}")


def _environment(recipe: Recipe) -> dict[str, str]:
    """Settings the container may change, and secrets by NAME: their values come from this shell."""
    env = {"XLAB_DEPLOY_PORT": str(container_port(recipe))}
    name = recipe.serve.api_key_env
    if name:
        if not os.environ.get(name):
            raise RecipeError(f"serve.api_key_env names {name}, but it is not set here: export it "
                              "before `image run` (its value is handed to the container, never "
                              "written to the image).")
        env[name] = os.environ[name]
    return env


def compose_file(recipe: Recipe, replicas: int, gpus: int | None = None) -> dict:
    """N API replicas behind LMDeploy's proxy, one GPU each (round-robin over `gpus`)."""
    inner = container_port(recipe)
    services: dict = {
        "proxy": {
            "image": "openmmlab/lmdeploy:v0.18.0-cu12",
            "command": ["lmdeploy", "serve", "proxy", "--server-name", "0.0.0.0",
                        "--server-port", "8000", "--routing-strategy", "min_expected_latency"],
            "ports": ["8000:8000"],
        },
    }
    for i in range(replicas):
        service = {
            "image": image_tag(recipe),
            "environment": {"XLAB_DEPLOY_PORT": str(inner)},
            "volumes": [f"${{MODEL_DIR:?set MODEL_DIR to the built model folder}}:"
                        f"{CONTAINER_MODELS}/{recipe.name}:ro"],
            "healthcheck": {"test": ["CMD", "python3", "-m", "deploy.serve.healthcheck"], "interval": "30s"},
        }
        if image_kind(recipe) == "gpu":
            service["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "device_ids": [str(i % (gpus or replicas))],
                 "capabilities": ["gpu"]}]}}}
        services[f"api-{i + 1}"] = service
    # The proxy learns its nodes through its HTTP API once the replicas answer.
    register = " && ".join(
        f"curl -sf -X POST http://proxy:8000/nodes/add -H 'content-type: application/json' "
        f"-d '{{\"url\": \"http://api-{i + 1}:{inner}\"}}'" for i in range(replicas))
    services["register"] = {
        "image": "curlimages/curl:8.11.1",
        "entrypoint": ["sh", "-c", f"sleep 5 && {register}"],
        "depends_on": {f"api-{i + 1}": {"condition": "service_healthy"} for i in range(replicas)},
    }
    return {"services": services}
