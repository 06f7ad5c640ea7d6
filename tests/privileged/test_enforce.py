"""`candela enforce host|status|exec|off` on the real kernel, against a fake provider address."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.cli import enforce as enforce_cli
from candela_mitm.ebpf import host
from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement import host as enforce

from .conftest import Probe, require

# A loopback address plays the provider: no route or interface to set up, nothing else uses it.
PROVIDER_IP = "127.77.0.1"
PROVIDER_NAME = "api.candela-test-provider.example"
SO_ORIGINAL_DST = 80
CANDELA = Path(sys.executable).with_name("candela")


def _listen(host_: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host_, port))
    s.listen(16)
    s.settimeout(2)
    return s


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(ip), port


def _accepted(listener: socket.socket, timeout: float = 2.0) -> socket.socket | None:
    # The probe has returned, so a connection it made already waits in the backlog: a short
    # timeout is enough to tell that none came.
    listener.settimeout(timeout)
    try:
        return listener.accept()[0]
    except TimeoutError:
        return None


class Env:
    def __init__(self, tmp: Path):
        self.provider = _listen(PROVIDER_IP, 443)
        self.proxy = _listen("127.0.0.1", 0)
        self.proxy_port = int(self.proxy.getsockname()[1])
        self.hosts = tmp / "hosts"
        self.hosts.write_text(f"# test provider\n{PROVIDER_IP} {PROVIDER_NAME}\n")
        self.state = str(tmp / "enforce.json")
        self.cgroup = f"candela-test-enforce-{uuid.uuid4().hex[:8]}"

    def cmd(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        rc = enforce_cli.main(["--state", self.state, *argv], out=out)
        return rc, out.getvalue()

    def on(self) -> tuple[int, str]:
        return self.cmd(
            "host",
            "--proxy-port",
            str(self.proxy_port),
            "--no-default-providers",
            "--provider",
            PROVIDER_NAME,
            "--hosts-file",
            str(self.hosts),
            "--cgroup",
            self.cgroup,
        )

    def close(self) -> None:
        self.provider.close()
        self.proxy.close()


@pytest.fixture
def env(tmp_path: Path, iptables: str) -> Iterator[Env]:
    if enforce.EnforceState.load() is not None or host.attached():
        require("host enforcement is active on this machine; not touching it")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        # Whatever happened, leave the machine as it was: never blocked.
        e.cmd("off", "--cgroup", e.cgroup)
        host.uninstall()
        enforce.HostChain().remove()
        cgroups.remove(cgroups.resolve(e.cgroup))
        e.close()


def _events(reader: host.PinnedEvents, tgid: int) -> list[str]:
    return [ev.reason for ev in reader.poll(300) if ev.tgid == tgid]


@pytest.mark.privileged
def test_enforce_host_redirects_blocks_and_turns_off(env: Env, probe: Probe) -> None:
    rc, out = env.on()
    assert rc == 0, out
    assert f"{PROVIDER_NAME}: {PROVIDER_IP}" in out

    rc, out = env.cmd("status", "--json")
    st = json.loads(out)
    assert rc == 0 and st["active"], out
    rules = "\n".join(st["chain"])
    assert f"--path /{env.cgroup}" in rules.replace('"', "")
    assert f"-d {PROVIDER_IP}/32" in rules and f"--to-ports {env.proxy_port}" in rules
    assert sorted(p["hook"] for p in st["programs"]) == sorted(n for n, _ in host.HOOKS)

    with host.PinnedEvents() as reader:
        # Outside Candela's cgroup, TCP 443 to the provider lands on the proxy.
        r = probe("tcp", PROVIDER_IP, 443)
        assert r.errno == 0
        conn = _accepted(env.proxy)
        assert conn is not None
        assert _original_dst(conn) == (PROVIDER_IP, 443)
        conn.close()
        assert _accepted(env.provider, 0.2) is None

        # Inside it (the proxy, started with `candela enforce exec`), straight to the provider.
        r = probe(
            "tcp",
            PROVIDER_IP,
            443,
            argv0=[str(CANDELA), "enforce", "--state", env.state, "exec", "--"],
        )
        assert r.errno == 0
        conn = _accepted(env.provider)
        assert conn is not None
        conn.close()
        cg = cgroups.resolve(env.cgroup)
        assert probe("udp", "127.0.0.1", 443, cgroup=cg).errno == 0

        # What redirection does not cover is refused, and reported.
        r = probe("tcp", PROVIDER_IP, 8443)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["provider_port"]
        r = probe("udp", "127.0.0.1", 443)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["udp_port"]
        r = probe("udp", PROVIDER_IP, 853)
        assert r.errno == errno.EPERM
        r = probe("tcp", PROVIDER_IP, 443, new_netns=True)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["foreign_netns"]
        # Other destinations are not Candela's business.
        assert probe("tcp", "127.0.0.1", 9).errno == errno.ECONNREFUSED

    counts = host.pinned_counts()
    assert counts["provider_port"] >= 1 and counts["udp_port"] >= 2
    assert counts["foreign_netns"] >= 1

    # Re-running replaces the programs without a gap or duplicates.
    old = {p["id"] for p in st["programs"]}
    rc, out = env.on()
    assert rc == 0, out
    now = host.attached()
    assert len(now) == len(host.HOOKS) and not old & {i for _, i, _ in now}

    # Candela stopped: provider traffic is refused, not let through.
    env.proxy.close()
    assert probe("tcp", PROVIDER_IP, 443).errno == errno.ECONNREFUSED
    assert _accepted(env.provider, 0.2) is None

    rc, out = env.cmd("off")
    assert rc == 0, out
    rc, out = env.cmd("status", "--json")
    st = json.loads(out)
    assert rc == 3 and not st["active"] and not st["partial"], out
    assert st["chain"] is None and st["programs"] == [] and not Path(host.PIN_DIR).exists()
    assert not cgroups.resolve(env.cgroup).exists()
    assert probe("tcp", PROVIDER_IP, 443).errno == 0
    conn = _accepted(env.provider)
    assert conn is not None
    conn.close()
    assert probe("udp", "127.0.0.1", 443).errno == 0


@pytest.mark.privileged
def test_no_resolvable_provider_changes_nothing(env: Env) -> None:
    env.hosts.write_text("")
    rc, _ = env.on()
    assert rc == 1
    assert host.attached() == [] and enforce.HostChain().rules() is None
    assert not os.path.exists(env.state)


@pytest.mark.privileged
def test_registered_netns_is_treated_as_redirected(env: Env, probe: Probe) -> None:
    """A sandbox with its own redirect registers its namespace; others stay refused."""
    rc, out = env.on()
    assert rc == 0, out
    assert probe("tcp", PROVIDER_IP, 443, new_netns=True).errno == errno.EPERM
    other = host.netns_cookie()
    assert host.register_netns(other, redirected=False)
    try:
        assert probe("tcp", PROVIDER_IP, 443).errno == errno.EPERM
    finally:
        host.register_netns(other)
    assert probe("tcp", PROVIDER_IP, 443).errno == 0


# -- candela-server --enforce host ------------------------------------------------------------


def _bypass_counted(metrics_url: str) -> dict[str, float]:
    import re
    import urllib.request

    from tests.e2e.conftest import ADMIN_KEY

    scrape = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(scrape, timeout=5) as r:
        text = r.read().decode()
    pattern = r'^candela_bypass_attempts_total\{kind="([^"]+)"\} (\S+)$'
    return {kind: float(n) for kind, n in re.findall(pattern, text, re.M)}


@pytest.mark.privileged
def test_candela_server_enforces_the_host_audits_refusals_and_stays_closed_when_stopped(
    tmp_path: Path, iptables: str, probe: Probe
) -> None:
    """`interception.enforce: host`: at start the proxy puts host enforcement in place towards
    its transparent listener, with itself exempt; it audits and counts what the kernel refuses;
    when it stops, provider traffic stays refused until `candela enforce off`."""
    from tests.e2e.conftest import base_config
    from tests.fakes.candela import CandelaProcess, free_port
    from tests.fakes.upstream import OPENAI_KEY, FakeUpstream

    from .sandbox_env import wait_for_audit

    if enforce.EnforceState.load() is not None or host.attached():
        require("host enforcement is active on this machine; not touching it")
    listen_port = free_port()
    upstream = FakeUpstream()
    upstream.__enter__()
    cfg = base_config(upstream.url, mode="transparent")
    # the test's interpreter, wherever it runs from, works for the admin
    cfg["governance"]["workloads"] = [
        {"exe": os.path.realpath(sys.executable), "user": "admin@example.com"}
    ]
    cfg["interception"] = {
        "listen_port": listen_port,
        "certs_dir": str(tmp_path / "certs"),
        # an address literal resolves to itself: the test provider needs no hosts file
        "hosts": {PROVIDER_IP: "openai"},
        "enforce": "host",
    }
    provider = _listen(PROVIDER_IP, 443)
    candela = CandelaProcess(tmp_path, cfg, env={"OPENAI_API_KEY": OPENAI_KEY})
    try:
        candela.start()
        assert candela.proc is not None
        assert cgroups.cgroup_of(candela.proc.pid) == f"/{enforce.DEFAULT_CGROUP}"
        state = enforce.EnforceState.load()
        assert state is not None and state.proxy_port == listen_port
        assert state.providers[PROVIDER_IP] == [PROVIDER_IP]

        refused = [probe("tcp", PROVIDER_IP, 8443), probe("udp", PROVIDER_IP, 443)]
        assert [r.errno for r in refused] == [errno.EPERM, errno.EPERM]
        for r, reason in zip(refused, ("provider_port", "udp_port"), strict=True):
            entries = wait_for_audit(
                tmp_path / "audit.db", "bypass_attempt", lambda e, r=r: e["tgid"] == r.tgid
            )
            assert [(e["reason"], e["comm"], e["enforcement"]) for e in entries] == [
                (reason, "cdl-probe", "host")
            ], entries
        assert _bypass_counted(candela.url + "/metrics") == {"provider_port": 1.0, "udp_port": 1.0}
        # TCP 443 to the provider is redirected to the proxy's transparent listener
        assert probe("tcp", PROVIDER_IP, 443).errno == 0
        assert _accepted(provider, 0.2) is None

        # the doors the proxy closes there, each audited with the process from the kernel
        db = tmp_path / "audit.db"
        no_sni = _tls(PROVIDER_IP, None, b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        other = _tls(
            PROVIDER_IP, "cdn.example.net", b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n"
        )
        assert no_sni["outcome"] == other["outcome"] == "error"
        for out, reason in ((no_sni, "no_sni"), (other, "sni_not_provider")):
            entries = wait_for_audit(
                db, "bypass_attempt", lambda e, out=out: e.get("pid") == out["pid"]
            )
            assert [(e["reason"], e["enforcement"]) for e in entries] == [(reason, "host")]
            assert entries[0]["exe"] == os.path.realpath(sys.executable)
            assert entries[0]["exe_sha256"] == _sha256_of(sys.executable)
            assert entries[0]["uid"] == os.geteuid()
        # a provider request with no Candela credential: the workload rule says whose it is
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
        chat = _tls(
            PROVIDER_IP,
            "api.openai.com",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Authorization: Bearer sk-the-apps-own\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        head = chat["response"].split("\r\n\r\n", 1)[0].lower()
        assert head.startswith("http/1.1 200"), chat
        assert f"x-candela-workload-exe-sha256: {_sha256_of(sys.executable)}" in head
        assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]
        entries = wait_for_audit(db, "llm_request", lambda e: e.get("workload_pid") == chat["pid"])
        assert [(e["user_id"], e["decision"]) for e in entries] == [
            ("admin@example.com", "allowed")
        ]
        assert entries[0]["workload_exe_sha256"] == _sha256_of(sys.executable)

        candela.stop()  # SIGTERM
        assert "proxy_stop" in {e["action"] for e in _actions(tmp_path / "audit.db")}
        rc, out = _status()
        assert rc == 0 and json.loads(out)["active"], out
        assert probe("tcp", PROVIDER_IP, 443).errno == errno.ECONNREFUSED  # not let through
        assert _accepted(provider, 0.2) is None
        assert probe("tcp", PROVIDER_IP, 8443).errno == errno.EPERM
    finally:
        candela.stop()
        upstream.__exit__(None, None, None)
        provider.close()
        enforce_cli.main(["off"], out=io.StringIO())
        host.uninstall()
        enforce.HostChain().remove()
        cgroups.remove(cgroups.resolve(enforce.DEFAULT_CGROUP))
    assert _status()[0] == 3
    assert probe("tcp", PROVIDER_IP, 8443).errno == errno.ECONNREFUSED  # nothing listens: open


TLS_CLIENT = """
import json, os, socket, ssl, sys
ip, name, req = sys.argv[1], sys.argv[2] or None, sys.argv[3].encode("latin-1")
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
out = {"pid": os.getpid()}
try:
    with socket.create_connection((ip, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(req)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    out.update(outcome="connected", response=data.decode("latin-1"))
except (OSError, ssl.SSLError) as e:
    out.update(outcome="error", error=repr(e))
print(json.dumps(out))
"""


def _tls(ip: str, name: str | None, request: bytes) -> dict[str, Any]:
    """One TLS connection from a process of its own (outside Candela's cgroup)."""
    p = subprocess.run(
        [sys.executable, "-c", TLS_CLIENT, ip, name or "", request.decode("latin-1")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def _sha256_of(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(os.path.realpath(path)).read_bytes()).hexdigest()


def _status() -> tuple[int, str]:
    out = io.StringIO()
    return enforce_cli.main(["status", "--json"], out=out), out.getvalue()


def _actions(db: Path) -> list[dict[str, str]]:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [{"action": a} for (a,) in conn.execute("SELECT action FROM audit_log")]
