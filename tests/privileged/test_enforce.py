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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.cli import enforce as enforce_cli
from candela_mitm.ebpf import host
from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement import host as enforce
from candela_mitm.enforcement.host_chain import HostChain

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
    """Host enforcement confined to a test cgroup (`scope`): the machine's other processes,
    other engineers' tests among them, keep their HTTPS untouched."""

    def __init__(self, tmp: Path, scope: Path):
        self.scope = scope
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
            "--scope",
            str(self.scope),
        )

    def close(self) -> None:
        self.provider.close()
        self.proxy.close()


@pytest.fixture
def env(tmp_path: Path, iptables: str, test_cgroup: Path) -> Iterator[Env]:
    if enforce.EnforceState.load() is not None or host.attached():
        require("host enforcement is active on this machine; not touching it")
    e = Env(tmp_path, test_cgroup)
    try:
        yield e
    finally:
        # Whatever happened, leave the machine as it was: never blocked.
        e.cmd("off", "--cgroup", e.cgroup)
        host.uninstall(root=test_cgroup)
        host.uninstall()
        HostChain().remove()
        cgroups.remove(cgroups.resolve(e.cgroup))
        e.close()


def _events(reader: host.PinnedEvents, tgid: int) -> list[str]:
    return [ev.reason for ev in reader.poll(300) if ev.tgid == tgid]


@pytest.mark.privileged
def test_enforce_host_redirects_blocks_and_turns_off(env: Env, probe: Probe) -> None:
    rc, out = env.on()
    assert rc == 0, out
    assert f"{PROVIDER_NAME}: {PROVIDER_IP}" in out
    scope = env.scope

    rc, out = env.cmd("status", "--json")
    st = json.loads(out)
    assert rc == 0 and st["active"], out
    assert st["state"]["scope"] == str(scope)
    rules = "\n".join(st["chain"]).replace('"', "")
    assert f"--path /{env.cgroup}" in rules
    assert f"! --path {cgroups.relative(scope)}" in rules
    # every HTTPS connection, whatever its address; plain HTTP only to the provider's
    assert f"--dports 443 -j REDIRECT --to-ports {env.proxy_port}" in rules
    assert f"-d {PROVIDER_IP}/32 -p tcp -m multiport --dports 80 -j REDIRECT" in rules
    assert sorted(p["hook"] for p in st["programs"]) == sorted(n for n, _ in host.HOOKS)
    assert host.attached() == []  # at the scope's cgroup, not the machine's root

    with host.PinnedEvents() as reader:
        # In the scope, TCP 443 lands on the proxy: to the provider and to any other address.
        for ip in (PROVIDER_IP, "127.77.0.9"):
            r = probe("tcp", ip, 443, cgroup=scope)
            assert r.errno == 0
            conn = _accepted(env.proxy)
            assert conn is not None
            assert _original_dst(conn) == (ip, 443)
            conn.close()
        assert _accepted(env.provider, 0.2) is None
        # Plain HTTP is redirected only towards a provider address.
        assert probe("tcp", PROVIDER_IP, 80, cgroup=scope).errno == 0
        conn = _accepted(env.proxy)
        assert conn is not None and _original_dst(conn) == (PROVIDER_IP, 80)
        conn.close()
        assert probe("tcp", "127.77.0.9", 80, cgroup=scope).errno == errno.ECONNREFUSED

        # Outside the scope, nothing changes: straight to the provider.
        assert probe("tcp", PROVIDER_IP, 443).errno == 0
        conn = _accepted(env.provider)
        assert conn is not None
        conn.close()
        assert probe("udp", "127.0.0.1", 443).errno == 0
        assert probe("tcp", PROVIDER_IP, 8443).errno == errno.ECONNREFUSED  # not refused: closed

        # In the scope but in Candela's cgroup (the proxy, started with `candela enforce
        # exec`): straight to the provider.
        r = probe(
            "tcp",
            PROVIDER_IP,
            443,
            cgroup=scope,
            argv0=[str(CANDELA), "enforce", "--state", env.state, "exec", "--"],
        )
        assert r.errno == 0
        conn = _accepted(env.provider)
        assert conn is not None
        conn.close()
        cg = cgroups.resolve(env.cgroup)
        assert probe("udp", "127.0.0.1", 443, cgroup=cg).errno == 0

        # What redirection does not cover is refused, and reported.
        r = probe("tcp", PROVIDER_IP, 8443, cgroup=scope)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["provider_port"]
        r = probe("udp", "127.0.0.1", 443, cgroup=scope)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["udp_port"]
        r = probe("udp", PROVIDER_IP, 853, cgroup=scope)
        assert r.errno == errno.EPERM
        r = probe("tcp", PROVIDER_IP, 443, cgroup=scope, new_netns=True)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["foreign_netns"]
        # HTTPS over IPv6 cannot be redirected: refused for any address (clients fall back to
        # IPv4, which is), but loopback; outside the scope it is not Candela's business
        r = probe("tcp", "2001:db8::1", 443, cgroup=scope)
        assert r.errno == errno.EPERM
        assert _events(reader, r.tgid) == ["ipv6_redirected_port"]
        assert probe("tcp", "::1", 443, cgroup=scope).errno == errno.ECONNREFUSED
        assert probe("tcp", "2001:db8::1", 443).errno != errno.EPERM
        # Other destinations are not Candela's business.
        assert probe("tcp", "127.0.0.1", 9, cgroup=scope).errno == errno.ECONNREFUSED

    counts = host.pinned_counts()
    assert counts["provider_port"] >= 1 and counts["udp_port"] >= 2
    assert counts["foreign_netns"] >= 1

    # Re-running replaces the programs without a gap or duplicates.
    old = {p["id"] for p in st["programs"]}
    rc, out = env.on()
    assert rc == 0, out
    now = host.attached(scope)
    assert len(now) == len(host.HOOKS) and not old & {i for _, i, _ in now}

    # Candela stopped: provider traffic is refused, not let through.
    env.proxy.close()
    assert probe("tcp", PROVIDER_IP, 443, cgroup=scope).errno == errno.ECONNREFUSED
    assert _accepted(env.provider, 0.2) is None

    rc, out = env.cmd("off")
    assert rc == 0, out
    rc, out = env.cmd("status", "--json")
    st = json.loads(out)
    assert rc == 3 and not st["active"] and not st["partial"], out
    assert st["chain"] is None and st["programs"] == [] and not Path(host.PIN_DIR).exists()
    assert host.attached(scope) == []
    assert not cgroups.resolve(env.cgroup).exists()
    assert probe("tcp", PROVIDER_IP, 443, cgroup=scope).errno == 0
    conn = _accepted(env.provider)
    assert conn is not None
    conn.close()
    assert probe("udp", "127.0.0.1", 443, cgroup=scope).errno == 0


