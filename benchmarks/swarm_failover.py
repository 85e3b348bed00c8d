"""The kit's stack on a real multi-node Docker Swarm, and what a node's death costs.

Three swarm nodes run as docker-in-docker containers on this machine's Docker engine (no
--privileged: a capability list instead; ../shared/swarm/NOTES.md has how and why). The kit's own
CPU image and the nginx proxy image are loaded into each node; the stack that
`python -m deploy image stack RECIPE --replicas 2` writes is deployed with `docker stack deploy`.
Then, while two clients keep sending chat requests through the proxy, the node of one replica is
killed: the run records which requests failed (and whether any had not yet started when the node
died), when the swarm saw the node down, when a replacement replica answered, and when the node,
restarted, was back in the swarm. Every container and the network are removed afterwards, by
name, also on failure.

Usage (as root, from the repository root, with the kit's CPU image built):
    eval "$(bash tools/docker_engine.sh)"
    python -m deploy image build recipes/smollm2-cpu.yaml
    python -m benchmarks.swarm_failover --out docs/data/swarm-failover-cpu.json
tests/e2e/test_swarm.py runs the same in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks._common import cpu_name
from deploy.serve.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-cpu.yaml"
MODEL = "smollm2-cpu"
KIT_IMAGE = "xlab-deploy/smollm2-cpu:latest"
NODE_IMAGE = "local/swarm-node:bookworm"
BASE_IMAGE = "local/bookworm:base"  # made by tools/docker_engine.sh
PREFIX = "xlab-swarm-node-"
NETWORK = "xlab-swarm"
LABEL = "xlab-deploy.recipe=swarm-test"  # tools/docker_engine.sh stop removes what carries it
NODE_FLAGS = ["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
              "--security-opt", "apparmor=unconfined", "--security-opt", "systempaths=unconfined",
              "--device-cgroup-rule", "a *:* rwm"]


def log(message: str) -> None:
    print(f"[swarm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def docker(*args: str, stdin=None, timeout: float = 600, check: bool = True) -> str:
    run = subprocess.run(["docker", *args], stdin=stdin, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode:
        raise RuntimeError(f"docker {' '.join(args[:4])}... failed: {run.stderr.strip()[-1500:]}")
    return run.stdout.strip()


def on(node: int, *args: str, **kwargs) -> str:
    """A docker command run by node `node`'s own engine."""
    interactive = ["-i"] if kwargs.get("stdin") is not None else []
    return docker("exec", *interactive, f"{PREFIX}{node}", "docker", *args, **kwargs)


