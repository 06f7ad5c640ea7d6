"""API keys with a lifecycle end to end: minted through the admin API, used at once with the
real openai SDK through another process sharing the store, refused everywhere once revoked."""

from __future__ import annotations

import json

import pytest
import requests

from candela_mitm.audit.query import query_entries
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.wait import until

from .conftest import ADMIN_KEY, base_config, candela_env, sdk_json

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = "/proxy/openai/v1/chat/completions"


def sdk_chat(url: str, key: str) -> dict:
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


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_minted_key_works_at_once_and_revocation_holds_in_every_process(
    tmp_path, upstream: FakeUpstream, token_server
):
    upstream.reset()
    upstream.clear()
    cfg = base_config(upstream.url, users={"bob@example.com": {"tenants": ["t"]}})
    env = candela_env(token_server, tmp_path)
    # two proxies on one state store: the key is minted and revoked through one, used via both
    with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
        r = requests.post(a.url + "/admin/v1/keys", headers=ADMIN, timeout=10,
                          json={"user_id": "bob@example.com", "name": "notebook"})
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        assert sdk_chat(b.url, key)["status"] == 200  # no restart, no config edit
        assert sdk_chat(a.url, key)["status"] == 200
        me = requests.get(b.url + "/admin/v1/me", headers={"Authorization": f"Bearer {key}"},
                          timeout=10)
        assert me.json()["user_id"] == "bob@example.com" and me.json()["via"] == "api_key"
        seen = len(upstream.requests)
        r = requests.delete(a.url + f"/admin/v1/keys/{key_id}", headers=ADMIN, timeout=10)
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        for proxy in (b, a):
            assert sdk_chat(proxy.url, key) == {"status": 401, "error": "unauthenticated"}
        assert len(upstream.requests) == seen  # nothing of a revoked key went upstream
        entries = requests.get(a.url + "/admin/v1/audit?action=admin_action", headers=ADMIN,
                               timeout=10).json()["entries"]
        actions = [e["fields"]["action"] for e in entries]
        assert actions[:2] == ["key.revoke", "key.create"]
        assert all(key not in str(e) for e in entries)


