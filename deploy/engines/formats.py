"""`quantization.weights: auto`: the weight format that decodes fastest where the model will run.

The choice follows measurements, not format names:
- Hopper and newer (sm_90+), TurboMind: on the H200 FP8 served 1.17x fp16 at concurrency 1 and
  W4A16 0.71x on Llama-2-7B shapes; FP8 1.15x on InternLM2-7B shapes (random weights, 3 runs each,
  `deploy bench`; docs/bench/h200-turbomind*/, docs/benchmarks.md).
  TurboMind's FP8 computes in bf16, so engine.dtype float16 keeps fp16 weights.
- Hopper on LMDeploy's PyTorch engine: FP8 too. On the H200 its Gluon FP8 kernel decoded 1.45-1.49x
  fp16 in LMDeploy's own pipeline and 1.04-1.26x through the kit's server over three calls
  (LMDeploy's api_server the same), W4A16 0.65x (random weights, 3 runs each;
  docs/data/gpu-2026-12-03-pytorch-fp8/, docs/data/gpu-2026-12-04-pytorch-fp8-reference/). Its
  fast FP8 kernels take bf16 activations only, so engine.dtype float16 keeps fp16 weights here too.
- Turing, Ampere and Ada (sm_75 to sm_89): W4A16 (AWQ). Not measured by this kit (no such card has
  been lent); LMDeploy's own guide reports its 4-bit kernels at up to 2.4x fp16 on these
  (lmdeploy docs/en/quantization/w4a16.md).
- No GPU: the weights as they are. llama.cpp's F16 GGUF gave the most tokens a second at 8 streams
  on this project's CPU (docs/cpu-runtimes.md); the transformers engine's 4-bit HQQ saves memory.
A GPU known only by its memory size (`--gpu 24`) has no known architecture: fp16, and the reason
says how to name it.
"""

from __future__ import annotations

from dataclasses import dataclass

# CUDA compute capability of the GPUs the planner knows by name (capacity/planner.py's table).
CAPABILITY = {"T4": (7, 5), "A10": (8, 6), "A100-40G": (8, 0), "A100-80G": (8, 0), "H100": (9, 0),
              "H200": (9, 0)}
HOPPER = (9, 0)
AWQ_MIN = (7, 5)  # TurboMind's W4A16 kernels start at Turing


@dataclass(frozen=True)
class WeightChoice:
    weights: str  # none, w4a16 or fp8
    reason: str


def capability_for(name: str) -> tuple[int, int] | None:
    """A GPU's compute capability from a name in the planner's table or a product name as NVML
    reports it ("NVIDIA H200", "NVIDIA A100-SXM4-80GB")."""
    key = name.upper().replace("NVIDIA", "").replace(" ", "")
    for known, capability in sorted(CAPABILITY.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(known.replace("-40G", "").replace("-80G", "")):
            return capability
    return None


def fastest_weights(backend: str, gpu: str | None, capability: tuple[int, int] | None,
                    dtype: str = "auto") -> WeightChoice:
    """The weight format for `backend` on `gpu` (None: no GPU). `backend` is resolved already,
    except that `auto` with a GPU means TurboMind, which `auto` picks wherever it loads."""
    if gpu is None or backend == "llamacpp":
        where = "llama.cpp" if backend == "llamacpp" else "the transformers engine"
        return WeightChoice("none", f"no GPU, {where}: the model's own weights decode fastest here "
                            "(docs/cpu-runtimes.md); 4-bit saves memory, set weights yourself for it")
    if backend == "transformers":
        return WeightChoice("none", f"the transformers engine on the {gpu} (LMDeploy is not installed "
                            "or not chosen): its 4-bit HQQ saves memory, not time; LMDeploy serves "
                            "the fast formats")
    if capability is None:
        return WeightChoice("none", f"the {gpu}'s architecture is unknown: name the card (--gpu "
                            "H100, A10, ...) or set quantization.weights")
    arch = f"{gpu} (sm_{capability[0]}{capability[1]})"
    if capability >= HOPPER:
        if dtype == "float16":
            return WeightChoice("none", f"{arch}: FP8 is fastest on LMDeploy but computes in bf16, "
                                "and engine.dtype is float16")
        if backend == "lmdeploy-pytorch":
            return WeightChoice("fp8", f"{arch} on LMDeploy's PyTorch engine: FP8 decoded 1.45-1.49x "
                                "fp16 in LMDeploy's pipeline and 1.04-1.26x through the kit's server "
                                "on the H200, W4A16 0.65x (Llama-2-7B shapes, random weights; "
                                "docs/data/gpu-2026-12-0[34]-pytorch-fp8*/)")
        return WeightChoice("fp8", f"{arch}: FP8 served 1.17x fp16 on the H200 and W4A16 0.71x "
                            "(Llama-2-7B shapes; FP8 1.15x on InternLM2-7B shapes; "
                            "docs/bench/h200-turbomind*/)")
    if capability >= AWQ_MIN:
        return WeightChoice("w4a16", f"{arch}: AWQ W4A16, up to 2.4x fp16 on Turing to Ada by "
                            "LMDeploy's guide (not measured by this kit)")
    return WeightChoice("none", f"{arch}: older than TurboMind's 4-bit kernels (sm_75)")
