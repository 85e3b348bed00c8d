"""How long a recipe takes from `deploy serve` to ready (GET /health/ready answering 200): the
engine's own start, measured, plus reading the weights from disk at a stated bandwidth.

Orchestrators kill a server whose probe fails before it is ready; the stack file's healthcheck
start period and the Helm chart's startup probe are set from this prediction instead of a guess.

The engine starts are medians measured with the weights already in the page cache (so they hold
the engine's imports, tokenizer, engine build and warm-up; raw files named beside each):
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from deploy.engines.sizing import weight_bytes
from deploy.recipe import Recipe

# backend: (seconds to ready with the weights in the page cache, where it was measured)
ENGINE_START = {
    # CPU, AMD EPYC (AVX2), bundled SmolLM2-135M, 3 starts:
    # docs/data/cpu-coldstart-2026-11-26/after-round2.json
    "transformers": (5.0, "CPU, SmolLM2-135M, 3 starts, 2026-11-26"),
    # the same CPU, the default recipe (F16 GGUF, Gradio UI), 3 starts to ready:
    # docs/data/cpu-coldstart-llamacpp-lean.json (no transformers import at the start)
    "llamacpp": (3.5, "CPU, SmolLM2-135M F16 GGUF, 3 starts, 2026-12-03"),
    # H100, InternLM2-7B shapes, 3 starts: docs/data/gpu-2026-11-26-coldstart-turbomind/
    "lmdeploy-turbomind": (19.1, "H100, InternLM2-7B shapes, 3 starts, 2026-11-26"),
    # H100, 3 starts with the engine process spawned first (docs/benchmarks.md, "The engine process
    # started first"): docs/data/gpu-2026-11-26-coldstart-nvml/
    "lmdeploy-pytorch": (22.2, "H100, InternLM2-7B shapes, 3 starts, 2026-11-26"),
}
DISK_MB_S = 500  # a cold read from a cloud block volume; local NVMe reads several times faster
PROBE_MARGIN = 2.0  # probes wait twice the prediction before they count a failure
MIN_PROBE_S = 60


@dataclass(frozen=True)
class StartPrediction:
    backend: str
    engine_s: float  # the engine's start with the weights cached
    weights_s: float  # reading the weights from disk at disk_mb_s
    disk_mb_s: float
    measured_on: str

    @property
    def total_s(self) -> float:
        return self.engine_s + self.weights_s

    @property
    def probe_grace_s(self) -> int:
        """The start period a probe should allow: the prediction with a margin, in whole tens."""
        return max(MIN_PROBE_S, int(math.ceil(self.total_s * PROBE_MARGIN / 10) * 10))

    def as_dict(self) -> dict:
        return {**asdict(self), "total_s": round(self.total_s, 1), "probe_grace_s": self.probe_grace_s}


def serving_backend(recipe: Recipe) -> str:
    """The backend a deployed server of this recipe runs: `auto` is deployed on the GPU image,
    where it picks TurboMind (wherever TurboMind loads)."""
    return "lmdeploy-turbomind" if recipe.engine.backend == "auto" else recipe.engine.backend


def predict_start(recipe: Recipe, config: dict, disk_mb_s: float = DISK_MB_S,
                  backend: str | None = None) -> StartPrediction:
    backend = backend or serving_backend(recipe)
    engine_s, where = ENGINE_START[backend]
    q = recipe.quantization
    size = weight_bytes(config, q.weights, recipe.engine.dtype, q.group_size)
    return StartPrediction(backend, engine_s, round(size / (disk_mb_s * 1e6), 1), disk_mb_s, where)


def render_start(p: StartPrediction) -> str:
    return (f"  ready after about  {p.total_s:6.1f} s (engine {p.engine_s:.1f} s on {p.backend}, measured "
            f"{p.measured_on}; weights {p.weights_s:.1f} s at {p.disk_mb_s:g} MB/s); probes allow "
            f"{p.probe_grace_s} s")
