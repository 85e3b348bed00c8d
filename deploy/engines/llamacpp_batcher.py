"""llama.cpp's model thread: every running request decodes in one `llama_decode` per step, and
arriving prompts are prefilled in chunks inside the same call.

Why a step loop here and not llama-cpp-python's `Llama`: `Llama` runs one sequence; the batch API
underneath it (`llama_batch` with a sequence id per token) is what llama.cpp's own server uses to
serve many. Each step the thread
- feeds every decoding request's last token (one row each, always first: a decode never waits for
  a prefill), then
- spends what is left of the step's token budget (`chunk`) on waiting prompts, oldest first, a
  piece of each; so a new arrival waits at most one step before its prefill starts, and a long
  prompt is cut over several steps instead of stalling everyone's next token.

The KV cache is llama.cpp's non-unified one: each sequence has its own stream of `session_len`
cells, so a request's attention sees only its own cells in the same places whatever else runs.
With the unified cache, 2 of 8 concurrent greedy answers differed from the same requests alone; with
per-sequence streams all 8 matched (docs/cpu-runtimes.md). Sequence id `slots` (one past the last
request slot) is kept for scoring (`logits`), which the gate and the benchmark call between steps.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from deploy.engines.llamacpp_build import batch_variance_warning, compiled_features
from deploy.engines.model_thread import ModelThread
from deploy.engines.np_sampling import generator_for, pick
from deploy.engines.requests import END, Request
from deploy.engines.sizing import LLAMACPP_CHUNK

log = logging.getLogger(__name__)


class LlamaCppError(RuntimeError):
    """llama.cpp refused a step (no KV room, or an internal error)."""


class LlamaBatcher(ModelThread):
    def __init__(self, gguf: Path, *, session_len: int, max_batch_size: int, eos: set[int],
                 threads: int, chunk: int = LLAMACPP_CHUNK):
        super().__init__("llama.cpp")
        import llama_cpp
        import llama_cpp._logger as llama_log  # routes llama.cpp's log lines; quiet by default

        llama_log.set_verbose(log.isEnabledFor(logging.DEBUG))
        self._lib = llama_cpp
        self.eos, self.slots, self.chunk = eos, max_batch_size, chunk
        self._scoring_seq = max_batch_size
        llama_cpp.llama_backend_init()
        self.compiled_for = compiled_features(llama_cpp.llama_print_system_info().decode())
        if warning := batch_variance_warning(self.compiled_for):
            log.warning(warning)
        self._model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            raise ValueError(f"llama.cpp could not load {gguf}: is it a complete GGUF file?")
        self._ctx = self._new_context(session_len, threads)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.weight_bytes = int(llama_cpp.llama_model_size(self._model))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._rows: dict[int, Request] = {}  # slot (sequence id) -> request
        self._thread.start()

    def _new_context(self, session_len: int, threads: int):
        lib = self._lib
        params = lib.llama_context_default_params()
        self._n_batch = self.chunk + self.slots  # one step's tokens: every decode row + a chunk
        params.n_batch = params.n_ubatch = self._n_batch
        params.n_seq_max = self.slots + 1
        params.n_ctx = session_len * params.n_seq_max  # split evenly: session_len per sequence
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise MemoryError(f"llama.cpp could not make a context of {params.n_ctx} tokens: lower "
                              "engine.session_len or engine.max_batch_size in the recipe.")
        return ctx

    # -- what the engine reads, from any thread (submit, call, cancel: model_thread.py) --------

    @property
    def active(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        super().close()
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._lib.llama_model_free(self._model)

    # -- the model thread ------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._rows)

    def _run(self) -> None:
        while (work := self._next_work()) is not None:
            calls, _ = work
            try:
                self._run_calls(calls)
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as exc:  # a bug here must fail requests, never hang them
                log.exception("the llama.cpp step failed")
                self._finish(list(self._rows), exc)
        self._fail_everything(RuntimeError("The engine was closed while this request ran."))

    def _admit_locked(self) -> None:
        """Waiting requests take free slots; their prompts are fed by the steps that follow."""
        free = [s for s in range(self.slots) if s not in self._rows]
        while self._waiting and free:
            request = self._waiting.popleft()
            request.generator = generator_for(request)
            self._rows[free.pop(0)] = request

    def _step(self) -> None:
        outputs = self._fill_batch()
        status = self._lib.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise LlamaCppError(f"llama_decode returned {status} (1: no room in the KV cache)")
        done = []
        for row, slot in outputs:
            request = self._rows[slot]
            token, score = pick(self._logits_row(row), request)
            if self._hand_over(request, token, score):  # END comes with _finish
                done.append(slot)
        self._finish(done)

    def _fill_batch(self) -> list[tuple[int, int]]:
        """Decode rows first, then prompt pieces; returns (batch row, slot) for rows with logits."""
        self._batch.n_tokens = 0
        outputs = []
        prefilling = []
        for slot, request in self._rows.items():
            if request.length < len(request.prompt):
                prefilling.append(slot)
            else:
                outputs.append((self._add(request.last, request.length, slot, True), slot))
                request.length += 1
        budget = self._n_batch - self._batch.n_tokens
        for slot in prefilling:  # slots fill in arrival order, so this is oldest first
            request = self._rows[slot]
            piece = request.prompt[request.length:request.length + budget]
            for i, token in enumerate(piece):
                last = request.length + i == len(request.prompt) - 1
                row = self._add(token, request.length + i, slot, last)
                if last:
                    outputs.append((row, slot))
            request.length += len(piece)
            budget -= len(piece)
            if budget <= 0:
                break
        return outputs

    def _add(self, token: int, position: int, seq: int, logits: bool) -> int:
        batch, row = self._batch, self._batch.n_tokens
        batch.token[row], batch.pos[row] = token, position
        batch.n_seq_id[row], batch.seq_id[row][0] = 1, seq
        batch.logits[row] = logits
        batch.n_tokens = row + 1
        return row

    def _logits_row(self, row: int) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.vocab,))

    def _drop_cancelled(self) -> None:
        self._finish([s for s, r in self._rows.items() if r.cancelled.is_set()])

    def _finish(self, slots, exc: BaseException | None = None) -> None:
        """End these slots' requests (with `exc`, where given) and free their KV cells."""
        for slot in slots:
            request = self._rows.pop(slot)
            if exc is not None:
                request.sink(exc)
            request.sink(END)
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)

    def _fail_rows(self, exc: BaseException) -> None:
        self._finish(list(self._rows), exc)

    # -- scoring, on the model thread through `call` ---------------------------------------------

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of `ids` ([len, vocab] float32), computed in the
        scoring sequence and forgotten afterwards."""
        rows = []
        seq = self._scoring_seq
        try:
            for start in range(0, len(ids), self._n_batch):
                self._batch.n_tokens = 0
                piece = ids[start:start + self._n_batch]
                for i, token in enumerate(piece):
                    self._add(token, start + i, seq, True)
                status = self._lib.llama_decode(self._ctx, self._batch)
                if status != 0:
                    raise LlamaCppError(f"llama_decode returned {status} while scoring")
                rows.extend(self._logits_row(i).copy() for i in range(len(piece)))
        finally:
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return np.stack(rows)
