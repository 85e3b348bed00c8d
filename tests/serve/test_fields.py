"""Every chat-completions field is served or refused by name, never ignored: penalties on the
transformers engine change the answer; fields it does not implement get a 400 naming them.
Log probabilities are tested in test_completions.py."""

from __future__ import annotations

import openai
import pytest
import torch

from deploy.engines.batcher import penalized
from deploy.engines.requests import Request

REPEAT = [{"role": "user", "content": "Write the word 'cat' twenty times, separated by spaces."}]


def test_penalties_follow_openai_and_hf_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    row = Request(prompt=[2], max_new=8, sink=print, presence_penalty=0.5, frequency_penalty=0.25,
                  counts={0: 2, 1: 1})
    out = penalized(logits, row)
    assert out.tolist() == pytest.approx([2.0 - 0.5 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 3.0])
    rep = Request(prompt=[2], max_new=8, sink=print, repetition_penalty=2.0, counts={1: 1})
    # seen: 2 (prompt) and 1 (generated); positive logits divided, negative multiplied
    assert penalized(logits, rep).tolist() == pytest.approx([2.0, -2.0, 0.25, 3.0])
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the batch's tensor is not changed


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


def answer(client, recipe, **extra) -> str:
    return client.chat.completions.create(model=recipe.name, messages=REPEAT, max_tokens=40,
                                          temperature=0, **extra).choices[0].message.content


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty", "repetition_penalty"])
def test_penalties_change_a_repetitive_answer(client, recipe, field):
    plain = answer(client, recipe)
    assert plain.lower().count("cat") >= 5  # the model does repeat without a penalty
    extra = {"extra_body": {field: 1.8}} if field == "repetition_penalty" else {field: 1.8}
    penalized_text = answer(client, recipe, **extra)
    assert penalized_text != plain
    if field != "presence_penalty":  # presence penalizes a token once: here "cat" became "Cat"
        assert penalized_text.lower().count("cat") < plain.lower().count("cat")


def test_neutral_values_of_optional_fields_are_accepted(client, recipe):
    plain = answer(client, recipe)
    same = answer(client, recipe, logprobs=False, presence_penalty=0, frequency_penalty=0,
                  response_format={"type": "text"}, tool_choice="none", user="someone")
    assert same == plain


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
])
def test_fields_the_engine_lacks_are_refused_by_name(client, recipe, assistant, extra, field):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=recipe.name, messages=REPEAT, max_tokens=4, **extra)
    error = raised.value.body
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert f"{assistant.engine.name} engine" in error["message"]


def test_top_logprobs_alone_is_refused(client, recipe):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=recipe.name, messages=REPEAT, max_tokens=4,
                                       top_logprobs=3)


def test_a_misspelt_field_is_still_refused(client, recipe):
    with pytest.raises(openai.BadRequestError, match="max_token"):
        client.chat.completions.create(model=recipe.name, messages=REPEAT,
                                       extra_body={"max_token": 4})
