"""GET /metrics in Prometheus' text format, read with prometheus_client's own parser, after real
requests through the openai client on the real model."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value}, and the response's content type."""
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_latency_tokens_and_build_info_are_counted(api_server, recipe, assistant):
    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)
    before = scrape(api_server.url)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=recipe.name, messages=question, max_tokens=8)
    streamed = 0
    for chunk in client.chat.completions.create(model=recipe.name, messages=question, max_tokens=8,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            streamed = chunk.usage.completion_tokens
    bad = httpx.post(api_server.url + "/v1/chat/completions", json={"model": recipe.name})
    assert bad.status_code == 400
    after = scrape(api_server.url)

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("xlab_requests_total", status="200") == 2
    assert grew("xlab_requests_total", status="400") == 1
    assert grew("xlab_time_to_first_token_seconds_count") == 2
    assert grew("xlab_e2e_request_latency_seconds_count") == 2
    assert grew("xlab_time_per_output_token_seconds_count") == 2
    assert grew("xlab_generation_tokens_total") == answer.usage.completion_tokens + streamed
    assert grew("xlab_prompt_tokens_total") == 2 * answer.usage.prompt_tokens
    assert grew("xlab_time_to_first_token_seconds_sum") > 0
    info = {dict(labels)["engine"] for (name, labels) in after if name == "xlab_build_info"}
    assert info == {assistant.engine.name}
    assert ("xlab_requests_in_flight", frozenset()) in after
    assert value(after, "xlab_requests_running") == 0  # the engine reports its batch: idle now


def test_metrics_can_be_switched_off(serve_with):
    with serve_with(metrics=False) as live:
        assert httpx.get(live.url + "/metrics").status_code == 404
        assert httpx.get(live.url + "/health").status_code == 200


def test_the_grafana_dashboard_reads_only_metrics_the_server_exposes(api_server, recipe):
    """docs/grafana/xlab-deploy.json: every series its queries name is in a real scrape."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana"
                            / "xlab-deploy.json").read_text())
    client = openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=recipe.name, max_tokens=4,
                                   messages=[{"role": "user", "content": "Hi"}])
    exposed = {name for name, _ in scrape(api_server.url)}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\b(xlab_[a-z_]+)\b", e)}
    assert len(named) >= 10
    assert named <= exposed, named - exposed
