"""The early engine process's handshake (deploy/engines/engine_process.py), on real spawned
processes. LMDeploy's own child needs a GPU (tests/test_lmdeploy_gpu.py adopts one there); here
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


def _spawn(target, arg) -> engine_process.EngineProcess:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(sender, arg))
    proc.start()
    sender.close()
    return engine_process.EngineProcess(proc, receiver)


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
