"""Past one machine, checked without a cluster: the swarm stack file and the Helm chart written
from one recipe. The stack is checked by Docker's own parser (`docker stack config`); the chart is
linted and rendered by Helm's SDK (helm-python-sdk) and its manifests validated against
Kubernetes' schemas (kubernetes-validate). tests/e2e/test_swarm.py runs the stack on real nodes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from deploy.capacity.startup import predict_start
from deploy.recipe import load_recipe
from tests.helpers import ROOT, in_ci

CPU = ROOT / "recipes" / "smollm2-cpu.yaml"
FLAGSHIP = ROOT / "recipes" / "internlm2-chat-7b-w4a16-kv8.yaml"


def kit(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, **env}, timeout=120)


def docker_stack_config(path) -> dict:
    if shutil.which("docker") is None:
        if in_ci():
            pytest.fail("the docker client is missing in CI: tools/docker_engine.sh installs it")
        pytest.skip("no docker client here")
    run = subprocess.run(["docker", "stack", "config", "-c", str(path)], capture_output=True, text=True,
                         cwd=path.parent, env={"PATH": "/usr/local/bin:/usr/bin:/bin",
                                               "MODEL_DIR": "/srv/models/flagship"})
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_the_cpu_stack_spreads_replicas_and_probes_readiness_for_the_predicted_start(tmp_path):
    run = kit("image", "stack", str(CPU), "--replicas", "2", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "docker stack deploy -c" in run.stdout and "swarm init" in run.stdout
    stack = docker_stack_config(tmp_path / "stack.yml")
    model, proxy = stack["services"]["model"], stack["services"]["proxy"]
    deploy = model["deploy"]
    assert deploy["replicas"] == 2 and deploy["endpoint_mode"] == "dnsrr"
    assert deploy["placement"]["max_replicas_per_node"] == 1
    assert deploy["restart_policy"]["condition"] == "any"
    assert deploy["update_config"]["order"] == "start-first"
    assert model["stop_grace_period"] == "40s"
    assert model["healthcheck"]["test"][-1] == "deploy.serve.healthcheck"  # GET /health/ready
    recipe = load_recipe(CPU)
    from deploy.builder.sources import model_config

    grace = predict_start(recipe, model_config(recipe)).probe_grace_s
    assert model["healthcheck"]["start_period"] in (f"{grace}s", f"{grace // 60}m0s", f"{grace}s0ms")
    assert proxy["deploy"]["mode"] == "global" and proxy["ports"][0]["mode"] == "host"
    # Swarm places a replica only where the memory `deploy plan` predicts is free; 1.5x is its limit.
    reserve, limit = _planned_memory(recipe)
    assert deploy["resources"] == {"reservations": {"memory": str(reserve * 2**20)},
                                   "limits": {"memory": str(limit * 2**20)}}
    assert f"reserves {reserve} MiB and is limited to {limit} MiB" in run.stdout
    conf = (tmp_path / "nginx.conf").read_text()
    assert "resolver 127.0.0.11" in conf and "tasks.model" in conf and "proxy_next_upstream error" in conf


def _planned_memory(recipe) -> tuple[int, int]:
    from deploy.builder.manifest import local_gguf
    from deploy.builder.sources import model_config
    from deploy.capacity.ram_planner import plan_ram
    from deploy.package.image import replica_memory

    plan = plan_ram(recipe, model_config(recipe), ("any", 2**40), local_gguf(recipe))
    return replica_memory(plan.rss_bytes)


def test_the_gpu_stack_reserves_a_gpu_and_keeps_the_key_out_of_the_file(tmp_path, monkeypatch):
    run = kit("image", "stack", str(FLAGSHIP), "--replicas", "3", "--out", str(tmp_path),
              XLAB_API_KEY="not-in-the-file")
    assert run.returncode == 0, run.stderr
    text = (tmp_path / "stack.yml").read_text()
    assert "not-in-the-file" not in text
    stack = docker_stack_config(tmp_path / "stack.yml")
    model = stack["services"]["model"]
    reservations = model["deploy"]["resources"]["reservations"]["generic_resources"]
    assert reservations == [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]
    recipe = load_recipe(FLAGSHIP)
    if recipe.serve.api_key_env:
        assert model["environment"][f"{recipe.serve.api_key_env}_FILE"] == "/run/secrets/xlab_api_key"
    assert model["volumes"][0]["source"] == "/srv/models/flagship" and model["volumes"][0]["read_only"]


def test_a_stack_without_replicas_is_refused_with_a_sentence(tmp_path):
    run = kit("image", "stack", str(CPU), "--replicas", "0", "--out", str(tmp_path))
    assert run.returncode == 2 and "--replicas" in run.stderr


@pytest.fixture(scope="module")
def chart(tmp_path_factory):
    out = tmp_path_factory.mktemp("chart") / "flagship"
    run = kit("image", "chart", str(FLAGSHIP), "--replicas", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    return out


def rendered(chart_dir, values=None) -> list[dict]:
    import helm_python as helm

    with helm.Chart.load(str(chart_dir)) as loaded:
        files = loaded.render(values or {}, name="assistant", namespace="serving", is_install=True)
    return [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]


def test_the_chart_lints_renders_and_validates_against_kubernetes_schemas(chart, tmp_path):
    import helm_python as helm
    import kubernetes_validate

    report = helm.lint(str(chart), strict=False)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 3], report
    docs = rendered(chart)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    server = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health/live"
    recipe = load_recipe(FLAGSHIP)
    from deploy.builder.sources import model_config

    grace = predict_start(recipe, model_config(recipe)).probe_grace_s
    probe = server["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= grace
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "xlab_requests_waiting"  # a metric the server really exports:
    from deploy.serve.metrics import ServerMetrics

    assert b"xlab_requests_waiting" in ServerMetrics("x", {}).render(None, None)


def test_the_cpu_chart_requests_the_planned_memory(tmp_path):
    import kubernetes_validate

    run = kit("image", "chart", str(CPU), "--replicas", "2", "--out", str(tmp_path / "cpu"))
    assert run.returncode == 0, run.stderr
    server = next(d for d in rendered(tmp_path / "cpu") if d["kind"] == "Deployment")
    kubernetes_validate.validate(server, "1.30", strict=True)
    reserve, limit = _planned_memory(load_recipe(CPU))
    resources = server["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "1", "memory": f"{reserve}Mi"},
                         "limits": {"memory": f"{limit}Mi"}}


def test_a_broken_values_file_is_rejected(chart):
    import helm_python as helm

    for broken in ({"replicaCount": "two"}, {"port": 0}, {"autoscaling": {"enabled": "yes"}},
                   {"unknownKey": 1}):
        with pytest.raises(helm.HelmError):
            rendered(chart, broken)


def test_a_manifest_kubernetes_would_refuse_is_caught():
    import kubernetes_validate

    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)
