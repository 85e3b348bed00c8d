"""The UI's guard rails. With serve.api_key_env set in gradio mode no answer comes without the
key: not from the page (Chromium), not from Gradio's own API (gradio_client), not from /v1. And
gradio mode answers no CORS preflight."""

from __future__ import annotations

import os

import httpx
import pytest

KEY = "ui-s3cret"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def keyed_ui(serve_with):
    os.environ["TEST_UI_KEY"] = KEY
    with serve_with(ui=True, api_key_env="TEST_UI_KEY") as live:
        yield live
    del os.environ["TEST_UI_KEY"]


@pytest.mark.slow  # gradio's import and its app's shutdown take over 20 s
def test_gradio_api_needs_the_key(keyed_ui):
    from gradio_client import Client

    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises several kinds here
        Client(keyed_ui.url + "/", verbose=False).predict(QUESTION, api_name="/chat")
    with pytest.raises(Exception):  # noqa: B017
        Client(keyed_ui.url + "/", auth=("anyone", "wrong"), verbose=False)
    answer = Client(keyed_ui.url + "/", auth=("anyone", KEY), verbose=False).predict(
        QUESTION, 0.0, 16, api_name="/chat")
    assert "Paris" in str(answer)
    assert httpx.post(keyed_ui.url + "/v1/chat/completions", json={}).status_code == 401


@pytest.mark.browser
def test_the_page_asks_for_the_key_then_chats(browser, keyed_ui, recipe):
    page = browser.new_page()
    page.goto(keyed_ui.url + "/", wait_until="domcontentloaded", timeout=60_000)
    password = page.locator("input[type=password]")
    password.wait_for(timeout=60_000)
    assert recipe.serve.examples[0] not in page.content()  # nothing of the app before login
    page.locator("input[type=text]").first.fill("someone")
    password.fill("wrong")
    password.press("Enter")
    page.wait_for_timeout(1500)
    assert page.locator("input[type=password]").count() == 1  # still the login page
    page.locator("input[type=text]").first.fill("someone")  # the failed login cleared it
    password.fill(KEY)
    password.press("Enter")
    page.wait_for_function(
        f"() => document.body.innerText.includes({recipe.serve.title!r})", timeout=60_000)
    box = page.get_by_role("textbox").first
    box.fill(QUESTION)
    box.press("Enter")
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('[data-testid=\"bot\"]');"
        " return b.length && b[b.length - 1].innerText.includes('Paris'); }",
        timeout=60_000,
    )
    page.get_by_text("Memory", exact=True).click()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function("() => document.body.innerText.includes('Weights')", timeout=30_000)
    assert "Engine llamacpp on cpu" in page.inner_text("body")  # the memory panel
    assert "Threads" in page.inner_text("body")  # and the CPU threads it runs, with why
    page.close()


@pytest.mark.slow  # gradio's import and its app's shutdown take over 20 s
def test_gradio_mode_answers_no_cors_preflight(gradio_server):
    """Gradio's own CORS middleware allowed localhost origins with credentials, on our API's
    paths too (its app is mounted at the root); the kit removes it."""
    for origin in ("http://localhost:3000", "http://evil.example"):
        for path in ("/v1/chat/completions", "/gradio_api/queue/join", "/"):
            response = httpx.options(gradio_server.url + path, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in response.headers, (origin, path)
            assert "access-control-allow-credentials" not in response.headers, (origin, path)
