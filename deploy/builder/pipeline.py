"""The builder: recipe -> fetch -> quantize -> verify -> publish, resumable and atomic.

Each recipe has a work dir (`$XLAB_DEPLOY_HOME/builds/NAME`) with a manifest.json recording every
finished step's inputs, outputs, file fingerprints and time. A step's output is written to a hidden
temporary folder and renamed into place when complete, and the manifest is rewritten (atomically)
only after that, so a build killed at any point leaves finished steps intact and no half-written
output; a rerun skips every step whose inputs are unchanged and whose outputs are still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from deploy.atomic import write_json
from deploy.builder.manifest import already_quantized, gate_retry, manifest_path, read_manifest, work_dir
from deploy.builder.quantize import default_calibration_file
from deploy.builder.sources import model_dir
from deploy.errors import KitError
from deploy.home import cache_home
from deploy.recipe import Recipe, chat_template_text
from deploy.recipe.tasks import default_tasks_file, load_tasks

log = logging.getLogger(__name__)
console = Console(stderr=True)

FULL_HASH_LIMIT = 64 * 2**20  # files above this get a fast fingerprint: size + head + tail


class BuildError(KitError):
    """A step could not write its output (full disk, no permission); the message says what to do."""


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_problem(exc: OSError, step: str, work: Path) -> str | None:
    """The user's version of a failed write, or None for errors that are not about the disk."""
    where = Path(exc.filename) if exc.filename else work
    # The kit's own cache can move; other folders (the Hugging Face cache, say) are named as they are.
    ours = where == work or cache_home() in where.parents
    move = ("set XLAB_DEPLOY_HOME to a folder on a bigger disk" if ours
            else "move that folder to a bigger disk")
    if exc.errno in DISK_FULL:
        try:
            existing = next(p for p in (where, *where.parents) if p.exists())
            free = f"{shutil.disk_usage(existing).free / 1e9:.1f} GB"
        except (OSError, StopIteration):
            free = "unknown space"
        return (f"The {step} step ran out of disk space writing {where} ({exc.strerror}; {free} "
                f"free there now that its partial output is removed). Free some space, or {move}, "
                "then run the build again: finished steps are kept.")
    if exc.errno == errno.ENOTDIR:
        return (f"The {step} step cannot create {where}: part of that path is a file, not a "
                "folder. Set XLAB_DEPLOY_HOME to a folder, then run the build again.")
    if exc.errno in NOT_ALLOWED:
        return (f"The {step} step may not write {where} ({exc.strerror}). Make that folder "
                "writable, or set XLAB_DEPLOY_HOME to a folder you own, then run the build again.")
    return None


@contextlib.contextmanager
def _writes(step: str, work: Path):
    """Turns a full disk or a refused write into a BuildError, after removing partial output."""
    try:
        yield
    except OSError as exc:
        problem = write_problem(exc, step, work)
        if problem is None:
            raise
        with contextlib.suppress(OSError):
            _remove_leftovers(work)
        raise BuildError(problem) from exc


class QualityGateError(KitError):
    """The quantized model is further from the original than the recipe allows."""

    exit_code = 4


@dataclass
class BuildResult:
    model_dir: Path
    manifest: dict


def build(recipe: Recipe, *, publish_dry_run: bool = False, gate: bool = True,
          publish_overwrite: bool = False) -> BuildResult:
    """Run the steps in order. `gate=False` (the benchmark, which measures quality itself) skips
    the verify step without recording it. `publish_overwrite` publishes on top of a remote that
    changed since the last publish. One build of a recipe runs at a time."""
    from deploy.engines import resolve_weights

    recipe = resolve_weights(recipe)  # `weights: auto` becomes the format for this machine's GPU
    work = work_dir(recipe)
    with _writes("set-up", work):
        work.mkdir(parents=True, exist_ok=True)
    with _build_lock(recipe, work):
        with _writes("set-up", work):
            _remove_leftovers(work)  # safe now: no other build of this recipe is writing them
        return _run_steps(recipe, work, publish_dry_run, gate, publish_overwrite)


STEP_NAMES = ("fetch", "merge", "quantize", "verify", "publish")


