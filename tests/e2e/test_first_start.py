"""Issue 20: from a first start with no keys to a governed call, following what the server prints."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pytest
import requests

from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import OPENAI_KEY, FakeUpstream
from tests.wait import WAIT_S

from .conftest import candela_env, providers_config, sdk_json

pytestmark = pytest.mark.e2e


def test_first_start_prints_the_one_command_that_mints_an_admin_key(
    tmp_path, upstream: FakeUpstream, token_server, sdk
):
    upstream.reset()
    upstream.clear()
    cfg = {"providers": providers_config(upstream.url)}
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        r = requests.post(c.url + "/proxy/openai/v1/chat/completions", json=chat, timeout=20)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        log = c.log()
        assert "no API keys and no admins are configured" in log
        [command] = re.findall(r"^    (\S+/candela keys create-admin --config \S+)$", log, re.M)
        [pid] = re.findall(r"kill -HUP (\d+)$", log, re.M)
        assert c.proc is not None and int(pid) == c.proc.pid

        minted = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
        assert minted.returncode == 0, minted.stderr
        [key] = re.findall(r"^    (cdl_\S+)$", minted.stdout, re.M)
        os.kill(int(pid), signal.SIGHUP)

        auth = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + WAIT_S  # the reload, once the signal is handled
        while time.monotonic() < deadline:
            me = requests.get(c.url + "/admin/v1/me", headers=auth, timeout=10)
            if me.status_code == 200:
                break
            time.sleep(0.1)
        assert me.status_code == 200 and me.json()["role"] == "admin", me.text
        # the README's quick start, with the real openai SDK and the printed key
        [out] = sdk_json(f"""
            import json, openai
            client = openai.OpenAI(base_url="{c.url}/proxy/openai/v1", api_key="{key}", max_retries=0)
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]
            )
            print(json.dumps({{"text": reply.choices[0].message.content}}))
        """)
        assert out["text"] == upstream.reply_text
        [rec] = upstream.wait_for(1)
        assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the organisation's key
        assert key not in c.log()
    assert key not in c.config_path.read_text()
