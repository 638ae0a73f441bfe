"""The README's screenshots, taken from the real app (default model, bundled sample) in Debian's Chromium.

Run: PYTHONPATH=. .venv/bin/python docs/screenshots.py [--adapter NAME] [--users 40]

Inspect at 1440 px for user u0002 with the seed_after preset; Compare over the first N users (with the adapter
when one is named and published in adapters/, the baselines always). Writes docs/screenshot-inspect.png and
docs/screenshot-compare.png.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="an adapter in adapters/ to compare with the base")
    parser.add_argument("--users", type=int, default=40, help="users for the Compare screenshot")
    options = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            deadline = time.monotonic() + 300
            while True:
                try:
                    page.goto(url)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)
            page.locator("#inspect-summary").get_by_text("User").wait_for(timeout=300_000)
            user = page.locator("#user-picker input")
            user.click()
            user.fill("u0002")
            page.get_by_role("option", name="u0002", exact=True).click()
            page.locator("#inspect-summary").get_by_text("User u0002").wait_for(timeout=300_000)
            page.locator("#letter-chart .js-plotly-plot").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ROOT / "docs" / "screenshot-inspect.png"), full_page=True)
            page.get_by_role("tab", name="Compare").click()
            if options.adapter:
                adapters = page.locator("#compare-adapters input")
                adapters.click()
                page.get_by_role("option", name=options.adapter).click()
            users = page.locator("#compare-users input[type=number]")
            users.fill(str(options.users))
            users.press("Enter")
            page.get_by_role("button", name="Compare on the Inspect tab's user").click()
            page.get_by_role("button", name="Run on N users").click()
            page.locator("#compare-scatter .js-plotly-plot").wait_for(timeout=900_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(ROOT / "docs" / "screenshot-compare.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
