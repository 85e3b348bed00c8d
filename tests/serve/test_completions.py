"""Log probabilities on the transformers engine, and the legacy /v1/completions API, through the
official `openai` client against the real bundled model."""

from __future__ import annotations

import openai
import pytest
import torch

from deploy.engines.base import joined

ASK = [{"role": "user", "content": "Name three colours of the rainbow."}]
TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_logprobs_are_the_models_own(client, recipe, assistant, api_server):
    done = client.chat.completions.create(model=recipe.name, messages=ASK, max_tokens=10,
                                          temperature=0, logprobs=True, top_logprobs=3)
    choice = done.choices[0]
    content = choice.logprobs.content
    assert len(content) == done.usage.completion_tokens == 10
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        values = [alt.logprob for alt in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy decoding picked the likeliest token, so it heads its own top list.
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token
    # The token ids behind the texts, from the engine itself, and the same log probabilities from
    # a plain forward pass over the prompt and the answer.
    engine = assistant.engine
    prompt = engine.encode(assistant.messages(ASK))
    direct = api_server.call(joined(engine.stream_tokens(prompt, assistant.params(
        max_tokens=10, temperature=0, logprobs=0))))
    ids = [s.token for s in direct.logprobs]
    assert [assistant.token_text(i) for i in ids] == [t.token for t in content]
    logits = api_server.call(engine.prompt_logits([prompt + ids]))[0]
    expected = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)
    gaps = [abs(t.logprob - float(expected[position, token]))
            for position, (token, t) in enumerate(zip(ids, content, strict=True))]
    # bf16 on a CPU: a decode step over the KV cache and a whole-sequence pass round differently
    # (up to 0.16 nats seen), so the match is close on average rather than exact.
    assert sum(gaps) / len(gaps) < 0.1 and max(gaps) < 0.4, gaps


def test_streamed_logprobs_match_the_whole_answer(client, recipe):
    whole = client.chat.completions.create(model=recipe.name, messages=ASK, max_tokens=8,
                                           temperature=0, logprobs=True)
    tokens, text = [], ""
    for chunk in client.chat.completions.create(model=recipe.name, messages=ASK, max_tokens=8,
                                                temperature=0, logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            tokens += [t.token for t in chunk.choices[0].logprobs.content]
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert tokens == [t.token for t in whole.choices[0].logprobs.content]
    assert text == whole.choices[0].message.content
    assert whole.choices[0].logprobs.content[0].top_logprobs == []


def test_completions_continue_raw_text(client, recipe, assistant):
    done = client.completions.create(model=recipe.name, prompt=TEXT, max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    choice = done.choices[0]
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    # No chat template and no system prompt: the prompt is the text's own tokens.
    assert done.usage.prompt_tokens == len(assistant.engine.tokenizer(TEXT)["input_ids"])
    assert done.usage.prompt_tokens < len(assistant.engine.encode(assistant.messages(
        [{"role": "user", "content": TEXT}])))
    assert "Paris" in choice.text  # the bundled model knows this one
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=recipe.name, prompt=[TEXT], max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text


def test_completions_echo_and_legacy_logprobs(client, recipe):
    echoed = client.completions.create(model=recipe.name, prompt=TEXT, max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text.startswith(TEXT) and len(echoed.choices[0].text) > len(TEXT)
    scored = client.completions.create(model=recipe.name, prompt=TEXT, max_tokens=5, temperature=0,
                                       logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == scored.choices[0].text
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and top[token] == pytest.approx(value)  # greedy: the top one


@pytest.mark.parametrize("extra, words", [
    ({"prompt": ["one", "two"]}, "give one prompt"),
    ({"prompt": TEXT, "echo": True, "logprobs": 1}, "echo with logprobs"),
    ({"prompt": TEXT, "suffix": "end"}, "suffix"),
    ({"prompt": TEXT, "best_of": 2}, "best_of"),
    ({"prompt": TEXT, "max_token": 3}, "max_token"),
])
def test_completions_refuse_what_they_do_not_serve(client, recipe, extra, words):
    with pytest.raises(openai.BadRequestError, match=words):
        client.completions.create(model=recipe.name, extra_body=extra,
                                  **{"prompt": extra.pop("prompt")} if "prompt" in extra else {})


def test_completions_of_another_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=TEXT, max_tokens=2)


def test_legacy_stream_chunks_are_text_completion_objects(api_server, recipe):
    import json

    import httpx

    body = {"model": recipe.name, "prompt": TEXT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/completions", json=body, timeout=60) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