@dataclass
class Cluster:
    nodes: int = 3
    proxy_port: int = 0  # node 1's port 8000, published on 127.0.0.1
    phases: dict = field(default_factory=dict)

    def up(self, images: list[str]) -> None:
        started = time.monotonic()
        docker("build", "-q", "-t", NODE_IMAGE, "--build-arg", f"BASE={BASE_IMAGE}", "-f",
               str(ROOT / "docker" / "standins" / "Dockerfile.swarm-node"), str(ROOT / "docker" / "standins"))
        self.phases["node_image_s"] = round(time.monotonic() - started, 1)
        # A subnet the engine picks as free, made explicit so that nodes can keep fixed addresses.
        docker("network", "create", "--label", LABEL, NETWORK)
        subnet = json.loads(docker("network", "inspect", NETWORK))[0]["IPAM"]["Config"][0]["Subnet"]
        docker("network", "rm", NETWORK)
        docker("network", "create", "--label", LABEL, "--subnet", subnet, NETWORK)
        prefix = subnet.rsplit(".", 1)[0]
        self.proxy_port = free_port()
        for i in range(1, self.nodes + 1):
            publish = ["-p", f"127.0.0.1:{self.proxy_port}:8000"] if i == 1 else []
            # A fixed address: a restarted node keeps the address the swarm knows it by.
            docker("run", "-d", "--name", f"{PREFIX}{i}", "--hostname", f"node-{i}", "--label", LABEL,
                   "--network", NETWORK, "--ip", f"{prefix}.{10 + i}", *publish, *NODE_FLAGS, NODE_IMAGE)
        for i in range(1, self.nodes + 1):
            self.wait_engine(i)
        self.phases["nodes_up_s"] = round(time.monotonic() - started, 1)
        self.load_images(images)
        self.phases["images_loaded_s"] = round(time.monotonic() - started, 1)
        first = f"{prefix}.11"
        on(1, "swarm", "init", "--advertise-addr", first)
        token = on(1, "swarm", "join-token", "-q", "manager")
        for i in range(2, self.nodes + 1):  # three managers: the swarm keeps its quorum without one
            on(i, "swarm", "join", "--token", token, f"{first}:2377")
        self.phases["swarm_formed_s"] = round(time.monotonic() - started, 1)

    def load_images(self, images: list[str]) -> None:
        """One `docker save` streamed into every node's `docker load` at once: no archive on disk
        (it was a GB, and a CI machine's disk ran out writing it) and one read of the layers."""
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        loads = [subprocess.Popen(["docker", "exec", "-i", f"{PREFIX}{i}", "docker", "load", "-q"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(1, self.nodes + 1)]
        try:
            for chunk in iter(lambda: save.stdout.read(1 << 20), b""):
                for load in loads:
                    load.stdin.write(chunk)
        finally:
            for load in loads:
                load.stdin.close()
        saved = save.wait(600)
        failed = [f"docker save exited {saved}"] if saved else []
        for i, load in enumerate(loads, start=1):
            if load.wait(600):
                failed.append(f"node {i}'s docker load: {load.stderr.read().decode()[-1500:]}")
        if failed:
            raise RuntimeError("loading the images into the swarm's nodes failed: " + "; ".join(failed))

    def wait_engine(self, node: int, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while subprocess.run(["docker", "exec", f"{PREFIX}{node}", "docker", "info"],
                             capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node}'s dockerd did not start: "
                                   + docker("logs", "--tail", "20", f"{PREFIX}{node}", check=False))
            time.sleep(0.5)

    def node_states(self) -> dict[str, str]:
        rows = on(1, "node", "ls", "--format", "{{.Hostname}} {{.Status}}", check=False)
        return dict(line.split() for line in rows.splitlines() if len(line.split()) == 2)

    def down(self) -> None:
        for i in range(1, self.nodes + 1):
            docker("rm", "-f", "-v", f"{PREFIX}{i}", check=False)
        docker("network", "rm", NETWORK, check=False)


@dataclass
class Request:
    started: float
    ended: float
    ok: bool
    served_by: str | None
    error: str | None = None


class Clients:
    """`n` clients sending chat requests through the proxy, one after another each, until stopped."""

    def __init__(self, url: str, n: int = 2, limit_s: float = 400):
        self.url, self.n, self.limit_s = url, n, limit_s
        self.done: list[Request] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=40)

    def _run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8, "temperature": 0}
        end = time.monotonic() + self.limit_s
        with httpx.Client(timeout=20) as client:
            while not self.stop.is_set() and time.monotonic() < end:
                started = time.monotonic()
                try:
                    reply = client.post(self.url + "/v1/chat/completions", json=body)
                    request = Request(started, time.monotonic(), reply.status_code == 200,
                                      reply.headers.get("x-served-by"),
                                      None if reply.status_code == 200 else f"HTTP {reply.status_code}")
                except httpx.HTTPError as exc:
                    request = Request(started, time.monotonic(), False, None, type(exc).__name__)
                with self.lock:
                    self.done.append(request)
                if not request.ok:  # the stack still starting, say: do not spin
                    time.sleep(0.2)

    def answered_by(self, since: float = 0) -> set[str]:
        with self.lock:
            return {r.served_by.split("/")[0] for r in self.done
                    if r.ok and r.served_by and r.started >= since}


