"""The probes on the real server and model: /health/live answers while the model loads,
/health/ready only once it has generated a token, and both say what went wrong when the load fails.
Orchestrators use them (Docker's HEALTHCHECK through deploy.serve.healthcheck)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx

from deploy.serve.app import create_app
from deploy.serve.assistant import Assistant
from tests.helpers import LiveServer


class KeptEngine:
    """The session's engine, which this server must not close when it stops."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def wait_until(url: str, state: str, seconds: float = 60) -> httpx.Response:
    """The probe's answer once its status is `state`, or its last answer after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        reply = httpx.get(url)
        if reply.json()["status"] == state or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_live_answers_while_loading_and_ready_waits_for_a_first_token(assistant):
    go = threading.Event()

    def load():
        go.wait(60)
        return Assistant(assistant.config, KeptEngine(assistant.engine))

    with LiveServer(create_app(assistant.config, load=load, ui=False)) as live:
        assert httpx.get(live.url + "/health/live").json()["status"] == "alive"
        starting = httpx.get(live.url + "/health/ready")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        assert httpx.get(live.url + "/health").json()["status"] == "starting"
        go.set()
        ready = wait_until(live.url + "/health/ready", "ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "model": assistant.config.name,
                                "engine": assistant.engine.name}
        assert httpx.get(live.url + "/health/live").status_code == 200


def test_a_failed_load_is_not_ready_and_says_why(assistant):
    def load():
        raise RuntimeError("no weights in /nowhere")

    with LiveServer(create_app(assistant.config, load=load, ui=False)) as live:
        failed = wait_until(live.url + "/health/ready", "failed")
        assert failed.status_code == 503
        assert failed.json()["status"] == "failed" and "no weights" in failed.json()["error"]
        assert httpx.get(live.url + "/health/live").status_code == 200  # restarting would not help


def test_the_container_healthcheck_reads_ready(api_server, monkeypatch):
    port = api_server.url.rsplit(":", 1)[1]
    run = subprocess.run([sys.executable, "-m", "deploy.serve.healthcheck"], capture_output=True,
                         env={"XLAB_DEPLOY_PORT": port, "PATH": "/usr/bin:/bin"}, timeout=30)
    assert run.returncode == 0, run.stderr
    closed = subprocess.run([sys.executable, "-m", "deploy.serve.healthcheck"], capture_output=True,
                            env={"XLAB_DEPLOY_PORT": "1", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert closed.returncode == 1


def test_behind_a_proxy_each_answer_names_its_replica(serve_with, monkeypatch):
    monkeypatch.setenv("XLAB_DEPLOY_REPLICA", "node-2/1")  # the swarm stack's template, filled in
    with serve_with() as live:
        assert httpx.get(live.url + "/health/ready").headers["x-served-by"] == "node-2/1"
        chat = httpx.post(live.url + "/v1/chat/completions", json={
            "model": live.config.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.headers["x-served-by"] == "node-2/1"


def test_the_api_key_can_come_from_a_mounted_secret_file(serve_with, monkeypatch, tmp_path):
    secret = tmp_path / "xlab_api_key"
    secret.write_text("from-a-file\n")
    monkeypatch.delenv("TEST_FILE_KEY", raising=False)
    monkeypatch.setenv("TEST_FILE_KEY_FILE", str(secret))
    with serve_with(api_key_env="TEST_FILE_KEY") as live:
        assert httpx.get(live.url + "/v1/models").status_code == 401
        keyed = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer from-a-file"})
        assert keyed.status_code == 200
