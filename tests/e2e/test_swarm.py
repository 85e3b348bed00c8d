"""Past one machine, for real: a 3-node Docker Swarm (docker-in-docker nodes on this machine's
engine), the kit's own CPU image built by the kit, and the stack `deploy image stack` writes,
deployed with 2 replicas on 2 nodes. Through the proxy both replicas answer; then one replica's
node is killed while two clients keep sending. Only requests already running on the dead node may
fail; a replacement must answer and the node, restarted, must rejoin. The figures are written to
a raw file (benchmarks/swarm_failover.py; docs/data/swarm-failover-cpu.json is a run of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.docker, pytest.mark.swarm]


def test_a_node_dies_and_the_stack_keeps_answering(engine, tmp_path):
    from benchmarks import swarm_failover

    client, _ = engine
    # The kit's own CPU image, built by the kit (reused where test_containers.py built it).
    built = subprocess.run([sys.executable, "-m", "deploy", "image", "build", "recipes/smollm2-cpu.yaml"],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200, env=os.environ)
    assert built.returncode == 0, built.stderr[-3000:]
    out = tmp_path / "swarm-failover.json"
    figures = swarm_failover.run(out)
    print(json.dumps(figures, indent=2))
    assert json.loads(out.read_text()) == figures
    assert len(figures["answered_by_before_kill"]) == 2  # two replicas, on two nodes
    assert figures["killed"] in figures["answered_by_before_kill"]
    # Requests not yet started when the node was seen stopped were all retried on a live replica:
    # the only failures are requests that were running on it (at most one per client).
    assert figures["failed_started_after_node_stopped"] == 0, figures["failures"]
    assert figures["failed"] <= figures["clients"], figures["failures"]
    assert figures["replacement_on"] and figures["killed"] not in figures["replacement_on"]
    assert figures["kill_to_replacement_answering_s"] < 240
    assert figures["restart_to_node_ready_s"] < 180
    # Each replica ran under the memory limit the stack set from `deploy plan`, and planned against it.
    memory = figures["replica_memory"]
    assert "memory limit" in memory["planned_against"], memory
    assert memory["rss_bytes"] < memory["limit_bytes"] / 1.4, memory
    leftover = client.containers.list(all=True, filters={"name": swarm_failover.PREFIX})
    assert leftover == [], "the swarm's nodes must be gone after the run"
