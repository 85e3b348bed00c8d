"""LMDeploy engine on a real GPU. Skipped where LMDeploy or an NVIDIA GPU is missing.

On the device: XLAB_GPU_TEST_MODEL names a model folder (a random-weight Llama does: see
tools/device_run.sh). Real text is checked on CPU with the bundled model; here the checks are
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
        # The engine process is the one the kit spawned before importing LMDeploy, adopted by
        # LMDeploy's client (deploy/engines/engine_process.py), not a second one.
        client = assistant.engine._engine.engine
        assert type(client).__name__ == "AdoptedZMQEngine" and client.proc.is_alive()
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



def test_lmdeploy_json_mode_and_scheduler_metrics_over_http(gpu_recipe):
    """Guided decoding holds even random weights to the schema; /metrics shows LMDeploy's own
    running count while a burst decodes."""
    import json
    import threading

    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from deploy.serve.app import create_app
    from deploy.serve.assistant import Assistant
    from deploy.serve.run import ServerThread

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Pick a colour."}]
    with Assistant.from_recipe(gpu_recipe) as assistant, \
            ServerThread(create_app(assistant.config, assistant, ui=False)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=gpu_recipe.name, messages=ask, max_tokens=200, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
        # Random weights wander (seen: 200 tokens of whitespace inside the object), but every
        # character they may emit is one the schema allows: without the whitespace, the text is a
        # beginning of one of the three answers. Unguided, a random model's text never is.
        content = answer.choices[0].message.content
        allowed = [f'{{"colour":"{c}"}}' for c in ("red", "green", "blue")]
        squeezed = "".join(content.split())
        assert squeezed and any(a.startswith(squeezed) for a in allowed), content[:200]
        if answer.choices[0].finish_reason == "stop":
            assert json.loads(content)["colour"] in ("red", "green", "blue")
        loose = client.chat.completions.create(model=gpu_recipe.name, messages=ask, max_tokens=200,
                                               temperature=0, response_format={"type": "json_object"})
        if loose.choices[0].finish_reason == "stop":  # random weights may run out of tokens first
            assert isinstance(json.loads(loose.choices[0].message.content), dict)

        def burst():
            client.chat.completions.create(model=gpu_recipe.name, messages=ask, max_tokens=400,
                                           temperature=0)

        threads = [threading.Thread(target=burst) for _ in range(6)]
        for t in threads:
            t.start()
        running = []
        while any(t.is_alive() for t in threads):
            text = httpx.get(live.url + "/metrics", timeout=30).text
            samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            running.append(samples.get("xlab_requests_running", 0))
            usage = samples.get("xlab_kv_cache_usage_ratio")
        for t in threads:
            t.join()
    assert max(running) >= 2, running
    assert usage is not None


def test_turbomind_takes_an_absolute_kv_budget(gpu_recipe):
    """engine.kv_cache_gib on TurboMind, which takes only a ratio of the memory free after the
    weights: the budget it logs is the one asked for, within the ratio's rounding."""
    from deploy.engines.hardware import lmdeploy_installed

    if not lmdeploy_installed():
        pytest.skip("LMDeploy is not installed")
    from lmdeploy import turbomind

    if not turbomind.is_available():
        pytest.skip("TurboMind's libraries are not installed (tools/device_run.sh tm-assemble)")
    from deploy.serve.assistant import Assistant

    recipe = gpu_recipe.model_copy(deep=True)
    recipe.engine.backend = "lmdeploy-turbomind"
    recipe.engine.cache_max_entry_count = None
    recipe.engine.kv_cache_gib = 2.0
    with Assistant.from_recipe(recipe) as assistant:
        memory = assistant.engine.memory()
        answer = assistant.chat("Hello", max_tokens=8)
    assert answer
    assert 0.97 * 2 * 2**30 <= memory.kv_cache_bytes <= 1.1 * 2 * 2**30, memory


def test_the_gate_gets_whole_answers_from_the_pytorch_engine(gpu_recipe):
    """LMDeploy 0.18's PyTorch engine cut its answers to 2 tokens after a logits request
    (experiments/logits_answers.py: 32, 2, 2, 2 when alternated). The gate's reference pass asks every
    answer before any logits, so its answers are the ones the engine gives alone."""
    from deploy.builder.gate import reference_rows
    from deploy.engines import GenerationParams
    from deploy.recipe.tasks import load_tasks
    from deploy.serve.assistant import Assistant

    tasks = load_tasks(None, 4)
    with Assistant.from_recipe(gpu_recipe) as assistant:
        engine = assistant.engine

        async def scenario():
            alone = [await engine.chat(t.messages(), GenerationParams(max_tokens=16)) for t in tasks]
            rows = await reference_rows(engine, engine.tokenizer, tasks, answer_tokens=16)
            return alone, rows

        alone, rows = asyncio.run(scenario())  # one loop: LMDeploy binds to the first it sees
    assert [r.answer for r in rows] == [a.text for a in alone]
    assert sum(a.completion_tokens for a in alone) > 2 * len(tasks)  # not all cut short


