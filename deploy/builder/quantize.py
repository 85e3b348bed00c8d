"""W4A16 weight quantization: AWQ with LMDeploy on a GPU, HQQ 4-bit for the transformers engine.

AWQ: LMDeploy's `lite auto_awq` accepts only hub dataset names and loads them through `datasets`.
Its Python API looks the loader up as a module attribute at call time, so the kit swaps in a loader
that reads the recipe's calibration file for the duration of the call, then restores it: no hub,
no patched files.

HQQ (CPU, or the transformers engine anywhere): data-free 4-bit weights with a bf16 scale and zero
per group, from the maintained `hqq` library. It is NOT AWQ: no calibration, and on CPU it saves
memory, not time (measured: docs/builder.md).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from deploy.atomic import atomic_dir
from deploy.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def default_calibration_file() -> Path:
    return Path(str(resources.files("deploy") / "data" / "calibration.txt"))


def calibration_text(path: Path) -> str:
    """A text file as is, or the text of a JSONL file's `text` / `prompt` (+ `reference`) fields."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return raw
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return "\n\n".join(
        "\n".join(str(r[k]) for k in ("text", "prompt", "reference") if r.get(k)) for r in rows
    )


def calibration_samples(tokenizer, text: str, samples: int, seqlen: int, seed: int = 0) -> list:
    """`samples` windows of `seqlen` tokens, drawn at random as LMDeploy's own loaders draw them."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] <= seqlen:  # a short file is repeated until one window fits
        ids = ids.repeat(1, seqlen // ids.shape[1] + 2)
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.shape[1] - seqlen - 1) for _ in range(samples)]
    return [ids[:, s:s + seqlen].to(torch.long) for s in starts]


@contextmanager
def _local_calibration(text: str):
    from lmdeploy.lite.apis import calibrate as calibrate_module

    original = calibrate_module.get_calib_loaders

    def local_loader(name, tokenizer, nsamples=128, seed=0, seqlen=2048):
        return calibration_samples(tokenizer, text, nsamples, seqlen, seed)

    calibrate_module.get_calib_loaders = local_loader
    try:
        yield
    finally:
        calibrate_module.get_calib_loaders = original


def awq_quantize(recipe: Recipe, source_dir: Path, out_dir: Path) -> Path:
    """AWQ-quantize `source_dir` into `out_dir`, atomically: the folder appears only when complete."""
    from lmdeploy.lite.apis.auto_awq import auto_awq

    quant = recipe.quantization
    calib = quant.calibration
    calib_file = recipe.resolve(calib.file) if calib.file else default_calibration_file()
    text = calibration_text(calib_file)
    with atomic_dir(out_dir) as work:
        log.info("AWQ w4 g%d on %s, calibration %s (%d x %d tokens)", quant.group_size,
                 source_dir, calib_file, calib.samples, calib.seqlen)
        with _local_calibration(text):
            auto_awq(
                str(source_dir),
                work_dir=str(work),
                calib_dataset="wikitext2",  # a name LMDeploy accepts; the loader above is local
                calib_samples=calib.samples,
                calib_seqlen=calib.seqlen,
                w_group_size=quant.group_size,
                dtype="float16",
                trust_remote_code=recipe.model.trust_remote_code,
            )
        for leftover in ("inputs_stats.pth", "outputs_stats.pth"):  # calibration intermediates
            (work / leftover).unlink(missing_ok=True)
    return out_dir


def hqq_quantize(recipe: Recipe, source_dir: Path, out_dir: Path) -> Path:
    """HQQ 4-bit (W4A16) for the transformers engine, written atomically into `out_dir`."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    group = recipe.quantization.group_size
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.bfloat16)
    hidden = model.config.hidden_size
    if hidden % group:
        raise RecipeError(
            f"quantization.group_size {group} does not divide the model's hidden size {hidden}: "
            f"use a divisor such as {next(g for g in (128, 64, 32, 16) if hidden % g == 0)}."
        )
    with atomic_dir(out_dir) as work:
        AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=group),
                                      compute_dtype=torch.bfloat16, device="cpu")
        AutoHQQHFModel.save_quantized(model, str(work))
        AutoTokenizer.from_pretrained(source_dir).save_pretrained(work)
        for extra in ("generation_config.json", "chat_template.jinja"):
            if (source_dir / extra).is_file() and not (work / extra).is_file():
                shutil.copy(source_dir / extra, work / extra)
    return out_dir
