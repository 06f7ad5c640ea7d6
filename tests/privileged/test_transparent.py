"""Transparent mode on the real kernel: the real openai SDK in a sandbox calls https://api.openai.com
(no base_url) and reaches the fake upstream only through Candela, governed as in reverse mode;
hosts that are not providers pass untouched; what would slip around governance is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import ALICE_KEY, candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.sdk import sdk_available
from tests.fakes.upstream import DEFAULT_REPLY, OPENAI_KEY, FakeUpstream

from .sandbox_env import (
    BROKE_KEY,
    LIMITED_KEY,
    PROVIDER_IP,
    REMOTE_ADDR,
    REMOTE_HOST_IF,
    REMOTE_NAME,
    REMOTE_NS,
    RemoteHost,
    audit_entries,
    candela_run,
    python_in_sandbox,
    transparent_config,
    wait_for_audit,
)

pytestmark = [pytest.mark.privileged, pytest.mark.sdk, pytest.mark.timeout(120)]

DUMMY_KEY = "sk-dummy-the-app-never-holds-a-real-key"
OPENAI_HOST = f"api.openai.com:{PROVIDER_IP}"

# The app: the real openai SDK with its defaults (https://api.openai.com/v1), a dummy key.
SDK_CALL = """
    import json, sys
    import openai
    client = openai.OpenAI(api_key=%(key)r, max_retries=0)
    out = {"base_url": str(client.base_url), "results": []}
    for model in %(models)r:
        try:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            out["results"].append({"status": 200, "content": r.choices[0].message.content})
        except openai.APIStatusError as e:
            out["results"].append({"status": e.status_code, "body": e.response.json()})
    if %(stream)r:
        chunks = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        out["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(json.dumps(out))
"""


@dataclass
class Env:
    candela: CandelaProcess
    upstream: FakeUpstream
    remote: RemoteHost
    listen_port: int

    @property
    def config(self) -> Path:
        return self.candela.config_path

    @property
    def audit_db(self) -> Path:
        return self.candela.tmp / "audit.db"

    def run(self, command: list[str], *options: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return candela_run(self.config, command, *options, **kw)

    def sdk(
        self, user: str, models: list[str], *options: str, stream: bool = False
    ) -> dict[str, Any]:
        script = SDK_CALL % {"key": DUMMY_KEY, "models": models, "stream": stream}
        p = self.run(python_in_sandbox(script), "--user", user, "--add-host", OPENAI_HOST, *options)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    def reverse(self, key: str, model: str) -> tuple[int, dict[str, Any]]:
        """The same request in reverse mode: /proxy/openai with the user's Candela key."""
        req = urllib.request.Request(
            self.candela.url + "/proxy/openai/v1/chat/completions",
            data=json.dumps(
                {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")
    tmp = tmp_path_factory.mktemp("transparent")
    with (
        FakeTokenServer() as tokens,
        FakeUpstream(google_token_valid=tokens.is_valid) as upstream,
        RemoteHost(tmp) as remote,
    ):
        cfg = transparent_config(upstream.url, tmp)
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp), pick_listen_port=True) as candela:
            yield Env(candela, upstream, remote, candela.listen_port)


def test_the_openai_sdk_reaches_the_provider_only_through_candela(env: Env) -> None:
    env.upstream.clear()
    out = env.sdk("alice@example.com", ["gpt-4o-mini"], "--tenant", "research-team", stream=True)
    assert out["base_url"] == "https://api.openai.com/v1/"  # the SDK's own default, unchanged
    assert out["results"] == [{"status": 200, "content": DEFAULT_REPLY}]
    assert out["stream"] == DEFAULT_REPLY
    seen = env.upstream.requests
    assert [r.path for r in seen] == ["/v1/chat/completions"] * 2  # the original path, kept
    for r in seen:
        # the organisation's key replaced the app's dummy one, which never left the machine
        assert r.headers["authorization"] == f"Bearer {OPENAI_KEY}" and r.auth == "openai_key"
        assert DUMMY_KEY not in json.dumps(r.headers)
        assert "x-candela-tenant-id" not in r.headers
    entries = wait_for_audit(
        env.audit_db, "llm_request", lambda e: e["user_id"] == "alice@example.com"
    )
    assert len(entries) == 2
    for e in entries:
        assert e["tenant_id"] == "research-team" and e["decision"] == "allowed"
        assert e["provider"] == "openai" and e["model"] == "gpt-4o-mini"
        assert e["client_address"].startswith("10.200.")
        assert e["input_tokens"] > 0 and e["cost_usd"] > 0


@pytest.mark.parametrize(
    "user, reverse_key, models, status, error",
    [
        ("broke@example.com", BROKE_KEY, ["gpt-4o-mini"], 402, "budget_exceeded"),
        ("alice@example.com", ALICE_KEY, ["gpt-4o"], 403, "model_not_allowed"),
        # each sandbox user gets one request a minute: the second is refused
        ("limited2@example.com", LIMITED_KEY, ["gpt-4o-mini", "gpt-4o-mini"], 429, "rate_limited"),
    ],
)
def test_denials_are_exactly_those_of_reverse_mode(
    env: Env, user: str, reverse_key: str, models: list[str], status: int, error: str
) -> None:
    env.upstream.clear()
    out = env.sdk(user, models)
    transparent = out["results"][-1]
    expected_upstream = len(models) - 1  # only the 429 case lets a first request through
    assert len(env.upstream.requests) == expected_upstream
    for model in models[:-1]:
        env.reverse(reverse_key, model)
    env.upstream.clear()
    code, body = env.reverse(reverse_key, models[-1])
    assert env.upstream.requests == []
    assert (transparent["status"], transparent["body"]["error"]) == (status, error)
    assert (code, body["error"]) == (status, error)
    assert set(transparent["body"]) == set(body)  # the same fields a user acts on
    volatile = {"resets_at", "window_resets_at", "retry_after_s", "user_id", "message"}
    assert {k: v for k, v in transparent["body"].items() if k not in volatile} == {
        k: v for k, v in body.items() if k not in volatile
    }


def test_a_tenant_that_is_not_the_users_is_refused(env: Env) -> None:
    env.upstream.clear()
    out = env.sdk("alice@example.com", ["gpt-4o-mini"], "--tenant", "someone-elses")
    assert out["results"][0]["status"] == 403
    assert out["results"][0]["body"]["error"] == "tenant_not_allowed"
    assert env.upstream.requests == []


# The app lists the organisation's files and batches, then the models: the catalogue refuses the
# first two (they read what other users created) and forwards the free listing.
SDK_READS = """
    import json
    import openai
    client = openai.OpenAI(api_key=%(key)r, max_retries=0)
    out = []
    for call in (client.files.list, client.batches.list, client.models.list):
        try:
            call()
            out.append({"status": 200})
        except openai.APIStatusError as e:
            out.append({"status": e.status_code, "body": e.response.json()})
    print(json.dumps(out))
"""


def test_the_intercepted_app_gets_only_the_catalogues_operations(env: Env) -> None:
    env.upstream.clear()
    script = SDK_READS % {"key": DUMMY_KEY}
    p = env.run(python_in_sandbox(script), "--user", "alice@example.com", "--add-host", OPENAI_HOST)
    assert p.returncode == 0, p.stderr[-3000:]
    files, batches, models = json.loads(p.stdout)
    for refused, path in ((files, "/v1/files"), (batches, "/v1/batches")):
        assert refused["status"] == 404
        assert refused["body"]["error"] == "endpoint_not_governed"
        assert (refused["body"]["method"], refused["body"]["path"]) == ("GET", path)
    assert models == {"status": 200}
    assert [r.path for r in env.upstream.requests] == ["/v1/models"]  # only the free listing
    entries = wait_for_audit(
        env.audit_db,
        "llm_request",
        lambda e: e["user_id"] == "alice@example.com" and e["path"] in ("/v1/files", "/v1/batches"),
    )
    assert {e["reason"] for e in entries} == {"endpoint_not_governed"}


# -- hosts that are not providers ------------------------------------------------------------

TLS_TO_REMOTE = f"""
    import json, socket, ssl
    ctx = ssl.create_default_context(cafile=%(cafile)r)  # trusts only the remote's own cert
    with socket.create_connection(({REMOTE_ADDR!r}, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname={REMOTE_NAME!r}) as s:
            der = s.getpeercert(binary_form=True)
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: {REMOTE_NAME}\\r\\n\\r\\n")
            body = s.recv(4096).split(b"\\r\\n\\r\\n", 1)[1].decode()
    import urllib.request
    with urllib.request.urlopen("http://{REMOTE_NAME}/", timeout=5) as r:
        plain = r.read().decode()
    print(json.dumps({{"der": der.hex(), "tls_body": body, "plain_body": plain}}))
"""


def test_tls_to_other_hosts_is_tunnelled_untouched_and_plain_http_passes(env: Env) -> None:
    assert env.remote.cert is not None
    script = TLS_TO_REMOTE % {"cafile": str(env.remote.cert)}
    p = env.run(
        [sys.executable, "-c", _dedent(script)],
        "--add-host",
        f"{REMOTE_NAME}:{REMOTE_ADDR}",
        "--add-host",
        OPENAI_HOST,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    remote_der = x509.load_pem_x509_certificate(env.remote.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert bytes.fromhex(out["der"]) == remote_der  # the server's own certificate: not decrypted
    assert out["tls_body"] == "remote 443"
    assert out["plain_body"] == "remote 80"


# -- what would go around governance --------------------------------------------------------

RAW_TLS = f"""
    import json, socket, ssl
    ctx = ssl.create_default_context()
    out = {{}}
    with socket.create_connection(({PROVIDER_IP!r}, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
            s.sendall(b"GET /v1/models HTTP/1.1\\r\\nHost: %(host)s\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    print(json.dumps({{"status": head.split(b" ")[1].decode(), "body": json.loads(body)}}))
"""


@pytest.mark.parametrize("host", ["evil.example", "api.anthropic.com"])
def test_a_host_header_unlike_the_sni_is_refused_and_audited(env: Env, host: str) -> None:
    env.upstream.clear()
    p = env.run(
        [sys.executable, "-c", _dedent(RAW_TLS % {"host": host})], "--add-host", OPENAI_HOST
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "421" and out["body"]["error"] == "misdirected_request"
    assert env.upstream.requests == []
    entries = wait_for_audit(env.audit_db, "interception_denied", lambda e: e.get("host") == host)
    assert entries and entries[0]["reason"] == "host_mismatch"
    assert entries[0]["sni"] == "api.openai.com"
    assert entries[0]["pid"] > 0 and entries[0]["comm"].startswith("python")


def test_a_client_from_the_network_is_refused(env: Env) -> None:
    """The listener takes every address (REDIRECT needs it) but serves only this machine and its
    sandboxes: a host on the network redirected to it (by a broader rule than Candela's) is
    turned away, and audited."""
    rule = ["PREROUTING", "-i", REMOTE_HOST_IF, "-p", "tcp", "--dport", "443"]
    rule += ["-m", "comment", "--comment", "candela-test-remote"]
    rule += ["-j", "REDIRECT", "--to-ports", str(env.listen_port)]
    subprocess.run(["iptables", "-w", "-t", "nat", "-I", *rule], check=True)
    try:
        code = (
            "import socket\n"
            "s = socket.create_connection(('10.201.0.1', 443), timeout=5)\n"
            "s.sendall(b'GET / HTTP/1.1\\r\\nHost: api.openai.com\\r\\n\\r\\n')\n"
            "try:\n    print(repr(s.recv(100)))\n"
            "except ConnectionResetError:\n    print('reset')\n"
        )
        p = subprocess.run(
            ["ip", "netns", "exec", REMOTE_NS, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        subprocess.run(["iptables", "-w", "-t", "nat", "-D", *rule], check=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() in ("b''", "reset")  # closed without a byte
    entries = wait_for_audit(
        env.audit_db, "interception_refused", lambda e: e["client_address"] == REMOTE_ADDR
    )
    assert entries and entries[0]["reason"] == "remote_client"


def test_the_ca_is_the_one_candela_ca_export_prints(env: Env) -> None:
    pem = subprocess.run(
        [
            str(Path(sys.executable).with_name("candela")),
            "ca",
            "export",
            "--config",
            str(env.config),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" not in pem
    issuer = """
        import socket, ssl
        ctx = ssl.create_default_context(cafile=%r)  # nothing but Candela's CA
        with socket.create_connection((%r, 443), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
                print(dict(x[0] for x in s.getpeercert()["issuer"])["commonName"])
    """
    ca_file = env.candela.tmp / "exported-ca.pem"
    ca_file.write_text(pem)
    p = env.run(
        [sys.executable, "-c", _dedent(issuer % (str(ca_file), PROVIDER_IP))],
        "--add-host",
        OPENAI_HOST,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "Candela CA"
    assert audit_entries(env.audit_db, "proxy_start")[0]["mode"] == "transparent"


def _dedent(s: str) -> str:
    import textwrap

    return textwrap.dedent(s)
