"""Containers for real: the CPU image is built and run against a real Docker engine, and two
replicas are brought up behind nginx with Debian's docker-compose.

Where no engine runs, tools/docker_engine.sh starts a private one (root needed) and makes the
local stand-in base images (no registry is reachable from this project's machines); the fixture
stops the daemon it started and removes the containers these tests ran, even when a test fails.
In CI these tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deploy.engines.hardware import usable_cpus
from deploy.serve.ports import free_port
from tests.helpers import in_ci

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
LABEL = "xlab-deploy.recipe"


def kit(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def recipe_file(tmp_path: Path, name: str, base: str = "smollm2-cpu.yaml", **changes) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / base).read_text())
    data["name"] = name
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def built(path: Path, out: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    run = kit("image", "build", str(path), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return time.perf_counter() - started, run


def wait_healthy(container, timeout: float = 120) -> str:
    """The container's HEALTHCHECK verdict, as Docker reports it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        status = container.attrs["State"].get("Health", {}).get("Status")
        if status in ("healthy", "unhealthy"):
            return status
        time.sleep(1)
    return "timeout"


def needs_chromium() -> None:
    if not shutil.which("chromium"):
        pytest.fail("chromium is missing") if in_ci() else pytest.skip("Debian's chromium is missing")


def chats_in_chromium(port: int) -> None:
    """The Gradio page on `port` loads in Chromium and answers the France question."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, FLAGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=60_000)
        box = page.get_by_role("textbox").first
        box.wait_for(timeout=60_000)
        box.fill("What is the capital of France?")
        box.press("Enter")
        page.wait_for_function(
            "() => { const b = document.querySelectorAll('[data-testid=\"bot\"]');"
            " return b.length && b[b.length - 1].innerText.includes('Paris'); }", timeout=90_000)
        browser.close()


def test_cpu_image_builds_offline_runs_serves_and_drains(engine, tmp_path):
    client, _ = engine
    key = "sk-container-test-0123456789abcdef"
    path = recipe_file(tmp_path, "ctest-cpu", serve={"mode": "api", "api_key_env": "CTEST_KEY"})
    seconds, first = built(path, tmp_path / "ctx")
    ctx = tmp_path / "ctx"
    assert (ctx / "wheels" / "requirements.txt").is_file()
    # The default recipe serves llama.cpp: no torch in its wheels or its image.
    assert not any(w.name.startswith("torch-") for w in (ctx / "wheels").iterdir())
    assert any(w.name.startswith("llama_cpp_python-") for w in (ctx / "wheels").iterdir())

    # The kit builds the CPU image with networking off (network_mode none): it passed, so the
    # wheelhouse held every dependency.
    assert "Downloading" not in first.stderr

    port = free_port()
    run = kit("image", "run", str(path), "--port", str(port), env={"CTEST_KEY": key})
    assert run.returncode == 0, run.stderr[-3000:]
    container = client.containers.get("xlab-ctest-cpu")
    assert container.attrs["Config"]["User"] == "1000:1000"
    assert container.exec_run("id -u").output.strip() == b"1000"
    # llama.cpp serves without torch or transformers; an API image has no UI library, and no
    # pip: serving never installs.
    for absent in ("torch", "transformers", "gradio", "pip"):
        assert container.exec_run(["python", "-c", f"import {absent}"]).exit_code != 0, absent
    assert container.attrs["Config"]["StopTimeout"] == 40
    assert wait_healthy(container) == "healthy"  # by its own HEALTHCHECK

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
    france = [{"role": "user", "content": "What is the capital of France?"}]
    answer = api.chat.completions.create(model="ctest-cpu", max_tokens=16, temperature=0,
                                         messages=france)
    assert "Paris" in answer.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="ctest-cpu", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}])]
    assert "".join(pieces)
    memory = httpx.get(f"http://127.0.0.1:{port}/memory", headers={"authorization": f"Bearer {key}"}).json()
    assert memory["engine"]["backend"] == "llamacpp" and memory["process"]["rss_bytes"] > 0
    assert httpx.get(f"http://127.0.0.1:{port}/memory").status_code == 401

    # No secret in the image: not in its history, not in its config.
    image = client.images.get("xlab-deploy/ctest-cpu:latest")
    history = json.dumps(client.api.history(image.id))
    assert key not in history and key not in json.dumps(image.attrs)

    # `docker stop` during a stream: SIGTERM reaches the server, which finishes the stream.
    events: list = []

    def stream():
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "ctest-cpu", "stream": True, "max_tokens": 60,
                                "messages": [{"role": "user", "content": "Tell me a long story."}]}) as r:
            events.extend(line for line in r.iter_lines() if line)  # SSE: blank lines between events

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 30
    while not any(e.startswith("data: {") for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    container.stop()  # Docker's own stop: SIGTERM, then SIGKILL after StopTimeout
    reader.join(60)
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, container.logs(tail=30)
    assert events[-1] == "data: [DONE]"
    assert any('"finish_reason":' in e and '"finish_reason":null' not in e for e in events)

    # Editing only the recipe rebuilds only the last layers.
    path.write_text(path.read_text().replace("title: SmolLM2", "title: Edited SmolLM2"))
    again_seconds, again = built(path, tmp_path / "ctx")
    steps = again.stderr.count("\nStep ") + again.stderr.startswith("Step ")
    cached = again.stderr.count("Using cache")
    assert again_seconds < 30 and cached >= 8, (again_seconds, cached, steps)
    size = client.images.get("xlab-deploy/ctest-cpu:latest").attrs["Size"]
    print(f"CPU image: first build {seconds:.1f}s, after a recipe edit {again_seconds:.1f}s "
          f"({cached} of {steps} steps cached), {size / 1e9:.2f} GB")


def test_mounted_and_baked_4bit_weights_both_serve(engine, tmp_path):
    client, _ = engine
    for weights in ("mount", "bake"):
        path = recipe_file(tmp_path, f"ctest-w4-{weights}", "smollm2-cpu-w4.yaml",
                           docker={"weights": weights}, serve={"mode": "api"})
        build = kit("build", str(path))
        assert build.returncode == 0, build.stderr[-2000:]
        built(path, tmp_path / f"ctx-{weights}")
        port = free_port()
        run = kit("image", "run", str(path), "--port", str(port))
        assert run.returncode == 0, run.stderr[-3000:]
        container = client.containers.get(f"xlab-ctest-w4-{weights}")
        mounts = [m["Destination"] for m in container.attrs["Mounts"]]
        assert (f"/models/ctest-w4-{weights}" in mounts) == (weights == "mount")
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        france = [{"role": "user", "content": "What is the capital of France?"}]
        answer = api.chat.completions.create(model=f"ctest-w4-{weights}", max_tokens=16,
                                             temperature=0, messages=france)
        assert "Paris" in answer.choices[0].message.content
        assert httpx.get(f"http://127.0.0.1:{port}/memory").json()["engine"]["weight_bytes"] < 2e8
        container.remove(force=True)


def test_the_default_recipes_gradio_image_chats_in_chromium(engine, tmp_path):
    """The default recipe as shipped (llama.cpp, Gradio UI and API): its image, with what
    deploy/package/slim.py takes out of the venv gone, serves a page that chats in Chromium."""
    needs_chromium()
    client, _ = engine
    path = recipe_file(tmp_path, "ctest-ui")
    built(path, tmp_path / "ctx")
    port = free_port()
    run = kit("image", "run", str(path), "--port", str(port))
    assert run.returncode == 0, run.stderr[-3000:]
    container = client.containers.get("xlab-ctest-ui")
    assert wait_healthy(container) == "healthy"
    gone = ("import pathlib, pandas, gradio, llama_cpp; site = pathlib.Path(pandas.__file__).parents[1]; "
            "print([p for p in ('pandas/tests', 'lib', 'gradio/templates/node', 'gradio/media_assets',"
            " 'hf_xet') if (site / p).exists()])")
    assert container.exec_run(["python", "-c", gone]).output.decode().strip() == "[]"
    chats_in_chromium(port)
    container.remove(force=True)


def test_run_without_an_image_or_twice_says_what_to_do(engine, tmp_path):
    client, _ = engine
    path = recipe_file(tmp_path, "ctest-never-built")
    run = kit("image", "run", str(path), "--port", str(free_port()))
    assert run.returncode == 1 and "build it first" in run.stderr and "Traceback" not in run.stderr


def test_two_replicas_behind_nginx_survive_one_stopping(engine, tmp_path):
    client, _ = engine
    if not shutil.which("docker-compose"):
        pytest.fail("docker-compose is missing: tools/docker_engine.sh installs it")
    path = recipe_file(tmp_path, "ctest-pair", serve={"mode": "api"})
    built(path, tmp_path / "ctx")
    out = tmp_path / "compose"
    made = kit("image", "compose", str(path), "--replicas", "2", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "docker-compose -f" in made.stdout or "docker compose -f" in made.stdout
    compose = ["docker-compose", "-p", "ctestpair", "-f", str(out / "docker-compose.yml")]
    up = subprocess.run([*compose, "up", "-d"], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        url = "http://127.0.0.1:8000"
        deadline = time.monotonic() + 180
        replicas = [client.containers.get(f"ctestpair_api-{i}_1") for i in (1, 2)]
        while time.monotonic() < deadline and not all(wait_healthy(c, 5) == "healthy" for c in replicas):
            time.sleep(1)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

        def ask() -> str:
            return api.chat.completions.create(
                model="ctest-pair", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}]
            ).choices[0].message.content

        assert "Paris" in ask()
        # Each replica's engine sized its threads to its share of this host's CPUs (cpus:).
        memory = httpx.get(f"{url}/memory", timeout=30).json()
        settings = memory["engine"]["settings"]
        assert settings["threads"] == max(1, int(usable_cpus()[0] / 2 + 0.5)), settings
        assert "CPU quota" in settings["threads_from"] or usable_cpus()[0] == 1, settings
        # ... and planned against its memory limit (mem_limit), which its resident set is well under.
        limit = yaml.safe_load((out / "docker-compose.yml").read_text())["services"]["api-1"]["mem_limit"]
        prediction = memory["prediction"]
        assert prediction["ram_bytes"] == int(limit.removesuffix("m")) * 2**20, (limit, prediction)
        assert "memory limit" in prediction["machine"] and prediction["fits"]
        assert memory["process"]["rss_bytes"] < prediction["ram_bytes"] / 1.4
        replicas[0].stop()  # one replica goes away: nginx sends requests to the other
        assert all("Paris" in ask() for _ in range(4))
    finally:
        down = subprocess.run([*compose, "down", "--timeout", "5"], capture_output=True, text=True,
                              timeout=300)
    assert down.returncode == 0, down.stderr
    assert client.containers.list(all=True, filters={"label": "com.docker.compose.project=ctestpair"}) == []


def test_openxlab_app_rehearsed_in_a_container_chats_in_chromium(engine, tmp_path):
    """`deploy app` writes the bundle; `deploy app-try` runs it as OpenXLab's Gradio runtime would
    (apt-get packages.txt, pip requirements.txt, python app.py on 7860); Chromium chats with it."""
    needs_chromium()
    client, _ = engine
    bundle = tmp_path / "app-bundle"
    made = kit("app", "recipes/smollm2-cpu.yaml", "--out", str(bundle))
    assert made.returncode == 0, made.stderr
    assert (bundle / "packages.txt").read_text().split() == ["git", "git-lfs"]  # no comment lines
    assert "model.safetensors filter=lfs" in (bundle / ".gitattributes").read_text() or \
        "*.safetensors filter=lfs" in (bundle / ".gitattributes").read_text()
    assert "torch==" not in (bundle / "requirements.txt").read_text()  # llama.cpp: torch-free
    port = free_port()
    run = kit("app-try", str(bundle), "--port", str(port))
    assert run.returncode == 0, run.stderr[-3000:]
    container = client.containers.get("xlab-app-app-bundle")
    assert container.attrs["Config"]["WorkingDir"] == "/home/xlab-app-center"
    chats_in_chromium(port)
    container.remove(force=True)


def test_gpu_dockerfile_builds_on_a_stand_in_for_the_lmdeploy_image(engine, tmp_path):
    """docker/Dockerfile.gpu's own steps (the kit's dependencies, the user, the healthcheck, the
    entry point) on a local stand-in for openmmlab/lmdeploy: the Python stand-in plus the LMDeploy
    wheel, installed without its dependencies. Running it needs a GPU host with the NVIDIA
    container toolkit, which no machine here has."""
    from deploy.package.image import cpu_torch
    from deploy.package.wheelhouse import link_into, wheelhouse

    client, _ = engine
    context = tmp_path / "stand-in"
    wheels = context / "wheels"
    # torch as the real base has it (CPU build here), so that nothing pulls torch from an index.
    link_into(wheelhouse(f"{cpu_torch()}\n"), wheels)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--only-binary=:all:", "lmdeploy==0.18.0", "--dest", str(wheels)],
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    shutil.copy(ROOT / "docker" / "standins" / "Dockerfile.lmdeploy", context / "Dockerfile")
    client.images.build(path=str(context), tag="local/lmdeploy:stand-in", rm=True, forcerm=True,
                        buildargs={"BASE": os.environ["XLAB_DEPLOY_BASE_IMAGE"]})
    path = recipe_file(tmp_path, "ctest-gpu", "internlm2-chat-7b-fp16.yaml")
    run = kit("image", "build", str(path), "--out", str(tmp_path / "ctx"),
              env={"XLAB_DEPLOY_BASE_IMAGE": "local/lmdeploy:stand-in"})
    assert run.returncode == 0, run.stderr[-3000:]
    # The base's torch stays: no CUDA wheel, no nvidia-* package was fetched over it.
    cuda = re.search(r".{60}nvidia[-_](cublas|cudnn|nccl|cuda).{20}", run.stderr)
    assert cuda is None, cuda.group(0)
    assert "Downloading torch" not in run.stderr
    image = client.images.get("xlab-deploy/ctest-gpu:latest")
    config = image.attrs["Config"]
    assert config["User"] == "1000:1000" and config["Cmd"] == ["python3", "-m", "deploy", "serve"]
    assert config["Healthcheck"]["Test"][-1] == "deploy.serve.healthcheck"
    check = client.containers.run(image.id, ["python3", "-c", "import importlib.metadata as m, "
                                              "deploy.cli; print(m.version('lmdeploy'))"],
                                  remove=True)
    assert check.strip() == b"0.18.0"  # the kit imports beside the base's LMDeploy
    # The recipe serves the API alone: no UI library in its image.
    no_ui = client.containers.run(image.id, ["python3", "-c", "import importlib.util as u; "
                                             "print(u.find_spec('gradio') is None)"], remove=True)
    assert no_ui.strip() == b"True"
