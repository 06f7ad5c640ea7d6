"""`candela run` on the real kernel: namespace, firewall, cgroup and eBPF guard around an unchanged
command; the bypass suite; exit codes; cleanup however the run ends."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.enforcement.registry import SandboxRegistry
from tests.e2e.conftest import candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import FakeUpstream

from .conftest import Probe
from .sandbox_env import (
    CANDELA,
    PROVIDER_IP,
    audit_barrier,
    audit_entries,
    candela_run,
    leftovers,
    sdk_env,
    started_sandboxes,
    transparent_config,
    wait_for_audit,
)

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

PROBE = Path(__file__).with_name("bypass_probe.py")


@dataclass
class Env:
    candela: CandelaProcess
    upstream: FakeUpstream
    listen_port: int

    @property
    def config(self) -> Path:
        return self.candela.config_path

    @property
    def audit_db(self) -> Path:
        return self.candela.tmp / "audit.db"

    def run(self, command: list[str], *options: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return candela_run(self.config, command, *options, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("sandbox")
    with FakeTokenServer() as tokens, FakeUpstream(google_token_valid=tokens.is_valid) as upstream:
        cfg = transparent_config(upstream.url, tmp)
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp), pick_listen_port=True) as candela:
            yield Env(candela, upstream, candela.listen_port)


def _no_sandboxes_left(env: Env) -> None:
    """Every sandbox this module started is gone: record, namespace, veth, rules, cgroup."""
    wait_for_audit(env.audit_db, "sandbox_stop")
    indexes = started_sandboxes(env.audit_db)
    assert indexes
    registry = SandboxRegistry()
    for index in indexes:
        record = registry.get(index)
        if record is not None and record.owner_alive():
            continue  # taken again since, by a sandbox running now elsewhere on this host
        assert record is None, record
        assert not any(leftovers(index).values()), (index, leftovers(index))


@pytest.mark.parametrize(
    "command, expected",
    [
        (["true"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -9 $$"], 128 + 9),
        (["/nonexistent/program"], 127),
    ],
)
def test_the_commands_exit_status_is_returned_and_nothing_is_left(
    env: Env, command: list[str], expected: int
) -> None:
    p = env.run(command, "--user", "alice@example.com")
    assert p.returncode == expected, p.stderr
    _no_sandboxes_left(env)


def test_the_command_runs_unchanged_with_candelas_ca_and_names(env: Env) -> None:
    script = """
        import json, os, socket, time
        def lookup(name):
            t = time.monotonic()
            try:
                ip = socket.getaddrinfo(name, 443, socket.AF_INET)[0][4][0]
            except OSError as e:
                ip = f"error {e.errno}"
            return ip, time.monotonic() - t
        bundle = os.environ["SSL_CERT_FILE"]
        print(json.dumps({
            "argv": __import__("sys").argv[1:],
            "cwd": os.getcwd(),
            "vars": {v: os.environ.get(v) for v in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                                                  "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")},
            "marker": os.environ.get("CANDELA_TEST_MARKER"),
            "bundle": open(bundle).read(),
            "openai": lookup("api.openai.com"),
            "anthropic": lookup("api.anthropic.com"),
            "unknown": lookup("nothing.invalid"),
            "interfaces": sorted(n for _, n in socket.if_nameindex()),
        }))
    """
    import textwrap

    ca = subprocess.run(
        [str(CANDELA), "ca", "export", "--config", str(env.config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    p = env.run(
        [sys.executable, "-c", textwrap.dedent(script), "a b", "--flag"],
        "--add-host",
        f"api.openai.com:{PROVIDER_IP}",
        env={**sdk_env(), "CANDELA_TEST_MARKER": "kept"},
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["argv"] == ["a b", "--flag"] and out["marker"] == "kept"
    assert out["cwd"] == os.getcwd()
    bundles = set(out["vars"].values())
    assert len(bundles) == 1 and None not in bundles  # all four name the same bundle
    assert ca in out["bundle"]  # Candela's CA ...
    assert out["bundle"].count("BEGIN CERTIFICATE") > 10  # ... beside the system's
    assert out["openai"][0] == PROVIDER_IP
    # a provider host with no address here still resolves: its port 443 goes to Candela anyway
    assert not out["anthropic"][0].startswith("error")
    assert out["unknown"][0].startswith("error") and out["unknown"][1] < 2.0
    assert out["interfaces"] == ["eth0", "lo"]


# -- the bypass suite ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bypass(env: Env) -> dict[str, Any]:
    """One sandbox run of bypass_probe.py; its report, and the audit entries made meanwhile."""
    before = {
        a: len(audit_entries(env.audit_db, a)) for a in ("bypass_attempt", "interception_denied")
    }
    upstream_before = len(env.upstream.requests)
    p = env.run(
        [sys.executable, str(PROBE), PROVIDER_IP],
        "--user",
        "alice@example.com",
        "--tenant",
        "research-team",
        "--add-host",
        f"api.openai.com:{PROVIDER_IP}",
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    wait_for_audit(env.audit_db, "sandbox_stop", lambda e: True)
    upstream = env.upstream.requests[upstream_before:]
    # the proxy's own entries (no_sni, interception_denied) are queued by its writer thread:
    # committed once a later one is (sandbox_stop comes from `candela run`, which does not
    # order them)
    audit_barrier(env.candela.url)
    audit = {a: audit_entries(env.audit_db, a)[n:] for a, n in before.items()}
    return {"report": report, "audit": audit, "upstream": upstream}


WHO = ("main", "child", "thread")
# attempt -> (errno the call failed with, the guard's reason)
KERNEL_REFUSED = {
    "other_port": (errno.EPERM, "not_allowed"),
    "ipv6": (errno.EPERM, "ipv6"),
    "udp_443": (errno.EPERM, "udp_port"),
    "dns_other_resolver": (errno.EPERM, "dns"),
    "dot": (errno.EPERM, "not_allowed"),
}


def _guard_entries(bypass: dict[str, Any], attempt: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in bypass["audit"]["bypass_attempt"] if e["pid"] == attempt["tid"]]


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("name", sorted(KERNEL_REFUSED))
def test_the_kernel_refuses_and_audits_with_pid_and_comm(
    bypass: dict[str, Any], name: str, who: str
) -> None:
    attempt = bypass["report"][who][name]
    err, reason = KERNEL_REFUSED[name]
    assert attempt["outcome"] == "error" and attempt["errno"] == err, attempt
    entries = [e for e in _guard_entries(bypass, attempt) if e["reason"] == reason]
    assert entries, bypass["audit"]["bypass_attempt"]
    e = entries[0]
    assert e["tgid"] == attempt["pid"] and e["comm"] == attempt["comm"]
    assert e["user_id"] == "alice@example.com" and e["tenant_id"] == "research-team"


@pytest.mark.parametrize("who", WHO)
def test_tls_without_sni_to_the_provider_is_refused_and_audited(
    bypass: dict[str, Any], who: str
) -> None:
    attempt = bypass["report"][who]["tls_without_sni"]
    assert attempt["outcome"] == "error", attempt
    entries = [
        e
        for e in bypass["audit"]["bypass_attempt"]
        if e["reason"] == "no_sni" and e["pid"] == attempt["pid"]
    ]
    # the worker thread's attempt comes from the main thread's process: two entries with its pid
    assert len(entries) == (1 if who == "child" else 2), bypass["audit"]["bypass_attempt"]
    assert entries[0]["destination"] == f"{PROVIDER_IP}:443"
    # the process's name (a thread's own name is the kernel guard's to report)
    assert entries[0]["comm"] == ("cdl-main" if who == "thread" else attempt["comm"])
    assert entries[0]["user_id"] == "alice@example.com"
    # the process as the kernel knows it: what it runs (and its hash), its uid and cgroup
    exe = os.path.realpath(sys.executable)
    assert entries[0]["exe"] == exe and entries[0]["uid"] == 0
    assert entries[0]["exe_sha256"] == hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    assert entries[0]["cgroup"].startswith("/candela/sandbox-")
    assert entries[0]["enforcement"] == "sandbox"


@pytest.mark.parametrize("who", WHO)
def test_the_provider_address_with_its_name_is_intercepted(
    bypass: dict[str, Any], who: str
) -> None:
    attempt = bypass["report"][who]["direct_ip_with_sni"]
    assert attempt["outcome"] == "intercepted", attempt
    assert attempt["issuer"] == "Candela CA"
    assert attempt["status"].startswith("HTTP/1.1 200")
    seen = [r for r in bypass["upstream"] if r.path == "/v1/models"]
    assert len(seen) == len(WHO)
    assert {r.headers["authorization"] for r in seen} == {"Bearer sk-test-openai-fake"}


@pytest.mark.parametrize("who", WHO)
def test_another_proxy_is_not_reachable(bypass: dict[str, Any], who: str) -> None:
    report = bypass["report"][who]
    other_port, port_80 = report["https_proxy_other_port"], report["https_proxy_port_80"]
    assert other_port["outcome"] == "error" and "Errno 1]" in other_port["error"], other_port
    assert [
        e
        for e in _guard_entries(bypass, other_port)
        if e["destination"] == "198.18.0.99:3128" and e["comm"] == other_port["comm"]
    ]
    # port 80 is redirected to Candela, which refuses to be asked for a tunnel, and says who asked
    assert port_80["outcome"] == "error", port_80
    assert [
        e
        for e in bypass["audit"]["interception_denied"]
        if e["reason"] == "proxy_request" and e["pid"] == port_80["pid"]
    ]


@pytest.mark.parametrize("who", WHO)
def test_a_new_network_namespace_gets_nowhere(bypass: dict[str, Any], who: str) -> None:
    attempts = bypass["report"][who]["new_netns"]["attempts"]
    # no CAP_SYS_ADMIN in the sandbox: a plain new namespace is refused outright
    assert attempts["--net"]["returncode"] != 0
    assert "Operation not permitted" in attempts["--net"]["stderr"]
    # a user namespace may be allowed; its network namespace is not the sandbox's, so the guard
    # refuses the connect (before any routing) and the attempt is audited with who made it
    userns = attempts["--user --map-root-user --net"]
    connect = userns["connect"]
    if connect is None:  # user namespaces are not permitted here: unshare itself was refused
        assert "Operation not permitted" in userns["stderr"], userns
        return
    assert connect["errno"] == errno.EPERM, userns
    entries = [e for e in bypass["audit"]["bypass_attempt"] if e["tgid"] == connect["pid"]]
    assert [(e["reason"], e["comm"], e["destination"]) for e in entries] == [
        ("foreign_netns", connect["comm"], f"{PROVIDER_IP}:443")
    ], bypass["audit"]["bypass_attempt"]
    assert entries[0]["user_id"] == "alice@example.com"


def test_the_proxys_metrics_count_what_sandboxes_audited(env: Env, bypass: dict[str, Any]) -> None:
    """`candela run` audits its guard's refusals from its own process; the proxy's
    candela_bypass_attempts_total counts them from the ledger, each once."""
    import re
    import urllib.request
    from collections import Counter

    assert bypass["audit"]["bypass_attempt"]
    in_ledger = Counter(e["reason"] for e in audit_entries(env.audit_db, "bypass_attempt"))
    for _ in range(2):  # a second scrape counts nothing again
        from tests.e2e.conftest import ADMIN_KEY

        scrape = urllib.request.Request(
            env.candela.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        with urllib.request.urlopen(scrape, timeout=5) as r:
            text = r.read().decode()
        pattern = r'^candela_bypass_attempts_total\{kind="([^"]+)"\} (\S+)$'
        counted = {kind: float(n) for kind, n in re.findall(pattern, text, re.M)}
        assert counted == {kind: float(n) for kind, n in in_ledger.items()}, text


def test_nothing_went_upstream_but_the_intercepted_requests(bypass: dict[str, Any]) -> None:
    assert {r.path for r in bypass["upstream"]} == {"/v1/models"}


# -- cleanup ---------------------------------------------------------------------------------


def _wait_for_sandbox(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """The index of the sandbox `candela run` (proc) made, once its command runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [r for r in SandboxRegistry().records() if r.pid == proc.pid]
        if records and records[0].cgroup and records[0].hosts:
            index = records[0].index
            procs = Path(records[0].cgroup, "cgroup.procs")
            running = procs.exists() and procs.read_text().split()
            # the command runs (it is in the cgroup, as `sleep`, past the launcher's exec)
            if running and all(leftovers(index).values()):
                comm = Path(f"/proc/{running[0]}/comm")
                if comm.exists() and comm.read_text().strip() == "sleep":
                    return index
        time.sleep(0.05)
    raise AssertionError("the sandbox did not come up")


