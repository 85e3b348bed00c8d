"""LMDeploy engine (TurboMind or PyTorch) on a GPU, behind the kit's Engine interface.

Requests go straight into LMDeploy's AsyncEngine on the caller's event loop, so concurrent requests
are batched by LMDeploy's scheduler (continuous batching), not queued by the kit. The kit renders
the prompt itself (see chat_format.py) and hands LMDeploy token ids: no template guessed from a
folder name. `engine_config_kwargs` is the one place where the engine config becomes LMDeploy settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from deploy.engines import engine_process
from deploy.engines.base import (
    Delta,
    Engine,
    EngineActivity,
    EngineMemory,
    GenerationParams,
    PromptTooLongError,
    StopMatcher,
    TokenLogprob,
)
from deploy.engines.chat_format import eos_ids, load_tokenizer, pad_token_in_prompts
from deploy.engines.config import EngineConfig
from deploy.engines.native_log import tee_stderr, turbomind_cache_budget, turbomind_warmups_too_long
from deploy.engines.rope_compat import model_dir_for_lmdeploy
from deploy.engines.sizing import kv_bytes_per_token
from deploy.errors import RecipeError

log = logging.getLogger(__name__)

QUANT_POLICY = {"none": 0, "int8": 8, "int4": 4}
BLOCK_TOKENS = 64  # LMDeploy's default KV block: PyTorch `block_size`, TurboMind `cache_block_seq_len`
DEFAULT_CACHE_RATIO = 0.8  # LMDeploy's own default


# LMDeploy 0.18's TurboMind reads AWQ weights of group size 128 only
# (turbomind/converter.py, _validate_quant_group_size; a group-64 folder failed its start with
# "Unsupported group_size=64", H200, docs/data/gpu-2026-12-03-decode-profile-tuned/).
TURBOMIND_AWQ_GROUPS = (128,)


def turbomind_group_refusal(backend: str, weights: str, group_size: int) -> RecipeError | None:
    """The error for AWQ weights TurboMind cannot read, before hours of calibration or a failed start."""
    if backend != "lmdeploy-turbomind" or weights != "w4a16" or group_size in TURBOMIND_AWQ_GROUPS:
        return None
    return RecipeError(f"quantization.group_size {group_size}: TurboMind reads W4A16 (AWQ) weights of "
                       f"group size {', '.join(map(str, TURBOMIND_AWQ_GROUPS))} only. Set "
                       "quantization.group_size: 128, or engine.backend: lmdeploy-pytorch.")


TM_RESERVED_BYTES = 2**30  # what TurboMind takes besides weights before it sizes its cache (rounded up)


def engine_config_kwargs(config: EngineConfig, model_config: dict,
                         free_after_weights: int | None = None) -> dict:
    """The engine config in LMDeploy's terms, for TurbomindEngineConfig or PytorchEngineConfig.
    `free_after_weights` (bytes per GPU) turns kv_cache_gib into TurboMind's ratio."""
    engine = config
    if engine.dtype == "float32":
        raise RecipeError(
            "engine.dtype 'float32' is not served by LMDeploy: use auto, float16 or bfloat16."
        )
    if config.weights == "fp8" and engine.dtype == "float16":
        # LMDeploy 0.18's TurboMind has FP8 GEMMs with bfloat16 activations only
        # (turbomind/converter.py, _get_executable_dtypes): float16 fails its start with "no
        # executable data type for this device" (H200, docs/data/gpu-2026-12-03-fp8/). The PyTorch
        # engine's fast FP8 GEMMs (Gluon, DeepGEMM) take bfloat16 only too; with float16 it falls
        # back to a Triton kernel that decoded at 0.67x fp16 (H200,
        # docs/data/gpu-2026-12-03-pytorch-fp8/).
        raise RecipeError("quantization.weights 'fp8' runs with bfloat16 activations on LMDeploy "
                          "(float16 fails on TurboMind and is slower than fp16 weights on the "
                          "PyTorch engine): set engine.dtype: auto or bfloat16.")
    if refusal := turbomind_group_refusal(config.backend, config.weights, config.group_size):
        raise refusal
    from deploy.engines.fp8_format import packed_qkv_misfit

    if config.weights == "fp8" and config.backend == "lmdeploy-turbomind" \
            and (misfit := packed_qkv_misfit(model_config)):
        raise RecipeError(f"quantization.weights 'fp8' cannot be served by TurboMind for this model: "
                          f"{misfit}. Use quantization.weights: none or w4a16.")
    kwargs = {
        # FP8 computes in bfloat16 (above): `auto` would follow the checkpoint's float16 on the
        # PyTorch engine.
        "dtype": "bfloat16" if config.weights == "fp8" and engine.dtype == "auto" else engine.dtype,
        "session_len": engine.session_len,
        "max_batch_size": engine.max_batch_size,
        "tp": engine.tp,
        "quant_policy": QUANT_POLICY[config.kv_cache],
    }
    if config.backend == "lmdeploy-turbomind":
        kwargs["model_format"] = {"w4a16": "awq", "fp8": "fp8"}.get(config.weights, "hf")
        kwargs["cache_block_seq_len"] = BLOCK_TOKENS
    else:
        # The PyTorch engine reads AWQ from the checkpoint's quantization_config; its model_format
        # only accepts 'fp8', so it stays unset here.
        kwargs["block_size"] = BLOCK_TOKENS
        # Log probabilities as the model gives them, before penalties and temperature (the
        # engine computes none unless a request asks; without a mode it returns none at all).
        kwargs["logprobs_mode"] = "raw_logprobs"
        # By default the engine runs in its own process, as `lmdeploy serve api_server` runs it:
        # in the server's process its scheduling loop competes with 64 streams for one event loop
        # (measured on the H100: 35% less output at concurrency 64, docs/benchmarks.md). In the
        # server's process (engine.own_process: false) it skips a hop per token, which single
        # streams feel (docs/lmdeploy.md).
        kwargs["enable_mp_engine"] = engine.own_process
        if engine.tp > 1:
            kwargs["distributed_executor_backend"] = tp_executor()
    if engine.kv_cache_gib is not None:
        blocks = kv_blocks_for(engine.kv_cache_gib, model_config, config.kv_cache, engine.tp)
        if config.backend == "lmdeploy-turbomind":
            kwargs["cache_max_entry_count"] = turbomind_ratio(
                blocks * BLOCK_TOKENS * kv_bytes_per_token(model_config, config.kv_cache) / engine.tp,
                free_after_weights, engine.kv_cache_gib)
        else:
            kwargs["num_gpu_blocks"] = blocks
            kwargs["cache_max_entry_count"] = DEFAULT_CACHE_RATIO  # unused once blocks are fixed
    else:
        # A share of the memory still FREE after the weights load, not of the whole card.
        kwargs["cache_max_entry_count"] = engine.cache_max_entry_count or DEFAULT_CACHE_RATIO
    return kwargs


