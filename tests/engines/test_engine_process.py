"""The early engine process's handshake (deploy/engines/engine_process.py), on real spawned
processes. LMDeploy's own child needs a GPU (tests/engines/test_lmdeploy_gpu.py adopts one there); here
stand-in children publish a port the way LMDeploy's `_mp_proc` does, or die before they do."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from deploy.engines import engine_process


def _publishes(conn, port):
    # What LMDeploy's ZMQMPEngine._mp_proc does with the dict and condition it is given.
    shared, condition = engine_process._PortSender(conn), engine_process._Notifier()
    with condition:
        shared["rpc_server_port"] = port
        condition.notify()
    time.sleep(60)  # an engine serves until it is stopped


def _dies(conn, code):
    raise SystemExit(code)


def _publishes_forever(conn, model_path, engine_kwargs, trust_remote_code):
    _publishes(conn, 43118)


def _spawn(target, arg) -> engine_process.EngineProcess:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(sender, arg))
    proc.start()
    sender.close()
    return engine_process.EngineProcess(proc, receiver)


EXITS_BEFORE_ADOPTING = """
import sys, time
from pathlib import Path
from deploy.engines import engine_process
import tests.engines.test_engine_process as t
engine_process._child = t._publishes_forever
process = engine_process.start(Path("/nonexistent"), {}, False)
print(process.proc.pid, flush=True)
raise SystemExit(3)  # the server fails before LMDeploy's client adopts the engine
"""


def test_the_parent_reads_the_port_the_child_publishes_and_stop_ends_it():
    process = _spawn(_publishes, 43117)
    try:
        assert process.port() == 43117
        assert process.port() == 43117  # read once, kept
        assert process.proc.is_alive()
    finally:
        process.stop()
    assert not process.proc.is_alive()
    assert process.proc.exitcode is not None


def test_a_child_that_dies_before_it_listens_is_reported_with_its_exit_code():
    process = _spawn(_dies, 3)
    # "not alive" is what LMDeployEngine turns into its advice on where the traceback is.
    with pytest.raises(RuntimeError, match=r"not alive: it exited with code 3"):
        process.port()
    process.stop()  # a no-op on a dead process


def test_a_parent_that_exits_before_adopting_ends_the_engine_process():
    """Without the kit's exit handler, multiprocessing's own would wait at exit for an engine
    process that serves forever: the server would hang instead of exiting."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", EXITS_BEFORE_ADOPTING], cwd=root,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 3, run.stderr
    pid = int(run.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the engine process outlived its parent")
