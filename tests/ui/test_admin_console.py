"""Issue 20 in a real browser: the /admin/ console of a running candela-server, in headless Chromium."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from playwright.sync_api import expect

from candela_mitm.providers.usage import Usage
from tests.e2e.conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env, sdk_json, sha
from tests.fakes.candela import CandelaProcess
from tests.fakes.sdk import sdk_available

pytestmark = pytest.mark.e2e
SCREENSHOT = "/tmp/candela-admin-console.png"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
MSGS = [{"role": "user", "content": "hi"}]
TARA = "tara@example.com"  # tenant admin of research-team
TARA_KEY = "cdl_tara_tenant_admin"
RITA = "rita@example.com"  # a developer in research-team only


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream, token_server) -> Iterator[CandelaProcess]:
    tmp = tmp_path_factory.mktemp("console")
    cfg = base_config(
        upstream.url,
        users={
            "alice@example.com": {
                "tenants": ["research-team", "other-team"],
                "daily_budget_usd": 50.0,
            },
            "bob@example.com": {"tenants": ["contractor-pool"]},
            TARA: {"role": "tenant_admin", "tenants": ["research-team"]},
            RITA: {"tenants": ["research-team"]},
        },
    )
    cfg["auth"]["api_keys"].append({"sha256": sha(TARA_KEY), "user": TARA})
    cfg["governance"]["models"] = {
        "blocked": ["o1-pro"],
        "tenants": {"contractor-pool": {"models": {"allowed": ["gpt-4o-mini"]}}},
    }
    cfg["governance"]["tenants"] = {"research-team": {"budget_usd": 500, "period": "monthly"}}
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        # real spend, through the proxy: two tenants, two models
        upstream.usage = Usage(input_tokens=100_000, output_tokens=20_000)
        for tenant, model in (
            ("research-team", "gpt-4o"),
            ("research-team", "gpt-4o-mini"),
            ("other-team", "gpt-4o"),
        ):
            r = requests.post(
                c.url + "/proxy/openai/v1/chat/completions",
                json={"model": model, "messages": MSGS},
                headers={**ALICE, "X-Candela-Tenant-Id": tenant},
                timeout=20,
            )
            assert r.status_code == 200, r.text
        upstream.reset()
        yield c


def open_page(browser: Any, server: CandelaProcess) -> Any:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400}, accept_downloads=True)
    pg = ctx.new_page()
    pg.problems = []
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.on("requestfailed", lambda r: pg.problems.append(f"requestfailed: {r.url}"))
    pg.goto(server.url + "/admin/", wait_until="load")
    return pg


def sign_in(pg: Any, key: str) -> None:
    pg.fill("#key", key)
    pg.click("#signin-form button[type=submit]")
    pg.wait_for_selector("#app:not([hidden])")


@pytest.fixture
def admin_page(browser: Any, server: CandelaProcess) -> Iterator[Any]:
    pg = open_page(browser, server)
    sign_in(pg, ADMIN_KEY)
    yield pg
    pg.context.close()


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def test_page_is_served_before_authentication_with_a_strict_policy(server):
    r = requests.get(server.url + "/admin/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/admin/admin.js"' in r.text and "http" not in r.text.split("<body>")[0]
    assert requests.get(server.url + "/admin/admin.js", timeout=10).status_code == 200
    # the API itself still needs a key
    assert requests.get(server.url + "/admin/v1/users", timeout=10).status_code == 401
    r = requests.post(server.url + "/admin/", timeout=10)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_admin_sees_spend_per_tenant_drawn_from_the_api(admin_page, server):
    pg = admin_page
    pg.select_option("#spend-by", "tenant")
    lb = requests.get(
        server.url + f"/admin/v1/leaderboard?by=tenant&since={today()}&until={today()}",
        headers=ADMIN,
        timeout=10,
    ).json()
    expected = {r["key"]: r["spend_usd"] for r in lb["rows"]}
    assert expected["research-team"] > expected["other-team"] > 0
    for tenant, usd in expected.items():
        bar = pg.locator(f"#chart rect[data-key='{tenant}'][data-day='{today()}']")
        expect(bar).to_have_count(1)
        assert float(bar.get_attribute("data-usd")) == pytest.approx(usd)
        assert float(bar.get_attribute("height")) > 0.4
    pg.select_option("#spend-by", "model")
    expect(pg.locator(f"#chart rect[data-key='gpt-4o-mini'][data-day='{today()}']")).to_have_count(
        1
    )
    expect(pg.locator("#models tbody tr")).to_have_count(2)
    expect(pg.locator("#leaderboard tbody tr")).to_have_count(2)
    first = pg.locator("#leaderboard tbody tr").first
    assert first.locator("td").nth(1).inner_text() == "research-team"
    alice = pg.locator("#users tr[data-user='alice@example.com']")
    expect(alice).to_have_count(1)
    assert alice.locator("td").nth(3).inner_text() == "$50.00"
    assert float(alice.locator("meter").get_attribute("value") or 0) > 0
    pg.wait_for_timeout(300)
    pg.screenshot(path=SCREENSHOT, full_page=True)
    assert pg.problems == []


def test_a_grant_created_from_the_page_shows_in_the_api_and_the_audit(admin_page, server):
    pg = admin_page
    pg.click("#users tr[data-user='alice@example.com'] button")
    expect(pg.locator("#grant-create")).to_be_enabled()
    expires = (datetime.now(UTC).date() + timedelta(days=30)).isoformat()
    pg.fill("#grant-amount", "7.5")
    pg.fill("#grant-expires", expires)
    pg.fill("#grant-reason", "conference demo")
    pg.click("#grant-create")
    expect(pg.locator("#grant-confirm")).to_be_visible()
    assert "$7.50 to alice@example.com" in pg.inner_text("#grant-summary")
    # nothing is created before the confirmation
    before = requests.get(
        server.url + "/admin/v1/users/alice@example.com/grants", headers=ADMIN, timeout=10
    ).json()["grants"]
    assert [g for g in before if g["reason"] == "conference demo"] == []
    pg.click("#grant-yes")
    expect(pg.locator("#grant-msg")).to_contain_text("Created g_")
    grant_id = pg.inner_text("#grant-msg").split("Created ", 1)[1].rstrip(".")
    grants = requests.get(
        server.url + "/admin/v1/users/alice@example.com/grants", headers=ADMIN, timeout=10
    ).json()["grants"]
    [g] = [g for g in grants if g["id"] == grant_id]
    assert (g["amount_usd"], g["reason"], g["actor"]) == (
        7.5,
        "conference demo",
        "admin@example.com",
    )
    assert g["expires_at"].startswith(expires)
    expect(pg.locator(f"#grants tr[data-grant='{grant_id}']")).to_have_count(1)

    # the audit log, filtered, and its CSV export
    pg.fill("#audit-action", "admin_action")
    pg.fill("#audit-user", "admin@example.com")
    pg.click("#audit-form button[type=submit]")
    expect(pg.locator("#audit tbody tr").first).to_contain_text("grant.create")
    with pg.expect_download() as dl:
        pg.click("#audit-csv")
    rows = list(csv.DictReader(io.StringIO(open(dl.value.path()).read())))
    api = requests.get(
        server.url + "/admin/v1/audit?action=admin_action&user=admin@example.com",
        headers=ADMIN,
        timeout=10,
    ).json()["entries"]
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in api]
    assert {r["action"] for r in rows} == {"admin_action"}
    assert grant_id in rows[0]["fields"] and rows[0]["user_id"] == "admin@example.com"
    assert rows[0]["hash"] == api[0]["hash"]
    assert pg.problems == []


def test_cancelled_grant_is_not_created(admin_page, server):
    pg = admin_page
    pg.click("#users tr[data-user='bob@example.com'] button")
    pg.fill("#grant-amount", "3")
    pg.fill("#grant-expires", (datetime.now(UTC).date() + timedelta(days=3)).isoformat())
    pg.fill("#grant-reason", "never")
    pg.click("#grant-create")
    pg.click("#grant-no")
    expect(pg.locator("#grant-confirm")).to_be_hidden()
    pg.wait_for_timeout(300)
    grants = requests.get(
        server.url + "/admin/v1/users/bob@example.com/grants", headers=ADMIN, timeout=10
    ).json()["grants"]
    assert grants == []
    assert pg.problems == []


def test_a_developer_sees_only_their_own_usage_and_budget(browser, server):
    pg = open_page(browser, server)
    try:
        sign_in(pg, ALICE_KEY)
        expect(pg.locator("#me-user")).to_have_text("alice@example.com")
        expect(pg.locator("#me-budget")).to_have_text("$50.00")
        for section in ("#users", "#audit", "#leaderboard", "#grants"):
            assert not pg.locator(section).is_visible()
        bar = pg.locator(f"#chart rect[data-key='gpt-4o'][data-day='{today()}']")
        expect(bar).to_have_count(1)
        own = requests.get(
            server.url + f"/admin/v1/usage?since={today()}&until={today()}",
            headers=ALICE,
            timeout=10,
        ).json()
        [m] = [m for m in own["models"] if m["model"] == "gpt-4o"]
        assert float(bar.get_attribute("data-usd")) == pytest.approx(m["spend_usd"])
        pg.wait_for_timeout(300)
        assert pg.problems == []  # no admin-only call was made (it would be a 403 in the console)
    finally:
        pg.context.close()


def test_a_wrong_key_is_refused(browser, server):
    pg = open_page(browser, server)
    try:
        pg.fill("#key", "cdl_not_a_key")
        pg.click("#signin-form button[type=submit]")
        expect(pg.locator("#signin-msg")).to_have_text("That key is not valid here.")
        assert pg.locator("#app").is_hidden()
    finally:
        pg.context.close()


def test_users_are_added_changed_and_removed_from_the_page(admin_page, server):
    pg = admin_page
    # change bob's budget and rate: nothing happens before the confirmation
    pg.click("#users tr[data-user='bob@example.com'] button")
    expect(pg.locator("#u-id")).to_have_value("bob@example.com")
    assert pg.input_value("#u-tenants") == "contractor-pool"
    pg.fill("#u-budget", "12.5")
    pg.fill("#u-rpm", "30")
    pg.click("#u-save")
    expect(pg.locator("#user-summary")).to_contain_text("Change bob@example.com")

    def users() -> dict[str, Any]:
        r = requests.get(server.url + "/admin/v1/users", headers=ADMIN, timeout=10)
        return {u["user_id"]: u for u in r.json()["users"]}

    assert users()["bob@example.com"]["daily_budget_usd"] != 12.5
    pg.click("#user-yes")
    expect(pg.locator("#user-msg")).to_have_text("Changed bob@example.com.")
    bob = users()["bob@example.com"]
    assert (bob["daily_budget_usd"], bob["requests_per_minute"]) == (12.5, 30)
    assert bob["tenants"] == ["contractor-pool"]
    expect(pg.locator("#users tr[data-user='bob@example.com'] td").nth(3)).to_have_text("$12.50")

    # a new user, then removed
    pg.fill("#u-id", "carol@example.com")
    pg.select_option("#u-role", "developer")
    pg.fill("#u-tenants", "research-team, other-team")
    pg.fill("#u-budget", "")
    pg.fill("#u-rpm", "")
    pg.click("#u-save")
    pg.click("#user-yes")
    expect(pg.locator("#user-msg")).to_have_text("Added carol@example.com.")
    assert users()["carol@example.com"]["tenants"] == ["research-team", "other-team"]
    pg.click("#users tr[data-user='carol@example.com'] button")
    pg.click("#u-remove")
    expect(pg.locator("#user-summary")).to_contain_text("Remove carol@example.com?")
    pg.click("#user-yes")
    expect(pg.locator("#user-msg")).to_have_text("Removed carol@example.com.")
    assert "carol@example.com" not in users()
    expect(pg.locator("#users tr[data-user='carol@example.com']")).to_have_count(0)
    audit = requests.get(
        server.url + "/admin/v1/audit?action=admin_action&user=admin@example.com",
        headers=ADMIN,
        timeout=10,
    ).json()["entries"]
    done = [(e["fields"]["action"], e["fields"]["target"]) for e in audit]
    for change in (
        ("user.update", "bob@example.com"),
        ("user.create", "carol@example.com"),
        ("user.delete", "carol@example.com"),
    ):
        assert change in done
    assert pg.problems == []


# -- API keys -------------------------------------------------------------------------------------

CHAT = "/proxy/openai/v1/chat/completions"


def chat_with(server: CandelaProcess, key: str) -> requests.Response:
    return requests.post(
        server.url + CHAT,
        json={"model": "gpt-4o-mini", "messages": MSGS},
        headers={"Authorization": f"Bearer {key}"},
        timeout=20,
    )


def sdk_chat(url: str, key: str) -> dict[str, Any]:
    [out] = sdk_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{url}/proxy/openai/v1", api_key="{key}", max_retries=0)
        try:
            r = c.chat.completions.create(model="gpt-4o-mini",
                                          messages=[{{"role": "user", "content": "hi"}}])
            print(json.dumps({{"status": 200, "text": r.choices[0].message.content}}))
        except openai.APIStatusError as e:
            print(json.dumps({{"status": e.status_code, "error": e.body.get("error")
                               if isinstance(e.body, dict) else e.body}}))
    """)
    return out


