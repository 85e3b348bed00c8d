"""The server over real HTTP on loopback, driven by the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_recipe(client, recipe):
    assert [m.id for m in client.models.list()] == [recipe.name]


def test_chat_completion(client, recipe):
    reply = client.chat.completions.create(model=recipe.name, messages=QUESTION, max_tokens=24,
                                           temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_matches_non_streaming(client, recipe):
    whole = client.chat.completions.create(model=recipe.name, messages=QUESTION, max_tokens=24,
                                           temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=recipe.name, messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_health_and_memory_schema(api_server):
    assert httpx.get(api_server.url + "/health").json()["status"] == "ok"
    memory = httpx.get(api_server.url + "/memory").json()
    assert memory["gpus"] == [] and "NVML" in memory["gpu_reason"]  # this CPU has no GPU
    assert memory["process"]["rss_bytes"] > memory["engine"]["weight_bytes"] > 100e6
    assert memory["engine"]["backend"] == "llamacpp"  # the default recipe's engine
    assert memory["engine"]["kv_bytes_per_token"] > 0
    assert memory["settings"]["engine"]["session_len"] == 4096
    assert memory["engine"]["settings"]["threads"] >= 1 and memory["engine"]["settings"]["threads_from"]
    assert memory["settings"]["quantization"] == {"weights": "none", "kv_cache": "none"}
    # The RAM planner's prediction sits beside the measurement: the weights are the GGUF file's size,
    # llama.cpp's tensors and the file's metadata (within 1%); the resident set is compared in a
    # server process of its own (tests/capacity/test_ram_planner.py), not in this test process.
    prediction = memory["prediction"]
    assert prediction["device"] == "cpu" and prediction["fits"]
    weights = prediction["weight_bytes"]
    assert abs(weights - memory["engine"]["weight_bytes"]) / weights < 0.01
    assert prediction["kv_bytes_per_token"] == memory["engine"]["kv_bytes_per_token"]
    assert prediction["kv_cache_bytes"] == memory["engine"]["kv_cache_bytes"]
    assert prediction["rss_bytes"] > prediction["weight_bytes"] + prediction["kv_cache_bytes"]


@pytest.mark.parametrize("body,param", [
    (b'{"model": "smollm2-cpu", "messages": [', None),
    (b'{"model": "smollm2-cpu"}', "messages"),
    (b'{"model": "smollm2-cpu", "messages": []}', "messages"),
    (b'{"model": "smollm2-cpu", "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}',
     "max_tokens"),
    (b'{"model": "smollm2-cpu", "max_token": 5, "messages": [{"role": "user", "content": "hi"}]}',
     "max_token"),
])
def test_bad_requests_get_openai_errors(api_server, body, param):
    r = httpx.post(api_server.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert httpx.get(api_server.url + "/health").json()["status"] == "ok"  # still serving


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"


def test_negative_max_tokens_through_client(client, recipe):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=recipe.name, messages=QUESTION, max_tokens=-3)
    assert client.chat.completions.create(model=recipe.name, messages=QUESTION, max_tokens=2)


def test_prompt_over_session_len_names_the_limit(client, recipe):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=recipe.name, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=2)
    assert "session_len is 4096" in err.value.body["message"]


def test_api_key_guards_v1_and_memory(serve_with, recipe, monkeypatch):
    monkeypatch.setenv("TEST_XLAB_KEY", "s3cret-value")
    with serve_with(api_key_env="TEST_XLAB_KEY") as live:
        assert httpx.get(live.url + "/memory").status_code == 401
        assert httpx.get(live.url + "/health").status_code == 200
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret-value", max_retries=0)
        assert good.chat.completions.create(model=recipe.name, messages=QUESTION, max_tokens=3)