def token_logprobs(token_ids: list[int] | None, logprobs: list[dict] | None,
                   top: int) -> list[TokenLogprob]:
    """LMDeploy's log probabilities of one streamed piece (a dict per new token: token id to log
    probability, its n likeliest plus the chosen one) as TokenLogprobs with the `top` likeliest.
    The dicts belong to the piece's newest tokens: its token ids may start with ones held back
    from the previous piece's text."""
    count = min(len(logprobs or []), len(token_ids or []))
    if not count:
        return []
    scored = []
    for token, dist in zip(token_ids[-count:], logprobs[-count:], strict=True):
        if token not in dist:
            raise RuntimeError(f"LMDeploy returned no log probability for generated token {token}.")
        ranked = sorted(dist.items(), key=lambda item: item[1], reverse=True)
        scored.append(TokenLogprob(int(token), float(dist[token]),
                                   tuple((int(t), float(lp)) for t, lp in ranked[:top])))
    return scored


def turbomind_ratio(needed: float, free_after_weights: int | None, gib: float) -> float:
    """TurboMind 0.18 sizes its KV cache only as a ratio of the memory free once the weights are
    in: a block count is refused ("object-cache path no longer accepts cache_max_block_count as a
    block count", seen on the H200). The ratio that gives `needed` bytes, rounded up."""
    if free_after_weights is None:
        raise RecipeError("engine.kv_cache_gib on TurboMind needs the GPU's free memory: load the "
                          "engine on a GPU, or set engine.cache_max_entry_count instead.")
    ratio = math.ceil(needed / free_after_weights * 1000) / 1000
    if ratio >= 1:
        raise RecipeError(
            f"engine.kv_cache_gib {gib} does not fit: about {free_after_weights / 2**30:.1f} GiB is "
            "free once the weights are loaded. Lower it, or quantize the weights or the KV cache.")
    return ratio