@pytest.mark.privileged
def test_moving_the_scope_leaves_the_old_one_alone(env: Env, probe: Probe) -> None:
    rc, out = env.on()
    assert rc == 0, out
    old = env.scope
    env.scope = cgroups.create(old / "moved")
    rc, out = env.on()
    assert rc == 0, out
    assert host.attached(old) == [] and len(host.attached(env.scope)) == len(host.HOOKS)
    assert probe("tcp", PROVIDER_IP, 8443, cgroup=old).errno == errno.ECONNREFUSED  # not refused
    assert probe("tcp", PROVIDER_IP, 8443, cgroup=env.scope).errno == errno.EPERM


@pytest.mark.privileged
def test_a_scope_that_does_not_exist_changes_nothing(env: Env) -> None:
    env.scope = env.scope / "missing"
    rc, _ = env.on()
    assert rc == 1
    assert host.attached() == [] and HostChain().rules() is None
    assert not os.path.exists(env.state)


@pytest.mark.privileged
def test_with_no_provider_address_https_is_still_decided_by_name(env: Env, probe: Probe) -> None:
    env.hosts.write_text("")
    rc, out = env.on()
    assert rc == 0, out
    assert "no provider address resolved" in out
    r = probe("tcp", "127.77.0.9", 443, cgroup=env.scope)
    assert r.errno == 0
    conn = _accepted(env.proxy)
    assert conn is not None and _original_dst(conn) == ("127.77.0.9", 443)
    conn.close()


@pytest.mark.privileged
def test_registered_netns_is_treated_as_redirected(env: Env, probe: Probe) -> None:
    """A sandbox with its own redirect registers its namespace; others stay refused."""
    rc, out = env.on()
    assert rc == 0, out
    assert probe("tcp", PROVIDER_IP, 443, cgroup=env.scope, new_netns=True).errno == errno.EPERM
    other = host.netns_cookie()
    assert host.register_netns(other, redirected=False)
    try:
        assert probe("tcp", PROVIDER_IP, 443, cgroup=env.scope).errno == errno.EPERM
    finally:
        host.register_netns(other)
    assert probe("tcp", PROVIDER_IP, 443, cgroup=env.scope).errno == 0


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


