"""`quantization.weights: auto`: the format per GPU and engine, its reason, and the recipe it
resolves to in `deploy plan` and `deploy tune` (offline, from the stored InternLM2 config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.capacity.planner import parse_gpu
from deploy.engines import resolve_weights
from deploy.engines.formats import capability_for, fastest_weights
from deploy.engines.hardware import local_gpu
from deploy.recipe import load_recipe
from deploy.tune.candidates import Target, enumerate_candidates

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
CONFIG = json.loads((ROOT / "deploy" / "data" / "configs" / "internlm--internlm2-chat-7b.json").read_text())


@pytest.mark.parametrize("name, capability", [
    ("H200", (9, 0)), ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0)),
    ("A10", (8, 6)), ("NVIDIA A10G", (8, 6)), ("Tesla T4", None), ("T4", (7, 5)), ("24 GiB GPU", None)])
def test_capability_from_names(name, capability):
    assert capability_for(name) == capability


@pytest.mark.parametrize("backend, gpu, dtype, weights, says", [
    ("lmdeploy-turbomind", "H200", "auto", "fp8", "1.17x"),
    ("lmdeploy-turbomind", "H100", "float16", "none", "engine.dtype is float16"),
    ("lmdeploy-pytorch", "H100", "auto", "fp8", "PyTorch engine"),
    ("lmdeploy-pytorch", "H200", "float16", "none", "engine.dtype is float16"),
    ("lmdeploy-turbomind", "A100-80G", "auto", "w4a16", "not measured by this kit"),
    ("lmdeploy-turbomind", "T4", "auto", "w4a16", "sm_75"),
    ("lmdeploy-turbomind", "24 GiB GPU", "auto", "none", "--gpu"),
    ("llamacpp", None, "auto", "none", "llama.cpp"),
    ("transformers", None, "auto", "none", "no GPU"),
    ("transformers", "H100", "auto", "none", "LMDeploy is not installed"),
])
def test_the_fastest_format_and_why(backend, gpu, dtype, weights, says):
    choice = fastest_weights(backend, gpu, capability_for(gpu) if gpu else None, dtype)
    assert (choice.weights, says in choice.reason) == (weights, True), choice


def _auto(tmp_path, source: str) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / source).read_text())
    data.setdefault("quantization", {})["weights"] = "auto"
    if "dtype" in data.get("engine", {}):
        data["engine"]["dtype"] = "auto"  # TurboMind's FP8 computes in bf16: float16 rules it out
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_auto_on_this_cpu_machine_keeps_the_weights(tmp_path, caplog):
    recipe = load_recipe(_auto(tmp_path, "smollm2-cpu.yaml"))
    with caplog.at_level("INFO"):
        assert resolve_weights(recipe).quantization.weights == "none"
    assert "weights auto -> none (no GPU, llama.cpp" in caplog.text
    untouched = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    assert resolve_weights(untouched) is untouched


@pytest.mark.parametrize("gpu, weights, weight_gb", [("H200", "fp8", 8.5), ("A10", "w4a16", 5.14)])
def test_plan_resolves_auto_for_the_named_gpu(tmp_path, gpu, weights, weight_gb):
    path = _auto(tmp_path, "internlm2-chat-7b-fp16.yaml")
    run = subprocess.run([sys.executable, "-m", "deploy", "plan", str(path), "--gpu", gpu, "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=OFFLINE)
    assert run.returncode == 0, run.stderr
    assert f"quantization.weights auto -> {weights}" in run.stderr
    assert json.loads(run.stdout)["weight_bytes"] / 1e9 == pytest.approx(weight_gb, abs=0.1)


def test_tune_offers_fp8_on_hopper_only(tmp_path):
    base = load_recipe(_auto(tmp_path, "internlm2-chat-7b-fp16.yaml"))
    for gpu, has_fp8 in (("H200", True), ("A10", False)):
        target = Target("gpu", *parse_gpu(gpu))
        labels = [c.label for c in enumerate_candidates(base, target, 4, CONFIG)]
        assert any(label.startswith("fp8-") for label in labels) is has_fp8, labels
        assert any(label.startswith("w4a16g128-") for label in labels)
    # The PyTorch engine gets FP8 candidates too (its Gluon kernel, bf16); float16 rules FP8 out.
    h200 = Target("gpu", *parse_gpu("H200"))
    for engine, has_fp8 in (({"backend": "lmdeploy-pytorch"}, True),
                            ({"backend": "lmdeploy-pytorch", "dtype": "float16"}, False)):
        recipe = base.model_copy(update={"engine": base.engine.model_copy(update=engine)})
        labels = [c.label for c in enumerate_candidates(recipe, h200, 4, CONFIG)]
        assert any(label.startswith("fp8-") for label in labels) is has_fp8, (engine, labels)


@pytest.mark.skipif(local_gpu() is None, reason="needs an NVIDIA GPU (runs on the device)")
def test_this_machines_gpu_is_named_and_resolved(tmp_path, caplog):
    """On a real card: NVML's name maps to NVML's own compute capability where the table knows
    the card, and `auto` resolves for it as fastest_weights says."""
    name, capability = local_gpu()
    assert capability >= (7, 0)
    assert capability_for(name) in (None, capability), (name, capability)
    path = _auto(tmp_path, "internlm2-chat-7b-fp16.yaml")
    recipe = load_recipe(path)
    turbomind = recipe.model_copy(update={"engine": recipe.engine.model_copy(
        update={"backend": "lmdeploy-turbomind"})})
    with caplog.at_level("INFO"):
        resolved = resolve_weights(turbomind)
    expected = fastest_weights("lmdeploy-turbomind", name, capability, "auto").weights
    assert resolved.quantization.weights == expected
    assert name in caplog.text
    print(f"{name} sm_{capability[0]}{capability[1]}: auto -> {expected}")
