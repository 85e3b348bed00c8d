"""What llama.cpp was compiled for: the kit's own build is the portable AVX2 one, and a build with
AVX-512 (as a host's own pip build can be) is named in the log with what it can change."""

from __future__ import annotations

from deploy.engines.llamacpp_build import batch_variance_warning, compiled_features

# llama_print_system_info of llama-cpp-python 0.3.36 built with the kit's flags plus GGML_AVX512,
# _VBMI, _VNNI and _BF16 (benchmarks/llama_build_time.py's "kit flags + AVX-512").
AVX512_REPORT = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                 "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | "
                 "REPACK = 1 | ")


def test_an_avx512_build_is_named_with_its_consequence():
    features = compiled_features(AVX512_REPORT)
    assert features[:4] == ["SSE3", "SSSE3", "AVX", "AVX2"] and "AVX512_BF16" in features
    warning = batch_variance_warning(features)
    assert "AVX512, AVX512_VBMI, AVX512_VNNI, AVX512_BF16" in warning
    assert "make install" in warning


def test_features_switched_off_and_other_backends_are_not_read():
    report = "CPU : AVX = 1 | AVX2 = 1 | AVX512 = 0 | Metal : EMBED_LIBRARY = 1 | "
    assert compiled_features(report) == ["AVX", "AVX2"]
    assert batch_variance_warning(compiled_features(report)) is None
    assert compiled_features("") == []


def test_the_kits_own_build_is_the_portable_one(assistant):
    """`make install` builds llama.cpp with the Makefile's flags: AVX2, no AVX-512, so no warning;
    /memory's settings say what the server's llama.cpp was compiled for."""
    compiled = assistant.engine.memory().settings["llama_cpp_compiled_for"]
    assert "AVX2" in compiled and "FMA" in compiled
    assert not [f for f in compiled if f.startswith("AVX512")]
    assert batch_variance_warning(compiled) is None
