"""Issue 6 in a real browser: the /_local/ page over a running `candela`, in headless Chromium."""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from playwright.sync_api import expect

from candela_mitm.config import parse_config
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage

pytestmark = pytest.mark.e2e
SCREENSHOT = "/tmp/candela-local-ui.png"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def page(browser: Any, local: Any) -> Iterator[Any]:
    """The page, opened fresh; every console error and uncaught exception is collected."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    pg.problems = []
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.on("requestfailed", lambda r: pg.problems.append(f"requestfailed: {r.url}"))
    pg.goto(local.url + "/_local/", wait_until="load")
    yield pg
    ctx.close()


@pytest.fixture(autouse=True)
def _reset(upstream: Any, ollama: Any) -> None:
    upstream.reset()
    ollama.reset()


def test_the_page_loads_whole_and_without_console_errors(page: Any, local: Any) -> None:
    page.wait_for_selector("#rt-status.ok")  # the runtime card filled from /_local/api/health
    assert page.inner_text("#rt-name") == "ollama" and page.inner_text("#rt-version") == "0.6.0"
    page.wait_for_selector("#models tbody tr[data-model='llama3.2:3b']")
    assert page.inner_text("#models tr[data-model='llama3.2:3b'] td:nth-child(2)") == "ollama"
    assert page.inner_text("#models tr[data-model='gpt-4o-mini'] td:nth-child(3)") == "cloud"
    expect(page.locator("#spend-budget")).to_have_text("$5.00")
    assert page.inner_text("#spend-user") == getpass.getuser()
    assert page.locator("#chart rect").count() == 24
    assert page.input_value("#cfg-ttl") == "3600"
    assert page.inner_text("#conn") == "live"
    assert page.inner_text("#base-url") == local.url + "/v1"
    page.wait_for_timeout(500)  # a late poll would still report its error
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert page.problems == []


def test_a_request_through_the_proxy_shows_in_the_trace_table(page: Any, local: Any) -> None:
    r = requests.post(
        f"{local.url}/v1/chat/completions",
        timeout=10,
        headers={"Authorization": "Bearer lm-studio"},
        json={"model": "llama3.2:3b", "messages": MSGS},
    )
    assert r.status_code == 200
    row = page.wait_for_selector(
        f"#traces tr[data-span-id='{r.headers['x-candela-span-id']}']", timeout=30_000
    )
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[1:4] == ["llama3.2:3b", "ollama", "12 / 7"]
    assert cells[4] == "$0.00" and cells[5].endswith(" ms") and cells[6] == "ok"
    assert page.is_hidden("#traces-empty")
    assert page.problems == []


def test_a_config_change_through_the_form_takes_effect(
    page: Any, local: Any, upstream: Any
) -> None:
    expect(page.locator("#cfg-mult")).to_have_value("0.25")
    page.fill("#cfg-mult", "0.5")
    page.fill("#cfg-ttl", "600")
    page.click("#cfg-save")
    page.wait_for_selector("#cfg-msg.ok")
    assert page.inner_text("#cfg-msg") == "Saved."
    got = requests.get(f"{local.url}/_local/api/config", timeout=5).json()
    assert got == {"cache_ttl_s": 600, "gemini_cache_price_multiplier": 0.5}
    # and a Gemini request with cached input is priced with it
    upstream.configure(usage=Usage(input_tokens=10_000, output_tokens=1_000, cached_tokens=8_000))
    r = requests.post(
        f"{local.url}/v1/chat/completions",
        timeout=10,
        json={"model": "gemini-2.5-flash", "messages": MSGS},
    )
    assert r.status_code == 200, r.text
    p = PricingTable.from_config(parse_config({})).get("gemini-2.5-flash")
    expected = (2_000 * p.input + 8_000 * p.input * 0.5 + 1_000 * p.output) / 1e6
    span = next(
        s
        for s in requests.get(f"{local.url}/_local/api/traces", timeout=5).json()["spans"]
        if s["span_id"] == r.headers["x-candela-span-id"]
    )
    assert span["cost_usd"] == pytest.approx(expected)
    # a bad value is refused with the reason, and nothing changes
    page.fill("#cfg-mult", "")
    page.locator("#cfg-mult").evaluate(
        "el => el.removeAttribute('max')"
    )  # past the form's own check
    page.fill("#cfg-mult", "3")
    page.click("#cfg-save")
    page.wait_for_selector("#cfg-msg.bad")
    assert "less than or equal to 1" in page.inner_text("#cfg-msg")
    assert (
        requests.get(f"{local.url}/_local/api/config", timeout=5).json()[
            "gemini_cache_price_multiplier"
        ]
        == 0.5
    )
    page.problems[:] = [p for p in page.problems if "400" not in p]  # that refusal was the point
    assert page.problems == []


def test_pulling_a_model_fills_the_progress_bar(page: Any, local: Any, ollama: Any) -> None:
    ollama.configure(n_chunks=5, chunk_delay_s=0.2)
    page.fill("#pull-model", "phi4:14b")
    page.click("#pull-btn")
    # streamed: the bar is seen part way before it is full
    expect(page.locator("#pull-pct")).to_have_text(re.compile(r"^[1-9][0-9]?%$"))
    expect(page.locator("#pull-progress")).to_have_js_property("value", 100)
    page.wait_for_selector("text=phi4:14b: pulled")
    assert page.inner_text("#pull-pct") == "100%"
    assert [q.json for q in ollama.requests if q.route == "ollama.pull"][-1] == {
        "model": "phi4:14b",
        "stream": True,
    }
    expect(page.locator("#traces tbody tr").first).to_be_visible()
    page.screenshot(path=SCREENSHOT.replace(".png", "-used.png"), full_page=True)
    assert page.problems == []
