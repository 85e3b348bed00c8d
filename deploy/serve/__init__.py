"""Stage 4, serving: the Assistant (the kit's Python API, assistant.py) over an engine, and what
people and programs talk to: the HTTP server (server.py, with openai_protocol.py), the Gradio UI
(ui.py) and the terminal chat (terminal_chat.py).

Serving finds built weights only through deploy.builder.manifest.
"""