@dataclass
class Enforcing:
    """candela-server with `interception.enforce: host` confined to a test cgroup (`scope`)."""

    candela: Any  # tests.fakes.candela.CandelaProcess
    upstream: Any  # tests.fakes.upstream.FakeUpstream
    provider: socket.socket  # the provider address the proxy resolved at start
    scope: Path
    tmp: Path
    listen_port: int

    @property
    def audit_db(self) -> Path:
        return self.tmp / "audit.db"


@contextmanager
def _enforcing(
    tmp_path: Path,
    scope: Path,
    *,
    openai_base_url: bool = True,
    hosts: str | None = None,
    upstream_ca: Path | None = None,
) -> Iterator[Enforcing]:
    """candela-server enforcing `scope`; `hosts`: an /etc/hosts of its own (a private mount
    namespace), for the upstream names it resolves; `openai_base_url` False: the openai route
    goes to the public hosts (resolved through `hosts`)."""
    from tests.e2e.conftest import base_config
    from tests.fakes.candela import CandelaProcess
    from tests.fakes.upstream import OPENAI_KEY, FakeUpstream

    if enforce.EnforceState.load() is not None or host.attached():
        require("host enforcement is active on this machine; not touching it")
    upstream = FakeUpstream()
    upstream.__enter__()
    cfg = base_config(upstream.url, mode="transparent")
    if not openai_base_url:
        del cfg["providers"]["openai"]
    # the test's interpreter, wherever it runs from, works for the admin
    cfg["governance"]["workloads"] = [
        {"exe": os.path.realpath(sys.executable), "user": "admin@example.com"}
    ]
    cfg["interception"] = {
        "listen_port": 0,  # picked by CandelaProcess (again if taken before Candela binds it)
        "certs_dir": str(tmp_path / "certs"),
        # an address literal resolves to itself: the test provider needs no hosts file
        "hosts": {PROVIDER_IP: "openai"},
        "enforce": "host",
        # only the test's processes: the machine's other HTTPS is not the test's to take
        "enforce_scope": cgroups.relative(scope),
    }
    if upstream_ca is not None:
        cfg["interception"]["upstream_ca_file"] = str(upstream_ca)
    prefix: list[str] = []
    if hosts is not None:
        hosts_file = tmp_path / "candela-hosts"
        hosts_file.write_text(hosts)
        # unshare(1) makes the new mount namespace's mounts private: the host's /etc/hosts stays
        prefix = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount --bind {hosts_file} /etc/hosts && exec "$@"',
            "sh",
        ]
    provider = _listen(PROVIDER_IP, 443)
    candela = CandelaProcess(tmp_path, cfg, env={"OPENAI_API_KEY": OPENAI_KEY}, prefix=prefix,
                             pick_listen_port=True)
    try:
        candela.start()
        yield Enforcing(candela, upstream, provider, scope, tmp_path, candela.listen_port)
    finally:
        candela.stop()
        upstream.__exit__(None, None, None)
        provider.close()
        enforce_cli.main(["off"], out=io.StringIO())
        host.uninstall(root=scope)
        host.uninstall()
        HostChain().remove()
        cgroups.remove(cgroups.resolve(enforce.DEFAULT_CGROUP))


@pytest.fixture
def enforcing(tmp_path: Path, iptables: str, test_cgroup: Path) -> Iterator[Enforcing]:
    with _enforcing(tmp_path, test_cgroup) as e:
        yield e


