"""The served app in Debian's Chromium driven by Playwright: the browser tests and the README screenshots share it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "chromium", "open_app", "pick_user"]

CHROMIUM = Path("/usr/bin/chromium")
# Headless and offline: nothing in the browser reaches the network besides the app.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser on Debian's Chromium, closed on the way out."""
    # Playwright is needed only here: importing this module must not need it (the tests skip without it).
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser: Any, url: str, *, width: int, height: int, first_user: str = "",
             timeout_ms: int = 60_000, server_start_s: float = 0.0) -> Any:
    """A new page on the app once the Inspect tab has scored its first user (it does on load).

    server_start_s: how long to retry the first load while a server that was just started comes up."""
    page = browser.new_page(viewport={"width": width, "height": height})
    deadline = time.monotonic() + server_start_s
    while True:
        try:
            page.goto(url)
            break
        except Exception:  # Playwright's Error: connection refused until the server listens
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    page.locator("#inspect-summary").get_by_text(f"User {first_user}".strip()).wait_for(timeout=timeout_ms)
    return page


def pick_user(page: Any, user_id: str, *, timeout_ms: int = 60_000) -> None:
    """Type the user into the Inspect picker, choose it, and wait until the summary shows it."""
    picker = page.locator("#user-picker input")
    picker.click()
    picker.fill(user_id)
    page.get_by_role("option", name=user_id, exact=True).click()
    page.locator("#inspect-summary").get_by_text(f"User {user_id}").wait_for(timeout=timeout_ms)
