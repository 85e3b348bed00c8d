"""Recipe -> LMDeploy engine config, checked on CPU (no LMDeploy, no TurboMind .so needed)."""

from __future__ import annotations

import importlib.util

import pytest

from deploy.engines import engine_config, load_engine
from deploy.engines.lmdeploy_engine import engine_config_kwargs as config_kwargs
from deploy.engines.lmdeploy_engine import kv_blocks_for, token_logprobs, tp_executor
from deploy.engines.sizing import kv_bytes_per_token
from deploy.recipe import RecipeError, parse_recipe

# InternLM2-chat-7B's attention shape and Llama-2-7B's.
INTERNLM2 = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 4096}
LLAMA2 = {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096}


def recipe(**sections):
    return parse_recipe(sections)


def engine_config_kwargs(r, backend, model_config, free_after_weights=None):
    """The recipe -> engine config -> LMDeploy settings path, as the kit runs it."""
    return config_kwargs(engine_config(r, backend), model_config, free_after_weights)


def test_kv_bytes_per_token_anchors():
    assert kv_bytes_per_token(INTERNLM2) == 128 * 1024
    assert kv_bytes_per_token(LLAMA2) == 512 * 1024
    # int8 halves the elements and adds an fp16 scale and zero per head: about 2x fewer bytes.
    assert kv_bytes_per_token(LLAMA2, "int8") == 32 * 32 * 2 * (128 + 4)
    assert kv_bytes_per_token(LLAMA2, "int4") == 32 * 32 * 2 * (64 + 4)


def test_pytorch_engine_config_from_recipe():
    r = recipe(quantization={"weights": "w4a16", "kv_cache": "int8"},
               engine={"dtype": "float16", "session_len": 8192, "max_batch_size": 32,
                       "cache_max_entry_count": 0.3, "tp": 2})
    kw = engine_config_kwargs(r, "lmdeploy-pytorch", INTERNLM2)
    assert kw == {"dtype": "float16", "session_len": 8192, "max_batch_size": 32, "tp": 2,
                  "quant_policy": 8, "block_size": 64, "enable_mp_engine": True,
                  "logprobs_mode": "raw_logprobs",
                  "distributed_executor_backend": tp_executor(),
                  "cache_max_entry_count": 0.3}
    assert "distributed_executor_backend" not in engine_config_kwargs(recipe(), "lmdeploy-pytorch",
                                                                      INTERNLM2)
    inline = recipe(engine={"own_process": False})
    assert engine_config_kwargs(inline, "lmdeploy-pytorch", INTERNLM2)["enable_mp_engine"] is False


def test_tp_executor_is_ray_only_where_ray_is_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray"
                        else real(name, *a))
    assert tp_executor() == "mp"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ray"
                        else real(name, *a))
    assert tp_executor() == "ray"


def test_turbomind_engine_config_from_recipe():
    r = recipe(quantization={"weights": "w4a16", "kv_cache": "int4"})
    kw = engine_config_kwargs(r, "lmdeploy-turbomind", INTERNLM2)
    assert kw["model_format"] == "awq"
    assert kw["quant_policy"] == 4
    assert kw["cache_block_seq_len"] == 64
    assert kw["cache_max_entry_count"] == 0.8  # LMDeploy's default when the recipe sets none
    assert engine_config_kwargs(recipe(), "lmdeploy-turbomind", INTERNLM2)["model_format"] == "hf"


