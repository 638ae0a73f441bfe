"""The README's screenshots, taken from the real app (default model, bundled sample) in Debian's Chromium.

Run: PYTHONPATH=. .venv/bin/python docs/screenshots.py [--adapter NAME] [--users 40]

Inspect at 1440 px for user u0002 with the app's default settings (preset seed); Compare over the first N users
(with the adapter when one is named and published in adapters/, the baselines always). Writes
docs/screenshot-inspect.png and docs/screenshot-compare.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rerank_app.browser import chromium, open_app, pick_user
from rerank_app.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="an adapter in adapters/ to compare with the base")
    parser.add_argument("--users", type=int, default=40, help="users for the Compare screenshot")
    options = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        with chromium() as browser:
            # The server loads the model first: retry the page while it starts, then wait for the first score.
            page = open_app(browser, url, width=1440, height=1000, timeout_ms=300_000, server_start_s=300)
            pick_user(page, "u0002", timeout_ms=300_000)
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
            users.blur()  # commits the count; Enter would start the run before the one-user Compare
            page.get_by_role("button", name="Compare on the Inspect tab's user").click()
            page.get_by_role("button", name="Run on N users").click()
            page.locator("#compare-scatter .js-plotly-plot").wait_for(timeout=900_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(ROOT / "docs" / "screenshot-compare.png"), full_page=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
