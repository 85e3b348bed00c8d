"""`deploy plan` for an engine on the CPU: the memory a server will hold, against this machine's RAM
or a memory limit. Before it, a llama.cpp recipe was planned as if on an H100."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.capacity.ram_planner import BASE_BYTES, is_cpu_recipe, parse_ram, plan_ram, preflight
from deploy.engines.hardware import cgroup_memory_limit, usable_ram
from deploy.recipe import RecipeError, parse_recipe
from tests.engines.test_cpu_threads import tree
from tests.helpers import ROOT

GIB, MIB = 2**30, 2**20
# SmolLM2-135M's shape (the bundled model's config.json)
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152,
           "tie_word_embeddings": True, "max_position_embeddings": 8192}


def recipe(backend="llamacpp", session_len=4096, batch=8, mode="api", **quant):
    return parse_recipe({"name": "r", "engine": {"backend": backend, "session_len": session_len,
                                                  "max_batch_size": batch},
                         "serve": {"mode": mode}, "quantization": quant or {}})


def test_llamacpp_holds_its_whole_kv_and_one_steps_logits():
    p = plan_ram(recipe(), SMOLLM2, ("24 GiB", 24 * GIB))
    per_token = 30 * 3 * 64 * 2 * 2  # layers x kv heads x head_dim x fp16 x (K, V)
    assert p.kv_bytes_per_token == per_token == 23040
    assert p.kv_cache_bytes == per_token * 4096 * 9  # eight sessions and the scoring one
    assert p.working_bytes == (256 + 8) * 49152 * 4  # one step's tokens' logits, float32
    base = BASE_BYTES[("llamacpp", "api")]
    assert p.rss_bytes == base + p.weight_bytes + p.kv_cache_bytes + p.working_bytes
    assert p.fits and p.kv_allocated_at_start and p.weights_from == "config.json"
    gradio = plan_ram(recipe(mode="gradio"), SMOLLM2, ("24 GiB", 24 * GIB))
    assert gradio.rss_bytes - p.rss_bytes == BASE_BYTES[("llamacpp", "gradio")] - base
    # A session_len past what the model was trained for is capped, as the engine caps it.
    assert plan_ram(recipe(session_len=20000), SMOLLM2, ("24 GiB", 24 * GIB)).session_len == 8192


def test_a_gguf_here_gives_the_weights_its_size(tmp_path):
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"\0" * 12345)
    p = plan_ram(recipe(weights="q4_1"), SMOLLM2, ("24 GiB", 24 * GIB), gguf)
    assert p.weight_bytes == 12345 and p.weights_from == "the file m.Q4_1.gguf"


def test_too_many_sessions_name_the_field_and_the_number_that_fits():
    p = plan_ram(recipe(batch=64), SMOLLM2, ("a machine with 4GiB", 4 * GIB))
    assert not p.fits
    room = int(4 * GIB * 0.9) - p.base_bytes - p.weight_bytes - p.working_bytes
    assert p.sessions_that_fit == room // (23040 * 4096) - 1
    assert f"set engine.max_batch_size to {p.sessions_that_fit} or less" in p.advice[0]
    assert plan_ram(recipe(batch=p.sessions_that_fit), SMOLLM2, ("4GiB", 4 * GIB)).fits


def test_weights_that_leave_no_room_suggest_smaller_weights():
    p = plan_ram(recipe(), SMOLLM2, ("a machine with 300MiB", 300 * MIB))
    assert not p.fits and p.sessions_that_fit == 0
    assert "quantization.weights q8_0 or q4_1" in p.advice[0]


def test_transformers_kv_grows_and_its_peak_holds_copies():
    p = plan_ram(recipe("transformers", session_len=1024, batch=8), SMOLLM2, ("24 GiB", 24 * GIB))
    assert p.kv_cache_bytes == 23040 * 1024 * 8 and not p.kv_allocated_at_start
    assert p.working_bytes == 3 * p.kv_cache_bytes
    wide = plan_ram(recipe("transformers", session_len=1024, batch=8), SMOLLM2, ("24 GiB", 24 * GIB),
                    sessions=16)
    assert wide.sessions == 16 and wide.kv_cache_bytes == 2 * p.kv_cache_bytes


def test_which_recipes_are_planned_on_the_cpu():
    assert is_cpu_recipe(recipe(), gpu_here=True)
    assert is_cpu_recipe(recipe("transformers"), gpu_here=False)
    assert not is_cpu_recipe(recipe("transformers"), gpu_here=True)
    assert not is_cpu_recipe(recipe("lmdeploy-pytorch"), gpu_here=False)


def test_ram_sizes():
    assert parse_ram("16GiB")[1] == 16 * GIB and parse_ram("512M")[1] == 512 * MIB
    assert parse_ram("1.5")[1] == int(1.5 * GIB)
    with pytest.raises(RecipeError, match="16GiB or 512MiB"):
        parse_ram("lots")


def test_a_memory_limit_is_read_from_the_cgroup_and_its_parents(tmp_path):
    v2 = tree(tmp_path / "v2", {"memory.max": "max\n", "svc/memory.max": f"{2 * GIB}\n",
                                "svc/app/memory.max": "max\n"})
    member = tree(tmp_path, {"v2.txt": "0::/svc/app\n"}) / "v2.txt"
    assert cgroup_memory_limit(v2, member) == 2 * GIB
    assert usable_ram(v2, member) == (2 * GIB, "its cgroup's memory limit")
    # cgroup v1 writes "no limit" as a number near 2**63; in a container the root is its own cgroup.
    v1 = tree(tmp_path / "v1", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                "memory/docker/abc/memory.limit_in_bytes": f"{GIB}\n"})
    member = tree(tmp_path, {"v1.txt": "4:memory:/docker/abc\n3:cpu:/\n"}) / "v1.txt"
    assert cgroup_memory_limit(v1, member) == GIB
    unlimited = tree(tmp_path / "none", {"memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert cgroup_memory_limit(unlimited, tree(tmp_path, {"n.txt": "4:memory:/\n"}) / "n.txt") is None
    total, why = usable_ram(tmp_path / "missing")
    assert why == "its RAM" and total > GIB


def plan_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plan_on_a_llamacpp_recipe_plans_this_machines_memory(assistant):
    """`assistant`: the bundled model loaded once, so its F16 GGUF is on disk."""
    run = plan_cli("recipes/smollm2-cpu.yaml", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["device"] == "cpu" and result["backend"] == "llamacpp" and result["fits"]
    assert result["weights_from"] == "the file SmolLM2-135M-Instruct.F16.gguf"
    small = plan_cli("recipes/smollm2-cpu.yaml", "--ram", "1GiB")
    assert small.returncode == 3
    assert "does NOT fit" in small.stdout and "set engine.max_batch_size to 4 or less" in small.stdout
    wrong = plan_cli("recipes/smollm2-cpu.yaml", "--gpu", "A10")
    assert wrong.returncode == 2 and "--gpu does not apply" in wrong.stderr


@pytest.mark.parametrize("session_len,batch", [(512, 1), (4096, 8)])
def test_a_real_servers_resident_set_is_within_5_percent_of_the_plan(assistant, tmp_path, session_len,
                                                                    batch):
    """The server as a user starts it, in a process of its own; GET /memory shows the prediction
    beside the measurement after it has answered."""
    from deploy.serve.ports import free_port

    spec = yaml.safe_load((ROOT / "recipes/smollm2-cpu.yaml").read_text())
    spec["engine"].update(session_len=session_len, max_batch_size=batch)
    spec["serve"]["mode"] = "api"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "deploy", "serve", str(path), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ok(url):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "smollm2-cpu", "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        memory = httpx.get(url + "/memory", timeout=30).json()
    finally:
        server.terminate()
        server.wait(30)
    predicted, measured = memory["prediction"]["rss_bytes"], memory["process"]["rss_bytes"]
    assert memory["prediction"]["device"] == "cpu"
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).json().get("status") == "ok"
    except httpx.HTTPError:
        return False


def test_a_kv_cache_larger_than_the_memory_is_refused_before_llamacpp_allocates_it(caplog):
    assert preflight(recipe(), SMOLLM2, ("24 GiB", 24 * GIB), None) is None
    refused = preflight(recipe(session_len=8192, batch=200), SMOLLM2, ("this machine", 24 * GIB), None)
    assert "set engine.max_batch_size to" in refused and "allocated at start" in refused
    # Between 90% and 100% of the memory: a warning, and the server loads.
    p = plan_ram(recipe(), SMOLLM2, ("x", 24 * GIB))
    with caplog.at_level("WARNING", logger="deploy.capacity.ram_planner"):
        assert preflight(recipe(), SMOLLM2, ("tight", int(p.rss_bytes / 0.95)), None) is None
    assert "engine.max_batch_size" in caplog.text
    # transformers' plan is an upper bound: a warning only, however far over.
    assert preflight(recipe("transformers", batch=200), SMOLLM2, ("small", GIB), None) is None


def memory_cgroup(limit: int) -> Path | None:
    """A cgroup with a memory limit (v2, else v1's `memory` hierarchy); None where none can be
    written (not root, or no memory controller)."""
    import os

    for root, name in ((Path("/sys/fs/cgroup"), "memory.max"),
                       (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if not (root / name).is_file() and not (root / "cgroup.controllers").is_file():
            continue
        group = root / f"xlab-test-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
            (group / name).write_text(str(limit))
            return group
        except OSError:
            if group.is_dir():
                group.rmdir()
    return None


def test_serve_under_a_memory_limit_says_what_fits_instead_of_being_killed(assistant, tmp_path):
    """The default recipe's server (1.2 GiB planned, 0.8 of it KV that llama.cpp clears at start)
    in a cgroup limited to 900 MiB, as `docker run --memory 900m` would run it. Without the check
    the kernel kills it while llama.cpp clears its KV, and nothing says why; with it, /health says
    what fits."""
    from deploy.serve.ports import free_port
    from tests.helpers import in_ci

    group = memory_cgroup(900 * MIB)
    if group is None:
        if in_ci():
            pytest.fail("CI runs as root with a memory cgroup controller: none could be made")
        pytest.skip("no writable memory cgroup here (needs root)")
    port = free_port()
    server = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -m deploy serve '
         f"recipes/smollm2-cpu.yaml --port {port}", sys.executable],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, health = time.monotonic() + 60, {}
        while health.get("status") != "failed":
            assert server.poll() is None, f"the server died (exit {server.returncode}): {health}"
            assert time.monotonic() < deadline, health
            time.sleep(0.3)
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                pass
        assert "memory limit" in health["error"] and "set engine.max_batch_size to" in health["error"]
    finally:
        server.kill()
        server.wait(30)
        group.rmdir()
