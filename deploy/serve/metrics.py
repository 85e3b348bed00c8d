"""GET /metrics: the server's numbers in Prometheus' text format, as LMDeploy's api_server, vLLM
and TGI expose theirs.

Names follow vLLM's where one exists (time to first token, time per output token, end-to-end
latency, tokens in and out, requests running and waiting), under the `xlab_` prefix. Each app
has its own registry: two servers in one process (the tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Latency buckets from 10 ms to 5 min: a CPU model's first token and a GPU's both fall inside.
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


class ServerMetrics:
    def __init__(self, recipe_name: str, quantization: dict):
        self.registry = CollectorRegistry()
        r = self.registry
        self.build = Info("xlab_build", "The recipe, engine and quantization being served.",
                          registry=r)
        self.build.info({"recipe": recipe_name, "engine": "loading", **quantization})
        self._quantization = quantization
        self._recipe = recipe_name
        self.requests = Counter("xlab_requests", "Chat requests answered, by HTTP status.",
                                ["status"], registry=r)
        self.ttft = Histogram("xlab_time_to_first_token_seconds",
                              "Request received to first generated text.", buckets=SECONDS,
                              registry=r)
        self.tpot = Histogram("xlab_time_per_output_token_seconds",
                              "(end-to-end - time to first token) / (output tokens - 1).",
                              buckets=TOKEN_SECONDS, registry=r)
        self.e2e = Histogram("xlab_e2e_request_latency_seconds",
                             "Request received to last token.", buckets=SECONDS, registry=r)
        self.prompt_tokens = Counter("xlab_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("xlab_generation_tokens", "Tokens generated.", registry=r)
        self.in_flight = Gauge("xlab_requests_in_flight",
                               "Chat requests admitted and not finished (serve.max_pending bounds it).",
                               registry=r)
        self.running = Gauge("xlab_requests_running", "Requests the engine is decoding now, where "
                             "it reports them.", registry=r)
        self.waiting = Gauge("xlab_requests_waiting", "Requests queued inside the engine, where it "
                             "reports them.", registry=r)
        self.kv_usage = Gauge("xlab_kv_cache_usage_ratio", "Share of the KV cache in use, where the "
                              "engine has a fixed cache and reports it.", registry=r)
        self.kv_capacity = Gauge("xlab_kv_cache_capacity_tokens", "Tokens the KV cache holds, "
                                 "where the engine has a fixed cache.", registry=r)

    def engine_loaded(self, engine_name: str) -> None:
        self.build.info({"recipe": self._recipe, "engine": engine_name, **self._quantization})

    def observe(self, *, started: float, first: float | None, ended: float, prompt_tokens: int,
                completion_tokens: int) -> None:
        """One finished generation, with perf_counter() timestamps."""
        self.e2e.observe(ended - started)
        if first is not None:
            self.ttft.observe(first - started)
            if completion_tokens > 1:
                self.tpot.observe((ended - first) / (completion_tokens - 1))
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def render(self, engine_memory, activity) -> bytes:
        """The text format; engine gauges are read now, from the engine's own reports."""
        if activity is not None:
            self.running.set(activity.running)
            self.waiting.set(activity.waiting)
            if activity.kv_usage is not None:
                self.kv_usage.set(activity.kv_usage)
        if engine_memory is not None and engine_memory.kv_capacity_tokens:
            self.kv_capacity.set(engine_memory.kv_capacity_tokens)
        return generate_latest(self.registry)
