"""The builder's GGUF quantize step (deploy/builder/gguf.py, `llama_model_quantize`) with as many
threads as the machine has CPUs against as many as the process may use, in a process under a
1-CPU cgroup quota (a build in `docker run --cpus 1`, a CI runner's share) and on the whole
machine. Each run writes the bundled model's F16 GGUF as Q4_1 and as Q8_0 in a fresh process and
times both. Settings alternate within each round. Needs root and a writable cgroup `cpu`
controller for the quota settings; without one they are left out and the file says so.
Writes OUT (JSON) with the CPU's name and flags.

Usage: python -m benchmarks.gguf_quantize_threads [--rounds 3] [--out docs/data/gguf-quantize-threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, cpu_name
from benchmarks.cpu_threads import make_cgroup

HOST = os.cpu_count() or 1
# name -> (threads, CPU quota or None)
SETTINGS = {
    "whole machine, threads = machine's CPUs": (HOST, None),
    "1-CPU quota, threads = machine's CPUs (before)": (HOST, 1.0),
    "1-CPU quota, threads = usable CPUs (now)": (1, 1.0),
}


def worker(spec: dict) -> None:
    """One process: join the cgroup, quantize twice, print the seconds as JSON."""
    if spec["cgroup"]:
        Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    import llama_cpp
    import llama_cpp._logger as llama_log

    llama_log.set_verbose(False)
    times = {}
    for kind in ("Q4_1", "Q8_0"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = spec["threads"]
        out = Path(spec["out"]) / f"m.{kind}.gguf"
        started = time.perf_counter()
        status = llama_cpp.llama_model_quantize(spec["source"].encode(), str(out).encode(), params)
        times[kind] = round(time.perf_counter() - started, 3)
        assert status == 0 and out.stat().st_size > 0
        out.unlink()
    print(json.dumps(times), flush=True)


def source_gguf() -> str:
    from deploy.builder.sources import bundled_model_dir
    from deploy.engines.llamacpp_engine import find_gguf

    return str(find_gguf(bundled_model_dir("SmolLM2-135M-Instruct", weights=False)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/data/gguf-quantize-threads.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    source, group = source_gguf(), make_cgroup(1.0)
    settings = {k: v for k, v in SETTINGS.items() if v[1] is None or group is not None}
    runs: dict[str, list] = {name: [] for name in settings}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for name, (threads, quota) in settings.items():
                    spec = {"threads": threads, "cgroup": str(group) if quota else None,
                            "source": source, "out": tmp}
                    done = subprocess.run([sys.executable, "-m", "benchmarks.gguf_quantize_threads",
                                           "--worker", json.dumps(spec)], cwd=ROOT, check=True,
                                          capture_output=True, text=True)
                    runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    finally:
        if group is not None:
            group.rmdir()
    result = {
        "script": "python -m benchmarks.gguf_quantize_threads " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "host_cpus": HOST,
        "source": Path(source).name, "note": "seconds per llama_model_quantize call, real weights",
        "left_out": [] if group else ["the quota settings: no writable cgroup cpu controller"],
        "settings": {name: {"threads": SETTINGS[name][0], "cpu_quota": SETTINGS[name][1],
                            **{kind: [min(r[kind] for r in rs), max(r[kind] for r in rs)]
                               for kind in ("Q4_1", "Q8_0")}, "runs": rs}
                     for name, rs in runs.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
