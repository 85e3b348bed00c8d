"""LMDeploy's PyTorch engine process, started before the kit's own process imports anything heavy.

LMDeploy runs its PyTorch engine in a child process (`enable_mp_engine`, as its api_server does) and
spawns that child only once the parent has imported torch, transformers and LMDeploy, loaded the
tokenizer and built the engine config. The child then imports them all again: on the H100, 16.5 s
in the server process and then 9.1 s in the engine's, one after the other (docs/benchmarks.md).

Here the kit spawns the same child, running LMDeploy's own `ZMQMPEngine._mp_proc`, first; LMDeploy's
client adopts it once the parent's imports are done, so the two sets of imports overlap. The child
gets the engine settings as plain keyword arguments and builds LMDeploy's config itself, because
building it here would import torch before the spawn.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EngineProcess:
    """A started engine process, until LMDeploy's client adopts it (or `stop` ends it)."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, conn) -> None:
        self.proc = proc
        self._conn = conn
        self._port: int | None = None

    def port(self) -> int:
        """The port of the engine's RPC server; waits until the child has published it."""
        while self._port is None:
            try:
                if self._conn.poll(1):
                    key, value = self._conn.recv()
                    if key == "rpc_server_port":
                        self._port = int(value)
                    continue
            except EOFError:  # the child's end closed: it has exited or is exiting
                self.proc.join(10)
            if not self.proc.is_alive():
                raise RuntimeError(
                    f"PyTorch engine process is not alive: it exited with code {self.proc.exitcode} "
                    "before it listened.")
        return self._port

    def adopted(self) -> None:
        """LMDeploy's client owns the process from here: its close() ends it, at exit too."""
        atexit.unregister(self.stop)
        self._conn.close()

    def stop(self) -> None:
        """End the process: for a parent that fails, or exits, before it adopts it. Without this,
        multiprocessing's own exit handler would wait for the engine, which never ends by itself."""
        atexit.unregister(self.stop)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def start(model_path: Path, engine_kwargs: dict, trust_remote_code: bool) -> EngineProcess:
    """Spawn LMDeploy's PyTorch engine process for `model_path` with PytorchEngineConfig(**engine_kwargs)."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # as LMDeploy's: CUDA cannot be forked
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=_child, name="mp_engine_proc",
                           args=(sender, str(model_path), dict(engine_kwargs), trust_remote_code))
    proc.start()
    sender.close()
    log.info("LMDeploy engine process started early (pid %d, %.2fs)", proc.pid,
             time.perf_counter() - started)
    process = EngineProcess(proc, receiver)
    atexit.register(process.stop)
    return process


def async_engine_class(process: EngineProcess):
    """LMDeploy's AsyncEngine, building its PyTorch engine client on `process` instead of spawning
    one. Subclasses, made once LMDeploy is imported, with LMDeploy's own code doing the rest."""
    from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine
    from lmdeploy.serve.core.async_engine import AsyncEngine

    class AdoptedZMQEngine(ZMQMPEngine):
        def _start_mp_proc(self, model_path, engine_config=None, speculative_config=None, **kwargs):
            self.proc = process.proc
            self.port = process.port()
            process.adopted()

    class AdoptingAsyncEngine(AsyncEngine):
        def _build_pytorch(self, model_path, backend_config=None, speculative_config=None,
                           trust_remote_code=False, **kwargs):
            return AdoptedZMQEngine(model_path, engine_config=backend_config,
                                    speculative_config=speculative_config,
                                    trust_remote_code=trust_remote_code)

    return AdoptingAsyncEngine


class _PortSender:
    """Stands for the Manager dict LMDeploy's child publishes its RPC port in."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def __setitem__(self, key, value) -> None:
        self._conn.send((key, value))


class _Notifier(contextlib.nullcontext):
    """Stands for the Manager condition LMDeploy's child notifies: the pipe wakes the parent."""

    def notify(self) -> None:
        pass


def _child(conn, model_path: str, engine_kwargs: dict, trust_remote_code: bool) -> None:
    from lmdeploy import PytorchEngineConfig
    from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine
    from lmdeploy.utils import get_logger

    ZMQMPEngine._mp_proc(_PortSender(conn), _Notifier(), model_path=model_path,
                         engine_config=PytorchEngineConfig(**engine_kwargs),
                         log_level=get_logger("lmdeploy").level, trust_remote_code=trust_remote_code)
