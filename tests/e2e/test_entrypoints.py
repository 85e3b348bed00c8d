"""The commands a user runs: `python -m deploy serve` and the terminal chat."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from deploy.serve.ports import free_port
from deploy.serve.terminal_chat import chat_loop

ROOT = Path(__file__).resolve().parents[2]


def test_serve_command_reports_starting_then_answers(tmp_path):
    """The real `serve` process: starting -> ok, an API key that never reaches the log, no CORS,
    and SIGTERM during a stream lets the stream finish before the process exits."""
    import json
    import signal

    key = "sk-test-7f3a9c-never-logged"
    recipe = tmp_path / "api.yaml"
    recipe.write_text((ROOT / "recipes" / "smollm2-cpu.yaml").read_text()
                      .replace("mode: gradio", "mode: api\n  api_key_env: TEST_SERVE_KEY")
                      .replace("name: smollm2-cpu", "name: t"))
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deploy", "--verbose", "serve", str(recipe),
                             "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TEST_SERVE_KEY": key})
    try:
        url = f"http://127.0.0.1:{port}"
        seen = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status = httpx.get(url + "/health").json()["status"]
            except httpx.TransportError:
                status = None
            seen.add(status)
            if status == "ok":
                break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        assert {"starting", "ok"} <= seen, (tmp_path / "serve.log").read_text()
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="t", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        wrong = httpx.post(url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        # CORS is off: a browser on another origin gets no permission to read the API.
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in httpx.get(
            url + "/health", headers={"Origin": "https://elsewhere.example"}).headers

        # SIGTERM with a stream in flight: the stream runs to its end, then the process exits.
        body = {"model": "t", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 48, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:  # answering: stop the server now
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]
                  if json.loads(e)["choices"]]
        assert finish[-1] == "length" and len(events) > 10
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    logs = (tmp_path / "serve.log").read_text()
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so -15 is a clean exit too.
    assert proc.returncode in (0, -15), logs
    assert "ready in" in logs and "Application shutdown complete" in logs
    assert "Traceback" not in logs
    assert key not in logs and "Bearer" not in logs


def test_terminal_chat_streams_resets_and_exits(assistant):
    stdin = io.StringIO("What is the capital of France?\n/reset\nWhat is 2 + 2?\n/exit\n")
    out = io.StringIO()
    chat_loop(assistant, stdin=stdin, out=out)
    text = out.getvalue()
    assert "Paris" in text
    assert "(conversation reset)" in text
    assert text.count("assistant> ") == 2


def test_terminal_chat_ends_on_eof(assistant):
    out = io.StringIO()
    chat_loop(assistant, stdin=io.StringIO(""), out=out)
    assert out.getvalue().endswith("you> \n")


def test_start_up_log_survives_lmdeploys_logger_setup():
    # LMDeploy's get_logger (lmdeploy/utils.py) raises root handlers of the exact type
    # StreamHandler to ERROR; the kit's phase times must still reach the console after it runs.
    code = (
        "import logging\n"
        "from deploy.cli import setup_logging\n"
        "setup_logging()\n"
        "for handler in logging.root.handlers:\n"
        "    if type(handler) is logging.StreamHandler:\n"
        "        handler.setLevel(logging.ERROR)\n"
        "logging.getLogger('deploy.engines').info('LMDeploy engine started (1.0s)')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "INFO deploy.engines: LMDeploy engine started (1.0s)" in result.stderr
