"""How many CPU threads the CPU engines run: the CPUs this process may use (affinity, the cgroup's
CPU quota) unless `engine.threads` says otherwise. With a thread per host CPU, a llama.cpp server
pinned to one CPU answered at 0.3 tok/s instead of 44.9-57.0 (docs/data/cpu-threads.json)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.engines.hardware import cgroup_cpu_quota, cpu_threads, usable_cpus
from deploy.recipe import RecipeError, parse_recipe
from tests.helpers import ROOT


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_quota_is_read_from_this_process_cgroup_and_its_parents(tmp_path):
    v2 = tree(tmp_path / "v2", {"cpu.max": "max 100000\n", "svc/cpu.max": "150000 100000\n",
                                "svc/app/cpu.max": "max 100000\n"})
    member = tree(tmp_path, {"v2.txt": "0::/svc/app\n"}) / "v2.txt"
    assert cgroup_cpu_quota(v2, member) == 1.5  # the parent's quota binds its children

    quotas = {"cpu": "-1", "cpu/a": "200000", "cpu/a/b": "50000"}  # -1: none
    v1 = tree(tmp_path / "v1", {**{f"{d}/cpu.cfs_quota_us": q for d, q in quotas.items()},
                                **{f"{d}/cpu.cfs_period_us": "100000" for d in quotas}})
    member = tree(tmp_path, {"v1.txt": "4:memory:/x\n3:cpu,cpuacct:/a/b\n0::/\n"}) / "v1.txt"
    assert cgroup_cpu_quota(v1, member) == 0.5  # the lowest on the way up

    # In a container the mount's root is the container's own cgroup, whatever the path says.
    docker = tree(tmp_path / "docker", {"cpu/cpu.cfs_quota_us": "100000\n",
                                        "cpu/cpu.cfs_period_us": "100000\n"})
    member = tree(tmp_path, {"docker.txt": "3:cpu:/docker/0123abcd\n"}) / "docker.txt"
    assert cgroup_cpu_quota(docker, member) == 1.0

    unlimited = tree(tmp_path / "none", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(unlimited, member) is None
    assert cgroup_cpu_quota(tmp_path / "missing", member) is None


def test_a_quota_is_rounded_to_the_nearest_cpu(tmp_path):
    host = usable_cpus(tmp_path / "missing")[0]
    small = tree(tmp_path / "small", {"cpu.max": "40000 100000\n"})
    assert usable_cpus(small) == (1, "a CPU quota of 0.4 CPUs (its cgroup)")
    one = tree(tmp_path / "one", {"cpu.max": "100000 100000\n"})
    assert usable_cpus(one) == (1, "a CPU quota of 1 CPU (its cgroup)")
    half = tree(tmp_path / "half", {"cpu.max": "150000 100000\n"})
    assert usable_cpus(half)[0] == min(host, 2)
    wide = tree(tmp_path / "wide", {"cpu.max": f"{(host + 4) * 100000} 100000\n"})
    assert usable_cpus(wide)[0] == host  # a quota above the CPUs there does not add any


def test_more_threads_than_cpus_is_allowed_but_named(caplog):
    usable, why = usable_cpus()
    assert cpu_threads(None) == (usable, why)
    with caplog.at_level(logging.WARNING, logger="deploy.engines.hardware"):
        assert cpu_threads(usable + 3) == (usable + 3, "engine.threads")
    assert "engine.threads is" in caplog.text and "Lower engine.threads" in caplog.text


def test_the_recipe_field_refuses_zero():
    assert parse_recipe({"engine": {"threads": 3}}).engine.threads == 3
    with pytest.raises(RecipeError, match="engine.threads"):
        parse_recipe({"engine": {"threads": 0}})


PINNED = r"""
import asyncio, json, os, sys
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import torch
from deploy.builder.sources import bundled_model_dir
from deploy.engines import GenerationParams, engine_config, load_engine
from deploy.recipe import parse_recipe

out = {}
for backend in sys.argv[1:]:
    recipe = parse_recipe({"engine": {"backend": backend, "max_batch_size": 2, "session_len": 512}})
    engine = load_engine(engine_config(recipe), bundled_model_dir("SmolLM2-135M-Instruct"))
    answer = asyncio.run(engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                                     GenerationParams(max_tokens=12)))
    settings = engine.memory().settings
    out[backend] = {"threads": settings["threads"], "from": settings["threads_from"],
                    "text": answer.text, "torch_threads": torch.get_num_threads()}
    engine.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_engines_pinned_to_one_cpu_run_one_thread_and_answer():
    backends = ["transformers"]
    try:
        import llama_cpp  # noqa: F401

        backends.append("llamacpp")
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-c", PINNED, *backends], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for backend in backends:
        assert out[backend]["threads"] == 1, out
        assert "Paris" in out[backend]["text"], out
    assert out["transformers"]["torch_threads"] == 1
    if "llamacpp" in out:  # llama.cpp would run a thread per host CPU unless told
        assert out["llamacpp"]["from"] == "1 CPU in this process's CPU affinity", out
