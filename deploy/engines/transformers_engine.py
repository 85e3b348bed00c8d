"""Hugging Face transformers engine: the baseline, and the fallback where there is no GPU.

`generate` runs one request at a time on a single worker thread (a queue): on a small CPU box
that is faster than interleaving, and it keeps streams from mixing. Each request streams its own
tokens through its own asyncio queue; closing the stream stops generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from deploy.engines.base import (
    HQQ_MARKER,
    Delta,
    Engine,
    EngineMemory,
    GenerationParams,
    Message,
    PromptTooLongError,
    StopMatcher,
)
from deploy.engines.chat_format import encode_chat, eos_ids, load_tokenizer
from deploy.engines.sizing import kv_bytes_per_token

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_END = object()


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        session_len: int = 4096,
        chat_template: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 decodes about 2x faster than fp32 on the CPUs measured here; fp16 is the GPU norm.
        self.dtype = DTYPES[dtype] if dtype != "auto" else (
            torch.float16 if self.device.startswith("cuda") else torch.bfloat16
        )
        self.tokenizer = load_tokenizer(model_dir, chat_template, trust_remote_code)
        self.hqq = (Path(model_dir) / HQQ_MARKER).is_file()
        if self.hqq:  # 4-bit weights made by the builder (deploy/build/quantize.py)
            from hqq.models.hf.base import AutoHQQHFModel

            self.model = AutoHQQHFModel.from_quantized(str(model_dir), device=self.device,
                                                       compute_dtype=self.dtype)
            self._weight_file = Path(model_dir) / HQQ_MARKER
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype,
                                                              trust_remote_code=trust_remote_code)
            self.model.to(self.device)
        self.model.eval()
        self.session_len = min(session_len, _max_positions(self.model.config) or session_len)
        self.model_config = self.model.config.to_dict()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._eos = set(eos_ids(model_dir, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos, default=0)

    # -- the Engine interface ---------------------------------------------------------------

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self._encode(messages))

    async def stream_chat(
        self, messages: list[Message], params: GenerationParams
    ) -> AsyncIterator[Delta]:
        prompt = self._encode(messages)
        room = self.session_len - len(prompt)
        if room <= 0:
            raise PromptTooLongError(len(prompt), self.session_len)
        max_new = min(params.max_tokens, room)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        streamer = _QueueStreamer(loop, queue)
        job = loop.run_in_executor(
            self._worker, self._generate, prompt, params, max_new, streamer, cancel
        )
        decoder = _IncrementalDecoder(self.tokenizer)
        stops = StopMatcher(params.stop)
        generated = 0
        hit_eos = False
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                generated += len(item)
                hit_eos = hit_eos or any(t in self._eos for t in item)
                text = stops.feed(decoder.add(item))
                if text:
                    yield Delta(text)
                if stops.stopped:
                    break
            tail = stops.feed(decoder.flush()) + stops.flush()
            finish = "stop" if hit_eos or stops.stopped or generated < max_new else "length"
            yield Delta(tail, finish, len(prompt), generated)
        finally:
            cancel.set()  # stops generate at its next token if the client went away
            await asyncio.shield(job)

    async def prompt_logits(self, token_ids: list[list[int]]) -> list:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self._worker, self._logits, ids) for ids in token_ids]

    def _logits(self, ids: list[int]):
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    def memory(self) -> EngineMemory:
        if self.hqq:  # hqq keeps packed weights and their scales outside parameters and buffers
            weights = self._weight_file.stat().st_size
        else:
            weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
            weights += sum(t.numel() * t.element_size() for t in self.model.buffers())
        return EngineMemory(
            device=self.device,
            weight_bytes=weights,
            kv_bytes_per_token=kv_bytes_per_token(self.model.config, "none", self.dtype.itemsize),
            notes=[
                "transformers grows the KV cache per request instead of pre-allocating it, "
                "so there is no fixed KV capacity; requests run one at a time."
            ],
        )

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, messages: list[Message]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def _generate(self, prompt, params, max_new, streamer, cancel) -> None:
        try:
            if cancel.is_set():  # the client left while the request was queued
                return
            ids = torch.tensor([prompt], device=self.device)
            sampling = (
                {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
                if params.temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            )
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    streamer=streamer,
                    stopping_criteria=[_Cancelled(cancel)],
                    pad_token_id=self._pad_id,
                    **sampling,
                )
        except BaseException as exc:  # surfaced to the awaiting request, not lost in a thread
            streamer.fail(exc)
        finally:
            streamer.end()


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)  # generate combines it with GPU tensors


class _QueueStreamer(BaseStreamer):
    """Hands each new token from the generate thread to the request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self.prompt_seen = False
        self.ended = False

    def _send(self, item) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first echoes the prompt
            self.prompt_seen = True
            return
        self._send(value.reshape(-1).tolist())

    def fail(self, exc: BaseException) -> None:
        self._send(exc)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._send(_END)


class _IncrementalDecoder:
    """Token ids in, new text out; holds back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        # A character still incomplete when generation ends can never be completed: drop it.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        new, self.emitted = text[self.emitted:], len(text)
        return new
