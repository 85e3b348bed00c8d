"""llama.cpp servers given fewer CPUs than the machine has: one pinned to a CPU (taskset, docker
--cpuset-cpus), one under a CPU quota (docker --cpus), two on the same cores (two replicas on one
host). Each with as many threads as the machine has CPUs (what the engine ran before it read its
affinity and quota) and with the CPUs it may use (`engine.threads` unset, or set to its share).

Every server is the kit's engine (LlamaCppEngine, the default F16 GGUF; with `--engine
transformers` the transformers engine on the default bf16 weights) in a process of its own,
asked in-process through Engine.stream_chat. The processes of a setting load, warm up, then start
together; each answers one story prompt (no early end) to `--tokens`, then eight at once to
`--tokens` each. Settings alternate within each round. A quota needs root and a writable cgroup
`cpu` controller (v1 or v2); where there is none those settings are left out and the file says so.
Writes OUT (JSON) with the CPU's name and flags.

Usage: python -m benchmarks.cpu_threads [--rounds 3] [--tokens 24] [--engine llamacpp|transformers]
       [--only SETTING ...] [--out docs/data/cpu-threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import ROOT, cpu_name

HOST = os.cpu_count() or 1
NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal")
# name -> (servers, each one's threads (None: the engine's own choice), pinned CPUs, CPU quota)
SETTINGS = {
    "one server, all CPUs": (1, None, None, None),
    "one server pinned to 1 CPU, threads = machine's CPUs": (1, HOST, {0}, None),
    "one server pinned to 1 CPU, threads unset": (1, None, {0}, None),
    "one server under a 1-CPU quota, threads = machine's CPUs": (1, HOST, None, 1.0),
    "one server under a 1-CPU quota, threads unset": (1, None, None, 1.0),
    # A fractional quota: the engine rounds it to the nearest CPU (2 here); rounded down it is 1.
    "one server under a 1.5-CPU quota, threads 1 (rounded down)": (1, 1, None, 1.5),
    "one server under a 1.5-CPU quota, threads unset": (1, None, None, 1.5),
    "two servers, threads = machine's CPUs each": (2, HOST, None, None),
    "two servers, threads = half the CPUs each": (2, max(1, HOST // 2), None, None),
}


def worker(spec: dict) -> None:
    """One server's process: engine, warm-up, 'ready', wait for 'go', measure, print JSON."""
    if spec["cgroup"]:
        Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    if spec["pinned"]:
        os.sched_setaffinity(0, set(spec["pinned"]))
    from benchmarks.cpu_runtimes import LONG, KitRow
    from deploy.builder.sources import bundled_model_dir
    if spec["engine"] == "transformers":
        from deploy.engines.transformers_engine import TransformersEngine

        engine = TransformersEngine(bundled_model_dir("SmolLM2-135M-Instruct"), session_len=2048,
                                    max_batch_size=8, threads=spec["threads"])
    else:
        from deploy.engines.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine(bundled_model_dir("SmolLM2-135M-Instruct", False), session_len=2048,
                                max_batch_size=8, threads=spec["threads"])
    row = KitRow(engine)
    prompts = [f"{LONG} Call the dragon {name}." for name in NAMES]
    row.answer(prompts[:1], 4)
    print("ready", flush=True)
    sys.stdin.readline()
    result = {"threads": engine.threads, "threads_from": engine.threads_from}
    for label, asked in (("one", prompts[:1]), ("eight", prompts)):
        answers, wall = row.answer(asked, spec["tokens"])
        tokens = sum(count for _, _, count in answers)
        result[label] = {"tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1)}
    engine.close()
    print(json.dumps(result), flush=True)


def make_cgroup(cpus: float) -> Path | None:
    """A cgroup with a CPU quota of `cpus`: v2 where /sys/fs/cgroup is a v2 mount, else v1's `cpu`
    hierarchy. None where neither can be written (not root, or no cpu controller)."""
    period, quota = 100_000, int(cpus * 100_000)
    tries = []
    if Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        tries.append((Path("/sys/fs/cgroup"), {"cpu.max": f"{quota} {period}"}))
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").is_file():
        tries.append((Path("/sys/fs/cgroup/cpu"), {"cpu.cfs_period_us": str(period),
                                                   "cpu.cfs_quota_us": str(quota)}))
    for root, files in tries:
        group = root / f"xlab-bench-{os.getpid()}-{quota}"
        try:
            group.mkdir(exist_ok=True)
            for name, value in files.items():
                (group / name).write_text(value)
            return group
        except OSError:
            if group.is_dir():
                group.rmdir()
    return None


def run_setting(name: str, args, cgroups: dict) -> dict:
    servers, threads, pinned, quota = SETTINGS[name]
    spec = {"threads": threads, "pinned": sorted(pinned) if pinned else None, "tokens": args.tokens,
            "engine": args.engine,
            "cgroup": str(cgroups[quota]) if quota else None}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_threads", "--worker", json.dumps(spec)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(servers)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", f"{name}: a server did not start"
    started = time.perf_counter()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(proc.stdout.readline()) for proc in procs]
    for proc in procs:
        proc.wait(60)
    return {"setting": name, "servers": results, "wall_s": round(time.perf_counter() - started, 1),
            "one_tok_s_total": round(sum(r["one"]["tok_s"] for r in results), 1),
            "eight_tok_s_total": round(sum(r["eight"]["tok_s"] for r in results), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--only", action="append", help="a setting's name (repeatable)")
    parser.add_argument("--engine", choices=["llamacpp", "transformers"], default="llamacpp",
                        help="the engine each server runs (transformers: the default bf16 weights)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("docs/data/cpu-threads.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    names = args.only or list(SETTINGS)
    quotas = {SETTINGS[n][3] for n in names if SETTINGS[n][3]}
    cgroups = {q: make_cgroup(q) for q in quotas}
    left_out = [n for n in names if SETTINGS[n][3] and not cgroups[SETTINGS[n][3]]]
    names = [n for n in names if n not in left_out]
    runs = []
    try:
        for round_ in range(args.rounds):
            for name in names:
                result = {"round": round_ + 1, **run_setting(name, args, cgroups)}
                runs.append(result)
                print(json.dumps({k: result[k] for k in ("round", "setting", "one_tok_s_total",
                                                         "eight_tok_s_total", "wall_s")}), flush=True)
    finally:
        for group in cgroups.values():
            if group:
                group.rmdir()
    report = {"what": __doc__.splitlines()[0], "cpu": cpu_name(), "cpus": HOST, "engine": args.engine,
              "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"),
              "left_out": {n: "no writable cgroup cpu controller here (needs root)" for n in left_out},
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
