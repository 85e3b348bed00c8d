"""On a GPU machine: NVML's GPU, and `weights: auto` resolved for it per engine (needs only
pydantic, pyyaml and psutil beside nvidia-ml-py). From the repo root:
python3 tools/check_auto_weights.py (docs/data/gpu-2026-12-03-auto/)."""

from __future__ import annotations

import logging

from deploy.engines.config import resolve_weights
from deploy.engines.formats import capability_for
from deploy.engines.hardware import local_gpu
from deploy.recipe import load_recipe

logging.basicConfig(level=logging.INFO)
name, capability = local_gpu()
print("local_gpu:", name, capability, "table:", capability_for(name))
assert capability_for(name) in (None, capability)
recipe = load_recipe("recipes/internlm2-chat-7b-fp16.yaml", check_files=False)
for backend, dtype in (("lmdeploy-turbomind", "auto"), ("lmdeploy-turbomind", "float16"),
                       ("lmdeploy-pytorch", "auto"), ("auto", "auto")):
    engine = recipe.engine.model_copy(update={"backend": backend, "dtype": dtype})
    quantization = recipe.quantization.model_copy(update={"weights": "auto"})
    got = resolve_weights(recipe.model_copy(update={"engine": engine, "quantization": quantization}))
    print(f"backend {backend}, dtype {dtype}: auto -> {got.quantization.weights}")
