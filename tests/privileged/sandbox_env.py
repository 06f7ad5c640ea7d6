"""What the transparent-mode and sandbox tests share: a transparent Candela, `candela run`, a
"remote" host in a namespace of its own, and the audit ledger."""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyroute2 import IPRoute, NetNS, netns

from tests.e2e.conftest import ADMIN_KEY, ALICE_SHA, providers_config, sha
from tests.fakes.sdk import _SCRUBBED, sdk_python

CANDELA = Path(sys.executable).with_name("candela")

# The provider's "public" address inside sandboxes (--add-host): never contacted, since port 443
# is redirected to Candela whatever the address; RFC 2544 benchmarking space, routed nowhere.
PROVIDER_IP = "198.18.0.1"

# A host outside any sandbox that is not a provider: a namespace of the tests' own.
REMOTE_NS = "candela-test-remote"
REMOTE_HOST_IF = "cdltremh"
REMOTE_HOST_ADDR = "10.201.0.1"
REMOTE_ADDR = "10.201.0.2"
REMOTE_NAME = "other.test"

BROKE_KEY = "cdl_broke_key"
LIMITED_KEY = "cdl_limited_key"


def transparent_config(upstream_url: str, tmp: Path, listen_port: int = 0) -> dict[str, Any]:
    """Candela in transparent mode before the fake upstream; users for 402, 403 and 429.
    `listen_port` 0: picked by `CandelaProcess(..., pick_listen_port=True)` (again if another
    process takes it before Candela binds it), read back as its `listen_port`."""
    return {
        "mode": "transparent",
        "providers": providers_config(upstream_url),
        "interception": {"listen_port": listen_port, "certs_dir": str(tmp / "certs")},
        "auth": {
            "required": True,
            "api_keys": [
                {"sha256": ALICE_SHA, "user": "alice@example.com"},
                {"sha256": sha(BROKE_KEY), "user": "broke@example.com"},
                {"sha256": sha(LIMITED_KEY), "user": "limited@example.com"},
                {"sha256": sha(ADMIN_KEY), "user": "admin@example.com"},  # scrapes /metrics
            ],
            "admins": ["admin@example.com"],
        },
        "users": {
            "alice@example.com": {"tenants": ["research-team", "other-team"]},
            "broke@example.com": {"daily_budget_usd": 0.0},
            "limited@example.com": {"requests_per_minute": 1},
            "limited2@example.com": {"requests_per_minute": 1},
        },
        "governance": {
            "budgets": {"default_daily_usd": 1000.0},
            "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]},
        },
    }


def sdk_env() -> dict[str, str]:
    """The test runner's environment without provider keys, proxies or CA bundles."""
    return {k: v for k, v in os.environ.items() if k not in _SCRUBBED}