def test_the_pytorch_engine_serves_the_kits_fp8_weights(gpu_recipe, tmp_path):
    """quantization.weights: fp8 on LMDeploy's PyTorch engine: the kit's blocked-FP8 folder (the
    layout TurboMind reads) loads through its quantization_config, answers, and the engine's
    memory report counts FP8 weight bytes, about half the fp16 ones."""
    from pathlib import Path

    from deploy.builder.fp8 import fp8_quantize
    from deploy.serve.assistant import Assistant

    source = Path(os.environ["XLAB_GPU_TEST_MODEL"])
    fp8_dir = fp8_quantize(source, tmp_path / "fp8", device="cuda")
    recipe = gpu_recipe.model_copy(deep=True)
    recipe.model.path = str(fp8_dir)
    recipe.quantization.weights = "fp8"
    recipe.quantization.kv_cache = "none"
    recipe.engine.dtype = "bfloat16"
    with Assistant.from_recipe(recipe) as assistant:
        answer = assistant.chat("Hello", max_tokens=8)
        memory = assistant.engine.memory()
    fp16_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert answer
    assert memory.weight_bytes is not None and memory.weight_bytes < 0.75 * fp16_bytes, memory


@pytest.mark.parametrize("backend", ["lmdeploy-pytorch", "lmdeploy-turbomind"])
def test_lmdeploy_log_probabilities_over_http(gpu_recipe, backend):
    """logprobs and top_logprobs through the openai client: one entry per generated token, the
    greedy choice is the likeliest, and the alternatives come in order. TurboMind, which reports
    them after its sampling filters (one token at 0.0 each under greedy decoding, seen on the
    H100), gets a 400 naming the field instead."""
    import openai

    from deploy.serve.app import create_app
    from deploy.serve.assistant import Assistant
    from deploy.serve.run import ServerThread

    if backend == "lmdeploy-turbomind":
        from lmdeploy import turbomind

        if not turbomind.is_available():
            pytest.skip("TurboMind's libraries are not installed (tools/device_run.sh tm-assemble)")
    recipe = gpu_recipe.model_copy(deep=True)
    recipe.engine.backend = backend
    with Assistant.from_recipe(recipe) as assistant, \
            ServerThread(create_app(assistant.config, assistant, ui=False)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        if backend == "lmdeploy-turbomind":
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model=recipe.name, messages=[{"role": "user", "content": "Count to five."}],
                    max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
            assert refused.value.body["param"] == "logprobs"
            return
        answer = client.chat.completions.create(
            model=recipe.name, messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
        streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
            model=recipe.name, messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True)
            if c.choices and c.choices[0].logprobs]
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens > 0
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert item.logprob == pytest.approx(tops[0], abs=1e-3)  # greedy: the likeliest
    assert [i.token for s in streamed for i in s.content] == [i.token for i in content]


def test_a_named_tool_choice_forces_a_call_through_guided_decoding():
    """tool_choice naming a function: LMDeploy's guided decoding admits only that call, with
    arguments that follow its schema, so even random weights write it (or the start of it, if
    they run out of tokens inside the JSON). Needs XLAB_GPU_TEST_INTERNLM2: a checkpoint from
    tools/make_random_internlm2.py (InternLM2's tool format)."""
    import json

    import openai

    reason = _gpu_ready()
    if reason or not os.environ.get("XLAB_GPU_TEST_INTERNLM2"):
        pytest.skip(reason or "set XLAB_GPU_TEST_INTERNLM2 to an InternLM2 checkpoint")
    from deploy.recipe import parse_recipe
    from deploy.serve.app import create_app
    from deploy.serve.assistant import Assistant
    from deploy.serve.run import ServerThread

    recipe = parse_recipe({
        "name": "gpu-tools", "model": {"source": "local", "path": os.environ["XLAB_GPU_TEST_INTERNLM2"],
                                       "trust_remote_code": True},
        "engine": {"backend": "lmdeploy-pytorch", "session_len": 2048, "max_batch_size": 8,
                   "cache_max_entry_count": 0.1}})
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}}
    with Assistant.from_recipe(recipe) as assistant, \
            ServerThread(create_app(assistant.config, assistant, ui=False)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=recipe.name, messages=[{"role": "user", "content": "Weather in Paris?"}],
            max_tokens=200, temperature=0, tools=[weather],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    if choice.finish_reason == "tool_calls":
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    else:  # out of tokens inside the call: what was written is its forced beginning
        assert choice.message.content.startswith('<|action_start|><|plugin|>{"name": "get_weather"')
