"""xlab-deploy: a recipe-driven kit that serves a quantized chat LLM."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `python -m deploy validate` does not pay for importing torch.
    if name == "Assistant":
        from deploy.serve.assistant import Assistant

        return Assistant
    raise AttributeError(name)