def test_fp8_on_turbomind_needs_bfloat16_and_whole_heads_in_a_packed_wqkv():
    fp8 = {"weights": "fp8"}
    kw = engine_config_kwargs(recipe(quantization=fp8, engine={"dtype": "bfloat16"}),
                              "lmdeploy-turbomind", {**INTERNLM2, "model_type": "internlm2"})
    assert kw["model_format"] == "fp8" and kw["dtype"] == "bfloat16"
    with pytest.raises(RecipeError, match="engine.dtype: auto or bfloat16"):
        engine_config_kwargs(recipe(quantization=fp8, engine={"dtype": "float16"}),
                             "lmdeploy-turbomind", LLAMA2)
    # The PyTorch engine reads FP8 from the folder; dtype auto would follow a float16 checkpoint
    # onto its slow Triton path, so the kit asks for bfloat16.
    pt = engine_config_kwargs(recipe(quantization=fp8), "lmdeploy-pytorch", LLAMA2)
    assert pt["dtype"] == "bfloat16" and "model_format" not in pt
    with pytest.raises(RecipeError, match="engine.dtype: auto or bfloat16"):
        engine_config_kwargs(recipe(quantization=fp8, engine={"dtype": "float16"}),
                             "lmdeploy-pytorch", LLAMA2)
    # InternLM2 with 64-row heads: a 128-row block scale would span two heads of the packed wqkv.
    small_heads = {**INTERNLM2, "model_type": "internlm2", "num_attention_heads": 64}
    with pytest.raises(RecipeError, match="heads of 64 rows"):
        engine_config_kwargs(recipe(quantization=fp8, engine={"dtype": "bfloat16"}),
                             "lmdeploy-turbomind", small_heads)
    # Llama keeps q, k and v apart: any head size is read.
    assert engine_config_kwargs(recipe(quantization=fp8, engine={"dtype": "bfloat16"}),
                                "lmdeploy-turbomind", {**LLAMA2, "num_attention_heads": 64})


def test_awq_groups_turbomind_cannot_read_are_refused_before_calibration(tmp_path):
    """TurboMind (LMDeploy 0.18) reads AWQ group 128 only; group 64 failed its start on the H200."""
    from deploy.builder.pipeline import _quantize

    g64 = {"weights": "w4a16", "group_size": 64}
    assert engine_config_kwargs(recipe(quantization={"weights": "w4a16"}), "lmdeploy-turbomind",
                                LLAMA2)["model_format"] == "awq"
    with pytest.raises(RecipeError, match="quantization.group_size 64: TurboMind reads"):
        engine_config_kwargs(recipe(quantization=g64), "lmdeploy-turbomind", LLAMA2)
    assert engine_config_kwargs(recipe(quantization=g64), "lmdeploy-pytorch", LLAMA2)["block_size"]
    # The build refuses before AWQ calibration (minutes on a GPU) starts, not when serving fails.
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    outputs = {"merge": {}, "fetch": {"model_dir": str(source)}}
    with pytest.raises(RecipeError, match="engine.backend: lmdeploy-pytorch"):
        _quantize(recipe(quantization=g64, engine={"backend": "lmdeploy-turbomind"}), tmp_path, outputs)
    assert not (tmp_path / "quantized-awq").exists()


def test_absolute_kv_budget_becomes_blocks():
    r = recipe(engine={"kv_cache_gib": 4})
    # 4 GiB / (64 tokens x 128 KiB) = 512 blocks for InternLM2 in fp16.
    assert engine_config_kwargs(r, "lmdeploy-pytorch", INTERNLM2)["num_gpu_blocks"] == 512
    assert kv_blocks_for(4, INTERNLM2, "none", tp=2) == 1024  # each GPU holds half the heads
    # TurboMind takes a ratio of the memory free after the weights: 4 of 64 GiB, rounded up.
    kw = engine_config_kwargs(r, "lmdeploy-turbomind", INTERNLM2, free_after_weights=64 * 2**30)
    assert kw["cache_max_entry_count"] == 0.063
    with pytest.raises(RecipeError, match="does not fit"):
        engine_config_kwargs(r, "lmdeploy-turbomind", INTERNLM2, free_after_weights=3 * 2**30)
    with pytest.raises(RecipeError, match="free memory"):
        engine_config_kwargs(r, "lmdeploy-turbomind", INTERNLM2)


def test_tiny_kv_budget_and_float32_are_refused():
    with pytest.raises(RecipeError, match="at least 16"):
        engine_config_kwargs(recipe(engine={"kv_cache_gib": 0.01}), "lmdeploy-pytorch", LLAMA2)
    with pytest.raises(RecipeError, match="float32"):
        engine_config_kwargs(recipe(engine={"dtype": "float32"}), "lmdeploy-pytorch", LLAMA2)


NO_LMDEPLOY = pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is not None,
                                 reason="checks the CPU fallback; LMDeploy is installed here")


@NO_LMDEPLOY
def test_auto_falls_back_to_transformers_without_lmdeploy_or_gpu(caplog):
    caplog.set_level("INFO")
    assert engine_config(recipe(engine={"backend": "auto"})).backend == "transformers"
    assert "engine.backend auto -> transformers" in caplog.text


