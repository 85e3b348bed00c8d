"""The Gradio chat UI; title, description, examples and system prompt come from the recipe."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from deploy.recipe import Recipe
from deploy.serve.assistant import Assistant


def _text(content) -> str:
    """Gradio hands history content as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def build_ui(recipe: Recipe, get_assistant: Callable[[], Assistant]) -> gr.Blocks:
    async def respond(message, history):
        assistant = get_assistant()
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        messages.append({"role": "user", "content": _text(message)})
        answer = ""
        async for delta in assistant.astream(messages, assistant.params()):
            answer += delta.text
            yield answer

    return gr.ChatInterface(
        respond,
        title=recipe.serve.title,
        description=recipe.serve.description or None,
        examples=recipe.serve.examples or None,
        cache_examples=False,
        flagging_mode="never",
        api_name="chat",
    )
