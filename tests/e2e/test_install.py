"""The kit as `pip install .` installs it (a wheel, not editable), used from outside the checkout:
the templates for images and app bundles travel inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_builds_an_app_bundle_and_an_image_context(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("xlab_deploy-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                str(site), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    # The installed copy comes first on the path; its dependencies are this environment's.
    env = {**os.environ, "PYTHONPATH": str(site)}

    def kit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=work, env=env,
                              capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import deploy; print(deploy.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where

    recipe = str(ROOT / "recipes" / "smollm2-cpu.yaml")
    run = kit("app", recipe, "--out", "bundle")
    assert run.returncode == 0, run.stderr
    bundle = work / "bundle"
    assert (bundle / "app.py").read_text() == (ROOT / "app" / "app.py").read_text()
    assert "sdk: gradio" in (bundle / "README.md").read_text()
    assert (bundle / "deploy" / "serve" / "app.py").is_file()
    assert not (bundle / "deploy" / "package" / "templates").exists()

    run = kit("image", "context", recipe, "--out", "ctx")
    assert run.returncode == 0, run.stderr
    ctx = work / "ctx"
    assert (ctx / "Dockerfile").read_text().startswith((ROOT / "docker" / "Dockerfile.cpu").read_text()[:400])
    # the wheelhouse: the default recipe's image serves llama.cpp, without torch
    assert any(w.name.startswith("llama_cpp_python-") for w in (ctx / "wheels").iterdir())
    requirements = (ctx / "requirements.txt").read_text().split()
    assert any(r.startswith("fastapi") for r in requirements)
    assert not any("extra ==" in r for r in requirements)
    assert yaml.safe_load((ctx / "recipe.yaml").read_text())["serve"]["host"] == "0.0.0.0"
