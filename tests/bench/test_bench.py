"""`python -m deploy bench` on CPU over two settings, with the quick `smoke` profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "recipes/smollm2-cpu-w4.yaml",
                          "--profile", "smoke", "--repeats", "2", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_results_are_sane(bench_out):
    out, _ = bench_out
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results] == ["transformers-bf16", "transformers-w4a16"]
    bf16, w4 = results
    for r in results:
        assert r["engine"] == "transformers"
        assert r["load_s"] > 0 and r["decode"]["decode_tok_per_s"] > 0
        assert r["offline"]["tokens"] > 0 and r["offline"]["tok_per_s"] > 0
        # Two runs at each concurrency (--repeats 2), and every decode run kept.
        assert [(s["concurrency"], s["repeat"]) for s in r["serving"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
        assert len(r["decode_runs"]) == 3
        assert all(s["failed"] == 0 and s["output_tok_per_s"] > 0 for s in r["serving"])
        assert all(s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] for s in r["serving"])
        assert r["memory"]["gpus"] == [] and r["memory"]["process"]["rss_bytes"] > 0
        # The load client ran in a process of its own, not on the serving interpreter.
        assert all(s["client_pid"] != r["memory"]["process"]["pid"] for s in r["serving"])
        assert r["quality"]["prompts"] == 3 and len(r["quality"]["answers"]) == 3
    # 4-bit weights are smaller. The reference is measured too: a second pass over its own record
    # (stored in fp16, so the KL is small but not zero).
    assert w4["memory"]["engine"]["weight_bytes"] < 0.6 * bf16["memory"]["engine"]["weight_bytes"]
    assert bf16["quality"]["compared_positions"] == w4["quality"]["compared_positions"] > 0
    assert 0.95 <= bf16["quality"]["top1_agreement"] <= 1.0 and 0 <= bf16["quality"]["mean_kl"] < 1e-3
    assert 0.5 < w4["quality"]["top1_agreement"] <= 1.0 and 0 < w4["quality"]["mean_kl"] < 1.0


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_report_has_every_section_and_plot(bench_out):
    out, _ = bench_out
    report = (out / "report.md").read_text()
    for heading in ("## Memory", "## Speed", "## Serving through the OpenAI API", "## Quality"):
        assert heading in report
    assert report.count("| transformers-w4a16 |") >= 4  # memory, speed, 2 serving rows, quality
    # One row per concurrency, its throughput the median with the range of the two runs.
    import re

    serving = [line for line in report.splitlines() if line.startswith("| transformers-bf16 | 2 |")]
    assert len(serving) == 1 and re.search(r"\| [\d.]+ \([\d.]+-[\d.]+\) \|", serving[0])
    for plot in ("memory.png", "throughput.png", "quality.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_rerun_keeps_measured_settings(bench_out):
    out, _ = bench_out
    before = (out / "transformers-bf16.json").read_text()
    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "recipes/smollm2-cpu-w4.yaml",
                          "--profile", "smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("measured earlier, kept") == 2
    assert (out / "transformers-bf16.json").read_text() == before


def test_lmdeploy_settings_on_cpu_are_refused_clearly():
    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "recipes/smollm2-cpu.yaml",
                          "--settings", "lmdeploy-fp16", "--out", "/tmp/never"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "need LMDeploy and an NVIDIA GPU" in run.stderr


def test_a_setting_with_nan_logits_is_reported_as_not_scored(recipe, assistant, nan_logits_engine):
    """The benchmark's quality pass on NaN logits (LMDeploy's PyTorch engine with a quantized KV
    cache): no agreement and no KL, with the reason, rather than a top-1 of 0; the other settings
    still score against a sound reference, and a reference that cannot record says so onwards."""
    import asyncio

    from deploy.bench.worker import _quality
    from deploy.recipe.tasks import load_tasks
    from deploy.serve.assistant import Assistant

    tasks = load_tasks(None, 2)
    broken = Assistant(assistant.config, nan_logits_engine)
    sound, record = asyncio.run(_quality(assistant, tasks, 8, None))
    assert sound["top1_agreement"] is not None and "not_scored" not in sound
    nan, _ = asyncio.run(_quality(broken, tasks, 8, record))
    assert nan["top1_agreement"] is None and nan["mean_kl"] is None
    assert "returned NaN logits" in nan["not_scored"] and all(a["answer"] for a in nan["answers"])
    as_reference, no_record = asyncio.run(_quality(broken, tasks, 8, None))
    assert no_record["rows"] == [] and "returned NaN logits" in no_record["not_scored"]
    after, _ = asyncio.run(_quality(assistant, tasks, 8, no_record))
    assert after["top1_agreement"] is None and "reference setting has no record" in after["not_scored"]


def test_fp8_settings_build_fp8_once_and_compute_in_bfloat16():
    from deploy.bench.runner import setting_recipe
    from deploy.recipe import load_recipe

    base = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml", check_files=False)
    fp8, fp8_kv8 = setting_recipe(base, "lmdeploy-fp8"), setting_recipe(base, "lmdeploy-fp8-kv8")
    assert (fp8.quantization.weights, fp8.quantization.kv_cache) == ("fp8", "none")
    assert (fp8_kv8.quantization.weights, fp8_kv8.quantization.kv_cache) == ("fp8", "int8")
    assert fp8.engine.dtype == fp8_kv8.engine.dtype == "bfloat16"  # TurboMind's FP8 GEMMs
    assert fp8.name == fp8_kv8.name  # one build serves both (the KV cache is chosen at serving)
    assert setting_recipe(base, "lmdeploy-fp16").engine.dtype == base.engine.dtype


@pytest.mark.slow  # three settings in fresh processes, about a minute on the 2-core machine
def test_a_llamacpp_recipe_is_measured_on_llamacpp_against_transformers(tmp_path):
    """The default recipe serves llama.cpp: its benchmark measures what it serves (the F16 GGUF and
    a Q4_1 one the kit writes) beside the Hugging Face baseline, and scores Q4_1 against F16."""
    from deploy.bench.runner import LLAMACPP_DEFAULT

    run = subprocess.run([sys.executable, "-m", "deploy", "bench", "recipes/smollm2-cpu.yaml",
                          "--profile", "smoke", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["setting"] for r in results] == LLAMACPP_DEFAULT
    f16, q4, hf = results
    assert [r["engine"] for r in results] == ["llamacpp", "llamacpp", "transformers"]
    for r in results:
        assert r["decode"]["decode_tok_per_s"] > 0
        assert all(s["failed"] == 0 and s["output_tok_per_s"] > 0 for s in r["serving"])
    weight_bytes = [r["memory"]["engine"]["weight_bytes"] for r in (f16, q4)]
    assert q4["weights"] == "q4_1" and weight_bytes[1] < 0.5 * weight_bytes[0]
    assert 0.95 <= f16["quality"]["top1_agreement"] <= 1.0  # the reference against its own record
    assert 0.5 < q4["quality"]["top1_agreement"] <= 1.0 and q4["quality"]["mean_kl"] > 0
    assert hf["quality"]["compared_positions"] == f16["quality"]["compared_positions"] > 0
