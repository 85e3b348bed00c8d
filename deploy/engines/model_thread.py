"""What both engines' model threads share (batcher.py for transformers, llamacpp_batcher.py for
llama.cpp): requests queue up from any thread, calls (logits for the gate and the benchmark) run
between two steps, cancellation wakes the thread, and closing fails whatever is left.

A subclass says what running means (`_busy`), which waiting requests join now (`_admit_locked`,
under the lock), what one iteration does, and how to fail its running rows (`_fail_rows`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from deploy.engines.requests import END, Request


class ModelThread:
    def __init__(self, name: str):
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- what the engine calls, from any thread ------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("The engine is closed.")
            self._waiting.append(request)
            self._cv.notify()

    def call(self, fn: Callable) -> Future:
        """Run `fn()` on the model thread between two steps (the model is not shared across
        threads)."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("The engine is closed.")
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def cancel(self, request: Request) -> None:
        request.cancelled.set()
        with self._cv:
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # -- the model thread ------------------------------------------------------------------------

    def _run(self) -> None:
        raise NotImplementedError

    def _busy(self) -> bool:
        raise NotImplementedError

    def _admit_locked(self):
        raise NotImplementedError

    def _fail_rows(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _next_work(self):
        """Wait for work; None once closed, else (the queued calls, what `_admit_locked` took)."""
        with self._cv:
            while not (self._closed or self._calls or self._waiting or self._busy()):
                self._cv.wait()
            if self._closed:
                return None
            calls = list(self._calls)
            self._calls.clear()
            return calls, self._admit_locked()

    def _hand_over(self, request: Request, token: int, score) -> bool:
        """Give `token` (and its log probability, where asked) to its request; True when the
        request has finished (end of answer, length, or cancelled). `self.eos` is the subclass's."""
        request.generated += 1
        request.last = token
        request.counts[token] = request.counts.get(token, 0) + 1
        if score is not None:
            request.sink(score)
        request.sink([token])
        return (token in self.eos or request.generated >= request.max_new
                or request.cancelled.is_set())

    @staticmethod
    def _run_calls(calls) -> None:
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, not lost here
                    future.set_exception(exc)

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cv:
            pending, calls = list(self._waiting), list(self._calls)
            self._waiting, self._calls = deque(), deque()
        self._fail_rows(exc)
        for request in pending:
            request.sink(exc)
            request.sink(END)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
