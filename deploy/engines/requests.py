"""One answer being generated, as the engines' model threads see it (the transformers batcher and
the llama.cpp one). Kept apart from both so that neither engine imports the other's runtime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

END = object()  # handed to a request's sink after its last token


@dataclass(eq=False)
class Request:
    """`sink` receives, from the model thread, a list of new token ids (each preceded by its
    TokenLogprob where `logprobs` is set), an exception, or END; it must be thread-safe and must
    not block."""

    prompt: list[int]
    max_new: int
    sink: Callable[[object], None]
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k: the token's and the k likeliest others'
    cancelled: threading.Event = field(default_factory=threading.Event)
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times
    generated: int = 0
    length: int = 0  # tokens of this row in the KV cache (padding excluded)
    last: int = 0  # the token the next step feeds
    generator: object = None  # the engine's random generator, for sampled requests