def candela_run(
    config_path: Path,
    command: list[str],
    *options: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`candela run --config ... OPTIONS -- COMMAND`, waited for (in `cwd`, which the command
    keeps).

    Sandboxes are a host-wide resource (namespace names, addresses, rules): the tests use the
    host's registry (/run/candela), as every `candela run` on a host must.
    """
    return subprocess.run(
        [str(CANDELA), "run", "--config", str(config_path), *options, "--", *command],
        env=env if env is not None else sdk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def python_in_sandbox(script: str) -> list[str]:
    """A command running `script` with the SDK venv's interpreter (the real openai package)."""
    return [str(sdk_python()), "-c", textwrap.dedent(script)]


def audit_entries(db: Path, action: str) -> list[dict[str, Any]]:
    """Committed ledger entries of one action, oldest first, fields decoded."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT seq, user_id, tenant_id, fields FROM audit_log WHERE action = ? ORDER BY seq",
            (action,),
        ).fetchall()
    return [{"seq": s, "user_id": u, "tenant_id": t, **json.loads(f)} for s, u, t, f in rows]


def wait_for_audit(
    db: Path, action: str, predicate: Any = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Entries of `action` (matching predicate), waiting for the writer's batch to commit."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_entries(db, action) if predicate is None or predicate(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def audit_barrier(proxy_url: str) -> None:
    """When this returns, every entry the proxy at `proxy_url` queued before the call is
    committed: a refused proxied request's llm_request entry is committed before its answer
    ends, and the writer commits in the order entries were queued. For entries the proxy
    records on its own (a refused TLS handshake, a denied interception), which another
    process's entries (sandbox_stop, from `candela run`) do not order. Nothing reaches the
    upstream: the model is not allowed (transparent_config)."""
    import urllib.error
    import urllib.request

    from tests.e2e.conftest import ALICE_KEY

    req = urllib.request.Request(
        proxy_url + "/proxy/openai/v1/chat/completions",
        data=json.dumps({"model": "gpt-4o", "messages": []}).encode(),
        headers={"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raise AssertionError(f"the barrier request was answered {r.status}, not refused")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert (e.code, body["error"]) == (403, "model_not_allowed"), (e.code, body)


def self_signed(name: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for `name` signed by nobody Candela or the sandbox trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# Plain HTTP on :80 and TLS on :443, each answering with which one it is.
REMOTE_SERVER = r"""
import socket, ssl, sys, threading
cert, key = sys.argv[1], sys.argv[2]

def serve(port, wrap):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=answer, args=(c, wrap, port), daemon=True).start()

def answer(c, wrap, port):
    try:
        if wrap:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            c = ctx.wrap_socket(c, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        body = f"remote {port}".encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except Exception:
        pass
    finally:
        c.close()

threading.Thread(target=serve, args=(80, False), daemon=True).start()
print("ready", flush=True)
serve(443, True)
"""


class RemoteHost:
    """A namespace joined to the host by a veth, serving plain HTTP and TLS: the world outside."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.cert: Path | None = None

    def __enter__(self) -> RemoteHost:
        self._remove()
        netns.create(REMOTE_NS)
        try:
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=REMOTE_HOST_IF,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": REMOTE_NS},
                )
                (idx,) = ipr.link_lookup(ifname=REMOTE_HOST_IF)
                ipr.addr("add", index=idx, address=REMOTE_HOST_ADDR, prefixlen=30)
                ipr.link("set", index=idx, state="up")
            with NetNS(REMOTE_NS) as ns:
                (peer,) = ns.link_lookup(ifname="eth0")
                ns.addr("add", index=peer, address=REMOTE_ADDR, prefixlen=30)
                ns.link("set", index=peer, state="up")
                (lo,) = ns.link_lookup(ifname="lo")
                ns.link("set", index=lo, state="up")
            self.cert, key = self_signed(REMOTE_NAME, self.workdir)
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    REMOTE_NS,
                    sys.executable,
                    "-c",
                    REMOTE_SERVER,
                    str(self.cert),
                    str(key),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stdout is not None
            assert self.proc.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None
        self._remove()

    @staticmethod
    def _remove() -> None:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=REMOTE_HOST_IF):
                ipr.link("del", index=idx)
        if REMOTE_NS in netns.listnetns():
            netns.remove(REMOTE_NS)


def started_sandboxes(db: Path) -> set[int]:
    """Indexes of the sandboxes one Candela's audit ledger saw start."""
    return {int(e["sandbox"].rsplit("-", 1)[1]) for e in audit_entries(db, "sandbox_start")}


def leftovers(index: int) -> dict[str, bool]:
    """Which pieces of sandbox `index` exist on the host now."""
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    net = network.SandboxNet(index)
    with IPRoute() as ipr:
        veth = bool(ipr.link_lookup(ifname=net.host_if))
    rules = any(i == index for i, _ in firewall.tagged_rules("iptables")) or any(
        i == index for i, _ in firewall.tagged_rules("ip6tables")
    )
    cgroup = (cgroups.cgroup2_root() / "candela" / f"sandbox-{index}").exists()
    return {"netns": network.exists(net), "veth": veth, "rules": rules, "cgroup": cgroup}
