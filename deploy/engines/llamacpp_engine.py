"""llama.cpp engine: the CPU path's runtime, serving a GGUF file natively.

On this project's 2-core AVX2 machine it decoded the bundled SmolLM2 GGUF at about 10x the
transformers engine's speed, one stream and eight (docs/cpu-runtimes.md). The model thread is in
llamacpp_batcher.py; prompts are rendered by the kit (chat_format.py) and handed over as token ids,
so every engine sees the same prompt. The Hugging Face tokenizer beside the GGUF and the GGUF's
own vocabulary are the same one; the engine checks their sizes agree. A folder with a
tokenizer.json is read without transformers (lean_tokenizer.py), so a llama.cpp image needs none.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from deploy.engines.base import Delta, Engine, EngineActivity, EngineMemory, GenerationParams
from deploy.engines.chat_format import eos_ids, load_tokenizer
from deploy.engines.hardware import cpu_threads
from deploy.engines.sizing import kv_bytes_per_token, llamacpp_kv_cells
from deploy.engines.token_stream import stream_answer


def find_gguf(model_dir: Path) -> Path:
    """The one GGUF file in `model_dir`; an error that says what to do where there is none."""
    files = sorted(Path(model_dir).glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise ValueError(
            f"engine.backend 'llamacpp' serves a GGUF file and {model_dir} holds none. Use the "
            "bundled model (model.source: bundled), put one .gguf file in the folder, or set "
            "engine.backend: transformers.")
    raise ValueError(f"{model_dir} holds {len(files)} GGUF files ({', '.join(f.name for f in files)});"
                     " keep one.")


def _tokenizer(model_dir: Path, chat_template: str | None, trust_remote_code: bool):
    """The lean tokenizer where the folder has a fast tokenizer's file; transformers otherwise (a
    model whose tokenizer is its own code, say)."""
    if (Path(model_dir) / "tokenizer.json").is_file() and not trust_remote_code:
        from deploy.engines.lean_tokenizer import LeanTokenizer

        return LeanTokenizer(model_dir, chat_template)
    return load_tokenizer(model_dir, chat_template, trust_remote_code)


class LlamaCppEngine(Engine):
    name = "llamacpp"
    # tools: rendered and read back by the server; a required tool_choice needs guided decoding.
    supports = frozenset({"presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                          "tools"})

    def __init__(self, model_dir: Path, *, session_len: int = 4096, max_batch_size: int = 8,
                 threads: int | None = None, chat_template: str | None = None,
                 trust_remote_code: bool = False):
        from deploy.engines.llamacpp_batcher import LlamaBatcher

        self.gguf = find_gguf(model_dir)
        self.tokenizer = _tokenizer(model_dir, chat_template, trust_remote_code)
        config = Path(model_dir) / "config.json"
        self.model_config = json.loads(config.read_text()) if config.is_file() else {}
        trained = self.model_config.get("max_position_embeddings")
        self.session_len = min(session_len, trained or session_len)
        self.max_batch_size = max_batch_size
        self.threads, self.threads_from = cpu_threads(threads)
        self._batcher = LlamaBatcher(self.gguf, session_len=self.session_len,
                                     max_batch_size=max_batch_size, threads=self.threads,
                                     eos=set(eos_ids(model_dir, self.tokenizer)))
        if self._batcher.vocab < len(self.tokenizer):
            self.close()
            raise ValueError(f"{self.gguf.name} has {self._batcher.vocab} tokens but the tokenizer "
                             f"in {model_dir} has {len(self.tokenizer)}: they are not one model.")

    def stream_tokens(self, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        return stream_answer(self._batcher, self.tokenizer, prompt, params, self.session_len)

    async def activity(self) -> EngineActivity:
        return EngineActivity(self._batcher.active, self._batcher.waiting)

    async def prompt_logits(self, token_ids: list[list[int]]) -> list:
        import torch  # the gate and the benchmark compare in torch; serving never comes here

        return [torch.from_numpy(await asyncio.wrap_future(
            self._batcher.call(lambda ids=ids: self._batcher.logits(ids)))) for ids in token_ids]

    def memory(self) -> EngineMemory:
        per_token = (kv_bytes_per_token(self.model_config, "none", 2)
                     if self.model_config else None)
        cells = llamacpp_kv_cells(self.session_len, self.max_batch_size)
        return EngineMemory(
            device="cpu",
            weight_bytes=self._batcher.weight_bytes,
            kv_bytes_per_token=per_token,
            kv_cache_bytes=per_token * cells if per_token else None,
            kv_capacity_tokens=cells,
            sessions_that_fit=self.max_batch_size,
            notes=["llama.cpp allocates an fp16 KV cache up front: engine.session_len tokens for "
                   "each of engine.max_batch_size sequences, plus one for scoring."],
            settings={"max_batch_size": self.max_batch_size, "gguf": self.gguf.name,
                      "threads": self.threads, "threads_from": self.threads_from,
                      # what llama.cpp was compiled for: a host's own build may differ from the
                      # kit's portable one (llamacpp_build.py)
                      "llama_cpp_compiled_for": self._batcher.compiled_for,
                      "batched_now": self._batcher.active, "waiting_now": self._batcher.waiting},
        )

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

