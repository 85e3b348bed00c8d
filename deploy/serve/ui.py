"""The Gradio chat UI; title, description, examples and system prompt come from the serve config.

Beside the chat: generation settings (temperature, answer length) and a memory panel that reads
GET /memory's report as a person would. With serve.api_key_env set, the page asks for the key
(app.py mounts it with gradio's auth), and so does Gradio's own API.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from deploy.serve.assistant import Assistant
from deploy.serve.config import ServeConfig

GIB, MIB = 2**30, 2**20


def _text(content) -> str:
    """Gradio hands history content as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def memory_markdown(report: dict) -> str:
    """GET /memory's report in a few lines a person reads."""
    engine = report["engine"]
    lines = [f"**Engine** {engine['backend']} on {engine['device']}"]
    if engine.get("weight_bytes"):
        lines.append(f"**Weights** {engine['weight_bytes'] / GIB:.2f} GiB")
    if engine.get("kv_capacity_tokens"):
        lines.append(f"**KV cache** {engine['kv_cache_bytes'] / GIB:.2f} GiB, "
                     f"{engine['kv_capacity_tokens']:,} tokens: "
                     f"{engine.get('sessions_that_fit') or 0} full sessions fit")
    elif engine.get("kv_bytes_per_token"):
        lines.append(f"**KV cache** grows per request, {engine['kv_bytes_per_token'] / 1024:.0f} KiB "
                     "per token")
    settings = engine.get("settings") or {}
    if "batched_now" in settings:
        lines.append(f"**Sessions** {settings['batched_now']} decoding, "
                     f"{settings.get('waiting_now', 0)} waiting, "
                     f"up to {settings['max_batch_size']} together")
    if settings.get("threads"):
        lines.append(f"**Threads** {settings['threads']}, from {settings['threads_from']}")
    for gpu in report.get("gpus") or []:
        lines.append(f"**GPU {gpu['index']}** {gpu['name']}: {gpu['used_bytes'] / MIB:,.0f} of "
                     f"{gpu['total_bytes'] / MIB:,.0f} MiB used")
    if not report.get("gpus"):
        lines.append(f"**Process** {report['process']['rss_bytes'] / MIB:,.0f} MiB resident (no GPU)")
    return "  \n".join(lines)


def build_ui(config: ServeConfig, get_assistant: Callable[[], Assistant]) -> gr.Blocks:
    async def respond(message, history, temperature, max_tokens):
        assistant = get_assistant()
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        messages.append({"role": "user", "content": _text(message)})
        params = assistant.params(temperature=float(temperature), max_tokens=int(max_tokens))
        answer = ""
        async for delta in assistant.astream(messages, params):
            answer += delta.text
            yield answer

    def memory() -> str:
        return memory_markdown(get_assistant().memory())

    with gr.Blocks(title=config.title) as page:
        # Inside Blocks, ChatInterface draws no title: the page heads itself.
        gr.Markdown(f"# {config.title}" + (f"\n{config.description}"
                                                  if config.description else ""))
        gr.ChatInterface(
            respond,
            examples=[[e, 0.0, config.max_tokens] for e in config.examples] or None,
            cache_examples=False,
            flagging_mode="never",
            api_name="chat",
            additional_inputs=[
                gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
                gr.Slider(1, max(config.max_tokens, 2048), value=config.max_tokens,
                          step=1, label="Max tokens"),
            ],
            additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        )
        with gr.Accordion("Memory", open=False):
            report = gr.Markdown("Open to read the memory report.")
            gr.Button("Refresh", size="sm").click(memory, outputs=report, api_name=False)
    return page
