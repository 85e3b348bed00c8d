"""TurboMind's KV budget is read from its own C++ log (deploy/engines/native_log.py): what is
written to file descriptor 2 inside the block is kept and still reaches stderr."""

from __future__ import annotations

import ctypes
import os

from deploy.engines.native_log import tee_stderr, turbomind_cache_budget, turbomind_warmups_too_long

LINE = (b"[TM][INFO][1126.01:54:35.657850][turbomind.cc:338] Object cache budget: 25483.43 MB "
        b"from free 127417.12 MB and ratio 0.200\n")  # as TurboMind 0.18 printed it on the H200


def test_native_writes_are_kept_and_passed_on(capfd):
    libc = ctypes.CDLL(None)
    with tee_stderr() as native:
        libc.write(2, LINE, len(LINE))  # from C, as TurboMind writes, not through sys.stderr
        os.write(2, b"second line\n")
    os.write(2, b"after the block\n")
    kept = b"".join(native)
    assert LINE in kept and b"second line" in kept and b"after the block" not in kept
    err = capfd.readouterr().err
    assert LINE.decode() in err and "after the block" in err  # the log reads as before


def test_budget_is_parsed_in_bytes():
    assert turbomind_cache_budget(b"noise\n" + LINE) == int(25483.43 * 2**20)
    assert turbomind_cache_budget(b"[TM][WARN] nothing about the cache\n") is None


def test_warmups_refused_as_too_long_are_read_from_the_log():
    # Lines as TurboMind 0.18 printed them on the H100 at session_len 4096
    # (docs/data/gpu-2026-11-26-internlm2/lmdeploy-turbomind/internlm2-7b.log).
    log = (b"[TM][INFO][1126.02:02:07.017841][turbomind.cc:440] Warm-up lengths: 8, 16, 4096, 6144, 8192\n"
           b"[TM][ERROR][turbomind.cc:486] Warm-up for 6144 tokens failed with status 6\n"
           b"[TM][ERROR][turbomind.cc:486] Warm-up for 8192 tokens failed with status 6\n"
           b"[TM][ERROR] Warm-up for 96 tokens failed with status 11\n")
    assert turbomind_warmups_too_long(log) == [6144, 8192]
    assert turbomind_warmups_too_long(b"[TM][INFO] Warm-up finished in 0.39 seconds.\n") == []
