"""From a model thread's tokens to a client's stream of Deltas, for the engines that run their own
model thread (transformers' batcher, llama.cpp's): the request is queued, its tokens arrive through
a thread-safe sink, and this turns them into text with stop strings, finish reason and counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from deploy.engines.base import Delta, GenerationParams, PromptTooLongError, StopMatcher, TokenLogprob
from deploy.engines.detokenize import incremental_decoder
from deploy.engines.requests import END, Request


class ModelThread(Protocol):
    eos: set[int]

    def submit(self, request: Request) -> None: ...

    def cancel(self, request: Request) -> None: ...


def request_for(prompt: list[int], max_new: int, sink, params: GenerationParams) -> Request:
    return Request(prompt=prompt, max_new=max_new, sink=sink, temperature=params.temperature,
                   top_p=params.top_p, seed=params.seed, presence_penalty=params.presence_penalty,
                   frequency_penalty=params.frequency_penalty,
                   repetition_penalty=params.repetition_penalty, logprobs=params.logprobs)


async def stream_answer(thread: ModelThread, tokenizer, prompt: list[int], params: GenerationParams,
                        session_len: int) -> AsyncIterator[Delta]:
    """Queue `prompt` on `thread` and stream its answer; closing the stream cancels the request."""
    room = session_len - len(prompt)
    if room <= 0:
        raise PromptTooLongError(len(prompt), session_len)
    max_new = min(params.max_tokens, room)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(item) -> None:  # called on the model thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, item)

    request = request_for(prompt, max_new, sink, params)
    thread.submit(request)
    decoder = incremental_decoder(tokenizer, not params.keep_special_tokens)
    stops = StopMatcher(params.stop)
    generated = 0
    hit_eos = False
    try:
        ended = False
        while not ended:
            tokens, scores, ended = await _next_tokens(queue, params.logprobs is not None)
            generated += len(tokens)
            hit_eos = hit_eos or any(t in thread.eos for t in tokens)
            # Special tokens kept (tool marks) must not include the end-of-answer token.
            text = stops.feed(decoder.add([t for t in tokens if t not in thread.eos]
                                          if params.keep_special_tokens else tokens))
            if text or scores:
                yield Delta(text, logprobs=scores)
            if stops.stopped:
                break
        tail = stops.feed(decoder.flush()) + stops.flush()
        finish = "stop" if hit_eos or stops.stopped or generated < max_new else "length"
        yield Delta(tail, finish, len(prompt), generated,
                    [] if params.logprobs is not None else None)
    finally:
        thread.cancel(request)  # frees the row at the next step if the client went away


async def _next_tokens(queue: asyncio.Queue, scored: bool):
    """Every token already waiting, at least one item: a client that reads slower than the model
    decodes gets them in one piece, and the event loop does less per token."""
    tokens: list[int] = []
    scores: list[TokenLogprob] | None = [] if scored else None
    item = await queue.get()
    while True:
        if isinstance(item, BaseException):
            raise item
        if item is END:
            return tokens, scores, True
        if isinstance(item, TokenLogprob):
            scores.append(item)
        else:
            tokens.extend(item)
        if queue.empty():
            return tokens, scores, False
        item = queue.get_nowait()
