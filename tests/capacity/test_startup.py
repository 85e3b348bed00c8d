"""`deploy plan`'s predicted start: the measured engine start plus the weights read from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deploy.capacity.startup import ENGINE_START, predict_start
from deploy.engines.sizing import weight_bytes
from deploy.recipe import parse_recipe
from tests.helpers import ROOT

CONFIGS = ROOT / "deploy" / "data" / "configs"
INTERNLM2 = json.loads((CONFIGS / "internlm--internlm2-chat-7b.json").read_text())


@pytest.mark.parametrize("backend", ["lmdeploy-turbomind", "lmdeploy-pytorch"])
def test_the_start_is_the_engine_plus_the_weights_at_the_disk_speed(backend):
    recipe = parse_recipe({"engine": {"backend": backend, "dtype": "float16"}})
    slow, fast = predict_start(recipe, INTERNLM2, 250), predict_start(recipe, INTERNLM2, 1000)
    size = weight_bytes(INTERNLM2, "none", "float16")
    assert slow.engine_s == fast.engine_s == ENGINE_START[backend][0]
    assert slow.weights_s == pytest.approx(size / 250e6, abs=0.1)
    assert slow.weights_s == pytest.approx(4 * fast.weights_s, rel=0.02)
    assert slow.probe_grace_s >= 2 * slow.total_s and slow.probe_grace_s % 10 == 0


def test_auto_is_predicted_as_turbomind_and_4bit_weights_start_sooner():
    fp16 = predict_start(parse_recipe({"engine": {"backend": "auto", "dtype": "float16"}}), INTERNLM2)
    w4 = predict_start(parse_recipe({"engine": {"backend": "auto", "dtype": "float16"},
                                     "quantization": {"weights": "w4a16"}}), INTERNLM2)
    assert fp16.backend == w4.backend == "lmdeploy-turbomind"
    assert w4.weights_s < fp16.weights_s / 2.5
    assert fp16.probe_grace_s >= 60


def test_plan_prints_the_predicted_start():
    run = subprocess.run([sys.executable, "-m", "deploy", "plan", "recipes/internlm2-chat-7b-fp16.yaml",
                          "--disk-mb-s", "1000", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    start = json.loads(run.stdout)["start"]
    assert start["disk_mb_s"] == 1000 and start["total_s"] == pytest.approx(
        start["engine_s"] + start["weights_s"], abs=0.1)
    text = subprocess.run([sys.executable, "-m", "deploy", "plan", "recipes/smollm2-cpu.yaml"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert "ready after about" in text and "probes allow 60 s" in text