def wait(what: str, check, seconds: float, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {seconds:.0f} s")


def failover(cluster: Cluster, stack_dir: Path) -> dict:
    started = time.monotonic()
    docker("cp", str(stack_dir), f"{PREFIX}1:/stack")
    docker("exec", "-w", "/stack", "-e", "XLAB_DEPLOY_PROXY_IMAGE=" + os.environ.get(
        "XLAB_DEPLOY_PROXY_IMAGE", "local/nginx:stand-in"), f"{PREFIX}1", "docker", "stack", "deploy",
        "--resolve-image", "never", "-c", "stack.yml", "kit")
    url = f"http://127.0.0.1:{cluster.proxy_port}"
    with Clients(url) as clients:
        both = wait("both replicas answering through the proxy", lambda: len(clients.answered_by()) >= 2
                    and clients.answered_by(), 240)
        serving_at = time.monotonic()
        # A replica's memory report: the stack's memory limit reached its engine's plan.
        report = httpx.get(url + "/memory", timeout=30).json()
        memory = {"planned_against": report["prediction"]["machine"],
                  "limit_bytes": report["prediction"]["ram_bytes"],
                  "planned_rss_bytes": report["prediction"]["rss_bytes"],
                  "rss_bytes": report["process"]["rss_bytes"]}
        victim = sorted(n for n in both if n != "node-1")[0]  # node 1 holds the proxy the clients use
        time.sleep(3)  # traffic on both before the kill
        killed = time.monotonic()
        docker("kill", f"{PREFIX}{victim.split('-')[1]}")
        # `docker kill` returns once the signal is sent; the node's processes and network go a
        # moment later. A request nginx sent to the node in that moment was running on it when it
        # died (CI saw one 0.11 s after the kill began), so only requests started after the node
        # is seen stopped must never fail.
        docker("wait", f"{PREFIX}{victim.split('-')[1]}", timeout=60)
        dead = time.monotonic()
        log(f"killed {victim}, stopped after {dead - killed:.2f} s")
        down = wait("the swarm marking the node down", lambda: cluster.node_states().get(victim) == "Down"
                    and time.monotonic(), 120)
        survivors = both - {victim}
        replaced = wait("a replacement replica answering", lambda: (clients.answered_by(killed) - survivors)
                        and time.monotonic(), 240)
        replacement = sorted(clients.answered_by(killed) - survivors)
        restarted = time.monotonic()
        docker("start", f"{PREFIX}{victim.split('-')[1]}")
        ready = wait("the node back in the swarm", lambda: cluster.node_states().get(victim) == "Ready"
                     and time.monotonic(), 180)
        time.sleep(3)
    # Before both replicas answered, the stack was still starting (the proxy not yet listening, or
    # no replica ready): those attempts are not failures of a running service.
    served = [r for r in clients.done if r.started >= serving_at]
    failed = [r for r in served if not r.ok]
    return {
        "stack_to_both_replicas_answering_s": round(serving_at - started, 1),
        "answered_by_before_kill": sorted(both),
        "killed": victim,
        "kill_to_node_stopped_s": round(dead - killed, 2),
        "kill_to_node_down_s": round(down - killed, 1),
        "kill_to_replacement_answering_s": round(replaced - killed, 1),
        "replacement_on": replacement,
        "restart_to_node_ready_s": round(ready - restarted, 1),
        "requests": len(served),
        "failed": len(failed),
        "attempts_while_starting": len(clients.done) - len(served),
        "failed_started_after_node_stopped": sum(r.started > dead for r in failed),
        "failures": [{**asdict(r), "started": round(r.started - killed, 2),
                      "ended": round(r.ended - killed, 2)} for r in failed],
        "clients": clients.n,
        "replica_memory": memory,
    }


def write_stack(out: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "deploy", "image", "stack", str(RECIPE), "--replicas", "2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"deploy image stack failed: {run.stderr[-1500:]}")


def run(out: Path | None = None) -> dict:
    """The whole run, torn down however it ends; the figures, also written to `out`."""
    cluster = Cluster()
    started = time.monotonic()
    try:
        cluster.down()  # what an interrupted run left
        with tempfile.TemporaryDirectory() as tmp:
            write_stack(Path(tmp) / "stack")
            cluster.up([KIT_IMAGE, os.environ.get("XLAB_DEPLOY_PROXY_IMAGE", "local/nginx:stand-in")])
            log(f"swarm formed: {cluster.phases}")
            figures = failover(cluster, Path(tmp) / "stack")
    finally:
        cluster.down()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "nodes": cluster.nodes, "replicas": 2, "recipe": "recipes/smollm2-cpu.yaml",
              "setup": cluster.phases, **figures, "total_s": round(time.monotonic() - started, 1)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "swarm-failover-cpu.json")
    args = parser.parse_args()
    print(json.dumps(run(args.out), indent=2))


if __name__ == "__main__":
    main()