@NO_LMDEPLOY
def test_lmdeploy_backend_without_gpu_says_what_to_do(tmp_path):
    r = recipe(engine={"backend": "lmdeploy-pytorch", "tp": 2})
    with pytest.raises(RecipeError, match="lmdeploy-pytorch"):
        load_engine(engine_config(r), tmp_path)


def test_quantized_recipe_on_transformers_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="quantization.kv_cache 'int8'"):
        load_engine(engine_config(recipe(engine={"backend": "transformers"},
                                         quantization={"kv_cache": "int8"})), tmp_path)


def test_tp_beyond_visible_gpus_is_refused():
    from deploy.engines import lmdeploy_problem

    assert "engine.tp is 2 but 1 GPU(s)" in lmdeploy_problem("lmdeploy-pytorch", 2, True, 1)
    assert "needs an NVIDIA GPU" in lmdeploy_problem("lmdeploy-pytorch", 1, True, 0)
    assert lmdeploy_problem("lmdeploy-pytorch", 2, True, 2) is None


def test_memory_report_with_tp_gives_kv_bytes_per_gpu(tmp_path):
    # The engine's own numbers as LMDeploy reported them for a Llama-2-7B-shaped model at tp 2 on
    # two H100s (docs/data/h100x2-2026-11-25-tp/memory-tp2.json): 914 blocks of 64 tokens.
    from types import SimpleNamespace

    from deploy.engines.lmdeploy_engine import LMDeployEngine

    engine = LMDeployEngine.__new__(LMDeployEngine)  # no GPU here: only the report's arithmetic
    engine.name, engine.model_dir, engine.session_len = "lmdeploy-pytorch", tmp_path, 4096
    engine.engine_config, engine.model_config = engine_config(recipe(engine={"tp": 2})), LLAMA2
    (tmp_path / "model.safetensors").write_bytes(b"0" * 100)
    engine._engine = SimpleNamespace(backend_config=SimpleNamespace(
        num_gpu_blocks=914, block_size=64, tp=2, cache_max_entry_count=0.2, quant_policy=0))
    memory = engine.memory()
    assert memory.kv_capacity_tokens == 58_496
    assert memory.kv_cache_bytes == 58_496 * 512 * 1024 // 2  # 15.3 GB on each of the two GPUs
    assert memory.sessions_that_fit == 14
    assert any("per GPU" in note for note in memory.notes)


def test_pytorch_engine_returns_raw_log_probabilities():
    r = recipe(model={"source": "local", "path": "."}, engine={"backend": "lmdeploy-pytorch"})
    assert engine_config_kwargs(r, "lmdeploy-pytorch", LLAMA2)["logprobs_mode"] == "raw_logprobs"
    assert "logprobs_mode" not in engine_config_kwargs(r, "lmdeploy-turbomind", LLAMA2)


def test_lmdeploy_log_probabilities_in_the_engine_interface():
    # As LMDeploy 0.18 streams them: a piece's token ids (here one held back from the previous
    # piece, 7) and a dict per new token of its likeliest ids plus the chosen one.
    scored = token_logprobs([7, 11, 12], [{11: -0.1, 5: -2.5, 3: -3.0}, {4: -0.2, 12: -1.9}], top=2)
    assert [(s.token, s.logprob) for s in scored] == [(11, -0.1), (12, -1.9)]
    assert scored[0].top == ((11, -0.1), (5, -2.5)) and scored[1].top == ((4, -0.2), (12, -1.9))
    assert token_logprobs([3], None, top=1) == []
    with pytest.raises(RuntimeError, match="no log probability for generated token 9"):
        token_logprobs([9], [{1: -0.5}], top=1)


def test_cuda_visible_devices_narrows_the_gpus_nvml_counts():
    """visible_gpus counts through NVML without importing torch, so it reads CUDA_VISIBLE_DEVICES
    as CUDA does: entries up to the first invalid one."""
    from deploy.engines.hardware import cuda_visible

    assert cuda_visible(4, None) == 4
    assert cuda_visible(4, "") == 0
    assert cuda_visible(4, "-1") == 0
    assert cuda_visible(4, "2") == 1
    assert cuda_visible(4, "0, 3") == 2
    assert cuda_visible(4, "1,7,2") == 1  # 7 is not a GPU here: CUDA stops reading there
    assert cuda_visible(2, "GPU-8f1a2b3c,MIG-11aa") == 2
