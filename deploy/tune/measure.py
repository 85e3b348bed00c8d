"""Measuring the candidates that survive the planner, each in a fresh process, within a time budget.

Each measurement is the benchmark's own worker (deploy/bench/worker.py) with a short profile: the
serving load at the asked concurrency, repeated, and the quality against the reference candidate
(unquantized weights and KV cache) on the recipe's gate prompts. A finished candidate's result is
written whole to OUT/measured/LABEL.json, so a rerun resumes and costs nothing for those.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from deploy.bench.runner import write_spec
from deploy.errors import KitError
from deploy.recipe import Recipe
from deploy.tune.candidates import Verdict

console = Console(stderr=True)


class TuneError(KitError):
    """Tuning cannot go on; the message says what to change."""


def profile(kind: str, sessions: int, repeats: int, recipe: Recipe) -> dict:
    """The benchmark profile for one candidate: what `deploy tune` needs, and little else."""
    verify = recipe.quantization.verify
    return {"decode_tokens": 16, "offline_prompts": 1, "offline_tokens": 4,
            "concurrency": [sessions], "repeats": repeats, "requests_per_slot": 2,
            "serve_tokens": 32 if kind == "gpu" else 24,
            "quality_prompts": verify.prompts, "quality_tokens": verify.answer_tokens}


def order(verdicts: list[Verdict], reference: Verdict) -> list[Verdict]:
    """The reference first (every quality number needs it), then one candidate of each quantization
    in turn, so a small budget still covers the choices that matter most."""
    rest = [v for v in verdicts if v.status == "unmeasured" and v is not reference]
    groups: dict[tuple, list[Verdict]] = {}
    for v in rest:
        groups.setdefault(v.candidate.variant, []).append(v)
    ordered = [reference]
    while any(groups.values()):
        for key in sorted(groups):
            if groups[key]:
                ordered.append(groups[key].pop(0))
    return ordered


def summarize(result: dict, serve_tokens: int) -> dict:
    """The numbers tuning ranks by, with the spread over the repeated serving runs."""
    runs = result["serving"]
    throughput = [r["output_tok_per_s"] for r in runs]
    # A request's latency at this load: time to the first token plus the rest at TPOT's pace.
    latency = [r["ttft_ms"]["p50"] + (r["tpot_ms"]["p50"] or 0) * (serve_tokens - 1) for r in runs
               if r["ttft_ms"]["p50"] is not None]
    memory = result["memory"]
    gpus = memory["gpus"]
    quality = result["quality"]
    return {
        "repeats": len(runs),
        "failed_requests": sum(r["failed"] for r in runs),
        "output_tok_per_s": _spread(throughput),
        "latency_ms": _spread(latency),
        "ttft_ms_p50": _spread([r["ttft_ms"]["p50"] for r in runs if r["ttft_ms"]["p50"] is not None]),
        "memory_bytes": gpus[0]["used_bytes"] if gpus else memory["process"]["rss_bytes"],
        "memory_kind": "GPU used (NVML)" if gpus else "process RSS",
        "top1_agreement": quality["top1_agreement"],
        "mean_kl": quality["mean_kl"],
        "not_scored": quality.get("not_scored"),
        "build_s": result["build_s"],
        "start_to_first_token_s": result["start_to_first_token_s"],
        "engine": result["engine"],
    }


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_all(base: Recipe, ordered: list[Verdict], out: Path, tasks: Path, budget_s: float,
                prof: dict) -> None:
    """Measure in order until the budget is spent; each verdict gets its numbers or its reason."""
    folder = out / "measured"
    for sub in ("measured", "recipes", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    reference_file = out / ".reference-logits.pt"
    started = time.monotonic()
    durations: list[float] = []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("measuring", total=len(ordered))
        for number, verdict in enumerate(ordered):
            result_path = folder / f"{verdict.label}.json"
            reference = number == 0
            if result_path.is_file() and (not reference or reference_file.is_file()):
                _record(verdict, json.loads(result_path.read_text()), prof)
                progress.advance(bar)
                continue
            left = budget_s - (time.monotonic() - started)
            typical = statistics.mean(durations) if durations else 0.0
            if not reference and left < typical:
                verdict.reason = (f"not measured: about {typical:.0f} s each and {max(left, 0):.0f} s of "
                                  "the budget left; rerun with a larger --budget (measured ones are kept)")
                progress.advance(bar)
                continue
            progress.update(bar, description=f"{verdict.label} ({max(left, 0):.0f} s of budget left)")
            begun = time.monotonic()
            outcome = _run_worker(base, verdict, out, tasks, prof, reference_file, reference,
                                  timeout=None if reference else max(left, 1))
            durations.append(time.monotonic() - begun)
            progress.advance(bar)
            if outcome == "timeout":
                verdict.reason = "not measured: its measurement ran past the budget and was stopped"
            elif outcome:
                verdict.status, verdict.reason = "failed", outcome
                if reference:
                    raise TuneError(f"The reference candidate {verdict.label} (unquantized weights and "
                                    f"KV cache) failed to measure, and every quality check needs it: "
                                    f"{outcome}")
            else:
                _record(verdict, json.loads(result_path.read_text()), prof)


def _record(verdict: Verdict, result: dict, prof: dict) -> None:
    verdict.measured = summarize(result, prof["serve_tokens"])
    if verdict.status == "unmeasured":
        verdict.status, verdict.reason = "measured", ""


def _run_worker(base: Recipe, verdict: Verdict, out: Path, tasks: Path, prof: dict,
                reference_file: Path, reference: bool, timeout: float | None) -> str | None:
    """None when measured; "timeout"; else the failure's last log lines."""
    spec_file = write_spec(out, verdict.label, verdict.candidate.recipe(base), tasks,
                           out / "measured" / f"{verdict.label}.json", prof, reference_file, reference)
    log_path = out / "logs" / f"{verdict.label}.log"
    with log_path.open("w") as log:
        # A session of its own, so a stop at the budget also ends LMDeploy's engine processes.
        process = subprocess.Popen([sys.executable, "-m", "deploy.bench.worker", str(spec_file)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timeout"
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    if code:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return f"the measurement failed (exit {code}): " + " / ".join(tail) + f" (log: {log_path})"
    return None
