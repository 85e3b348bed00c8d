"""The Gradio page in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


def test_page_shows_recipe_and_a_message_round_trips(browser, gradio_server, recipe):
    page = browser.new_page()
    page.goto(gradio_server.url + "/", wait_until="domcontentloaded", timeout=60_000)
    page.get_by_role("textbox").first.wait_for(timeout=60_000)
    assert recipe.serve.title in page.content()
    assert recipe.serve.examples[0] in page.content()

    box = page.get_by_role("textbox").first
    box.fill("What is the capital of France?")
    box.press("Enter")
    answer = page.locator('[data-testid="bot"]').last
    answer.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('[data-testid=\"bot\"]');"
        " return b.length && b[b.length - 1].innerText.includes('Paris'); }",
        timeout=60_000,
    )
    assert "Paris" in answer.inner_text()
    page.screenshot(path=str(gradio_server.screenshot_path))
    page.close()
