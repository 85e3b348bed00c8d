# Included by llama.cpp's project() when llama-cpp-python is built from source (the Makefile's and
# the wheelhouse's CMAKE_ARGS name it as CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces
# LLAMA_BUILD_COMMON on, but the Python package loads only libllama and libggml: libcommon (the
# tools' argument parser, chat parsers, JSON schema code) is compile time for nothing, and it is
# also the one part of llama.cpp that fails as a unity build. A normal variable set here shadows
# the forced cache entry in llama.cpp's directory scope (docs/cpu-runtimes.md, "Build time").
set(LLAMA_BUILD_COMMON OFF)
