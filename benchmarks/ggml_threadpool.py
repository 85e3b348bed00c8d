"""One ggml threadpool for the life of a llama.cpp context: a variant that
benchmarks/cpu_llama_threads.py measures against the engine's default (not shipped: parity).

Without one, llama.cpp's CPU backend (built without OpenMP, as the kit builds it) makes a new
threadpool inside every `llama_decode`: it starts its worker threads, runs the graph, and joins
them. The step's first barrier then waits for a thread that has only just been started; a perf
profile on the 2-core machine (not kept) showed the model thread spinning in `ggml_barrier` for
much of each step, and a new worker thread id for every step. A threadpool made once and attached
to the context keeps its threads between steps (llama.cpp's own CLI does this; llama-cpp-python
0.3.36 binds neither `ggml_threadpool_new` nor `llama_attach_threadpool`, so they are bound here).

`poll` 0: between steps the workers sleep instead of spinning, so the server's event loop, which
sends the step's tokens while the model thread picks the next ones, has the other core.
"""

from __future__ import annotations

import ctypes

GGML_MAX_N_THREADS = 512  # ggml.h


class ThreadpoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def attach_to_batcher(threads: int) -> None:
    """From now on, every LlamaBatcher context gets a kept threadpool of `threads` threads."""
    from deploy.engines import llamacpp_batcher

    batcher = llamacpp_batcher.LlamaBatcher
    new_context, close = batcher._new_context, batcher.close

    def with_pool(self, session_len: int, _threads: int):
        ctx = new_context(self, session_len, threads)
        self._pool = Threadpool(self._lib.llama_cpp._lib, ctx, threads)
        return ctx

    def closing(self) -> None:
        close(self)  # the model thread stops, then the context is freed
        self._pool.close()

    batcher._new_context, batcher.close = with_pool, closing


def _libraries(llama_lib: ctypes.CDLL) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """ggml's base and CPU libraries: the copies libllama already loaded. Opened by soname, so
    the dynamic loader hands back those same copies (a second copy would own other threads)."""
    base = ctypes.CDLL("libggml-base.so.0")
    cpu = ctypes.CDLL("libggml-cpu.so.0")
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(ThreadpoolParams)]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free.restype = None
    llama_lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p] * 3
    llama_lib.llama_attach_threadpool.restype = None
    return base, cpu


class Threadpool:
    """`threads` ggml compute threads, attached to `ctx` for decoding and prompts alike."""

    def __init__(self, llama_lib: ctypes.CDLL, ctx, threads: int, poll: int = 0):
        base, self._cpu = _libraries(llama_lib)
        params = ThreadpoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), threads)
        params.poll = poll
        self._pool = self._cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self._pool:
            raise RuntimeError(f"ggml could not start a threadpool of {threads} threads.")
        llama_lib.llama_attach_threadpool(ctx, self._pool, self._pool)

    def close(self) -> None:
        """Stop the threads, after the context is freed (as llama.cpp's CLI orders it)."""
        if self._pool:
            self._cpu.ggml_threadpool_free(self._pool)
            self._pool = None
