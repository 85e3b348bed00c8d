"""Stage 2, the build: recipe -> fetch (sources.py) -> merge a LoRA adapter (merge.py) -> quantize
(quantize.py) -> quality gate (gate.py) -> publish (publish.py), run and recorded by pipeline.py.

manifest.py holds the build record and `built_model_dir`, the only way later stages find weights.
"""