def _run_steps(recipe: Recipe, work: Path, publish_dry_run: bool, gate: bool,
               publish_overwrite: bool) -> BuildResult:
    manifest = read_manifest(recipe)
    steps = [("fetch", _fetch), ("merge", _merge), ("quantize", _quantize), ("verify", _verify),
             ("publish", _publish)]
    outputs: dict = {}
    prints: dict = {}  # each step's output folder fingerprints, as recorded
    rerun = False  # once a step runs, every step after it runs too
    for number, (name, step) in enumerate(steps, 1):
        inputs = _step_inputs(name, recipe, outputs, prints)
        done = manifest["steps"].get(name)
        rehearse = name == "publish" and publish_dry_run  # a dry run always shows its list
        if (done and not rerun and done["inputs"] == inputs and _outputs_exist(done["outputs"])
                and not rehearse):
            outputs[name], prints[name] = done["outputs"], done.get("fingerprints", {})
            if done["outputs"].get("passed") is False:
                console.print(f"[{number}/{len(steps)}] {name}: failed earlier on these same inputs")
                raise QualityGateError(done["outputs"]["message"])
            console.print(f"[{number}/{len(steps)}] {name}: done earlier, skipped")
            continue
        if name == "verify" and not gate:
            outputs[name] = {"skipped": "quality is measured by the caller"}
            continue
        rerun = True
        started = time.perf_counter()
        with _writes(name, work), console.status(f"[{number}/{len(steps)}] {name} ..."):
            result = step(recipe, work, outputs, publish_dry_run=publish_dry_run,
                          publish_overwrite=publish_overwrite, manifest=manifest)
        seconds = time.perf_counter() - started
        outputs[name] = result
        if result.get("skipped"):
            console.print(f"[{number}/{len(steps)}] {name}: {result['skipped']}")
        else:
            console.print(f"[{number}/{len(steps)}] {name}: done in {seconds:.1f}s")
        if name == "publish" and publish_dry_run:
            continue  # a dry run changes nothing, the manifest included
        prints[name] = _fingerprints(result.get("model_dir"))
        manifest["steps"][name] = {
            "inputs": inputs,
            "outputs": result,
            "fingerprints": prints[name],
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if result.get("head"):  # the remote's state after a publish, kept across rebuilds
            manifest.setdefault("published", {})[result["target"]] = {
                "head": result["head"], "at": manifest["steps"][name]["finished_at"]}
        # What later steps recorded was made from this step's old output: it no longer holds.
        for later in STEP_NAMES[STEP_NAMES.index(name) + 1:]:
            manifest["steps"].pop(later, None)
        with _writes(name, work):
            write_json(manifest_path(recipe), manifest)
        if result.get("passed") is False:
            raise QualityGateError(result["message"])
    final = outputs["quantize"].get("model_dir") or _source(outputs)
    return BuildResult(Path(final), manifest)


def _source(outputs: dict) -> str:
    """The unquantized model: the fetched one, or the base with the adapter merged in."""
    return outputs["merge"].get("model_dir") or outputs["fetch"]["model_dir"]


def _step_inputs(name: str, recipe: Recipe, outputs: dict, prints: dict) -> dict:
    """Everything a step's output depends on: the recipe fields it reads, and the fingerprints of
    the files it reads (the previous step's output included). A change re-runs it and every step
    after it."""
    model, quant = recipe.model, recipe.quantization
    if name == "fetch":
        local = recipe.resolve(model.path) if model.source == "local" else None
        return {"model": model.model_dump(include={"source", "id", "path", "revision"}),
                "files": _fingerprints(str(local)) if local else {}}
    if name == "merge":
        adapter = model.adapter
        local = adapter and recipe.resolve(adapter).is_dir()
        return {"fetched": outputs["fetch"], "base_files": prints["fetch"], "adapter": adapter,
                "trust_remote_code": model.trust_remote_code, "dtype": recipe.engine.dtype,
                "fingerprints": _fingerprints(str(recipe.resolve(adapter))) if local else {}}
    source_files = prints["merge"] if outputs["merge"].get("model_dir") else prints["fetch"]
    if name == "quantize":
        method = _quant_backend(recipe)
        calibration = quant.calibration
        calibration_file = (recipe.resolve(calibration.file) if calibration.file
                            else default_calibration_file())
        return {"source": _source(outputs), "source_files": source_files, "method": method,
                "weights": quant.weights, "group_size": quant.group_size,
                "trust_remote_code": model.trust_remote_code,
                # HQQ is data-free: only AWQ reads the calibration text.
                "calibration": {**calibration.model_dump(), "text": _fingerprint(calibration_file)}
                if method == "awq" else None}
    if name == "verify":
        gate = quant.verify
        tasks = recipe.resolve(gate.tasks) if gate.tasks else default_tasks_file()
        return {"quantized": outputs["quantize"], "quantized_fingerprints": prints["quantize"],
                "source_files": source_files, "verify": gate.model_dump(),
                "tasks": _fingerprint(tasks), "chat_template": chat_template_text(recipe),
                "kv_cache": quant.kv_cache, "engine": recipe.engine.model_dump(include={"backend", "dtype"}),
                "trust_remote_code": model.trust_remote_code}
    final = prints["quantize"] if outputs["quantize"].get("model_dir") else source_files
    return {"verified": outputs["verify"], "files": final, "publish": recipe.publish.model_dump()}


def _fetch(recipe: Recipe, work: Path, outputs: dict, **_) -> dict:
    return {"model_dir": str(model_dir(recipe))}


def _merge(recipe: Recipe, work: Path, outputs: dict, **_) -> dict:
    if not recipe.model.adapter:
        return {"skipped": "model.adapter is not set"}
    from deploy.builder.merge import merge_adapter

    target = work / "merged"
    shutil.rmtree(target, ignore_errors=True)  # inputs changed: the old output is stale
    merge_adapter(recipe, Path(outputs["fetch"]["model_dir"]), target)
    return {"model_dir": str(target), "adapter": recipe.model.adapter}


def _quant_backend(recipe: Recipe) -> str | None:
    """AWQ for LMDeploy on a GPU; HQQ for the transformers engine (CPU or GPU); a GGUF type
    written by llama.cpp for the llama.cpp engine."""
    if recipe.quantization.weights == "none":
        return None
    if recipe.engine.backend == "llamacpp":
        return "gguf"
    if recipe.quantization.weights == "fp8":
        return "fp8"  # the kit's own converter, for any engine (builder/fp8.py says why)
    from deploy.engines import pick_backend
    from deploy.engines.lmdeploy_engine import turbomind_group_refusal

    backend = pick_backend(recipe.engine.backend)
    if not backend.startswith("lmdeploy"):
        return "hqq"
    # Refused where the backend is resolved: before calibration (minutes on a GPU), not when the
    # server starts.
    quant = recipe.quantization
    if refusal := turbomind_group_refusal(backend, quant.weights, quant.group_size):
        raise refusal
    return "awq"


def _quantize(recipe: Recipe, work: Path, outputs: dict, **_) -> dict:
    method = _quant_backend(recipe)
    if method is None:
        return {"skipped": "quantization.weights is none"}
    source = Path(_source(outputs))
    if already_quantized(source):
        return {"model_dir": str(source), "method": "prequantized"}
    target = work / f"quantized-{method}"
    shutil.rmtree(target, ignore_errors=True)  # inputs changed: the old output is stale
    if method == "fp8":
        import torch

        from deploy.builder.fp8 import fp8_quantize, shard_count

        # A GPU scales a 7B model's blocks in seconds; the files are the same on either device.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with _progress(shard_count(source), "quantize: FP8 shards") as advance:
            fp8_quantize(source, target, advance, device=device)
        return {"model_dir": str(target), "method": method}
    if method == "gguf":
        from deploy.builder.gguf import GGUF_TYPES, gguf_quantize

        gguf_quantize(GGUF_TYPES[recipe.quantization.weights], source, target)
        return {"model_dir": str(target), "method": method, "type": recipe.quantization.weights}
    from deploy.builder.quantize import awq_quantize, hqq_quantize

    (awq_quantize if method == "awq" else hqq_quantize)(recipe, source, target)
    return {"model_dir": str(target), "method": method}


def _verify(recipe: Recipe, work: Path, outputs: dict, **_) -> dict:
    """The quality gate, one model in memory at a time: the unquantized reference answers and
    scores first, its distributions stay on the CPU, and it is closed before the candidate loads.
    Its verdict is recorded either way; serving refuses weights that failed (manifest.check_gate)."""
    if outputs["quantize"].get("method") in (None, "prequantized"):
        return {"skipped": "nothing was quantized here, so there is no original to compare with"}
    gate = recipe.quantization.verify
    if not gate.enabled:
        return {"skipped": "switched off by quantization.verify.enabled: false"}
    from dataclasses import replace

    from deploy.builder.gate import UnscorableLogits, compare_with, reference_rows
    from deploy.engines import engine_config, load_engine

    tasks = load_tasks(recipe.resolve(gate.tasks) if gate.tasks else None, gate.prompts)
    config = engine_config(recipe)
    # The same engine unquantized (LMDeploy fp16 on a GPU, which needs no hub code for InternLM2;
    # transformers on a CPU, with the recipe's trust_remote_code).
    reference = load_engine(replace(config, weights="none", kv_cache="none"), Path(_source(outputs)))
    try:
        with _progress(len(tasks), "verify: the original") as advance:
            rows = asyncio.run(reference_rows(reference, reference.tokenizer, tasks,
                                              gate.answer_tokens, advance))
    finally:
        reference.close()
    del reference
    gc.collect()  # the reference's weights go before the candidate's arrive
    candidate = load_engine(config, Path(outputs["quantize"]["model_dir"]))
    try:
        with _progress(len(tasks), "verify: the quantized model") as advance:
            result = asyncio.run(compare_with(candidate, rows, tasks, gate.answer_tokens, advance))
    except UnscorableLogits as exc:
        return _unscored(work, config, exc)
    finally:
        candidate.close()
    report = {**result.as_dict(), "min_top1_agreement": gate.min_top1_agreement,
              "max_mean_kl": gate.max_mean_kl}
    write_json(work / "verify.json", report)
    passed = result.top1_agreement >= gate.min_top1_agreement and result.mean_kl <= gate.max_mean_kl
    message = None if passed else (
        f"The quantized model failed the quality gate: top-1 agreement "
        f"{result.top1_agreement:.3f} (at least {gate.min_top1_agreement} needed), mean KL "
        f"{result.mean_kl:.4f} (at most {gate.max_mean_kl} allowed) over {result.positions} "
        f"positions. See {work / 'verify.json'} for the answers side by side. "
        f"Try {gate_retry(recipe.quantization.weights)}, or relax quantization.verify if the "
        "answers look right."
    )
    return {"passed": passed, "message": message, "top1_agreement": result.top1_agreement,
            "mean_kl": result.mean_kl, "positions": result.positions,
            "report": str(work / "verify.json")}


def _unscored(work: Path, config, exc: Exception) -> dict:
    """The gate's verdict when the candidate's logits cannot be scored: failed, with the reason
    and the ways on, never a top-1 of 0 that reads as a broken quantization."""
    why = f"The quality gate could not score the quantized model: {exc}."
    if config.backend == "lmdeploy-pytorch" and config.kv_cache != "none":
        why += (f" LMDeploy's PyTorch engine returns NaN for every logit when its KV cache is "
                f"quantized (quantization.kv_cache {config.kv_cache}; LMDeploy 0.18 on the H100, "
                "docs/benchmarks.md), though its answers are whole.")
    message = (f"{why} Set engine.backend: lmdeploy-turbomind (or auto, which picks TurboMind where "
               "it loads) and build again, or serve these weights unverified with `deploy serve --force`.")
    write_json(work / "verify.json", {"scored": False, "reason": str(exc)})
    return {"passed": False, "message": message, "reason": str(exc), "top1_agreement": None,
            "mean_kl": None, "positions": 0, "report": str(work / "verify.json")}


def _publish(recipe: Recipe, work: Path, outputs: dict, *, publish_dry_run: bool,
             publish_overwrite: bool, manifest: dict) -> dict:
    if recipe.publish.hub == "none":
        return {"skipped": "publish.hub is none"}
    from deploy.builder.publish import publish

    folder = Path(outputs["quantize"].get("model_dir") or _source(outputs))
    last = manifest.get("published", {}).get(f"{recipe.publish.hub}:{recipe.publish.repo}")
    return publish(recipe, folder, outputs.get("verify", {}), dry_run=publish_dry_run,
                   overwrite=publish_overwrite, last=last)


class _progress:
    """A progress bar for a step with a known number of items."""

    def __init__(self, total: int, label: str):
        from rich.progress import Progress

        self.bar = Progress(console=console, transient=True)
        self.total, self.label = total, label

    def __enter__(self) -> Callable[[], None]:
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _outputs_exist(outputs: dict) -> bool:
    folder = outputs.get("model_dir")
    return folder is None or (Path(folder) / "config.json").is_file()


def _fingerprints(folder: str | None) -> dict:
    if not folder:
        return {}
    return {f.name: _fingerprint(f) for f in sorted(Path(folder).iterdir()) if f.is_file()}


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            digest.update(f.read())
            return f"sha256:{digest.hexdigest()}"
        # Multi-GB weights: hashing them in full on every build costs minutes.
        digest.update(f.read(2**20))
        f.seek(-(2**20), os.SEEK_END)
        digest.update(f.read())
    return f"sha256-head-tail:{digest.hexdigest()}:{size}"


def _remove_leftovers(work: Path) -> None:
    """Temporary outputs of a killed build: never complete, always safe to delete."""
    for leftover in work.glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()


@contextlib.contextmanager
def _build_lock(recipe: Recipe, work: Path):
    """One build of a recipe at a time: a second one would delete the first one's temporary
    folders and race it for the manifest."""
    from filelock import FileLock, Timeout

    lock = FileLock(work / "build.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BuildError(
            f"Another build of {recipe.name} is running (it holds {work / 'build.lock'}). Wait for "
            "it to finish, then run the build again: the steps it finishes are kept."
        ) from None
    try:
        yield
    finally:
        lock.release()