@pytest.mark.privileged
def test_candela_server_enforces_the_host_audits_refusals_and_stays_closed_when_stopped(
    enforcing: Enforcing, probe: Probe
) -> None:
    """`interception.enforce: host`: at start the proxy puts host enforcement in place towards
    its transparent listener, with itself exempt; it audits and counts what the kernel refuses;
    when it stops, provider traffic stays refused until `candela enforce off`."""
    from .sandbox_env import wait_for_audit

    candela, upstream, provider, scope = (
        enforcing.candela,
        enforcing.upstream,
        enforcing.provider,
        enforcing.scope,
    )
    assert candela.proc is not None
    assert cgroups.cgroup_of(candela.proc.pid) == f"/{enforce.DEFAULT_CGROUP}"
    state = enforce.EnforceState.load()
    assert state is not None and state.proxy_port == enforcing.listen_port
    assert state.providers[PROVIDER_IP] == [PROVIDER_IP] and state.scope == str(scope)

    refused = [
        probe("tcp", PROVIDER_IP, 8443, cgroup=scope),
        probe("udp", PROVIDER_IP, 443, cgroup=scope),
    ]
    assert [r.errno for r in refused] == [errno.EPERM, errno.EPERM]
    for r, reason in zip(refused, ("provider_port", "udp_port"), strict=True):
        entries = wait_for_audit(
            enforcing.audit_db, "bypass_attempt", lambda e, r=r: e["tgid"] == r.tgid
        )
        assert [(e["reason"], e["comm"], e["enforcement"]) for e in entries] == [
            (reason, "cdl-probe", "host")
        ], entries
    assert _bypass_counted(candela.url + "/metrics") == {"provider_port": 1.0, "udp_port": 1.0}
    # TCP 443 to the provider is redirected to the proxy's transparent listener
    assert probe("tcp", PROVIDER_IP, 443, cgroup=scope).errno == 0
    assert _accepted(provider, 0.2) is None

    # the doors the proxy closes there, each audited with the process from the kernel
    db = enforcing.audit_db
    no_sni = _tls(
        PROVIDER_IP, None, b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", scope
    )
    other = _tls(
        PROVIDER_IP,
        "cdn.example.net",
        b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        scope,
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
    chat = _tls(PROVIDER_IP, "api.openai.com", _chat_request(), scope)
    head = chat["response"].split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("http/1.1 200"), chat
    assert f"x-candela-workload-exe-sha256: {_sha256_of(sys.executable)}" in head
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]
    entries = wait_for_audit(db, "llm_request", lambda e: e.get("workload_pid") == chat["pid"])
    assert [(e["user_id"], e["decision"]) for e in entries] == [("admin@example.com", "allowed")]
    assert entries[0]["workload_exe_sha256"] == _sha256_of(sys.executable)

    candela.stop()  # SIGTERM
    assert "proxy_stop" in {e["action"] for e in _actions(db)}
    rc, out = _status()
    assert rc == 0 and json.loads(out)["active"], out
    assert probe("tcp", PROVIDER_IP, 443, cgroup=scope).errno == errno.ECONNREFUSED
    assert _accepted(provider, 0.2) is None
    assert probe("tcp", PROVIDER_IP, 8443, cgroup=scope).errno == errno.EPERM
    enforce_cli.main(["off"], out=io.StringIO())
    assert _status()[0] == 3
    assert probe("tcp", PROVIDER_IP, 8443, cgroup=scope).errno == errno.ECONNREFUSED  # open


# A second address of the provider's edge that nobody resolved when enforcement started, and a
# server that is no provider's, each with a certificate of its own.
EDGE_IP = "127.77.0.2"
OTHER_IP = "127.77.0.3"
OTHER_NAME = "example.internal"


class TlsServer:
    """A TLS server on <ip>:443 with its own self-signed certificate, answering every request
    with `server <ip>` and counting the connections it accepted."""

    def __init__(self, ip: str, name: str, workdir: Path) -> None:
        import ssl
        import threading

        from .sandbox_env import self_signed

        self.ip = ip
        self.cert, key = self_signed(name, workdir)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, key)
        self.sock = _listen(ip, 443)
        self.sock.settimeout(None)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def fingerprint(self) -> str:
        import hashlib
        import ssl

        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert.read_text())).hexdigest()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                body = f"server {self.ip}".encode()
                s.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.privileged
