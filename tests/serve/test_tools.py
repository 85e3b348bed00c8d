"""Tool calling (deploy/serve/openai/tool_calls.py): InternLM2's tool format rendered into the prompt and read
back out of the answer, and the server's handling of `tools` and `tool_choice`.

On this CPU the model is a random-weight InternLM2 (tools/make_random_internlm2.py, tiny
shapes, the project's own transformers code) on the transformers engine, through the kit's real
server and the official openai client. Random weights never write a call, so what the model sees
is checked through the prompt's token count, and reading calls is checked on the text InternLM2
writes. Forced calls (tool_choice "required" or named) need guided decoding: LMDeploy on a GPU
(tests/engines/test_lmdeploy_gpu.py); here they are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from deploy.serve.openai import tool_calls as tools

ROOT = Path(__file__).resolve().parents[2]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_a_plan_checks_tools_and_choice():
    assert tools.plan(None, None, None) is None
    assert tools.plan([WEATHER], "none", None) is None
    auto = tools.plan([WEATHER, TIME], None, None)
    assert auto.choice == "auto" and [f["name"] for f in auto.allowed()] == ["get_weather", "get_time"]
    named = tools.plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False)
    assert [f["name"] for f in named.allowed()] == ["get_time"] and not named.parallel
    for tool_list, choice, param in [([WEATHER], "always", "tool_choice"), (None, "required", "tools"),
                                     ([WEATHER], {"type": "function", "function": {"name": "x"}},
                                      "tool_choice"),
                                     ([{"type": "function", "function": {}}], "auto", "tools")]:
        with pytest.raises(tools.ToolError) as raised:
            tools.plan(tool_list, choice, None)
        assert raised.value.param == param


def test_the_functions_go_in_a_plugin_message_after_the_system_prompt():
    plan = tools.plan([WEATHER], "auto", None)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    ]
    rendered = tools.render(history, plan)
    assert [m["role"] for m in rendered] == ["system", "system name=<|plugin|>", "user", "assistant",
                                            "environment name=<|plugin|>"]
    assert json.loads(rendered[1]["content"])[0]["name"] == "get_weather"
    assert rendered[3]["content"] == ('<|action_start|><|plugin|>\n{"name": "get_weather", '
                                      '"parameters": {"city": "Paris"}}<|action_end|>')
    assert tools.render([{"role": "user", "content": "hi"}], None) == [{"role": "user", "content": "hi"}]


def test_calls_are_read_out_of_what_internlm2_writes():
    text = ('Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|action_end|>')
    content, calls = tools.parse(text)
    assert content == "Let me check."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")
    two = tools.parse('<|action_start|><|plugin|>{"name": "a", "parameters": {}}<|action_end|>\n'
                      '<|action_start|><|plugin|>{"name": "b", "parameters": {"x": 1}}')  # cut short
    assert [c["function"]["name"] for c in two[1]] == ["a", "b"] and two[0] == ""
    broken = '<|action_start|><|plugin|>{"name": "a", "param'
    assert tools.parse(broken) == (broken, [])  # what the model wrote, not a call
    assert tools.parse("Just text.") == ("Just text.", [])


def test_a_forced_call_is_a_structural_tag_of_the_allowed_functions():
    assert tools.guided(tools.plan([WEATHER], "auto", None)) is None
    tag = tools.guided(tools.plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}},
                                  False))
    calls = tag["format"]["elements"][0]
    assert tag["type"] == "structural_tag" and calls["type"] == "tags_with_separator"
    assert calls["at_least_one"] and calls["stop_after_first"]
    [only] = calls["tags"]
    assert only["begin"] == '<|action_start|><|plugin|>{"name": "get_weather", "parameters": '
    assert only["content"] == {"type": "json_schema", "json_schema": WEATHER["function"]["parameters"]}
    assert only["end"] == "}<|action_end|>"
    # What the tag admits is what parse reads back.
    written = only["begin"] + '{"city": "Oslo"}' + only["end"]
    assert tools.parse(written)[1][0]["function"]["arguments"] == '{"city": "Oslo"}'


@pytest.fixture(scope="module")
def internlm2_server(tiny_internlm2, serve_with):
    from deploy.recipe import parse_recipe
    from deploy.serve.assistant import Assistant

    model = tiny_internlm2
    recipe = parse_recipe({"name": "internlm2-tiny", "model": {"source": "local", "path": str(model),
                                                               "trust_remote_code": True},
                           "engine": {"backend": "transformers", "dtype": "float32", "session_len": 1024}})
    with Assistant.from_recipe(recipe) as assistant, serve_with(assistant) as live:
        live.assistant, live.recipe = assistant, recipe
        yield live


def _client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_the_model_sees_the_tools_and_earlier_calls(internlm2_server):
    live = internlm2_server
    client, engine = _client(live), live.assistant.engine
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model=live.recipe.name, messages=ask, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(model=live.recipe.name, messages=ask, max_tokens=4,
                                                temperature=0, tools=[WEATHER])
    expected = engine.count_tokens(tools.render(ask, tools.plan([WEATHER], "auto", None)))
    assert with_tools.usage.prompt_tokens == expected > plain.usage.prompt_tokens
    assert with_tools.choices[0].message.tool_calls is None  # random weights write no call
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model=live.recipe.name, messages=history, max_tokens=4,
                                            temperature=0, tools=[WEATHER])
    assert answer.usage.prompt_tokens == engine.count_tokens(
        tools.render(history, tools.plan([WEATHER], "auto", None)))


def test_a_streamed_tools_answer_equals_the_whole_one(internlm2_server):
    live = internlm2_server
    client = _client(live)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    whole = client.chat.completions.create(model=live.recipe.name, messages=ask, max_tokens=6,
                                           temperature=0, tools=[WEATHER])
    chunks = list(client.chat.completions.create(model=live.recipe.name, messages=ask, max_tokens=6,
                                                 temperature=0, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_log_probabilities_come_with_a_tools_answer(internlm2_server):
    live = internlm2_server
    answer = _client(live).chat.completions.create(
        model=live.recipe.name, messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=5, temperature=0, tools=[WEATHER], logprobs=True, top_logprobs=2)
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens > 0


def test_forced_calls_need_guided_decoding(internlm2_server):
    live = internlm2_server
    client = _client(live)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=live.recipe.name, max_tokens=4, tools=[WEATHER],
                                       messages=[{"role": "user", "content": "hi"}], tool_choice="required")
    assert raised.value.body["param"] == "tool_choice"
    assert "transformers engine" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=live.recipe.name, max_tokens=4, tools=[WEATHER],
                                       messages=[{"role": "user", "content": "hi"}],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    body = raised.value.body
    assert body["param"] == "tool_choice" and "not among the tools" in body["message"]


def test_a_model_of_unknown_tool_format_refuses_tools(api_server, recipe):
    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=recipe.name, max_tokens=4, tools=[WEATHER],
                                       messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["param"] == "tools" and "internlm2" in raised.value.body["message"]
    assert "Remove `tools`" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:  # earlier calls need the format too
        client.chat.completions.create(model=recipe.name, max_tokens=4, messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "1"}])
    assert raised.value.body["param"] == "messages"


def test_without_parallel_calls_only_the_first_is_kept():
    import asyncio

    from deploy.engines import Delta

    text = ('<|action_start|><|plugin|>{"name": "a", "parameters": {}}<|action_end|>'
            '<|action_start|><|plugin|>{"name": "b", "parameters": {}}<|action_end|>')

    async def answer(parallel):
        async def stream():
            yield Delta(text[:30])
            yield Delta(text[30:], "stop", 5, 9)

        return [d async for d in tools.with_calls(stream(), parallel)]

    [both] = asyncio.run(answer(True))
    [first] = asyncio.run(answer(False))
    assert [c["function"]["name"] for c in both.tool_calls] == ["a", "b"]
    assert [c["function"]["name"] for c in first.tool_calls] == ["a"]
    assert (first.finish_reason, first.prompt_tokens, first.completion_tokens, first.text) == (
        "tool_calls", 5, 9, "")


def test_calls_are_framed_as_the_openai_client_reads_them():
    """A whole answer with calls, as a body and as SSE chunks, read back with the official
    openai client's own types."""
    import asyncio

    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from deploy.engines import Delta
    from deploy.serve.openai.protocol import ChatFormat
    from deploy.serve.openai.streaming import sse as _sse

    text = ('Checking.<|action_start|><|plugin|>{"name": "get_weather", "parameters": '
            '{"city": "Oslo"}}<|action_end|>')

    def answer():
        async def stream():
            yield Delta(text, "stop", 7, 11)

        return tools.with_calls(stream())

    form = ChatFormat("m", str)
    [whole] = asyncio.run(_collect(answer()))
    body = ChatCompletion.model_validate(form.body(whole))
    message = body.choices[0].message
    assert (message.content, body.choices[0].finish_reason) == ("Checking.", "tool_calls")
    assert message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Oslo"}

    events = asyncio.run(_collect(_sse(answer(), form, include_usage=False)))
    chunks = [ChatCompletionChunk.model_validate_json(e[len("data: "):]) for e in events
              if e.startswith("data: {")]
    streamed = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name) for c in streamed] == [(0, "get_weather")]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Checking."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_a_function_may_be_named_like_a_choice():
    called_auto = {"type": "function", "function": {"name": "auto", "parameters": {"type": "object"}}}
    forced = tools.plan([WEATHER, called_auto], {"type": "function", "function": {"name": "auto"}}, None)
    assert forced.choice == "function" and [f["name"] for f in forced.allowed()] == ["auto"]
    assert tools.guided(forced) is not None  # forced, not left to the model
