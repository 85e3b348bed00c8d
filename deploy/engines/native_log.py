"""What native code prints while a block runs: TurboMind reports its KV cache budget only in its own
C++ log ("[TM][INFO] ... Object cache budget: 25483.43 MB from free 127417.12 MB and ratio 0.200"),
written to file descriptor 2, out of Python's reach.

`tee_stderr()` points descriptor 2 at a pipe for the block's duration; a thread passes every byte
on to the real stderr at once (the log reads as before) and keeps a copy. The thread reads until
the pipe's last writer closes, so a writer that outlives the block can never fill it and stall.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

TM_CACHE_BUDGET = re.compile(r"Object cache budget: ([\d.]+) MB from free ([\d.]+) MB and ratio ([\d.]+)")


@contextlib.contextmanager
def tee_stderr() -> Iterator[list[bytes]]:
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copy: list[bytes] = []

    def pump() -> None:
        try:
            while data := os.read(read_end, 65536):
                copy.append(data)
                os.write(saved, data)
        finally:
            os.close(read_end)

    thread = threading.Thread(target=pump, name="stderr-tee", daemon=True)
    thread.start()
    try:
        yield copy
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's write end closes here: the pump sees its end
        thread.join(timeout=2)
        if not thread.is_alive():
            os.close(saved)
        # else a native thread still holds the pipe: the pump keeps forwarding (to `saved`)


def turbomind_cache_budget(log: bytes) -> int | None:
    """TurboMind's KV cache budget in bytes, from its log; None if it did not say."""
    found = TM_CACHE_BUDGET.findall(log.decode(errors="replace"))
    return int(float(found[-1][0]) * 2**20) if found else None


TM_WARMUP_TOO_LONG = re.compile(r"Warm-up for (\d+) tokens failed with status 6\b")


def turbomind_warmups_too_long(log: bytes) -> list[int]:
    """The warm-up lengths TurboMind refused as too long. Its warm-up sends one request per length
    up to its forward budget (max_prefill_token_num + max_batch_size, 8256 by default); status 6 is
    its Request::kTooLong (history + prompt > session_len), so every length past engine.session_len
    fails. Only the GEMM tuning of those sizes is skipped: a prefill that long tunes on first use."""
    return [int(n) for n in TM_WARMUP_TOO_LONG.findall(log.decode(errors="replace"))]
