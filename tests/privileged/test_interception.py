"""Interception without gaps (issue 17), on the real kernel, in `candela run` sandboxes: provider
host families (a data-residency host, with the real openai SDK), TLS without SNI, a name that is
no provider's to a provider's address, domain fronting on a shared edge (and the edge's other
traffic forwarded re-encrypted); each refusal audited with the process from the kernel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.config import PROVIDER_ROUTES
from candela_mitm.governance.provider_keys import fingerprint
from tests.e2e.conftest import candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.sdk import sdk_available, sdk_python
from tests.fakes.upstream import DEFAULT_REPLY, OPENAI_KEY, FakeUpstream

from .sandbox_env import (
    PROVIDER_IP,
    REMOTE_ADDR,
    REMOTE_NAME,
    RemoteHost,
    audit_entries,
    candela_run,
    python_in_sandbox,
    transparent_config,
    wait_for_audit,
)

pytestmark = [pytest.mark.privileged, pytest.mark.sdk, pytest.mark.timeout(120)]

RESIDENCY_HOST = "eu.api.openai.com"
SECRET = "fingerprint-secret"
PERSONAL_KEY = "sk-personal-key-of-a-developer"
AGENT = Path(f"/tmp/candela-test-agent-{os.getpid()}/agent")  # outside any tmp the sandbox hides


@dataclass
class Env:
    candela: CandelaProcess
    upstream: FakeUpstream
    remote: RemoteHost

    @property
    def audit_db(self) -> Path:
        return self.candela.tmp / "audit.db"

    def run(self, command: list[str], *options: str) -> dict[str, Any]:
        p = candela_run(
            self.candela.config_path,
            command,
            "--user",
            "alice@example.com",
            "--add-host",
            f"api.openai.com:{PROVIDER_IP}",
            "--add-host",
            f"{RESIDENCY_HOST}:{PROVIDER_IP}",
            "--add-host",
            f"{REMOTE_NAME}:{REMOTE_ADDR}",
            *options,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        out: dict[str, Any] = json.loads(p.stdout)
        return out

    def tls(self, script: str) -> dict[str, Any]:
        return self.run([sys.executable, "-c", textwrap.dedent(TLS_HELPERS + script)])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")
    tmp = tmp_path_factory.mktemp("interception")
    with (
        FakeTokenServer() as tokens,
        FakeUpstream(google_token_valid=tokens.is_valid) as upstream,
        RemoteHost(tmp) as remote,
    ):
        assert remote.cert is not None
        cfg = transparent_config(upstream.url, tmp)
        # the remote host plays a provider's shared front end, with its own certificate
        cfg["interception"]["shared_edges"] = [REMOTE_NAME]
        cfg["interception"]["upstream_ca_file"] = str(remote.cert)
        # a copy of the interpreter at a path of its own: a tool with a policy of its own
        AGENT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(sys.executable), AGENT)
        # apps bring their own OpenAI key: only the organisation's (by fingerprint) goes on
        cfg["interception"]["replace_provider_keys"] = [r for r in PROVIDER_ROUTES if r != "openai"]
        cfg["interception"]["organisation_keys"] = [fingerprint(SECRET.encode(), OPENAI_KEY)]
        cfg["governance"]["models"]["allowed"].append(MANTLE_MODEL)
        cfg["governance"]["workloads"] = [
            {"exe": str(AGENT), "models": {"mode": "allowlist", "allowed": ["gpt-4o"]}}
        ]
        try:
            proc_env = {**candela_env(tokens, tmp), "CANDELA_KEY_FINGERPRINT_SECRET": SECRET}
            with CandelaProcess(tmp, cfg, env=proc_env, pick_listen_port=True) as candela:
                yield Env(candela, upstream, remote)
        finally:
            shutil.rmtree(AGENT.parent, ignore_errors=True)


def _exe_sha256(path: str) -> str:
    return hashlib.sha256(Path(os.path.realpath(path)).read_bytes()).hexdigest()


def _assert_the_process(entry: dict[str, Any], exe: str) -> None:
    """The refusal names the process from the kernel: pid, what it runs and its hash, uid."""
    assert entry["pid"] > 0 and entry["uid"] == os.geteuid()
    assert entry["exe"] == os.path.realpath(exe)
    assert entry["exe_sha256"] == _exe_sha256(exe)
    assert entry["cgroup"].startswith("/candela/sandbox-")
    assert entry["user_id"] == "alice@example.com" and entry["enforcement"] == "sandbox"


# -- a provider host that is not api.openai.com ---------------------------------------------------

RESIDENCY_SDK = f"""
    import json, os, openai
    client = openai.OpenAI(base_url="https://{RESIDENCY_HOST}/v1", api_key=%(key)r, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": "hi"}}])
        denied = None
    except openai.APIStatusError as e:
        denied = [e.status_code, e.response.json()["error"]]
    print(json.dumps({{"content": r.choices[0].message.content, "denied": denied, "pid": os.getpid()}}))
"""


def test_a_data_residency_host_is_governed_end_to_end_with_the_openai_sdk(env: Env) -> None:
    env.upstream.clear()
    out = env.run(python_in_sandbox(RESIDENCY_SDK % {"key": OPENAI_KEY}))
    assert out["content"] == DEFAULT_REPLY
    assert out["denied"] == [403, "model_not_allowed"]  # model policy applies there too
    seen = env.upstream.requests
    assert [r.path for r in seen] == ["/v1/chat/completions"]  # the denied one never left
    assert seen[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the organisation's, kept
    entries = wait_for_audit(
        env.audit_db, "llm_request", lambda e: e.get("workload_pid") == out["pid"]
    )
    assert [e["decision"] for e in entries] == ["allowed", "denied"]
    assert entries[0]["provider"] == "openai" and entries[0]["user_id"] == "alice@example.com"
    # the process behind it, from the kernel: what it runs and its hash, its uid and cgroup
    sdk = os.path.realpath(sdk_python())
    for e in entries:
        assert e["workload_exe"] == sdk and e["workload_exe_sha256"] == _exe_sha256(sdk)
        assert e["workload_uid"] == os.geteuid()
        assert e["workload_cgroup"].startswith("/candela/sandbox-")


# -- Bedrock Mantle ------------------------------------------------------------------------------

MANTLE_HOST = "bedrock-mantle.us-east-1.api.aws"
MANTLE_MODEL = "openai.gpt-oss-120b"
MANTLE_SDK = f"""
    import json, os, openai
    client = openai.OpenAI(base_url="https://{MANTLE_HOST}/v1", api_key="the-apps-bedrock-key",
                           max_retries=0)
    msgs = [{{"role": "user", "content": "hi"}}]
    r = client.chat.completions.create(model="{MANTLE_MODEL}", messages=msgs, max_tokens=20)
    try:
        client.chat.completions.create(model="openai.gpt-oss-20b", messages=msgs, max_tokens=20)
        denied = None
    except openai.APIStatusError as e:
        denied = [e.status_code, e.response.json()["error"]]
    print(json.dumps({{"content": r.choices[0].message.content, "denied": denied, "pid": os.getpid()}}))
"""


def test_bedrock_mantle_is_governed_when_intercepted_with_the_openai_sdk(env: Env) -> None:
    env.upstream.clear()
    out = env.run(python_in_sandbox(MANTLE_SDK), "--add-host", f"{MANTLE_HOST}:{PROVIDER_IP}")
    assert out["content"] == DEFAULT_REPLY
    assert out["denied"] == [403, "model_not_allowed"]  # model policy applies there too
    [rec] = env.upstream.requests  # the denied one never left
    # Mantle's wire format, signed with the organisation's AWS credential for bedrock-mantle
    assert rec.route == "mantle.chat" and rec.sigv4 is True, rec.sigv4_reason
    assert "the-apps-bedrock-key" not in json.dumps(rec.headers)
    entries = wait_for_audit(
        env.audit_db, "llm_request", lambda e: e.get("workload_pid") == out["pid"]
    )
    assert [(e["provider"], e["decision"]) for e in entries] == [
        ("bedrock-mantle", "allowed"),
        ("bedrock-mantle", "denied"),
    ]
    assert entries[0]["cost_usd"] > 0 and entries[0]["user_id"] == "alice@example.com"


# -- a workload rule ------------------------------------------------------------------------------

CHAT = """
    import http.client, json, os
    c = http.client.HTTPSConnection("api.openai.com", timeout=10)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    c.request("POST", "/v1/chat/completions", body,
              {"Authorization": "Bearer %(key)s", "Content-Type": "application/json"})
    r = c.getresponse()
    print(json.dumps({"pid": os.getpid(), "status": r.status, "body": json.loads(r.read())}))
"""


def test_a_workload_rule_changes_the_decision_for_that_executable_only(env: Env) -> None:
    env.upstream.clear()
    chat = textwrap.dedent(CHAT) % {"key": OPENAI_KEY}
    same = env.run([sys.executable, "-c", chat])
    agent = env.run([str(AGENT), "-c", chat])
    assert same["status"] == 200
    assert (agent["status"], agent["body"]["error"]) == (403, "model_not_allowed")
    assert len(env.upstream.requests) == 1  # the refused one never left
    checks = wait_for_audit(
        env.audit_db,
        "model_policy_check",
        lambda e: (
            e["result"] == "denied"
            and e["model"] == "gpt-4o-mini"
            and e["policy_scope"] == "workload"
        ),
    )
    assert checks
    entries = wait_for_audit(
        env.audit_db, "llm_request", lambda e: e.get("workload_pid") == agent["pid"]
    )
    # the same bytes as the interpreter, at the tool's path: the rule names the path
    assert [(e["decision"], e["workload_exe"]) for e in entries] == [("denied", str(AGENT))]
    assert entries[0]["workload_exe_sha256"] == _exe_sha256(sys.executable)


# -- TLS that names no provider -------------------------------------------------------------------

TLS_HELPERS = """
    import json, os, socket, ssl
    def attempt(ip, name, request=None, verify=True):
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection((ip, 443), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=name) as s:
                    issuer = dict(x[0] for x in s.getpeercert()["issuer"]) if verify else {}
                    data = b""
                    if request:
                        s.sendall(request)
                        while chunk := s.recv(4096):
                            data += chunk
                    return {"outcome": "connected", "issuer": issuer.get("commonName"),
                            "response": data.decode("latin-1")}
        except (OSError, ssl.SSLError) as e:
            return {"outcome": "error", "error": repr(e)}
"""


def test_tls_without_sni_is_refused_whatever_the_address_and_audited(env: Env) -> None:
    out = env.tls(
        f"""
    print(json.dumps({{"pid": os.getpid(),
        "provider": attempt({PROVIDER_IP!r}, None, verify=False),
        "other": attempt({REMOTE_ADDR!r}, None, verify=False)}}))
    """
    )
    assert out["provider"]["outcome"] == "error" and out["other"]["outcome"] == "error"
    entries = wait_for_audit(
        env.audit_db,
        "bypass_attempt",
        lambda e: e.get("pid") == out["pid"] and e["reason"] == "no_sni",
    )
    assert sorted(e["destination"] for e in entries) == sorted(
        [f"{PROVIDER_IP}:443", f"{REMOTE_ADDR}:443"]
    )
    _assert_the_process(entries[0], sys.executable)


def test_a_name_that_is_no_providers_to_a_provider_address_is_refused(env: Env) -> None:
    env.upstream.clear()
    out = env.tls(
        f"""
    req = b"GET /v1/models HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n"
    print(json.dumps({{"pid": os.getpid(), "r": attempt({PROVIDER_IP!r}, "cdn.example.net", req)}}))
    """
    )
    assert out["r"]["outcome"] == "error"
    assert env.upstream.requests == []
    entries = wait_for_audit(env.audit_db, "bypass_attempt", lambda e: e.get("pid") == out["pid"])
    assert [(e["reason"], e["sni"]) for e in entries] == [("sni_not_provider", "cdn.example.net")]
    _assert_the_process(entries[0], sys.executable)


# -- a provider's shared edge ---------------------------------------------------------------------

EDGE_GET = f"GET / HTTP/1.1\\r\\nHost: {REMOTE_NAME}\\r\\nConnection: close\\r\\n\\r\\n"
FRONTED = "GET /v1/models HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n"


def test_other_traffic_on_a_shared_edge_is_forwarded_re_encrypted(env: Env) -> None:
    out = env.tls(
        f"""
    print(json.dumps({{"r": attempt({REMOTE_ADDR!r}, {REMOTE_NAME!r}, b"{EDGE_GET}")}}))
    """
    )
    r = out["r"]
    assert r["outcome"] == "connected", r
    assert r["issuer"] == "Candela CA"  # decrypted: its requests were read
    assert r["response"].startswith("HTTP/1.1 200") and r["response"].endswith("remote 443")


@pytest.mark.parametrize("first", ["", EDGE_GET.replace("close", "keep-alive")])
def test_a_provider_host_behind_a_shared_edge_name_is_domain_fronting(env: Env, first: str) -> None:
    """The fronted request alone, or behind an innocent one on the same connection (pipelined):
    refused, answered 421, audited; nothing reaches the provider."""
    env.upstream.clear()
    out = env.tls(
        f"""
    req = b"{first}" + b"{FRONTED}"
    print(json.dumps({{"pid": os.getpid(), "r": attempt({REMOTE_ADDR!r}, {REMOTE_NAME!r}, req)}}))
    """
    )
    r = out["r"]
    assert r["outcome"] == "connected" and r["response"].startswith("HTTP/1.1 421"), r
    body = json.loads(r["response"].split("\r\n\r\n", 1)[1])
    assert body["error"] == "misdirected_request"
    assert env.upstream.requests == []
    entries = wait_for_audit(env.audit_db, "bypass_attempt", lambda e: e.get("pid") == out["pid"])
    assert [(e["reason"], e["sni"], e["host"]) for e in entries] == [
        ("domain_fronting", REMOTE_NAME, "api.openai.com")
    ]
    _assert_the_process(entries[0], sys.executable)


# -- a provider key that is not the organisation's --------------------------------------------------

FOREIGN_SDK = f"""
    import json, os, openai
    client = openai.OpenAI(api_key={PERSONAL_KEY!r}, max_retries=0)
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
        out = None
    except openai.APIStatusError as e:
        out = [e.status_code, e.response.json()]
    print(json.dumps({{"denied": out, "pid": os.getpid()}}))
"""


def test_a_foreign_provider_key_is_refused_and_audited_with_its_fingerprint(env: Env) -> None:
    env.upstream.clear()
    out = env.run(python_in_sandbox(FOREIGN_SDK))
    fp = fingerprint(SECRET.encode(), PERSONAL_KEY)
    status, body = out["denied"]
    assert (status, body["error"], body["key_fingerprint"]) == (403, "foreign_provider_key", fp)
    assert env.upstream.requests == []
    entries = wait_for_audit(
        env.audit_db, "interception_denied", lambda e: e.get("pid") == out["pid"]
    )
    assert [(e["reason"], e["key_fingerprint"]) for e in entries] == [("foreign_provider_key", fp)]
    _assert_the_process(entries[0], str(sdk_python()))
    requests = wait_for_audit(
        env.audit_db, "llm_request", lambda e: e.get("workload_pid") == out["pid"]
    )
    assert [(e["decision"], e["reason"], e["provider_key_fingerprint"]) for e in requests] == [
        ("denied", "foreign_provider_key", fp)
    ]
    for action in ("interception_denied", "llm_request", "bypass_attempt"):
        assert PERSONAL_KEY not in json.dumps(audit_entries(env.audit_db, action))  # never the key
