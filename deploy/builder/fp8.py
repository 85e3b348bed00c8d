"""`quantization.weights: fp8`: a blocked-FP8 copy of a model folder, in the layout TurboMind reads
(deploy/engines/fp8_format.py). Data-free: each 128x128 block of a linear layer's weight is scaled
so that its largest value is FP8's largest, then rounded to float8_e4m3fn. Shards are rewritten
one at a time, so a 7B model needs the memory of its largest shard, not of the whole model.

Why the kit's own converter: LMDeploy 0.18 reads this layout but `lmdeploy lite` writes none, and
no library installable here writes it for TurboMind (llmcompressor's FP8 schemes store one scale per
channel or tensor, not per 128x128 block).
"""

from __future__ import annotations

import json
from pathlib import Path

from deploy.atomic import atomic_dir, copy_model_files
from deploy.engines.fp8_format import QUANTIZATION_CONFIG, SCALE_SUFFIX, quantize, quantized_name


def fp8_quantize(source_dir: Path, out_dir: Path, progress=None, device: str = "cpu") -> Path:
    """`device`: where each shard's blocks are scaled (a GPU does a 7B model in seconds); the
    files are the same either way."""
    from safetensors.torch import load_file, save_file

    shards = sorted(Path(source_dir).glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{source_dir} has no safetensors weights to write as FP8: the fp8 "
                         "builder reads a Hugging Face folder in safetensors.")
    with atomic_dir(out_dir) as work:
        scales: dict[str, str] = {}
        for shard in shards:
            tensors = load_file(shard, device=device)
            for name in [n for n, t in tensors.items() if quantized_name(n, t)]:
                tensors[name], tensors[name + SCALE_SUFFIX] = quantize(tensors[name])
                scales[name + SCALE_SUFFIX] = shard.name
            save_file({k: v.cpu() for k, v in tensors.items()}, work / shard.name,
                      metadata={"format": "pt"})
            del tensors
            if progress:
                progress()
        _copy_the_rest(Path(source_dir), work, scales)
    return out_dir


def shard_count(source_dir: Path) -> int:
    return len(list(Path(source_dir).glob("*.safetensors")))


def _copy_the_rest(source: Path, work: Path, scales: dict[str, str]) -> None:
    """config.json with FP8's quantization_config, the shard index with the scales added, and every
    other file (tokenizer, templates, generation config) as it is."""
    copy_model_files(source, work, skip=("config.json", "model.safetensors.index.json"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = source / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update(scales)
        (work / index.name).write_text(json.dumps(data, indent=2) + "\n")
