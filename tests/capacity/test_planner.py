"""`deploy plan`: the arithmetic against known anchors, the advice, and recorded H100 measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.capacity.planner import parse_gpu, plan
from deploy.engines.sizing import kv_bytes_per_token, weight_bytes
from deploy.recipe import RecipeError, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deploy" / "data" / "configs"
INTERNLM2 = json.loads((CONFIGS / "internlm--internlm2-chat-7b.json").read_text())
LLAMA2 = json.loads((ROOT / "docs" / "data" / "h100-2026-11-25" / "config.json").read_text())


def test_kv_per_token_anchors():
    assert kv_bytes_per_token(INTERNLM2) == 128 * 1024
    assert kv_bytes_per_token(LLAMA2) == 512 * 1024


def test_awq_weight_anchors():
    assert weight_bytes(LLAMA2, "w4a16") / 1e9 == pytest.approx(3.9, abs=0.05)
    assert weight_bytes(INTERNLM2, "w4a16") / 1e9 == pytest.approx(5.1, abs=0.05)
    assert weight_bytes(LLAMA2) / 1e9 == pytest.approx(13.48, abs=0.01)  # fp16 Llama-2-7B


def test_gpu_names_and_sizes():
    assert parse_gpu("h100") == ("H100", 81559 * 2**20)
    assert parse_gpu("a100-80g")[0] == "A100-80G"
    assert parse_gpu("24GiB") == ("24 GiB GPU", 24 * 2**30)
    with pytest.raises(RecipeError, match="neither a known GPU"):
        parse_gpu("potato")


def test_weights_that_do_not_fit_are_refused():
    p = plan(parse_recipe({}), INTERNLM2, "T4")
    assert not p.fits
    assert "do not fit a T4" in p.advice[0] and "w4a16" in p.advice[0]


def test_capacity_and_the_ratio_for_wanted_sessions():
    recipe = parse_recipe({"quantization": {"weights": "w4a16", "kv_cache": "int8"},
                           "engine": {"cache_max_entry_count": 0.5, "session_len": 4096}})
    p = plan(recipe, INTERNLM2, "A10", sessions=8)
    assert p.fits
    assert p.kv_capacity_tokens == p.kv_blocks * 64
    assert p.sessions_that_fit == p.kv_capacity_tokens // 4096
    # The smallest ratio for 8 sessions really gives at least 8 sessions, and 0.01 less does not.
    at = parse_recipe({**recipe.model_dump(exclude={"publish"}),
                       "engine": {"cache_max_entry_count": p.ratio_for_wanted, "session_len": 4096}})
    assert plan(at, INTERNLM2, "A10").sessions_that_fit >= 8
    below = at.model_copy(deep=True)
    below.engine.cache_max_entry_count = round(p.ratio_for_wanted - 0.01, 2)
    assert plan(below, INTERNLM2, "A10").sessions_that_fit < 8


def test_too_many_sessions_get_advice():
    recipe = parse_recipe({"engine": {"session_len": 32768}})
    p = plan(recipe, INTERNLM2, "A100-40G", sessions=64)
    assert p.ratio_for_wanted is None
    assert "kv_cache int8 or int4" in p.advice[-1]


def test_absolute_kv_budget():
    p = plan(parse_recipe({"engine": {"kv_cache_gib": 4}}), INTERNLM2, "H100")
    assert p.kv_capacity_tokens == 4 * 2**30 // (128 * 1024)  # 32,768 tokens


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "data" / "h100-2026-11-25").glob("[!c]*.json")),
                         ids=lambda p: p.stem)
def test_prediction_within_5_percent_of_h100_measurement(path):
    """Recorded by benchmarks/gpu_lmdeploy.py on the H100 (docs/lmdeploy.md); re-measure there."""
    from benchmarks.planner_vs_measured import compare

    row = next(r for r in compare(path.parent) if r["setting"] == path.stem)
    for key in ("weights", "kv_tokens", "used"):
        predicted, measured = row[key]
        assert abs(predicted - measured) / measured < 0.05, (key, predicted, measured)


def test_plan_command_offline_uses_stored_config():
    run = subprocess.run([sys.executable, "-m", "deploy", "plan",
                          "recipes/internlm2-chat-7b-w4a16-kv8.yaml", "--gpu", "A10", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1",
                         "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["weight_bytes"] / 1e9 == pytest.approx(5.14, abs=0.01)
    assert result["kv_bytes_per_token"] == 66 * 1024  # int8: 8 heads x (128 + 4) x 2 x 32 layers
    assert "stored copy" in run.stderr


def test_plan_command_exits_3_when_weights_do_not_fit():
    run = subprocess.run([sys.executable, "-m", "deploy", "plan", "recipes/internlm2-chat-7b-fp16.yaml",
                          "--gpu", "T4"], capture_output=True, text=True, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert run.returncode == 3
    assert "do not fit a T4" in run.stdout


def test_one_quick_probe_decides_whether_the_hub_is_used(monkeypatch, caplog):
    """No network: one probe, then local copies only (no ~20 s of huggingface_hub retries); a hub
    that answers is used. Driven against a closed local port and the local fake hub."""
    import huggingface_hub.constants

    from deploy.builder.sources import hub_reachable
    from deploy.serve.ports import free_port
    from tests.fixtures.fake_hub import create_fake_hub
    from tests.helpers import LiveServer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    hub_reachable.cache_clear()
    assert hub_reachable() is False
    assert "HF_HUB_OFFLINE=1" in caplog.text
    with LiveServer(create_fake_hub()) as live:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", live.url)
        hub_reachable.cache_clear()
        assert hub_reachable() is True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_reachable.cache_clear()
    assert hub_reachable() is False  # offline on purpose: no probe at all
    hub_reachable.cache_clear()


def test_plan_on_a_broken_config_json_says_so(tmp_path):
    import subprocess
    import sys

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    (tmp_path / "r.yaml").write_text("name: broken\nmodel:\n  source: local\n  path: m\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "plan", str(tmp_path / "r.yaml"), "--gpu",
                          "A10"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "config.json is not valid JSON" in run.stderr
    assert "Traceback" not in run.stderr