def tp_executor() -> str:
    """How the PyTorch engine runs its tp workers. LMDeploy picks Ray on CUDA, and fails at start
    when Ray is absent; its own multiprocessing executor needs nothing more on one host."""
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        return "ray"
    log.info("engine.tp > 1 without Ray installed: LMDeploy's multiprocessing executor runs the "
             "workers (pip install ray to use LMDeploy's default instead)")
    return "mp"


def kv_blocks_for(gib: float, model_config: dict, kv_cache: str, tp: int = 1) -> int:
    """KV blocks that fit in `gib` GiB on each GPU (tensor parallelism splits the KV heads)."""
    per_block = kv_bytes_per_token(model_config, kv_cache) * BLOCK_TOKENS / tp
    blocks = int(gib * 2**30 // per_block)
    if blocks < 16:
        raise RecipeError(
            f"engine.kv_cache_gib {gib} holds only {blocks} KV blocks of {BLOCK_TOKENS} tokens; "
            "LMDeploy needs at least 16. Raise engine.kv_cache_gib."
        )
    return blocks


def lmdeploy_config(config: EngineConfig, model_config: dict, model_dir: Path,
                    kwargs: dict | None = None):
    """LMDeploy's engine config; `kwargs` are engine_config_kwargs' already worked out (the
    PyTorch engine's, which its early process was started with)."""
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    turbomind = config.backend == "lmdeploy-turbomind"
    if kwargs is None:
        free = None
        if turbomind and config.kv_cache_gib is not None:
            import torch

            free = (torch.cuda.mem_get_info()[0] - _weight_file_bytes(model_dir) // config.tp
                    - TM_RESERVED_BYTES)
        kwargs = engine_config_kwargs(config, model_config, free)
    return (TurbomindEngineConfig if turbomind else PytorchEngineConfig)(**kwargs)


class LMDeployEngine(Engine):
    # response_format: LMDeploy's guided decoding (xgrammar, a dependency of its wheel) on both
    # backends. No penalties: LMDeploy 0.18 has no presence/frequency penalty, and its PyTorch
    # engine gave the same greedy answer with repetition_penalty 1.5 as without on the H100
    # (docs/data/h100-2026-11-26-transformers/gputest-repetition-penalty.log), so the server
    # refuses it rather than claim it.
    # tools: the server renders them and reads the calls (serve/openai/tool_calls.py); a named or required
    # choice is forced through the same guided decoding.
    supports = frozenset({"response_format", "logprobs", "tools", "tool_choice"})

    def __init__(self, model_dir: Path, config: EngineConfig):
        backend = config.backend
        self.name = backend
        self.engine_config = config
        self.model_dir = Path(model_dir)
        self.model_config = json.loads((self.model_dir / "config.json").read_text())
        _check_weights(config.weights, self.model_config, self.model_dir)
        trust = config.trust_remote_code
        turbomind = backend == "lmdeploy-turbomind"
        if turbomind:
            # TurboMind 0.18 reports log probabilities after its sampling filters, and has no raw
            # mode: under greedy decoding every token came back alone with 0.0 (H100,
            # docs/data/gpu-2026-11-26-gputest/). Refused rather than served wrong.
            self.supports = self.supports - {"logprobs"}
        served = self.model_dir
        early = checked = kwargs = None
        if not turbomind:
            served = model_dir_for_lmdeploy(self.model_dir, self.model_config)
            kwargs = engine_config_kwargs(config, self.model_config)
            checked = _env_check_marker(self.model_config, kwargs)
            _skip_env_check(checked.exists())
            # tp workers start from the engine process (not tried early); without a process of
            # its own there is nothing to start early.
            if config.tp == 1 and config.own_process:
                early = engine_process.start(served, kwargs, trust)
        try:
            self._start(config, served, early, turbomind, kwargs)
        except BaseException:
            if early is not None:
                early.stop()
            raise
        if checked is not None:
            checked.parent.mkdir(parents=True, exist_ok=True)
            checked.touch()
        self.stop_ids = eos_ids(self.model_dir, self.tokenizer)
        if not turbomind and (pad := pad_token_in_prompts(self.model_config, self.tokenizer)):
            log.warning("This model's chat prompts contain its pad token %r (pad_token_id %s), whose "
                        "embedding LMDeploy's PyTorch engine sets to zero on load: its answers can "
                        "differ from the checkpoint's. Use engine.backend: lmdeploy-turbomind, or set "
                        "pad_token_id in config.json to a token the template never emits.",
                        pad, self.model_config["pad_token_id"])
        self.session_len = self._engine.session_len
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self, config: EngineConfig, served: Path, early: engine_process.EngineProcess | None,
               turbomind: bool, kwargs: dict | None) -> None:
        trust = config.trust_remote_code
        started = time.perf_counter()
        # Imported before the tokenizer loads: both import transformers, and two threads
        # importing it at once fail ("cannot import name 'PretrainedConfig'", seen on the H100).
        from lmdeploy.serve.core.async_engine import AsyncEngine

        if early is not None:
            AsyncEngine = engine_process.async_engine_class(early)  # noqa: N806
        log.info("LMDeploy imported (%.1fs)", time.perf_counter() - started)
        self.tokenizer = load_tokenizer(self.model_dir, config.chat_template, trust)
        self.config = lmdeploy_config(config, self.model_config, self.model_dir, kwargs)
        log.info("LMDeploy %s config: %s", config.backend, self.config)
        started = time.perf_counter()
        if turbomind:  # its KV budget is logged at INFO only, and little else is (native_log.py)
            os.environ.setdefault("TM_LOG_LEVEL", "INFO")
        self._tm_cache_bytes: int | None = None
        try:
            with tee_stderr() if turbomind else contextlib.nullcontext([]) as native:
                self._engine = AsyncEngine(
                    str(served),
                    backend="turbomind" if turbomind else "pytorch",
                    backend_config=self.config,
                    trust_remote_code=trust,
                )
            self._tm_cache_bytes = turbomind_cache_budget(b"".join(native)) if turbomind else None
            if turbomind and (refused := turbomind_warmups_too_long(b"".join(native))):
                log.info("TurboMind's 'Warm-up ... failed with status 6' above is harmless: status 6 "
                         "means too long, and the warm-up of %s tokens is longer than engine.session_len "
                         "(%d). Those prefill sizes are tuned on first use instead.",
                         ", ".join(map(str, refused)), config.session_len)
        except Exception as exc:
            if "not alive" not in str(exc):
                raise
            # The PyTorch engine runs in a child process; the parent learns only that it died.
            raise RuntimeError(
                f"LMDeploy's engine process died while loading {self.model_dir} ({exc}). Its own "
                "traceback is earlier in this log, after 'Process mp_engine_proc'; fix what it "
                "names, or try engine.backend: lmdeploy-turbomind."
            ) from exc
        log.info("LMDeploy engine started (%.1fs)", time.perf_counter() - started)

    async def stream_tokens(self, prompt: list[int], params: GenerationParams) -> AsyncIterator[Delta]:
        from lmdeploy import GenerationConfig

        self._bind_loop()
        if len(prompt) >= self.session_len:
            raise PromptTooLongError(len(prompt), self.session_len)
        sampling = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=min(params.max_tokens, self.session_len - len(prompt)),
            do_sample=sampling,
            temperature=params.temperature if sampling else 1.0,
            top_p=params.top_p,
            random_seed=params.seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=not params.keep_special_tokens,
            spaces_between_special_tokens=not params.keep_special_tokens,
            response_format=params.response_format,
            # LMDeploy returns each token's n likeliest plus the chosen one; n 0 would mean none.
            logprobs=max(params.logprobs, 1) if params.logprobs is not None else None,
        )
        request = await self._engine.preprocess(
            None, self._engine.session_mgr.get(), gen_config=config, input_ids=prompt,
            do_preprocess=False,
        )
        stops = StopMatcher(params.stop)
        outputs = self._engine.generate(request, stream_response=True)
        last = None
        try:
            async for out in outputs:
                last = out
                if out.finish_reason == "error":
                    raise RuntimeError("LMDeploy reported an error while generating.")
                text = stops.feed(out.response.rstrip("\ufffd") if out.finish_reason else out.response)
                scores = None if params.logprobs is None else token_logprobs(
                    out.token_ids, out.logprobs, params.logprobs)
                if text or scores:
                    yield Delta(text, logprobs=scores)
                if stops.stopped:
                    break
            finish = "stop" if stops.stopped or last is None or last.finish_reason != "length" \
                else "length"
            generated = last.generate_token_len if last is not None else 0
            yield Delta(stops.flush(), finish, len(prompt), generated,
                        [] if params.logprobs is not None else None)
        finally:
            await outputs.aclose()  # cancels the request inside LMDeploy if still running

    async def activity(self) -> EngineActivity | None:
        """LMDeploy's scheduler counts (both backends). Before the first request the engine loop
        is not bound yet, and nothing runs: zeros without asking."""
        if self._loop is None:
            return EngineActivity(0, 0, 0.0)
        try:
            self._bind_loop()
            m = await self._engine.get_schedule_metrics()
        except Exception:  # a scrape must never fail because the engine could not answer
            log.debug("LMDeploy's schedule metrics are unavailable", exc_info=True)
            return None
        return EngineActivity(int(m.active_seqs), int(m.waiting_seqs), float(m.cache_usage))

    async def prompt_logits(self, token_ids: list[list[int]]) -> list:
        self._bind_loop()
        return [t.float().cpu() for t in await self._engine.async_get_logits(token_ids)]

    def memory(self) -> EngineMemory:
        cfg = self._engine.backend_config
        blocks = getattr(cfg, "num_gpu_blocks", 0) or None
        block = getattr(cfg, "block_size", None) or getattr(cfg, "cache_block_seq_len", None)
        per_token = kv_bytes_per_token(self.model_config, self.engine_config.kv_cache)
        tp = getattr(cfg, "tp", 1) or 1
        notes = ["weight_bytes is the size of the checkpoint's weight files."]
        if blocks is None and self._tm_cache_bytes and block:
            # TurboMind keeps no block count in Python; it logs its cache budget per GPU, which
            # holds the KV blocks (each GPU 1/tp of the KV heads).
            blocks = self._tm_cache_bytes * tp // (per_token * block)
            notes.append(f"KV capacity from TurboMind's logged cache budget "
                         f"({self._tm_cache_bytes / 2**20:,.0f} MiB per GPU) / bytes per token.")
        elif blocks is None:
            notes.append(f"{self.name} reported no KV capacity (TurboMind logs it only with "
                         "TM_LOG_LEVEL=INFO).")
        else:
            notes.append("KV bytes are blocks x block tokens x bytes per token from the config.")
        tokens = blocks * block if blocks and block else None
        if tp > 1:
            # As the planner and the per-GPU list report it: each GPU holds 1/tp of the KV heads.
            notes.append(f"tp {tp}: kv_cache_bytes is per GPU; kv_bytes_per_token and "
                         "weight_bytes are for the whole model.")
        return EngineMemory(
            device="cuda",
            weight_bytes=_weight_file_bytes(self.model_dir),
            kv_bytes_per_token=per_token,
            kv_cache_bytes=tokens * per_token // tp if tokens else None,
            kv_capacity_tokens=tokens,
            kv_block_size=block,
            kv_blocks=blocks,
            sessions_that_fit=tokens // self.session_len if tokens else None,
            notes=notes,
            settings={
                "cache_max_entry_count": getattr(cfg, "cache_max_entry_count", None),
                "quant_policy": int(getattr(cfg, "quant_policy", 0)),
                "model_format": getattr(cfg, "model_format", None),
                "session_len": self.session_len,
                "max_batch_size": getattr(cfg, "max_batch_size", None),
                "tp": getattr(cfg, "tp", None),
            },
        )

    def close(self) -> None:
        self._engine.close()

    def _bind_loop(self) -> None:
        """LMDeploy's engine loop lives on one asyncio loop: the one that first sends a request."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._engine.start_loop(loop, use_async_api=True)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "This LMDeploy engine is bound to the event loop that first used it; send every "
                "request from that loop (one server, one asyncio.run)."
            )


def _env_check_marker(model_config: dict, engine_kwargs: dict) -> Path:
    """Where a passed environment check is remembered, keyed by everything the check looks at:
    LMDeploy, torch, CUDA, transformers and triton versions, the GPUs, the model's config and the
    engine settings. Any change gives a new key, and the check runs again. Computed without
    importing torch: it runs before the engine process is spawned (engine_process.py)."""
    import hashlib
    import importlib.metadata
    import importlib.util

    from deploy.home import env_check_dir

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    from deploy.engines.hardware import gpu_report

    # torch's version.py names its version, CUDA version and commit, read without importing torch.
    spec = importlib.util.find_spec("torch")
    torch_build = "-"
    if spec is not None and spec.origin:
        built = Path(spec.origin).parent / "version.py"
        torch_build = built.read_text() if built.is_file() else version("torch")
    # NVML, not torch.cuda: the engine runs in its own process, and a CUDA context here would
    # cost seconds of start-up and GPU memory for nothing.
    gpus = [gpu["name"] for gpu in gpu_report()["gpus"]]
    key = json.dumps([version("lmdeploy"), torch_build, version("transformers"), version("triton"),
                      gpus, model_config, engine_kwargs], sort_keys=True, default=str)
    return env_check_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".ok")


def _skip_env_check(skip: bool) -> None:
    """LMDeploy's PyTorch engine checks its environment in a spawned process on every start (about
    20 s on the H100). Once it has passed for this exact setup, the kit skips it. The variable is
    read by the engine's own process, which is spawned after this."""
    if skip:
        log.info("skipping LMDeploy's environment check: it passed before for this exact setup")
        os.environ["LMDEPLOY_ENABLE_CHECK_ENV"] = "0"


def _check_weights(weights: str, config: dict, model_dir: Path) -> None:
    method = (config.get("quantization_config") or {}).get("quant_method")
    if weights == "w4a16" and method != "awq":
        raise RecipeError(
            f"quantization.weights is 'w4a16' but {model_dir} holds unquantized weights: "
            "run `python -m deploy build RECIPE` to AWQ-quantize them first."
        )
    if weights == "none" and method == "awq":
        raise RecipeError(
            f"{model_dir} holds AWQ weights: set quantization.weights: w4a16 in the recipe."
        )
    if (weights == "fp8") != (method == "fp8"):
        raise RecipeError(
            f"quantization.weights is {weights!r} but {model_dir} holds "
            f"{'FP8' if method == 'fp8' else 'no FP8'} weights: set quantization.weights to match, "
            "or run `python -m deploy build RECIPE` again.")


def _weight_file_bytes(model_dir: Path) -> int:
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    return sum(f.stat().st_size for f in files)
