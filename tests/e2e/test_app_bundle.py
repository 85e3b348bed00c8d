"""The OpenXLab app bundle, made and then run for real: `python app.py` in the bundle serves chat,
the Gradio page and /memory from the vendored kit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_bundle_runs_and_serves(tmp_path):
    out = tmp_path / "bundle"
    made = subprocess.run([sys.executable, "-m", "deploy", "app", "recipes/smollm2-cpu.yaml",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    for name in ("app.py", "requirements.txt", "packages.txt", "README.md", "recipe.yaml",
                 "deploy/serve/app.py", "model/config.json"):
        assert (out / name).is_file(), name
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\ntitle: SmolLM2 assistant (CPU)\n") and "sdk: gradio" in readme
    assert "app_file: app.py" in readme
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert all("==" in line for line in reqs), reqs  # pinned
    # llama.cpp serves the default recipe: no torch and no transformers on the app host.
    names = {line.split("==")[0] for line in reqs}
    assert not names & {"torch", "transformers", "accelerate", "hqq", "peft"}, names
    assert "llama-cpp-python" in names
    # Its model folder holds the GGUF the engine reads, not the safetensors it never reads.
    assert len(list((out / "model").glob("*.gguf"))) == 1
    assert not list((out / "model").glob("*.safetensors"))
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["source"] == "local" and recipe["serve"]["mode"] == "gradio"

    port = free_port()
    log = (tmp_path / "app.log").open("w")
    env = {**os.environ, "XLAB_DEPLOY_HOST": "127.0.0.1", "XLAB_DEPLOY_PORT": str(port)}
    # torch and transformers cannot be imported in the app's process, as on a host that has none.
    no_torch = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
                "runpy.run_path('app.py', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", no_torch], cwd=out, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-cpu", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        memory = httpx.get(url + "/memory").json()
        assert memory["engine"]["weight_bytes"] > 100e6
        assert "SmolLM2 assistant (CPU)" in httpx.get(url + "/").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # The app ran the kit vendored in the bundle, not the repository's copy.
    assert f"xlab-deploy from {out / 'deploy'}" in (tmp_path / "app.log").read_text()
