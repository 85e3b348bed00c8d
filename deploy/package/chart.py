"""A Helm chart from a recipe, for Kubernetes users: the kit's chart (the repository's helm/,
shipped as templates/helm) copied with its name, values.yaml and probes from the recipe.

Kubernetes cannot run on the machines this kit is developed on; the chart is linted, rendered and
validated against Kubernetes' schemas in the tests, not run.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from deploy.package.image import CONTAINER_MODELS, container_port, image_kind, image_tag, mounts_weights
from deploy.recipe import Recipe

if TYPE_CHECKING:
    from deploy.capacity.startup import StartPrediction

CHART = Path(__file__).resolve().parent / "templates" / "helm"
PROBE_PERIOD_S = 10


def chart_name(recipe: Recipe) -> str:
    """A DNS-1123 name, as Helm and Kubernetes want it."""
    return re.sub(r"[^a-z0-9-]+", "-", recipe.name.lower()).strip("-")[:53] or "assistant"


def _resources(recipe: Recipe, memory: tuple[int, int] | None) -> dict:
    """A CPU pod requests the memory `deploy plan` predicts and is limited to image.replica_memory's
    margin over it; a GPU pod's host memory is not planned (its GPU memory is)."""
    if image_kind(recipe) == "gpu":
        return {"requests": {"cpu": "4", "memory": "32Gi"}}
    if memory is None:
        return {"requests": {"cpu": "1", "memory": "2Gi"}}
    return {"requests": {"cpu": "1", "memory": f"{memory[0]}Mi"}, "limits": {"memory": f"{memory[1]}Mi"}}


def chart_values(recipe: Recipe, replicas: int, start: StartPrediction,
                 memory: tuple[int, int] | None = None) -> dict:
    repository, _, tag = image_tag(recipe).rpartition(":")
    return {
        "image": {"repository": repository, "tag": tag or "latest", "pullPolicy": "IfNotPresent"},
        "replicaCount": replicas,
        "port": container_port(recipe),
        "model": recipe.name,
        "gpu": 1 if image_kind(recipe) == "gpu" else 0,
        "resources": _resources(recipe, memory),
        "apiKey": {"envName": recipe.serve.api_key_env or "", "secretName": "", "secretKey": "api-key"},
        # mount: a PersistentVolumeClaim that holds the built model folder (name it here).
        "weights": {"existingClaim": "",
                    "mountPath": f"{CONTAINER_MODELS}/{recipe.name}" if mounts_weights(recipe) else ""},
        # The startup probe allows the predicted start (`deploy plan`) with its margin.
        "startup": {"periodSeconds": PROBE_PERIOD_S,
                    "failureThreshold": math.ceil(start.probe_grace_s / PROBE_PERIOD_S)},
        "terminationGracePeriodSeconds": 40,  # the server drains for up to 30 s
        "autoscaling": {"enabled": True, "minReplicas": replicas, "maxReplicas": max(replicas, 8),
                        "requestsWaitingPerPod": 4},
        "podDisruptionBudget": {"minAvailable": max(1, replicas - 1)},
    }


def write_chart(recipe: Recipe, out: Path, replicas: int, start: StartPrediction,
                memory: tuple[int, int] | None = None) -> Path:
    """The chart at `out` (replaced if present), named for the recipe, with its values."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(CHART, out)
    meta = yaml.safe_load((out / "Chart.yaml").read_text())
    meta.update(name=chart_name(recipe), description=f"{recipe.name}: {meta['description']}")
    (out / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    values = chart_values(recipe, replicas, start, memory)
    note = (f"# Values for {recipe.name}, written by `python -m deploy image chart`; the startup "
            f"probe allows {start.probe_grace_s} s (predicted ready after {start.total_s:.0f} s).\n")
    (out / "values.yaml").write_text(note + yaml.safe_dump(values, sort_keys=False))
    return out
