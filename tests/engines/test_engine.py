"""The transformers engine on the real bundled model (SmolLM2-135M-Instruct) on this CPU."""

from __future__ import annotations

import asyncio
import copy

import pytest

from deploy.engines import GenerationParams, PromptTooLongError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(coro):
    return asyncio.run(coro)


def test_greedy_answer_is_real_and_repeatable(assistant):
    params = GenerationParams(max_tokens=24)
    first = run(assistant.achat(QUESTION, params))
    second = run(assistant.achat(QUESTION, params))
    assert "Paris" in first.text
    assert first.text == second.text
    assert first.prompt_tokens > 5
    assert 0 < first.completion_tokens <= 24


def test_max_tokens_ends_with_length(assistant):
    answer = run(assistant.achat([{"role": "user", "content": "Write a long story about a cat."}],
                                GenerationParams(max_tokens=5)))
    assert answer.completion_tokens == 5
    assert answer.finish_reason == "length"


def test_stop_string_cuts_the_answer(assistant):
    messages = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    full = run(assistant.achat(messages, GenerationParams(max_tokens=40)))
    assert "3" in full.text
    cut = run(assistant.achat(messages, GenerationParams(max_tokens=40, stop=("3",))))
    assert cut.text == full.text[: full.text.index("3")]
    assert cut.finish_reason == "stop"


def test_sampling_with_seed_is_reproducible(assistant):
    params = GenerationParams(max_tokens=16, temperature=0.9, seed=7)
    assert run(assistant.achat(QUESTION, params)).text == run(assistant.achat(QUESTION, params)).text


def test_abandoned_stream_frees_the_engine(assistant):
    async def abandon_then_ask():
        stream = assistant.astream([{"role": "user", "content": "Tell me a long story."}],
                                  GenerationParams(max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()
        return await asyncio.wait_for(assistant.achat(QUESTION, GenerationParams(max_tokens=8)), 60)

    assert run(abandon_then_ask()).completion_tokens > 0


def test_prompt_longer_than_session_is_refused(assistant):
    long = [{"role": "user", "content": "word " * (assistant.engine.session_len + 10)}]
    with pytest.raises(PromptTooLongError, match="session_len"):
        run(assistant.achat(long, GenerationParams(max_tokens=4)))


def test_memory_reports_weights_and_kv_per_token(assistant):
    memory = assistant.engine.memory()
    # 135M parameters in bf16 is about 270 MB.
    assert 200e6 < memory.weight_bytes < 350e6
    # 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 2 bytes.
    assert memory.kv_bytes_per_token == 30 * 3 * 64 * 2 * 2


def test_system_prompt_from_recipe_is_applied(recipe, assistant):
    from deploy.serve.assistant import Assistant
    from deploy.serve.config import serve_config

    assert assistant.messages(QUESTION) == QUESTION  # the shipped recipe sets none
    briefed = recipe.model_copy(deep=True)
    briefed.model.system_prompt = "Be brief."
    brief = Assistant(serve_config(briefed), assistant.engine)
    assert brief.messages(QUESTION)[0] == {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "Mine."}, *QUESTION]
    assert brief.messages(own) == own


def test_a_pad_token_the_chat_template_emits_is_found(assistant):
    """LMDeploy's PyTorch engine zeroes the pad token's embedding on load (H100: chat prompts
    holding it agreed with transformers on 36% of next tokens). The bundled SmolLM2 tokenizer's
    ChatML template emits <|im_end|>, so a pad_token_id naming it is found, and one naming a
    token the template never emits, or none, is not."""
    from deploy.engines.chat_format import encode_chat, pad_token_in_prompts

    tokenizer = assistant.engine.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert pad_token_in_prompts({"pad_token_id": im_end}, tokenizer) == "<|im_end|>"
    assert pad_token_in_prompts({"pad_token_id": endoftext}, tokenizer) is None
    assert pad_token_in_prompts({}, tokenizer) is None
    strict = copy.deepcopy(tokenizer)  # a template that refuses the sample conversation
    strict.chat_template = "{{ raise_exception('only one turn, please') }}"
    with pytest.raises(Exception, match="only one turn"):
        encode_chat(strict, QUESTION)
    assert pad_token_in_prompts({"pad_token_id": im_end}, strict) is None
