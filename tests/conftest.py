"""Shared fixtures: the real bundled model, loaded once, and real servers on ephemeral ports."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, DEFAULT_RECIPE, FLAGS, ROOT, LiveServer, in_ci, nan_logits


@pytest.fixture(scope="session")
def recipe():
    from deploy.recipe import load_recipe

    return load_recipe(DEFAULT_RECIPE)


@pytest.fixture(scope="session")
def assistant(recipe):
    from deploy.serve.assistant import Assistant

    with Assistant.from_recipe(recipe) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def nan_logits_engine(assistant):
    """The real bundled engine, answering as it does, with every logit NaN: how LMDeploy 0.18's
    PyTorch engine scores with a quantized KV cache (H100, docs/data/gpu-2026-11-26-kv-logits/)."""
    return nan_logits(assistant.engine)


@pytest.fixture(scope="session")
def serve_with(assistant):
    """Starts the kit's real server on a free loopback port, over the bundled model or the
    assistant given, with serve settings changed from the recipe's:

        with serve_with(max_pending=1) as live: ...         # live.url, live.config
        with serve_with(other_assistant, ui=True) as live: ...
    """
    from deploy.serve.app import create_app

    @contextlib.contextmanager
    def start(over=None, *, ui: bool = False, **settings):
        served = over or assistant
        config = dataclasses.replace(served.config, **settings)
        with LiveServer(create_app(config, served, ui=ui)) as live:
            live.config = config
            yield live

    return start


@pytest.fixture(scope="session")
def api_server(serve_with):
    with serve_with() as live:
        yield live


@pytest.fixture(scope="session")
def gradio_server(serve_with, tmp_path_factory):
    with serve_with(ui=True) as live:
        live.screenshot_path = tmp_path_factory.mktemp("ui") / "gradio.png"
        yield live


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for the Hugging Face Hub (tests/fixtures/fake_hub.py), reached through HF_ENDPOINT;
    it fails the test if it saw a call it does not serve."""
    from tests.fixtures.fake_hub import create_fake_hub

    app = create_fake_hub()
    with LiveServer(app) as live:
        import huggingface_hub.constants

        monkeypatch.setenv("HF_ENDPOINT", live.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", live.url)
        # The stand-in speaks git-LFS, not Xet: large files take the LFS protocol.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield app
    assert app.state.unexpected == [], "the fake hub saw calls it does not serve"


# Module scope: Playwright's sync API runs an event loop on this thread while the browser lives,
# and later tests call asyncio.run().
@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        if in_ci():
            pytest.fail("chromium is missing in CI: .ci/run must install Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def tiny_internlm2(tmp_path_factory) -> Path:
    """A random-weight InternLM2 checkpoint of tiny shapes carrying the project's transformers code
    (tools/make_random_internlm2.py --modeling), with the bundled SmolLM2's tokenizer."""
    import subprocess
    import sys

    from deploy.builder.sources import bundled_model_dir

    bundled = bundled_model_dir("SmolLM2-135M-Instruct")
    tok = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (bundled / name).is_file():
            shutil.copy(bundled / name, tok / name)
    out = tmp_path_factory.mktemp("internlm2") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_internlm2.py"), str(out), str(tok),
                    "--size", "tiny", "--modeling"], check=True, capture_output=True)
    return out
