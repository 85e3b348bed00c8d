"""What several test folders share, imported as `tests.helpers` (the repository root is on pytest's
path, pyproject.toml's `pythonpath`): the repository root, the kit's in-thread server, the CI flag
and the browser's settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deploy.serve.run import ServerThread

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / "smollm2-cpu.yaml"

# The kit's own in-thread server, under the name the tests use.
LiveServer = ServerThread

# Debian's chromium, driven by Playwright, for the tests that load the Gradio page.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def nan_logits(engine):
    """`engine` as it is, but every logit it returns is NaN (see nan_logits_engine)."""
    import torch

    class NaNLogits:
        name = "lmdeploy-pytorch"

        def __getattr__(self, attr):
            return getattr(engine, attr)

        async def prompt_logits(self, token_ids):
            return [torch.full_like(t, float("nan")) for t in await engine.prompt_logits(token_ids)]

    return NaNLogits()
