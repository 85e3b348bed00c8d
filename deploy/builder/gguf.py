"""GGUF files for the llama.cpp engine, written by llama.cpp itself (`llama_model_quantize`).

- The bundled model arrives as a 4-bit GGUF (Q4_1). Its unquantized form for llama.cpp is an F16
  GGUF of the same values: the fetch step writes it beside the bf16 safetensors copy, so that the
  default recipe serves the model's own weights, and a 4-bit recipe has an original to be gated
  against.
- `quantization.weights: q4_1`, `q4_0` or `q8_0` with `engine.backend: llamacpp`: the quantize step
  writes that type from the F16 file. q4_0 is the fastest on AVX2 (llama.cpp repacks it at load for
  its batched kernels) and the roughest; on the bundled model it fails the gate, where q4_1 passes
  (docs/data/gguf-4bit-formats.json).
"""

from __future__ import annotations

from pathlib import Path

from deploy.atomic import atomic_dir, atomic_file, copy_model_files
from deploy.engines.hardware import usable_cpus

# quantization.weights -> llama.cpp's file type name (LLAMA_FTYPE_MOSTLY_*)
GGUF_TYPES = {"none": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}


class GGUFError(RuntimeError):
    """llama.cpp could not write the file."""


def write_gguf(source: Path, target: Path, file_type: str) -> Path:
    """`source` rewritten as `target` in llama.cpp's `file_type` (`LLAMA_FTYPE_MOSTLY_<file_type>`:
    the recipe's are GGUF_TYPES' values; benchmarks/gguf_4bit_formats.py tries others), atomically
    (a reader sees no file or a complete one)."""
    import llama_cpp
    import llama_cpp._logger as llama_log

    llama_log.set_verbose(False)  # a line per tensor otherwise; errors still show
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.allow_requantize = True  # the source may itself be quantized (the bundled Q4_1)
    # the CPUs this build may use, not the host's: under a 1-CPU quota a thread per host CPU made
    # the Q8_0 write slower (docs/data/gguf-quantize-threads.json)
    params.nthread = usable_cpus()[0]
    with atomic_file(target) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0 or not tmp.stat().st_size:
            raise GGUFError(f"llama.cpp could not write {target.name} from {source} (status "
                            f"{status}); check that the source is a complete GGUF file and the "
                            "disk has room.")
    return target


def gguf_name(stem: str, file_type: str) -> str:
    return f"{stem}.{file_type}.gguf"


def gguf_quantize(file_type: str, source_dir: Path, out_dir: Path) -> Path:
    """A model folder for the llama.cpp engine: `source_dir`'s tokenizer and config, and its GGUF
    rewritten in llama.cpp's `file_type`. The folder appears whole or not at all."""
    from deploy.engines.llamacpp_engine import find_gguf

    source = find_gguf(source_dir)
    stem = source.name.removesuffix(".gguf").removesuffix(".F16")
    with atomic_dir(out_dir) as work:
        copy_model_files(source_dir, work)
        write_gguf(source, work / gguf_name(stem, file_type), file_type)
    return out_dir
