"""Stage 4, serving: the Assistant (the kit's Python API, assistant.py) over an engine, and what
people and programs talk to: the HTTP server (app.py assembles it; openai/ holds the API, health.py
the probes, /memory and /metrics), the Gradio UI (ui.py) and the terminal chat (terminal_chat.py).

config.py narrows the recipe to a frozen ServeConfig; nothing else on this side reads a recipe.
Serving finds built weights only through deploy.builder.manifest.
"""
