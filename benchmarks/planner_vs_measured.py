"""Compare `deploy plan`'s prediction with what /memory measured on a GPU (benchmarks/gpu_lmdeploy.py).

Usage: python -m benchmarks.planner_vs_measured [DIR]   (default docs/data/h100-2026-11-25)
DIR holds the model's config.json and one SETTING.json per setting; prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deploy.capacity.planner import plan
from deploy.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent


def compare(folder: Path) -> list[dict]:
    config = json.loads((folder / "config.json").read_text())
    rows = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "config.json":
            continue
        run = json.loads(path.read_text())
        memory, gpu = run["memory"], run["memory"]["gpus"][0]
        recipe = parse_recipe({
            "quantization": {"weights": run["weights"], "kv_cache": run["kv_cache"]},
            "engine": {"dtype": "float16", "session_len": memory["settings"]["engine"]["session_len"],
                       "max_batch_size": memory["settings"]["engine"]["max_batch_size"],
                       "cache_max_entry_count": run["cache_max_entry_count"]},
        })
        p = plan(recipe, config, gpu_total=(gpu["name"], gpu["total_bytes"]))
        measured = memory["engine"]
        rows.append({
            "setting": run["setting"],
            "weights": (p.weight_bytes, measured["weight_bytes"]),
            "kv_tokens": (p.kv_capacity_tokens, measured["kv_capacity_tokens"]),
            "used": (p.nvidia_smi_used_bytes, gpu["used_bytes"]),
            "gpu": gpu["name"],
        })
    return rows


def table(rows: list[dict]) -> str:
    def cell(pair, scale=2**30, fmt="{:.2f}"):
        predicted, measured = pair
        return (f"{fmt.format(predicted / scale)} | {fmt.format(measured / scale)} | "
                f"{(predicted - measured) / measured * 100:+.1f}%")

    lines = ["| setting | weights GiB predicted | measured | error | KV tokens predicted | measured | "
             "error | nvidia-smi used GiB predicted | measured | error |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {cell(r['weights'])} | {cell(r['kv_tokens'], 1, '{:,.0f}')} "
                     f"| {cell(r['used'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "data" / "h100-2026-11-25"
    print(table(compare(folder)))