def test_candela_keys_cli_creates_lists_and_revokes(tmp_path, upstream: FakeUpstream, token_server,
                                                   monkeypatch, capsys):
    from candela_mitm.cli.keys import main

    upstream.reset()
    upstream.clear()
    cfg = base_config(upstream.url, users={"bob@example.com": {"tenants": ["t"]}})
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        monkeypatch.delenv("CANDELA_ADMIN_KEY", raising=False)
        assert main(["--url", c.url, "list"]) == 2  # no key: refused before any call
        monkeypatch.setenv("CANDELA_ADMIN_KEY", ADMIN_KEY)
        assert main(["--url", c.url, "create", "--user", "bob@example.com", "--name", "ci",
                     "--expires-at", "2099-01-01T00:00:00Z"]) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("cdk_")
        bob = {"Authorization": f"Bearer {key}"}
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert requests.post(c.url + CHAT, json=chat, headers=bob, timeout=10).status_code == 200
        assert main(["--url", c.url, "list", "--user", "bob@example.com"]) == 0
        [line] = capsys.readouterr().out.strip().splitlines()
        key_id, user, state = line.split()[:3]
        assert (user, state) == ("bob@example.com", "active") and key not in line
        # rotation: a new key works at once, the old one until its grace ends (0 here)
        assert main(["--url", c.url, "rotate", key_id, "--grace-s", "0"]) == 0
        rotated = capsys.readouterr()
        new_key = rotated.out.strip()
        assert new_key.startswith("cdk_") and f"replaces {key_id}" in rotated.err
        new = {"Authorization": f"Bearer {new_key}"}
        assert requests.post(c.url + CHAT, json=chat, headers=new, timeout=10).status_code == 200
        r = requests.post(c.url + CHAT, json=chat, headers=bob, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        new_id = rotated.err.split()[1]
        assert main(["--url", c.url, "revoke", new_id]) == 0
        assert "revoked" in capsys.readouterr().out
        r = requests.post(c.url + CHAT, json=chat, headers=new, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        assert main(["--url", c.url, "revoke", "k_0000000000000000"]) == 1
        assert "404 key_not_found" in capsys.readouterr().err
        assert main(["--url", c.url, "revoke", "k_nonesuch"]) == 1  # not a key id at all
        assert "400 invalid_parameter" in capsys.readouterr().err


def test_a_key_narrowed_to_models_is_refused_the_others_in_every_process(
    tmp_path, upstream: FakeUpstream, token_server, monkeypatch, capsys
):
    from candela_mitm.cli.keys import main

    upstream.reset()
    upstream.clear()
    cfg = base_config(upstream.url, users={"bob@example.com": {"tenants": ["t"]}})
    env = candela_env(token_server, tmp_path)
    with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
        monkeypatch.setenv("CANDELA_ADMIN_KEY", ADMIN_KEY)
        assert main(["--url", a.url, "--json", "create", "--user", "bob@example.com",
                     "--models", "gpt-4o-mini", "claude-sonnet-*"]) == 0
        minted = json.loads(capsys.readouterr().out)
        assert minted["models"] == ["gpt-4o-mini", "claude-sonnet-*"]
        bob = {"Authorization": f"Bearer {minted['key']}"}

        def chat(proxy: CandelaProcess, model: str) -> requests.Response:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return requests.post(proxy.url + CHAT, json=body, headers=bob, timeout=10)

        assert chat(b, "gpt-4o-mini").status_code == 200
        for proxy in (a, b):
            r = chat(proxy, "gpt-4o")  # bob's own policy allows it: his key does not
            assert r.status_code == 403
            assert r.json() == {
                "error": "model_not_allowed",
                "message": f"Model 'gpt-4o' is not among the models API key '{minted['id']}' "
                "may use",
                "model": "gpt-4o",
                "tenant_id": "t",
                "policy": "allowlist",
                "key_id": minted["id"],
            }
        assert len(upstream.requests) == 1  # nothing refused went upstream
        # committed by the writer thread after each answer: waited for (a fixed 0.3 s was short
        # on a loaded machine); a fourth would still show among the last 10
        checks = until(
            lambda: query_entries(tmp_path / "audit.db", action="model_policy_check", limit=10),
            lambda checks: len(checks) >= 3, what="three model_policy_check entries")
        assert [(e["fields"]["model"], e["fields"]["result"], e["fields"]["policy_scope"])
                for e in reversed(checks)] == [
            ("gpt-4o-mini", "allowed", "global"),
            ("gpt-4o", "denied", "key"),
            ("gpt-4o", "denied", "key"),
        ]


def test_a_key_with_a_budget_is_refused_with_scope_key_while_its_user_has_budget(
    tmp_path, upstream: FakeUpstream, token_server, monkeypatch, capsys
):
    from candela_mitm.cli.keys import main

    from .conftest import BOB_KEY

    upstream.reset()
    upstream.clear()
    cfg = base_config(upstream.url, users={"bob@example.com": {"tenants": ["t"]}})
    env = candela_env(token_server, tmp_path)
    # two proxies on one state store: minted through one, spent and refused through both
    with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
        monkeypatch.setenv("CANDELA_ADMIN_KEY", ADMIN_KEY)
        assert main(["--url", a.url, "--json", "create", "--user", "bob@example.com",
                     "--budget-usd", "0.0002"]) == 0
        minted = json.loads(capsys.readouterr().out)
        assert minted["budget_usd"] == 0.0002

        def chat(proxy: CandelaProcess, key: str, max_tokens: int) -> requests.Response:
            body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "hi"}]}
            return requests.post(proxy.url + CHAT, json=body, timeout=10,
                                 headers={"Authorization": f"Bearer {key}"})

        # ~$0.00006 at most (100 output tokens of gpt-4o-mini): fits the key's $0.0002
        assert chat(b, minted["key"], 100).status_code == 200
        assert len(upstream.requests) == 1
        # ~$0.0006 at most: more than the key has, far less than bob's $1000
        for proxy in (a, b):
            r = chat(proxy, minted["key"], 1000)
            assert r.status_code == 402, r.text
            body = r.json()
            assert (body["error"], body["scope"], body["key_id"]) == (
                "budget_exceeded", "key", minted["id"]
            )
            assert body["user_id"] == "bob@example.com" and body["budget_usd"] == 0.0002
            assert body["period"] == "daily" and body["resets_at"].endswith("T00:00:00Z")
        assert len(upstream.requests) == 1  # nothing refused went upstream
        assert chat(a, BOB_KEY, 1000).status_code == 200  # bob himself still has budget
        assert len(upstream.requests) == 2
        me = requests.get(b.url + "/admin/v1/me", timeout=10,
                          headers={"Authorization": f"Bearer {minted['key']}"}).json()
        spent = me["key_budget"]["spent_usd"]
        assert me["key_budget"]["key_id"] == minted["id"] and 0 < spent <= 0.0002
        assert me["key_budget"]["remaining_usd"] == pytest.approx(0.0002 - spent)
        # a rotated key spends from the same budget: refused as well, and names itself
        r = requests.post(a.url + f"/admin/v1/keys/{minted['id']}/rotate", headers=ADMIN,
                          json={"grace_s": 0}, timeout=10)
        assert r.status_code == 201 and r.json()["budget_usd"] == 0.0002
        rotated = r.json()
        r = chat(b, rotated["key"], 1000)
        assert r.status_code == 402 and r.json()["key_id"] == rotated["id"]
        me = requests.get(a.url + "/admin/v1/me", timeout=10,
                          headers={"Authorization": f"Bearer {rotated['key']}"}).json()
        assert me["key_budget"]["spent_usd"] == spent
        assert len(upstream.requests) == 2

