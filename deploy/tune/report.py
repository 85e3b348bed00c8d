"""What `deploy tune` leaves behind: the winning recipe, and a report of every candidate (Markdown,
JSON and a plot) saying what it measured and why it lost."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from deploy.atomic import write_json
from deploy.bench.runner import portable_recipe
from deploy.recipe import Recipe, load_recipe
from deploy.tune.candidates import Target, Verdict

GIB = 2**30


def write_recipe(base: Recipe, winner: Verdict, path: Path, header: str) -> Path:
    """The base recipe with the winner's settings, under the base's own name; checked by loading it."""
    recipe = winner.candidate.recipe(base)
    data = portable_recipe(recipe)
    data["name"] = f"{base.name}-tuned"
    if base.publish.hub != "none":
        data["publish"] = base.publish.model_dump()
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"# {line}\n" for line in header.splitlines())
                   + yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    load_recipe(tmp)  # a tuned recipe that does not validate is a bug: fail here, not at serve time
    tmp.replace(path)
    return path


def write_report(out: Path, base: Recipe, target: Target, args: dict, verdicts: list[Verdict],
                 winner: Verdict | None, machine: str) -> Path:
    summary = {
        "recipe": base.name, "date": time.strftime("%Y-%m-%d"), "measured_on": machine,
        "target": {"kind": target.kind, "name": target.name, "total_bytes": target.total_bytes},
        **args,
        "winner": winner.label if winner else None,
        "candidates": [v.as_dict() for v in verdicts],
    }
    write_json(out / "report.json", summary)
    plot = _plot(out, verdicts, args["goal"])
    lines = [
        f"# Tuning {base.name}",
        "",
        f"{summary['date']}; target {target.name} ({target.total_bytes / GIB:.1f} GiB"
        f"{' of GPU memory' if target.kind == 'gpu' else ' of RAM'}), {args['sessions']} sessions, "
        f"goal {args['goal']}, top-1 floor {args['min_top1']}; "
        + ("plan only, nothing measured." if args["plan_only"] else
           f"measured on {machine}, budget {args['budget_s']:.0f} s, {args['repeats']} serving runs "
           "per candidate (the range is their min-max)."),
        "",
        f"**Winner: `{winner.label}`**, written to `recipe.yaml`." if winner else
        "**No candidate passed**: see the reasons below.",
        "",
        "| candidate | status | predicted memory (GiB) | sessions that fit | output tok/s | "
        "latency (ms) | memory measured (GiB) | top-1 | mean KL | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(verdicts, key=_rank):
        m = v.measured
        lines.append(
            f"| {v.label} | {v.status} | {v.predicted_bytes / GIB:.2f} | {v.sessions_that_fit} "
            f"| {_spread(m.get('output_tok_per_s'))} | {_spread(m.get('latency_ms'))} "
            f"| {_num(m.get('memory_bytes') and m['memory_bytes'] / GIB, '.2f')} "
            f"| {_num(m.get('top1_agreement'), '.3f')} | {_num(m.get('mean_kl'), '.4f')} | {v.reason} |")
    if target.kind == "gpu" and not args["plan_only"]:
        lines += ["", f"Predicted memory is the planner's for the {target.name}; measured memory is "
                  f"what the measuring GPU showed, where the cache ratio sizes the KV cache by that "
                  "card's memory."]
    if plot:
        lines += ["", f"![candidates]({plot.name})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rank(v: Verdict) -> tuple:
    order = {"chosen": 0, "measured": 1, "failed": 2, "unmeasured": 3, "pruned": 4}
    throughput = (v.measured.get("output_tok_per_s") or {}).get("median") or 0
    return order[v.status], -throughput, v.label


def _spread(s: dict | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plot(out: Path, verdicts: list[Verdict], goal: str) -> Path | None:
    measured = [v for v in verdicts if v.measured]
    if not measured:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"chosen": "tab:green", "measured": "tab:blue", "failed": "tab:red",
               "pruned": "tab:gray", "unmeasured": "tab:gray"}
    for v in measured:
        m = v.measured
        x = m["memory_bytes"] / GIB
        s = m["output_tok_per_s"]
        ax.errorbar([x], [s["median"]], yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                    fmt="o", color=colours[v.status], capsize=3)
        ax.annotate(v.label, (x, s["median"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"memory measured ({measured[0].measured['memory_kind']}), GiB")
    ax.set_ylabel("output tok/s at the asked concurrency")
    ax.set_title(f"Candidates (goal: {goal}); green chosen, red failed a floor")
    fig.tight_layout()
    path = out / "candidates.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
