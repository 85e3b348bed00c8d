"""Concurrent requests decode together in the transformers engine (deploy/engines/batcher.py), on
the real bundled model on this CPU.

These engines run in float32: batched and lone runs then give the same greedy tokens. In bf16 the
padded batch's matmuls round differently, and a near-tie can pick another word, as in any batching
engine; the batching logic is the same in both.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deploy.builder.manifest import built_model_dir
from deploy.engines import GenerationParams
from deploy.engines.transformers_engine import TransformersEngine

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
             "Write one sentence about the sea, please, in simple words."]


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def model_dir(recipe, assistant):  # the session's assistant has built the bundled model
    return built_model_dir(recipe)


@pytest.fixture(scope="module")
def engine(model_dir):
    loaded = TransformersEngine(model_dir, dtype="float32", max_batch_size=4)
    yield loaded
    loaded.close()


async def _together(engine, calls) -> tuple[list, int]:
    """Run the coroutines at once; also the most requests seen decoding in one batch."""
    most = 0
    done = asyncio.Event()

    async def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, engine.memory().settings["batched_now"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.gather(*calls), most
    finally:
        done.set()
        await watcher


def test_greedy_answers_in_a_batch_equal_answers_alone(engine):
    params = GenerationParams(max_tokens=24)
    alone = [asyncio.run(engine.chat(ask(q), params)) for q in QUESTIONS]
    together, most = asyncio.run(_together(engine, [engine.chat(ask(q), params) for q in QUESTIONS]))
    assert most >= 2, "the requests never decoded in one batch"
    assert [a.text for a in together] == [a.text for a in alone]
    assert [a.completion_tokens for a in together] == [a.completion_tokens for a in alone]
    assert "Paris" in together[0].text


def test_each_request_keeps_its_own_length_and_stop(engine):
    lone_stop = asyncio.run(engine.chat(ask(QUESTIONS[1]), GenerationParams(max_tokens=24)))
    stop = lone_stop.text.split()[2]  # a word the answer does contain
    calls = [engine.chat(ask(QUESTIONS[0]), GenerationParams(max_tokens=3)),
             engine.chat(ask(QUESTIONS[1]), GenerationParams(max_tokens=24, stop=(stop,))),
             engine.chat(ask(QUESTIONS[3]), GenerationParams(max_tokens=20))]
    (short, cut, long), most = asyncio.run(_together(engine, calls))
    assert most >= 2
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert cut.finish_reason == "stop" and cut.text == lone_stop.text[:lone_stop.text.index(stop)]
    assert long.completion_tokens == 20


def test_a_cancelled_row_leaves_the_others_untouched(engine):
    params = GenerationParams(max_tokens=24)
    alone = [asyncio.run(engine.chat(ask(q), params)).text for q in QUESTIONS[:3]]

    async def abandon():
        stream = engine.stream_chat(ask("Tell me a very long story about a dragon."),
                                    GenerationParams(max_tokens=200))
        pieces = 0
        async for _ in stream:
            pieces += 1
            if pieces == 3:
                break
        await stream.aclose()  # what the server does when the client goes
        return pieces

    async def run():
        return await _together(engine, [abandon(), *(engine.chat(ask(q), params)
                                                     for q in QUESTIONS[:3])])

    (pieces, *answers), most = asyncio.run(run())
    assert pieces == 3 and most >= 2
    assert [a.text for a in answers] == alone

    async def settled():  # the abandoned row is freed at the next step, not after 200 tokens
        for _ in range(200):
            if engine.memory().settings["batched_now"] == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(settled())


def test_seeded_sampling_reproduces_inside_a_batch(engine):
    seeded = GenerationParams(max_tokens=16, temperature=0.9, seed=7)
    alone = asyncio.run(engine.chat(ask(QUESTIONS[3]), seeded)).text
    others = [engine.chat(ask(q), GenerationParams(max_tokens=16, temperature=0.9))
              for q in QUESTIONS[:3]]
    (mine, *_), most = asyncio.run(_together(engine, [engine.chat(ask(QUESTIONS[3]), seeded),
                                                      *others]))
    assert most >= 2
    assert mine.text == alone  # the other rows' sampling does not touch this row's generator
    texts = {asyncio.run(engine.chat(ask(QUESTIONS[3]), GenerationParams(
        max_tokens=16, temperature=0.9, seed=s))).text for s in (1, 2, 3)}
    assert len(texts) > 1  # the seed matters


def test_max_batch_size_is_honoured(model_dir):
    small = TransformersEngine(model_dir, dtype="bfloat16", max_batch_size=2)
    try:
        seen_waiting = 0

        async def run():
            nonlocal seen_waiting
            calls = [small.chat(ask(q), GenerationParams(max_tokens=12)) for q in QUESTIONS]
            task = asyncio.ensure_future(_together(small, calls))
            while not task.done():
                seen_waiting = max(seen_waiting, small.memory().settings["waiting_now"])
                await asyncio.sleep(0.005)
            return await task

        answers, most = asyncio.run(run())
        assert most == 2 and seen_waiting >= 1
        assert all(a.completion_tokens > 0 for a in answers)
        memory = small.memory()
        assert memory.settings["max_batch_size"] == 2 and memory.settings["batched_now"] == 0
    finally:
        small.close()


def test_logits_run_between_decode_steps(engine):
    ids = engine.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]

    async def run():
        stream = engine.chat(ask(QUESTIONS[3]), GenerationParams(max_tokens=20))
        logits, answer = await asyncio.gather(engine.prompt_logits([ids]), stream)
        return logits[0], answer

    logits, answer = asyncio.run(run())
    assert answer.completion_tokens == 20
    with torch.inference_mode():  # the batcher is idle now: the model can be asked directly
        direct = engine.model(torch.tensor([ids])).logits[0].float()
    assert logits.shape == direct.shape
    assert torch.allclose(logits, direct, atol=1e-4)
