"""LMDeploy engine on a real GPU. Skipped where LMDeploy or an NVIDIA GPU is missing.

On the device: XLAB_GPU_TEST_MODEL names a model folder (a random-weight Llama does: see
scripts/device_run.sh). Real text is checked on CPU with the bundled model; here the checks are
that requests stream, batch without mixing, and that /memory's KV numbers add up.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

pytestmark = pytest.mark.gpu


def _gpu_ready() -> str | None:
    if importlib.util.find_spec("lmdeploy") is None:
        return "LMDeploy is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not os.environ.get("XLAB_GPU_TEST_MODEL"):
        return "set XLAB_GPU_TEST_MODEL to a model folder"
    return None


@pytest.fixture(scope="module")
def gpu_recipe():
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    from deploy.recipe import parse_recipe

    return parse_recipe({
        "name": "gpu-test",
        "model": {"source": "local", "path": os.environ["XLAB_GPU_TEST_MODEL"]},
        "quantization": {"kv_cache": "int8"},
        "engine": {"backend": "lmdeploy-pytorch", "session_len": 2048, "max_batch_size": 16,
                   "cache_max_entry_count": 0.1},
    })


def test_lmdeploy_streams_batches_and_reports_kv(gpu_recipe):
    from deploy.assistant import Assistant
    from deploy.engines import GenerationParams

    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
    params = GenerationParams(max_tokens=32)

    async def scenario(assistant):
        alone = [(await assistant.chat(p, params)).text for p in prompts]
        together = await asyncio.gather(*(assistant.chat(p, params) for p in prompts))
        stream = assistant.stream(prompts[0], GenerationParams(max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()  # an abandoned stream must not block the next request
        after = await asyncio.wait_for(assistant.chat(prompts[1], params), 120)
        return alone, together, after

    with Assistant.from_recipe(gpu_recipe) as assistant:
        assert assistant.engine.name == "lmdeploy-pytorch"
        alone, together, after = asyncio.run(scenario(assistant))
        memory = assistant.engine.memory()

    assert all(a.completion_tokens > 0 for a in together)
    assert [a.text for a in together] == alone  # greedy: batching changes nothing
    assert after.text == alone[1]
    assert memory.kv_blocks > 16
    assert memory.kv_capacity_tokens == memory.kv_blocks * memory.kv_block_size
    assert memory.kv_cache_bytes == memory.kv_capacity_tokens * memory.kv_bytes_per_token
    assert memory.settings["quant_policy"] == 8
