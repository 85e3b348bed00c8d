"""The Gradio page in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import shutil

import pytest
from conftest import in_ci

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


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
