"""The Inspect tab in a real browser: Debian's Chromium driven by Playwright picks a user and sees chart and audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import free_port, make_context

from rerank_app.server import build_app, launch

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("browser"), smol_tokenizer)
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    yield context, f"http://127.0.0.1:{port}/"
    context.jobs.wait(timeout=60)
    demo.close()


def test_pick_a_user_and_see_chart_and_audit(browser, served) -> None:
    _, url = served
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    # The first user is scored on load.
    page.locator("#inspect-summary").get_by_text("User u00").wait_for(timeout=60_000)
    picker = page.locator("#user-picker input")
    picker.click()
    picker.fill("u07")
    page.get_by_role("option", name="u07", exact=True).click()
    page.locator("#inspect-summary").get_by_text("User u07").wait_for(timeout=60_000)
    chart = page.locator("#letter-chart .js-plotly-plot")
    chart.wait_for(timeout=30_000)
    assert chart.locator("g.point").count() == 20  # one bar per candidate letter
    audit = page.locator("#audit-table")
    clean = audit.get_by_text("ok", exact=True).filter(visible=True)
    clean.first.wait_for(timeout=30_000)
    assert clean.count() >= 5  # the flags column: every letter clean
    assert "ground truth" in page.locator("#letter-chart").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-inspect.png"), full_page=True)
    page.close()


def test_fine_tune_from_the_form_shows_progress_and_lists_the_adapter(browser, served) -> None:
    context, url = served
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    page.locator("#inspect-summary").get_by_text("User u00").wait_for(timeout=60_000)
    page.get_by_role("tab", name="Fine-tune").click()
    page.locator("#adapter-name textarea, #adapter-name input").first.fill("from-the-form")
    page.get_by_text("Advanced", exact=True).click()
    for field, value in (("max-samples", "16"), ("candidates", "10"), ("eval-users", "0")):
        box = page.locator(f"#finetune-{field} input")
        box.wait_for(state="visible")
        box.fill(value)
        box.press("Tab")
    page.locator("#start-finetune").click()
    # The page polls the run: the result card appears without a reload, with the loss curve drawn.
    page.locator("#finetune-result").get_by_text("is ready").wait_for(timeout=180_000)
    assert "step 4/4" in page.locator("#finetune-progress").inner_text()
    status = context.jobs.status()
    assert status.state == "done" and status.evals == []  # the form's "eval users 0" reached the run
    page.screenshot(path=str(ARTIFACTS / "browser-finetune.png"), full_page=True)
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#adapter-picker input").click()
    page.get_by_role("option", name="from-the-form").wait_for(timeout=10_000)
    page.close()
