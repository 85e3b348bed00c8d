"""A Docker Swarm stack from a recipe: `docker stack deploy -c stack.yml NAME` runs it on any swarm.

- `model`: the kit's image, N replicas spread one per node, restarted on any exit, updated by
  starting the new task before stopping the old, given the server's 30 s drain on stop, and
  health-checked on /health/ready with a start period from the predicted start
  (deploy/capacity/startup.py). GPU images reserve one GPU each as a swarm generic resource; CPU
  images reserve the memory `deploy plan` predicts (deploy/capacity/ram_planner.py), with a limit.
- `proxy`: nginx on every node (global), publishing the API on port 8000 in host mode. It finds the
  replicas through Docker's DNS (`tasks.model`, re-read every 2 s), not through swarm's virtual IP
  and routing mesh, which need IPVS (absent on some kernels; these machines have none): so the
  replicas use `endpoint_mode: dnsrr`. nginx rather than LMDeploy's proxy for the GPU image too:
  LMDeploy's proxy learns its replicas by explicit registration of fixed URLs, which a rescheduled
  task (a new IP) would leave stale.
- Nothing secret is in the file: the API key is a swarm secret the user creates, read by the server
  through `<serve.api_key_env>_FILE`.
"""

from __future__ import annotations

import yaml

from deploy.capacity.startup import StartPrediction
from deploy.package.image import (
    CONTAINER_MODELS,
    LABEL,
    PROXY_PORT,
    STOP_TIMEOUT,
    container_port,
    image_kind,
    image_tag,
    mounts_weights,
)
from deploy.recipe import Recipe

SECRET = "xlab_api_key"


def stack_files(recipe: Recipe, replicas: int, start: StartPrediction,
                memory: tuple[int, int] | None = None) -> dict[str, str]:
    """stack.yml and nginx.conf, to write side by side. `memory`: a CPU replica's (reservation,
    limit) in MiB (image.replica_memory)."""
    config = {
        "version": "3.8",
        "services": {"model": model_service(recipe, replicas, start, memory), "proxy": proxy_service()},
        "networks": {"kit": {"driver": "overlay", "attachable": True}},
        "configs": {"nginx_conf": {"file": "./nginx.conf"}},
    }
    if recipe.serve.api_key_env:
        config["secrets"] = {SECRET: {"external": True}}
    return {"stack.yml": yaml.safe_dump(config, sort_keys=False),
            "nginx.conf": proxy_conf("model", container_port(recipe))}


def model_service(recipe: Recipe, replicas: int, start: StartPrediction,
                  memory: tuple[int, int] | None = None) -> dict:
    gpu = image_kind(recipe) == "gpu"
    python = "python3" if gpu else "python"
    env = {"XLAB_DEPLOY_PORT": str(container_port(recipe)),
           # Which replica answered, in the X-Served-By header (swarm fills the template in).
           "XLAB_DEPLOY_REPLICA": "{{.Node.Hostname}}/{{.Task.Slot}}"}
    service: dict = {
        "image": image_tag(recipe),
        "environment": env,
        "healthcheck": {"test": ["CMD", python, "-m", "deploy.serve.healthcheck"], "interval": "10s",
                        "timeout": "5s", "retries": 3, "start_period": f"{start.probe_grace_s}s"},
        "stop_grace_period": f"{STOP_TIMEOUT}s",
        "networks": ["kit"],
        "labels": {LABEL: recipe.name},
        "deploy": {
            "replicas": replicas,
            "endpoint_mode": "dnsrr",
            "placement": {"max_replicas_per_node": 1},
            "restart_policy": {"condition": "any", "delay": "5s"},
            # A new task must be ready before the old one stops: a rolling update never drops
            # below N answering replicas.
            "update_config": {"parallelism": 1, "order": "start-first", "failure_action": "rollback",
                              "monitor": f"{start.probe_grace_s}s"},
            "rollback_config": {"parallelism": 1, "order": "start-first"},
        },
    }
    if recipe.serve.api_key_env:
        env[f"{recipe.serve.api_key_env}_FILE"] = f"/run/secrets/{SECRET}"
        service["secrets"] = [SECRET]
    if mounts_weights(recipe):
        # The same path on every node that may run a replica (copy the built folder there).
        service["volumes"] = [{"type": "bind", "read_only": True,
                               "source": "${MODEL_DIR:?set MODEL_DIR to the built model folder, the "
                                         "same path on every node}",
                               "target": f"{CONTAINER_MODELS}/{recipe.name}"}]
    if gpu:
        # Nodes advertise their GPUs in daemon.json ("node-generic-resources": ["NVIDIA-GPU=GPU-..."]).
        service["deploy"]["resources"] = {"reservations": {"generic_resources": [
            {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": 1}}]}}
    elif memory:
        # Swarm places a replica only on a node with its reservation unreserved.
        service["deploy"]["resources"] = {"reservations": {"memory": f"{memory[0]}M"},
                                          "limits": {"memory": f"{memory[1]}M"}}
    return service


def proxy_service() -> dict:
    return {
        "image": "${XLAB_DEPLOY_PROXY_IMAGE:-nginx:1.27-bookworm}",
        "configs": [{"source": "nginx_conf", "target": "/etc/nginx/nginx.conf"}],
        "ports": [{"target": PROXY_PORT, "published": PROXY_PORT, "protocol": "tcp", "mode": "host"}],
        "networks": ["kit"],
        "deploy": {"mode": "global", "restart_policy": {"condition": "any", "delay": "2s"}},
    }


def proxy_conf(service: str, port: int) -> str:
    """nginx in front of `tasks.<service>`. The name is re-resolved every 2 s (a variable in
    proxy_pass makes nginx ask the resolver), and every address it resolves to takes requests in
    turn. A replica that cannot be reached within 2 s, or answers 502/503 (loading, busy), hands
    the request to the next: a request not yet sent to a dead node is never lost. A request already
    running on a node that dies fails (nginx does not resend a POST it has sent)."""
    return f"""worker_processes 1;
events {{ worker_connections 1024; }}
http {{
  resolver 127.0.0.11 valid=2s ipv6=off;
  resolver_timeout 2s;
  server {{
    listen {PROXY_PORT};
    client_max_body_size 2m;
    location = /proxy/health {{
      return 200 "ok\\n";
    }}
    location / {{
      set $replicas tasks.{service};
      proxy_pass http://$replicas:{port};
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_connect_timeout 2s;
      proxy_read_timeout 600s;
      proxy_next_upstream error timeout http_502 http_503;
      proxy_next_upstream_timeout 30s;
    }}
  }}
}}
"""


def deploy_commands(stack_file: str, recipe: Recipe) -> list[str]:
    """What a user runs on a manager node, in order."""
    steps = []
    if recipe.serve.api_key_env:
        steps.append(f'printf %s "${recipe.serve.api_key_env}" | docker secret create {SECRET} -')
    model = "MODEL_DIR=/path/on/every/node " if mounts_weights(recipe) else ""
    steps.append(f"{model}docker stack deploy -c {stack_file} {recipe.name.lower()}")
    return steps
