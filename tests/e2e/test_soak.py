"""A short run of the soak test (benchmarks/soak.py) against the real server process: mixed streaming
and non-streaming requests over loopback, the queue limit reached (503 + Retry-After), some streams
dropped by their clients mid-way. `make soak` runs the full 1,000 requests (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # over 20 s on the 2-core machine, itself or through its fixture
def test_short_soak_leaks_nothing_and_never_fails_a_request(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.soak", "recipes/smollm2-cpu.yaml",
                          "--requests", "60", "--concurrency", "8", "--max-pending", "6",
                          "--disconnect", "0.2", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert run.returncode == 0, result["checks"]
    assert all(result["checks"].values())
    tally = result["tally"]
    assert tally["dropped"] > 0 and tally["503"] > 0  # both hard paths were taken
    assert tally["stream_ok"] + tally["non_stream_ok"] + tally["dropped"] == 60
