"""The Inspect tab in a real browser: Debian's Chromium driven by Playwright picks a user and sees chart and audit."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
from app_helpers import make_context

from rerank_app.browser import CHROMIUM, chromium, open_app, pick_user
from rerank_app.ports import free_port
from rerank_app.server import build_app, launch

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("browser"), smol_tokenizer)
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    yield context, f"http://127.0.0.1:{port}/"
    context.finetune.jobs.wait(timeout=60)
    demo.close()


def app_tab(browser, url: str, tab: str):
    """The app opened at 1400 px on its first user, with `tab` selected."""
    page = open_app(browser, url, width=1400, height=1100, first_user="u00")
    page.get_by_role("tab", name=tab).click()
    return page


def diagnose_permutations(browser, url: str, count: int):
    """The Diagnose tab with position bias set to `count` permuted orders; the page and the orders box."""
    page = app_tab(browser, url, "Diagnose")
    page.get_by_role("radio", name="permutations").check()
    orders = page.locator("#diagnose-orders input")
    orders.fill(str(count))
    return page, orders


def fine_tune_form(browser, url: str, adapter_name: str):
    """The app's Fine-tune tab with the adapter name typed in."""
    page = app_tab(browser, url, "Fine-tune")
    page.locator("#adapter-name textarea, #adapter-name input").first.fill(adapter_name)
    return page


def test_pick_a_user_and_see_chart_and_audit(browser, served) -> None:
    _, url = served
    page = open_app(browser, url, width=1400, height=1100, first_user="u00")  # the first user is scored on load
    pick_user(page, "u07")
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
    page = fine_tune_form(browser, url, "from-the-form")
    page.get_by_text("Advanced", exact=True).click()
    for field, value in (("max-samples", "16"), ("candidates", "10"), ("eval-users", "0")):
        box = page.locator(f"#finetune-{field} input")
        box.wait_for(state="visible")
        box.fill(value)
        box.press("Tab")
    page.locator("#start-finetune").click()
    # The page polls the run: the result card appears without a reload, with the loss curve drawn.
    try:
        page.locator("#finetune-result").get_by_text("is ready").wait_for(timeout=180_000)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "debug-finetune.png"), full_page=True)
        print("MESSAGE", page.locator("#finetune-message").inner_text(), context.finetune.jobs.status())
        raise
    assert "step 4/4" in page.locator("#finetune-progress").inner_text()
    status = context.finetune.jobs.status()
    assert status.state == "done" and status.evals == []  # the form's "eval users 0" reached the run
    # Both losses drawn and named in the legend; ln N beside the letter loss.
    loss = page.locator("#finetune-loss")
    loss.locator(".js-plotly-plot").wait_for(timeout=30_000)
    legend = loss.inner_text()
    assert "letter loss (answer letter only)" in legend and "total loss (letter + end-of-turn tokens)" in legend
    assert "ln N" in legend
    page.screenshot(path=str(ARTIFACTS / "browser-finetune.png"), full_page=True)
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#adapter-picker input").click()
    page.get_by_role("option", name="from-the-form").wait_for(timeout=10_000)
    page.close()


def test_a_long_diagnostic_does_not_freeze_inspect_and_stops_on_request(browser, served) -> None:
    """The freeze case: the longest allowed position-bias run, while another client inspects."""
    from gradio_client import Client

    context, url = served
    page, _ = diagnose_permutations(browser, url, 200)
    users = page.locator("#diagnose-bias-users input[type=number]")
    users.fill("25")  # 25 users x 200 orders: the 5000 scored prompts the limits allow
    users.press("Enter")  # Enter in the users box runs "Run on N users" (one run: no click besides)
    deadline = 0
    while not context.stops.active and deadline < 600:
        page.wait_for_timeout(100)
        deadline += 1
    assert deadline < 600, "the long diagnostic did not start"
    # Another client: answered while the diagnostic is still running.
    other = Client(url, verbose=False)
    answer = other.predict(user_id="u05", api_name="/inspect_json")
    assert answer["user_id"] == "u05"
    assert context.stops.active, "the diagnostic ended first"
    page.locator("#diagnose-stop").click()
    page.locator("#diagnose-stop-note").get_by_text("Stop requested for 1").wait_for(timeout=30_000)
    for _ in range(300):
        if not context.stops.active:
            break
        page.wait_for_timeout(100)
    assert not context.stops.active
    # Started again, then the page is closed: the run stops with it.
    page.locator("#diagnose-bias-users-button").click()
    for _ in range(600):
        if context.stops.active:
            break
        page.wait_for_timeout(100)
    page.close()
    for _ in range(600):
        if not context.stops.active:
            break
        threading.Event().wait(0.1)
    assert not context.stops.active, "closing did not stop it"


