"""The README's screenshot of the Gradio page: the default recipe's UI after one question, with
the generation settings and the memory panel open. Needs Debian's chromium and Playwright.

Usage: python -m tools.ui_screenshot [--out docs/img/ui.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "ui.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from deploy.recipe import load_recipe
    from deploy.serve.app import create_app
    from deploy.serve.assistant import Assistant
    from deploy.serve.run import ServerThread
    from tests.helpers import CHROMIUM, FLAGS

    recipe = load_recipe(ROOT / "recipes" / "smollm2-cpu.yaml")
    with Assistant.from_recipe(recipe) as assistant, \
            ServerThread(create_app(assistant.config, assistant, ui=True)) as live, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1250})
        page.goto(live.url + "/", wait_until="domcontentloaded", timeout=60_000)
        box = page.get_by_role("textbox").first
        box.wait_for(timeout=60_000)
        box.fill(recipe.serve.examples[0])
        box.press("Enter")
        page.wait_for_function(
            "() => { const b = document.querySelectorAll('[data-testid=\"bot\"]');"
            " return b.length && b[b.length - 1].innerText.includes('Paris'); }", timeout=60_000)
        page.get_by_text("Generation settings").click()
        page.get_by_text("Memory", exact=True).click()
        page.get_by_role("button", name="Refresh").click()
        page.wait_for_function("() => document.body.innerText.includes('Weights')", timeout=30_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
