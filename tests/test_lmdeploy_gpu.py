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
    from deploy.engines import GenerationParams
    from deploy.serve.assistant import Assistant

    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
    # Each request asks for its own length, so per-request accounting shows through batching.
    lengths = [8 + 4 * i for i in range(len(prompts))]

    async def scenario(assistant):
        together = await asyncio.gather(*(
            assistant.achat(p, GenerationParams(max_tokens=n))
            for p, n in zip(prompts, lengths, strict=True)))
        stream = assistant.astream(prompts[0], GenerationParams(max_tokens=200))
        pieces = []
        async for delta in stream:
            pieces.append(delta.text)
            if len(pieces) == 3:
                break
        await stream.aclose()  # an abandoned stream must not block the next request
        after = await asyncio.wait_for(assistant.achat(prompts[1], GenerationParams(max_tokens=16)), 120)
        return together, pieces, after

    with Assistant.from_recipe(gpu_recipe) as assistant:
        assert assistant.engine.name == "lmdeploy-pytorch"
        together, pieces, after = asyncio.run(scenario(assistant))
        memory = assistant.engine.memory()

    # Random weights: the text is noise and greedy argmax flips with batch shape, so only the
    # accounting is compared (a random model rarely emits EOS, so each runs to its own length).
    assert [a.completion_tokens for a in together] == lengths
    assert all(a.finish_reason == "length" and a.text for a in together)
    assert len(pieces) == 3 and all(pieces)
    assert after.completion_tokens == 16
    assert memory.kv_blocks > 16
    assert memory.kv_capacity_tokens == memory.kv_blocks * memory.kv_block_size
    assert memory.kv_cache_bytes == memory.kv_capacity_tokens * memory.kv_bytes_per_token
    assert memory.settings["quant_policy"] == 8