def test_a_refused_request_keeps_the_page_and_restores_the_seed(browser, served) -> None:
    _, url = served
    page = open_app(browser, url, width=1400, height=1100, first_user="u00")
    page.get_by_text("More settings", exact=True).click()
    seed = page.locator("#candidate-seed input")
    seed.wait_for(state="visible")
    seed.fill("")
    seed.press("Enter")
    page.get_by_text("candidate seed is empty").first.wait_for(timeout=30_000)
    # The previous results stay, with no error badge; the seed is back to its last valid value.
    assert "User u00" in page.locator("#inspect-summary").inner_text()
    assert page.locator("#letter-chart .js-plotly-plot g.point").count() == 20
    page.wait_for_function("() => document.querySelector('#candidate-seed input').value === '0'", timeout=30_000)
    page.close()


def test_narrow_layout_and_the_report_opened_from_disk(browser, served) -> None:
    _, url = served
    page = open_app(browser, url, width=800, height=1100, first_user="u00")
    page.locator("#letter-chart .js-plotly-plot").wait_for(timeout=30_000)
    table = page.locator("#candidates-table")
    first_item = table.get_by_text("i0", exact=False).first
    box = first_item.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 800  # readable, not cut off
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-inspect-800px.png"), full_page=True)
    page.locator("#inspect-report-button").click()
    link = page.locator("#inspect-report a").first
    link.wait_for(timeout=60_000)
    report = Path(tempfile.gettempdir()) / "rerank-inspector-reports" / "inspect-u00-base.html"
    assert report.is_file()
    page.close()
    offline = browser.new_page(viewport={"width": 1200, "height": 900})
    offline.goto(report.as_uri())
    chart = offline.locator("#letters .main-svg").first
    chart.wait_for(timeout=30_000)
    assert offline.locator("#letters g.point").count() == 20  # plotly.js inlined: the chart renders offline
    offline.screenshot(path=str(ARTIFACTS / "report-inspect.png"), full_page=False)
    offline.close()


def test_a_refused_diagnostic_keeps_its_results_and_restores_the_orders(browser, served) -> None:
    _, url = served
    page, orders = diagnose_permutations(browser, url, 3)
    orders.press("Enter")  # Enter runs the section
    page.locator("#diagnose-heatmap .js-plotly-plot").wait_for(timeout=60_000)
    page.locator("#diagnose-bias-note").get_by_text("User u00").wait_for(timeout=30_000)
    orders.fill("1000000")
    orders.press("Enter")
    page.get_by_text("orders must be from 1 to 200").first.wait_for(timeout=30_000)
    # The previous results stay, with no error badge; the orders box is back to its last valid value.
    page.wait_for_function("() => document.querySelector('#diagnose-orders input').value === '3'", timeout=30_000)
    assert page.locator("#diagnose-heatmap .js-plotly-plot").count() == 1
    assert "User u00" in page.locator("#diagnose-bias-note").inner_text()
    for section in ("#diagnose-heatmap", "#diagnose-bias-note"):
        assert page.locator(section).get_by_text("Error", exact=True).count() == 0
    page.close()


def test_enter_in_the_candidates_box_rescores(browser, served) -> None:
    _, url = served
    page = open_app(browser, url, width=1400, height=1100, first_user="u00")
    points = page.locator("#letter-chart .js-plotly-plot g.point")
    page.wait_for_function("() => document.querySelectorAll('#letter-chart .js-plotly-plot g.point').length === 20",
                           timeout=30_000)
    count = page.locator("#candidates-count input[type=number]")
    count.fill("7")
    count.press("Enter")  # no blur: Enter alone re-scores
    page.wait_for_function("() => document.querySelectorAll('#letter-chart .js-plotly-plot g.point').length === 7",
                           timeout=30_000)
    assert points.count() == 7
    assert page.evaluate("() => document.activeElement.closest('#candidates-count') !== null")  # focus kept
    page.close()


def test_enter_in_a_diagnose_users_box_runs_its_section(browser, served) -> None:
    _, url = served
    page = app_tab(browser, url, "Diagnose")
    users = page.locator("#diagnose-prior-users input[type=number]")
    users.fill("2")
    users.press("Enter")  # no click on "Run letter prior": Enter in the slider's box runs it
    page.locator("#diagnose-prior-chart .js-plotly-plot").wait_for(timeout=60_000)
    assert users.input_value() == "2"
    page.close()


def test_enter_in_a_fine_tune_box_starts_the_run(browser, served) -> None:
    context, url = served
    page = fine_tune_form(browser, url, "started-by-enter")
    samples = page.locator("#finetune-max-samples input")
    samples.fill("16")
    samples.press("Enter")
    try:
        page.locator("#finetune-message").get_by_text("Started started-by-enter").wait_for(timeout=30_000)
    finally:  # the served app runs one fine-tune at a time: leave none running for the next test
        if context.finetune.jobs.status().active:
            context.finetune.jobs.cancel()
        assert not context.finetune.jobs.wait(timeout=120).active
    page.close()
