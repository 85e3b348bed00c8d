"""`deploy tune`: from a machine and targets (GPU, sessions, a quality floor, a goal) to the best
recipe, with a report of every candidate.

recipe -> candidates (candidates.py) -> the planner prunes them -> the survivors are measured by the
benchmark's worker within a budget (measure.py) -> the quality floor and the goal pick the winner
(choose.py) -> the winning recipe and the report (report.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deploy.recipe import Recipe, RecipeError
from deploy.tune.candidates import Target, Verdict, enumerate_candidates, judge
from deploy.tune.choose import GOALS, choose
from deploy.tune.measure import TuneError, measure_all, order, profile
from deploy.tune.report import write_recipe, write_report

__all__ = ["GOALS", "TuneError", "TuneResult", "parse_budget", "tune"]


@dataclass
class TuneResult:
    recipe: Path | None
    report: Path
    winner: Verdict | None


def parse_budget(text: str) -> float:
    """Seconds from '20m', '90s', '1h' or '1.5h'; a bare number is minutes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not match:
        raise RecipeError(f"--budget {text!r} is not a duration: write 20m, 90s or 1h.")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[match.group(2)]


def machine_target(gpu: str | None, plan_only: bool) -> tuple[Target, str]:
    """The target to fit, and the machine that measures (a description, for the report)."""
    from deploy.bench.runner import has_gpu
    from deploy.capacity.planner import parse_gpu
    from deploy.engines.hardware import cpu_machine, gpu_report, usable_cpus, usable_ram

    card = gpu_report()["gpus"][0] if has_gpu() else None  # the GPU that measures, if any
    if gpu is not None and card is None and not plan_only:
        raise RecipeError(f"This machine has no GPU to measure on: add --plan-only to plan for "
                          f"the {gpu} without measuring, or drop --gpu to tune for this CPU.")
    if gpu is not None or (card is None and plan_only):
        target = Target("gpu", *parse_gpu(gpu))
    elif card is not None:
        target = Target("gpu", card["name"], card["total_bytes"])
    else:
        cpus, _ = usable_cpus()
        ram, why = usable_ram()
        target = Target("cpu", f"this CPU machine ({cpus} CPU{'s' if cpus > 1 else ''}, {why})", ram)
    machine = (f"{card['name']} ({card['total_bytes'] / 2**30:.0f} GiB)" if card is not None
               else cpu_machine())
    return target, machine


def tune(base: Recipe, config: dict, out: Path, *, gpu: str | None = None, sessions: int | None = None,
         min_top1: float | None = None, goal: str = "throughput", budget_s: float = 1200,
         plan_only: bool = False, repeats: int = 3, tasks: Path | None = None,
         batch_sizes: list[int] | None = None, session_lens: list[int] | None = None) -> TuneResult:
    from deploy.recipe.tasks import default_tasks_file, load_tasks

    if goal not in GOALS:
        raise RecipeError(f"--goal {goal!r} is not one of: {', '.join(GOALS)}.")
    if (sessions is not None and sessions < 1) or repeats < 1:
        raise RecipeError("--sessions and --repeats take a whole number of 1 or more.")
    sessions = sessions or base.engine.max_batch_size
    verify = base.quantization.verify
    min_top1 = verify.min_top1_agreement if min_top1 is None else min_top1
    target, machine = machine_target(gpu, plan_only)
    verdicts = [judge(base, c, target, sessions, config)
                for c in enumerate_candidates(base, target, sessions, config, batch_sizes, session_lens)]
    out.mkdir(parents=True, exist_ok=True)
    if not plan_only:
        tasks = tasks or (base.resolve(verify.tasks) if verify.tasks else default_tasks_file())
        load_tasks(tasks)  # a bad task file fails now, not in every measurement
        reference = _reference(verdicts)
        pruned = reference.status == "pruned"
        measure_all(base, order(verdicts, reference), out, tasks, budget_s,
                    profile(target.kind, sessions, repeats, base))
        if pruned:
            reference.reason += "; measured only as the quality reference"
    winner = choose(verdicts, goal, min_top1, verify.max_mean_kl, plan_only)
    args = {"sessions": sessions, "goal": goal, "min_top1": min_top1, "plan_only": plan_only,
            "budget_s": budget_s, "repeats": repeats}
    recipe_path = None
    if winner is not None:
        header = (f"Written by `python -m deploy tune` for {target.name}, {sessions} sessions, goal "
                  f"{goal}: candidate {winner.label}.\nEvery candidate and why it lost: report.md "
                  "beside this file.")
        recipe_path = write_recipe(base, winner, out / "recipe.yaml", header)
    report = write_report(out, base, target, args, verdicts, winner, machine)
    return TuneResult(recipe_path, report, winner)


def _reference(verdicts: list[Verdict]) -> Verdict:
    """Unquantized weights and KV cache, the largest batch, the longest session, the ratio cache:
    what every quantized candidate's answers are compared with."""
    plain = [v for v in verdicts if v.candidate.quantization_rank == (0, 0)
             and v.candidate.kv_cache_gib is None]
    return max(plain, key=lambda v: (v.candidate.max_batch_size, v.candidate.session_len))
