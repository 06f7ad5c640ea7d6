"""API keys with a lifecycle end to end: minted through the admin API, used at once with the
real openai SDK through another process sharing the store, refused everywhere once revoked."""

from __future__ import annotations

import pytest
import requests

from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream

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