def test_https_is_decided_by_name_for_the_scope_only(enforcing: Enforcing, tmp_path: Path) -> None:
    """Every TCP 443 of the enforced cgroup reaches the transparent listener, which decides by
    SNI: the provider's name at an address nobody resolved is governed; another name is relayed
    to its own server untouched (its certificate, not Candela's); outside the cgroup nothing is
    redirected at all."""
    edge = TlsServer(EDGE_IP, "api.openai.com", tmp_path)
    other = TlsServer(OTHER_IP, OTHER_NAME, tmp_path)
    try:
        state = enforce.EnforceState.load()
        assert state is not None
        assert EDGE_IP not in {a for v in state.providers.values() for a in v}

        # the provider's name at an address not resolved at start: governed
        chat = _tls(EDGE_IP, "api.openai.com", _chat_request(), enforcing.scope)
        assert chat["response"].lower().startswith("http/1.1 200"), chat
        assert chat["cert_sha256"] != edge.fingerprint()  # Candela's certificate for the name
        assert edge.accepted == 0
        assert [r.path for r in enforcing.upstream.requests] == ["/v1/chat/completions"]

        # another name: relayed untouched, the server's own certificate, verified by curl
        curl = _in_cgroup(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(other.cert),
                "--resolve",
                f"{OTHER_NAME}:443:{OTHER_IP}",
                f"https://{OTHER_NAME}/",
            ],
            enforcing.scope,
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == f"server {OTHER_IP}"
        assert other.accepted == 1  # through the proxy's relay: the curl did reach it once
        relayed = _tls(OTHER_IP, OTHER_NAME, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", enforcing.scope)
        assert relayed["cert_sha256"] == other.fingerprint()
        # a nameless TLS connection to an address that is no provider's: relayed as well
        nameless = _tls(OTHER_IP, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", enforcing.scope)
        assert nameless["cert_sha256"] == other.fingerprint(), nameless
        assert len(enforcing.upstream.requests) == 1  # none of it went to the provider

        # outside the cgroup: not redirected, the edge's own server answers
        outside = _tls(EDGE_IP, "api.openai.com", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert outside["cert_sha256"] == edge.fingerprint(), outside
        assert outside["response"].endswith(f"server {EDGE_IP}")
        assert edge.accepted == 1
        assert len(enforcing.upstream.requests) == 1
    finally:
        edge.close()
        other.close()


RESIDENCY = "eu.api.openai.com"
RESIDENCY_IP = "127.77.0.5"


class TlsFront:
    """TLS on <ip>:443 with its own certificate for `name`, relaying each connection's bytes to a
    plain-HTTP server (the fake upstream): the fake records the request as the provider host
    would receive it, Host header included."""

    def __init__(self, ip: str, name: str, workdir: Path) -> None:
        import ssl
        import threading

        from .sandbox_env import self_signed

        self.cert, key = self_signed(name, workdir)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, key)
        self.backend: tuple[str, int] = ("127.0.0.1", 9)  # set once the fake upstream runs
        self.sock = _listen(ip, 443)
        self.sock.settimeout(None)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        import threading

        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
            back = socket.create_connection(self.backend, timeout=10)
        except OSError:
            conn.close()
            return

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(back, tls), daemon=True).start()
        pipe(tls, back)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.privileged
def test_a_residency_host_is_forwarded_to_that_same_host(
    tmp_path: Path, iptables: str, test_cgroup: Path
) -> None:
    """An app's request for eu.api.openai.com (no base_url pins the openai route) is governed and
    forwarded to eu.api.openai.com itself, not api.openai.com: the provider host receives it
    with its own name as Host and the organisation's key."""
    from urllib.parse import urlsplit

    from tests.fakes.upstream import OPENAI_KEY

    workdir = tmp_path / "front"
    workdir.mkdir()
    front = TlsFront(RESIDENCY_IP, RESIDENCY, workdir)
    try:
        with _enforcing(
            tmp_path,
            test_cgroup,
            openai_base_url=False,
            hosts=f"127.0.0.1 localhost\n{RESIDENCY_IP} {RESIDENCY}\n",
            upstream_ca=front.cert,  # Candela trusts it as the provider host's certificate
        ) as e:
            backend = urlsplit(e.upstream.url)
            front.backend = (backend.hostname or "", backend.port or 0)
            chat = _tls(EDGE_IP, RESIDENCY, _chat_request(RESIDENCY), e.scope)
            assert chat["response"].lower().startswith("http/1.1 200"), chat
            [rec] = e.upstream.requests
            assert rec.path == "/v1/chat/completions"
            assert rec.headers["host"] == RESIDENCY  # not api.openai.com
            assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    finally:
        front.close()


def _chat_request(host: str = "api.openai.com") -> bytes:
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        "Authorization: Bearer sk-the-apps-own\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _in_cgroup(argv: list[str], cgroup: Path | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=cgroups.enter(cgroup) if cgroup is not None else None,
    )


TLS_CLIENT = """
import hashlib, json, os, socket, ssl, sys
ip, name, req = sys.argv[1], sys.argv[2] or None, sys.argv[3].encode("latin-1")
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
out = {"pid": os.getpid()}
try:
    with socket.create_connection((ip, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            out["cert_sha256"] = hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()
            s.sendall(req)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    out.update(outcome="connected", response=data.decode("latin-1"))
except (OSError, ssl.SSLError) as e:
    out.update(outcome="error", error=repr(e))
print(json.dumps(out))
"""


def _tls(ip: str, name: str | None, request: bytes, cgroup: Path | None = None) -> dict[str, Any]:
    """One TLS connection from a process of its own (outside Candela's cgroup; in `cgroup`)."""
    p = _in_cgroup(
        [sys.executable, "-c", TLS_CLIENT, ip, name or "", request.decode("latin-1")], cgroup
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