def keys_of(server: CandelaProcess, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    r = requests.get(server.url + "/admin/v1/keys", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return {k["id"]: k for k in r.json()["keys"]}


def create_key_in_page(pg: Any, name: str, user: str = "") -> tuple[str, str]:
    """(key id, the key) as the page shows them once."""
    if user:
        pg.fill("#k-user", user)
    pg.fill("#k-name", name)
    pg.click("#k-create")
    expect(pg.locator("#key-new")).to_be_visible()
    expect(pg.locator("#key-new")).to_contain_text("it will not be shown again")
    secret = pg.inner_text("#key-secret").strip()
    key_id = pg.inner_text("#key-msg").split("Created ", 1)[1].split(" ", 1)[0]
    return key_id, secret


@pytest.mark.sdk
def test_a_key_created_in_the_page_works_with_the_openai_sdk_and_revoked_is_refused(
    browser, server, upstream
):
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")
    ctx = browser.new_context(
        viewport={"width": 1280, "height": 1400}, permissions=["clipboard-read", "clipboard-write"]
    )
    pg = ctx.new_page()
    pg.problems = []
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.goto(server.url + "/admin/", wait_until="load")
    try:
        sign_in(pg, ALICE_KEY)
        assert not pg.locator("#k-user").is_visible()  # a developer mints only for themselves
        key_id, secret = create_key_in_page(pg, "notebook")
        assert secret.startswith("cdk_") and len(secret) > 30
        pg.click("#key-copy")
        expect(pg.locator("#key-msg")).to_have_text("Copied to the clipboard.")
        assert pg.evaluate("navigator.clipboard.readText()") == secret
        mine = keys_of(server, ALICE)
        assert (mine[key_id]["user_id"], mine[key_id]["name"], mine[key_id]["state"]) == (
            "alice@example.com",
            "notebook",
            "active",
        )
        row_ = pg.locator(f"#keys tr[data-key='{key_id}']")
        expect(row_).to_contain_text("active")
        assert secret not in row_.inner_text()
        # shown once: gone from the page when dismissed, and never in a listing
        pg.click("#key-done")
        expect(pg.locator("#key-new")).to_be_hidden()
        assert secret not in pg.content()
        assert (
            secret
            not in requests.get(server.url + "/admin/v1/keys", headers=ALICE, timeout=10).text
        )

        upstream.clear()
        out = sdk_chat(server.url, secret)
        assert out["status"] == 200, out
        [seen] = upstream.requests
        assert secret not in str(seen.headers)  # the organisation's key went upstream

        # revoke: asked first, nothing changes before the confirmation
        row_.locator("button[data-act=revoke]").click()
        expect(pg.locator("#key-summary")).to_contain_text(f"Revoke {key_id}")
        assert keys_of(server, ALICE)[key_id]["state"] == "active"
        pg.click("#key-yes")
        expect(pg.locator("#key-msg")).to_have_text(f"Revoked {key_id}.")
        expect(row_).to_contain_text("revoked")
        assert keys_of(server, ALICE)[key_id]["state"] == "revoked"
        upstream.clear()
        out = sdk_chat(server.url, secret)
        assert (out["status"], out["error"]) == (401, "unauthenticated")
        r = chat_with(server, secret)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        assert upstream.requests == []  # refused before it left
        assert pg.problems == []
    finally:
        ctx.close()


def test_a_key_rotated_in_the_page_is_replaced_and_cancel_changes_nothing(
    browser, server, upstream
):
    pg = open_page(browser, server)
    try:
        sign_in(pg, ALICE_KEY)
        old_id, old = create_key_in_page(pg, "laptop")
        pg.click("#key-done")
        row_ = pg.locator(f"#keys tr[data-key='{old_id}']")
        row_.locator("button[data-act=rotate]").click()
        expect(pg.locator("#key-summary")).to_contain_text(f"Rotate {old_id}")
        pg.click("#key-no")
        expect(pg.locator("#key-confirm")).to_be_hidden()
        assert len([k for k in keys_of(server, ALICE).values() if k["name"] == "laptop"]) == 1

        row_.locator("button[data-act=rotate]").click()
        pg.click("#key-yes")
        expect(pg.locator("#key-new")).to_be_visible()
        expect(pg.locator("#key-msg")).to_contain_text(f"Rotated {old_id}")
        new = pg.inner_text("#key-secret").strip()
        assert new.startswith("cdk_") and new != old
        laptops = {k["id"]: k for k in keys_of(server, ALICE).values() if k["name"] == "laptop"}
        assert len(laptops) == 2 and laptops[old_id]["expires_at"] is not None
        upstream.clear()
        assert chat_with(server, new).status_code == 200
        assert chat_with(server, old).status_code == 200  # within its grace hour
        assert len(upstream.requests) == 2
        audit = requests.get(
            server.url + "/admin/v1/audit?action=admin_action&user=alice@example.com",
            headers=ADMIN,
            timeout=10,
        ).json()["entries"]
        assert ("key.rotate", "alice@example.com") in [
            (e["fields"]["action"], e["fields"]["target"]) for e in audit
        ]
        assert pg.problems == []
    finally:
        pg.context.close()


def test_developers_see_only_their_own_keys_and_admins_every_key(browser, server):
    r = requests.post(
        server.url + "/admin/v1/keys",
        json={"user_id": "bob@example.com", "name": "bob-ci"},
        headers=ADMIN,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    bob_key = r.json()["id"]
    # the admin sees it, and mints one for bob from the page
    pg = open_page(browser, server)
    try:
        sign_in(pg, ADMIN_KEY)
        expect(pg.locator(f"#keys tr[data-key='{bob_key}']")).to_contain_text("bob@example.com")
        minted, _ = create_key_in_page(pg, "from-console", user="bob@example.com")
        assert keys_of(server, ADMIN)[minted]["user_id"] == "bob@example.com"
        assert pg.problems == []
    finally:
        pg.context.close()

    dev = open_page(browser, server)
    try:
        sign_in(dev, ALICE_KEY)
        expect(dev.locator("#keys-scope")).to_have_text("(alice@example.com)")
        dev.wait_for_timeout(300)
        rows = dev.locator("#keys tbody tr")
        users = {rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())}
        assert users <= {"alice@example.com"}
        assert dev.locator(f"#keys tr[data-key='{bob_key}']").count() == 0
        assert dev.problems == []
    finally:
        dev.context.close()


# -- the tenant admin's view -----------------------------------------------------------------------


def test_a_tenant_admin_sees_only_its_tenant_and_acts_for_its_developers(browser, server, upstream):
    pg = open_page(browser, server)
    try:
        sign_in(pg, TARA_KEY)
        expect(pg.locator("#tenant-view")).to_contain_text("Tenant view: research-team")
        assert not pg.locator("#edit-card").is_visible()  # changing users is for admins
        # users: those of research-team, with only research-team shown
        expect(pg.locator(f"#users tr[data-user='{RITA}']")).to_have_count(1)
        alice = pg.locator("#users tr[data-user='alice@example.com']")
        expect(alice).to_have_count(1)
        assert alice.locator("td").nth(2).inner_text() == "research-team"
        assert pg.locator("#users tr[data-user='bob@example.com']").count() == 0
        # spend and leaderboard: its tenant only, drawn from the API's scoped answers
        expect(pg.locator("#leaderboard tbody tr")).to_have_count(1)
        assert pg.locator("#leaderboard tbody tr td").nth(1).inner_text() == "research-team"
        pg.select_option("#spend-by", "tenant")
        bar = pg.locator(f"#chart rect[data-key='research-team'][data-day='{today()}']")
        expect(bar).to_have_count(1)
        assert pg.locator("#chart rect[data-key='other-team']").count() == 0
        tara = {"Authorization": f"Bearer {TARA_KEY}"}
        lb = requests.get(
            server.url + f"/admin/v1/leaderboard?by=tenant&since={today()}",
            headers=tara,
            timeout=10,
        ).json()["rows"]
        assert float(bar.get_attribute("data-usd")) == pytest.approx(lb[0]["spend_usd"])
        tenants = {
            pg.locator("#audit tbody tr").nth(i).locator("td").nth(4).inner_text()
            for i in range(pg.locator("#audit tbody tr").count())
        }
        assert tenants and tenants <= {"research-team", "–"}

        # a grant for its developer, from the page
        pg.click(f"#users tr[data-user='{RITA}'] button")
        pg.fill("#grant-amount", "4")
        pg.fill("#grant-expires", (datetime.now(UTC).date() + timedelta(days=5)).isoformat())
        pg.fill("#grant-reason", "tenant offsite")
        pg.click("#grant-create")
        pg.click("#grant-yes")
        expect(pg.locator("#grant-msg")).to_contain_text("Created g_")
        [g] = requests.get(
            server.url + f"/admin/v1/users/{RITA}/grants", headers=ADMIN, timeout=10
        ).json()["grants"]
        assert (g["amount_usd"], g["actor"]) == (4.0, TARA)
        # not for a user shared with another tenant: the API refuses it
        pg.click("#users tr[data-user='alice@example.com'] button")
        pg.fill("#grant-amount", "4")
        pg.fill("#grant-expires", (datetime.now(UTC).date() + timedelta(days=5)).isoformat())
        pg.fill("#grant-reason", "sneaky")
        pg.click("#grant-create")
        pg.click("#grant-yes")
        expect(pg.locator("#grant-msg")).to_contain_text("forbidden: A tenant admin may only")
        alice_grants = requests.get(
            server.url + "/admin/v1/users/alice@example.com/grants", headers=ADMIN, timeout=10
        ).json()["grants"]
        assert [x for x in alice_grants if x["reason"] == "sneaky"] == []

        # a key for its developer, from the page, that works on the proxy
        key_id, secret = create_key_in_page(pg, "rita-ci", user=RITA)
        assert keys_of(server, ADMIN)[key_id]["user_id"] == RITA
        upstream.clear()
        assert chat_with(server, secret).status_code == 200
        assert len(upstream.requests) == 1
        rows = pg.locator("#keys tbody tr")
        owners = {rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())}
        assert owners <= {TARA, RITA}
        pg.screenshot(path=SCREENSHOT.replace(".png", "-tenant.png"), full_page=True)
        # the policy: its tenant only
        expect(pg.locator("#policy-tenants tbody tr")).to_have_count(1)
        assert pg.locator("#policy-tenants tr[data-tenant='research-team']").count() == 1
        users = pg.locator("#policy-users tbody tr")
        shown = {users.nth(i).get_attribute("data-user") for i in range(users.count())}
        assert shown == {TARA, RITA, "alice@example.com"}
        assert "other-team" not in pg.inner_text("#policy-card")
        # the only problem the browser saw is the API's refusal of the shared user's grant
        assert [p for p in pg.problems if "403" not in p] == [], pg.problems
        assert len(pg.problems) == 1
    finally:
        pg.context.close()


# -- the policy in force ---------------------------------------------------------------------------


def test_the_policy_in_force_is_shown_read_only_as_the_api_says(admin_page, server, browser):
    pg = admin_page
    policy = requests.get(server.url + "/admin/v1/policy", headers=ADMIN, timeout=10).json()
    glob = pg.locator("#policy-models tr[data-policy='every request (global)']")
    expect(glob).to_contain_text("blocklist")
    expect(glob).to_contain_text("o1-pro")
    pool = pg.locator("#policy-models tr[data-policy='contractor-pool']")
    expect(pool).to_contain_text("allowlist")
    expect(pool).to_contain_text("gpt-4o-mini")
    expect(pool).to_contain_text("the tenant's own list")
    research = pg.locator("#policy-tenants tr[data-tenant='research-team']")
    expect(research).to_contain_text("$500.00")
    expect(research).to_contain_text("monthly")
    [api_research] = [t for t in policy["tenants"] if t["tenant_id"] == "research-team"]
    assert api_research["spent_usd"] > 0
    assert research.locator("td").nth(3).inner_text() == f"${api_research['spent_usd']:.2f}"
    expect(pg.locator("#policy-users tbody tr")).to_have_count(len(policy["users"]))
    expect(pg.locator("#policy-defaults")).to_contain_text("per daily period")
    assert pg.locator("#policy-card input, #policy-card button").count() == 0  # read-only
    assert pg.problems == []

    dev = open_page(browser, server)
    try:
        sign_in(dev, ALICE_KEY)
        expect(dev.locator("#policy-users tbody tr")).to_have_count(1)
        assert dev.locator("#policy-users tbody tr").get_attribute("data-user") == (
            "alice@example.com"
        )
        rows = dev.locator("#policy-tenants tbody tr")
        expect(rows).to_have_count(2)
        tenants = {rows.nth(i).get_attribute("data-tenant") for i in range(2)}
        assert tenants == {"research-team", "other-team"}
        assert "contractor-pool" not in dev.inner_text("#policy-card")
        assert dev.problems == []
    finally:
        dev.context.close()
