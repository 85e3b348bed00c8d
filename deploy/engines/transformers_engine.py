"""Hugging Face transformers engine: the baseline, and the fallback where there is no GPU.

Concurrent requests decode together (batcher.py: a request joins the running batch at the next
step), up to `max_batch_size`. Each request streams its own tokens through its own asyncio queue,
with its own stop strings, length and sampling settings; closing the stream frees its row at the
next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from deploy.engines.base import (
    HQQ_MARKER,
    Delta,
    Engine,
    EngineActivity,
    EngineMemory,
    GenerationParams,
)
from deploy.engines.batcher import Batcher, can_batch
from deploy.engines.chat_format import eos_ids, load_tokenizer
from deploy.engines.fp8_format import is_fp8_folder, load_dequantized
from deploy.engines.hardware import cpu_threads
from deploy.engines.sizing import kv_bytes_per_token
from deploy.engines.token_stream import stream_answer

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TransformersEngine(Engine):
    name = "transformers"
    # tools: rendered and read back by the server (serve/openai/tool_calls.py); a required or named
    # tool_choice needs guided decoding, which this engine lacks.
    supports = frozenset({"presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                          "tools"})

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        session_len: int = 4096,
        max_batch_size: int = 8,
        chat_template: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = self.threads_from = None
        if self.device == "cpu":
            # torch starts with a thread per physical core in its affinity, blind to a container's
            # CPU quota: lowered to the quota, or set to engine.threads, never raised past it.
            wanted, why = cpu_threads(threads)
            if threads is not None or wanted < torch.get_num_threads():
                torch.set_num_threads(wanted)
            else:
                why = "torch's default: the physical cores in this process's CPU affinity"
            self.threads, self.threads_from = torch.get_num_threads(), why
        # bf16 decodes about 2x faster than fp32 on the CPUs measured here; fp16 is the GPU norm.
        self.dtype = DTYPES[dtype] if dtype != "auto" else (
            torch.float16 if self.device.startswith("cuda") else torch.bfloat16
        )
        self.tokenizer = load_tokenizer(model_dir, chat_template, trust_remote_code)
        self.hqq = (Path(model_dir) / HQQ_MARKER).is_file()
        self.fp8 = is_fp8_folder(model_dir)
        if self.fp8:  # blocked FP8 (builder/fp8.py), multiplied back: FP8's rounding, any device
            self.model = load_dequantized(model_dir, self.dtype, trust_remote_code).to(self.device)
        elif self.hqq:  # 4-bit weights made by the builder (deploy/builder/quantize.py)
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
        self.max_batch_size = max_batch_size
        if max_batch_size > 1 and not can_batch(self.model):
            log.warning("%s keeps a KV cache the batcher cannot pad; requests run one at a time.",
                        type(self.model).__name__)
            self.max_batch_size = 1
        self._batcher = Batcher(self.model, max_batch_size=self.max_batch_size,
                                eos=set(eos_ids(model_dir, self.tokenizer)), device=self.device)

    # -- the Engine interface ---------------------------------------------------------------

    def stream_tokens(self, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        return stream_answer(self._batcher, self.tokenizer, prompt, params, self.session_len)

    async def activity(self) -> EngineActivity:
        return EngineActivity(self._batcher.active, self._batcher.waiting)

    async def prompt_logits(self, token_ids: list[list[int]]) -> list:
        return [await asyncio.wrap_future(self._batcher.call(lambda ids=ids: self._logits(ids)))
                for ids in token_ids]

    def _logits(self, ids: list[int]):
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
                "so there is no fixed KV capacity; up to max_batch_size requests decode together, "
                "the others wait."
            ],
            settings={"max_batch_size": self.max_batch_size, "batched_now": self._batcher.active,
                      "waiting_now": self._batcher.waiting,
                      "shared_prefix_tokens": self._batcher.shared_prefix_tokens,
                      "threads": self.threads, "threads_from": self.threads_from},
        )

    def close(self) -> None:
        self._batcher.close()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)
