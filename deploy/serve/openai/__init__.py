"""The OpenAI-compatible API, one module per endpoint family (as vLLM's entrypoints/openai/):
protocol.py (the wire formats), serving.py (one request from admission to answer), streaming.py
(server-sent events), chat.py, completions.py, models.py (the routes) and tool_calls.py (tools in
the model's own format)."""
