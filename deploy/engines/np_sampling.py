"""Choosing a request's next token from a row of logits in numpy, for the llama.cpp engine (which
hands logits out as float32 arrays and needs no torch). The same rules as the transformers batcher:
log probabilities are the model's own (before penalties and temperature); penalties follow OpenAI
(presence, frequency) and Hugging Face (repetition); greedy is a plain argmax."""

from __future__ import annotations

import secrets

import numpy as np

from deploy.engines.base import TokenLogprob
from deploy.engines.requests import Request


def generator_for(request: Request) -> np.random.Generator | None:
    if request.temperature <= 0:
        return None
    return np.random.default_rng(request.seed if request.seed is not None else secrets.randbits(63))


def pick(logits: np.ndarray, request: Request) -> tuple[int, TokenLogprob | None]:
    """The next token for `request` from its float32 `logits` row, and its TokenLogprob where the
    request asked for log probabilities."""
    score = None
    if request.logprobs is not None:
        logp = log_softmax(logits)
        k = request.logprobs
        top = np.argsort(-logp)[:k] if k else np.array([], dtype=np.int64)
        score = (logp, tuple((int(i), float(logp[i])) for i in top))
    if request.presence_penalty or request.frequency_penalty or request.repetition_penalty != 1.0:
        logits = penalized(logits, request)
    if request.temperature > 0:
        token = _sample(logits, request.temperature, request.top_p, request.generator)
    else:
        token = int(np.argmax(logits))
    if score is None:
        return token, None
    logp, top = score
    return token, TokenLogprob(token, float(logp[token]), top)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def penalized(logits: np.ndarray, request: Request) -> np.ndarray:
    logits = logits.astype(np.float32, copy=True)
    if request.counts and (request.presence_penalty or request.frequency_penalty):
        ids = np.fromiter(request.counts, dtype=np.int64)
        times = np.fromiter(request.counts.values(), dtype=np.float32)
        logits[ids] -= request.frequency_penalty * times + request.presence_penalty
    if request.repetition_penalty != 1.0:
        seen = np.array(sorted(set(request.prompt) | set(request.counts)), dtype=np.int64)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / request.repetition_penalty,
                                values * request.repetition_penalty)
    return logits


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    probs = np.exp(log_softmax(logits / temperature))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        order = np.argsort(-probs)
        ordered = probs[order]
        outside = np.cumsum(ordered) - ordered > top_p
        probs[order[outside]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))
