"""What the llama.cpp library in this environment was compiled for, from its own system report
(`llama_print_system_info`: "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ... | AVX512 = 0 | ..."), and the
one consequence the kit warns about.

`make install` and the CPU image build llama.cpp for any AVX2 CPU (the Makefile says why). A host
that builds llama-cpp-python itself with its default flags, as the OpenXLab app host's pip does,
gets a build for its own CPU instead. On an AVX-512 CPU such a build changed greedy answers under
concurrency in 1 of 9 runs of the kit's test, where the portable build kept them in 3 of 3
(docs/cpu-runtimes.md, docs/data/llama-wheel-greedy-avx512*.json).
"""

from __future__ import annotations


def compiled_features(report: str) -> list[str]:
    """The features switched on in a `llama_print_system_info` report, in its order: instruction
    families and llama.cpp's own CPU paths, e.g. ["SSE3", "AVX", "AVX2", "F16C", "FMA", "LLAMAFILE"].
    Only the "CPU :" part is read."""
    cpu = report.split("CPU :", 1)[-1] if "CPU :" in report else ""
    features = []
    for part in cpu.split("|"):
        name, _, value = part.partition("=")
        if ":" in name:  # the next backend's section ("Metal : ...") starts here
            break
        if value.strip() == "1":
            features.append(name.strip())
    return features


def batch_variance_warning(features: list[str]) -> str | None:
    """A sentence for the log where this build's greedy answers may depend on other traffic."""
    wide = [f for f in features if f.startswith("AVX512")]
    if not wide:
        return None
    return (f"This llama.cpp was compiled with {', '.join(wide)} (a build for this CPU, not the kit's "
            "portable AVX2 one): with such a build, greedy answers changed in 1 of 9 tests when "
            "requests ran together (docs/cpu-runtimes.md). Where the same answer alone and under "
            "load matters, install the kit with `make install`, whose build keeps them equal.")
