# Included by llama.cpp's project() when llama-cpp-python is built from source (the Makefile's and
# the wheelhouse's CMAKE_ARGS name it as CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces
# LLAMA_BUILD_COMMON on, but the Python package loads only libllama and libggml: libcommon (the
# tools' argument parser, chat parsers, JSON schema code) is compile time for nothing, and it is
# also the one part of llama.cpp that fails as a unity build. A normal variable set here shadows
# the forced cache entry in llama.cpp's directory scope (docs/cpu-runtimes.md, "Build time").
set(LLAMA_BUILD_COMMON OFF)

# libllama (model loading, vocabulary, the per-token graph build) at -O1, ggml (every matrix
# multiply and kernel) left at -O3: libllama is most of the compile and little of a token's time.
# -DXLAB_LLAMA_OPT=3 builds it as upstream does.
# Measured: docs/cpu-runtimes.md, "Build time" (build time and decode speed, both variants).
set(XLAB_LLAMA_OPT "1" CACHE STRING "optimization level for libllama (ggml keeps -O3)")
function(_xlab_llama_opt)
  if(TARGET llama AND NOT XLAB_LLAMA_OPT STREQUAL "3")
    # After CMAKE_CXX_FLAGS_RELEASE's -O3 on the command line, so this one is the one GCC keeps.
    set_property(TARGET llama APPEND PROPERTY COMPILE_OPTIONS "-O${XLAB_LLAMA_OPT}")
  endif()
endfunction()
cmake_language(DEFER DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}" CALL _xlab_llama_opt)