def _start(env: Env, command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(CANDELA), "run", "--config", str(env.config), "--", *command],
        env=sdk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_reaches_the_command_and_everything_is_removed(env: Env) -> None:
    proc = _start(env, ["sleep", "30"])
    try:
        _wait_for_sandbox(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _no_sandboxes_left(env)


def test_a_killed_run_is_cleaned_up_by_the_next_one(env: Env) -> None:
    proc = _start(env, ["sleep", "30"])
    orphan = None
    try:
        index = _wait_for_sandbox(proc)
        record = SandboxRegistry().get(index)
        assert record is not None and record.cgroup
        orphan = int(Path(record.cgroup, "cgroup.procs").read_text().split()[0])
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait(30)
        assert all(leftovers(index).values())  # namespace, veth, rules, cgroup all still there
        assert Path(f"/proc/{orphan}").exists()  # and the command still runs in them
        p = env.run(["true"])
        assert p.returncode == 0, p.stderr
        assert not any(leftovers(index).values()), leftovers(index)
        assert SandboxRegistry().get(index) is None
        deadline = time.monotonic() + 30
        while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{orphan}").exists()
        cleaned = audit_entries(env.audit_db, "sandbox_cleanup")
        assert any(e["sandbox"] == f"candela-{index}" for e in cleaned)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if orphan is not None:
            try:
                os.kill(orphan, signal.SIGKILL)
            except ProcessLookupError:
                pass
        env.run(["true"])  # whatever this test left, the next start removes
    _no_sandboxes_left(env)


def test_a_process_moved_into_the_sandbox_from_another_namespace_is_refused(
    env: Env, probe: Probe
) -> None:
    """The guard lets TCP 80/443 out only from the sandbox's own namespace, whose firewall sends
    it to Candela: from the host's, or a new one, the connect fails and is audited."""
    proc = _start(env, ["sleep", "30"])
    try:
        index = _wait_for_sandbox(proc)
        record = SandboxRegistry().get(index)
        assert record is not None and record.cgroup
        cgroup = Path(record.cgroup)
        attempts = [
            probe("tcp", PROVIDER_IP, 443, cgroup=cgroup, new_netns=True),
            probe("tcp", PROVIDER_IP, 80, cgroup=cgroup),  # the host's namespace
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for attempt, port in zip(attempts, (443, 80), strict=True):
        assert attempt.errno == errno.EPERM, attempt
        entries = wait_for_audit(
            env.audit_db, "bypass_attempt", lambda e, a=attempt: e["tgid"] == a.tgid
        )
        assert [(e["reason"], e["comm"], e["destination"], e["sandbox"]) for e in entries] == [
            ("foreign_netns", "cdl-probe", f"{PROVIDER_IP}:{port}", record.netns)
        ], entries
    _no_sandboxes_left(env)


def test_a_command_is_required(env: Env) -> None:
    p = subprocess.run(
        [str(CANDELA), "run", "--config", str(env.config)], capture_output=True, text=True
    )
    assert p.returncode == 2 and "no command" in p.stderr


# -- beside host enforcement ------------------------------------------------------------------

PROVIDER_CALL = f"""
import socket, ssl
ctx = ssl.create_default_context()
with socket.create_connection(({PROVIDER_IP!r}, 443), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
        s.sendall(b"GET /v1/models HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n")
        print(s.recv(100).split(b"\\r\\n", 1)[0].decode())
"""


def test_a_sandbox_works_while_the_host_is_enforced(env: Env, tmp_path: Path) -> None:
    """`candela enforce host` refuses provider connections from namespaces it does not know to be
    redirected; `candela run` registers its own, and takes it back when it ends."""
    import io
    import uuid

    from candela_mitm.cli import enforce as enforce_cli
    from candela_mitm.ebpf import host
    from candela_mitm.enforcement import cgroups
    from candela_mitm.enforcement import host as enforce
    from candela_mitm.enforcement.host_chain import HostChain

    from .conftest import require

    if enforce.EnforceState.load() is not None or host.attached():
        require("host enforcement is already active on this machine; not touching it")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{PROVIDER_IP} api.openai.com\n")
    state = str(tmp_path / "enforce.json")
    cgroup = f"candela-test-enforce-{uuid.uuid4().hex[:8]}"
    # confined to where sandboxes live: the machine's other HTTPS is not the test's to take
    scope = cgroups.create("candela")
    on = ["host", "--proxy-port", str(env.listen_port), "--no-default-providers"]
    on += ["--provider", "api.openai.com", "--hosts-file", str(hosts), "--cgroup", cgroup]
    on += ["--scope", str(scope)]
    assert enforce_cli.main(["--state", state, *on], out=io.StringIO()) == 0
    try:
        with host.PinnedEvents() as refusals:
            p = env.run(
                [sys.executable, "-c", PROVIDER_CALL], "--add-host", f"api.openai.com:{PROVIDER_IP}"
            )
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == "HTTP/1.1 200 OK"
            assert [e for e in refusals.poll(200) if e.reason == "foreign_netns"] == []
    finally:
        enforce_cli.main(["--state", state, "off", "--cgroup", cgroup], out=io.StringIO())
        host.uninstall(root=scope)
        host.uninstall()
        HostChain().remove()
        cgroups.remove(cgroups.resolve(cgroup))
