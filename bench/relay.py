"""Scenario 9: what host enforcement costs HTTPS that is no provider's (every TCP 443 redirected).

Under `candela enforce host` every TCP 443 connection of an enforced process reaches Candela's
transparent listener, which reads the ClientHello's server name and relays a connection whose
name is no provider's to its own destination untouched (never decrypted). Measured: a TLS server
that is no provider's (`example.internal` on 198.18.0.2:443, a certificate of its own, which the
load generator verifies: a relay that decrypted would fail it), reached

- direct: by the load generator with nothing in between;
- relayed: by the same load generator run in a cgroup that Candela enforces
  (`interception.enforce: host`, `enforce_scope` that cgroup, so nothing else on the machine is
  redirected): iptables REDIRECT, the listener's SNI decision, its connection to the server and
  the relay of every byte both ways.

Loads: a new connection per request (closed loop, 16 at once: what the relay adds to a
handshake), keep-alive (closed loop, 16 connections: what relaying a request's bytes costs), and
an open loop of 50 new connections per second (added latency with a core to spare).

Needs root, iptables, openssl and bcc (host enforcement loads its eBPF programs); the address, the
cgroup and host enforcement are removed afterwards (`candela enforce off`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

ADDR = "198.18.0.2"
HOST = "example.internal"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def _cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise FileNotFoundError("no cgroup v2 mount")


def run(b: Any) -> dict[str, Any]:
    import harness as bench

    candela_cli = bench.ROOT / ".venv" / "bin" / "candela"
    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("openssl"):
        return {"skipped": "needs root, iptables and openssl"}
    if Path("/run/candela/enforce.json").exists():
        return {"skipped": "host enforcement is already on here; not touching it"}
    tls = b.work / "relay-tls"
    tls.mkdir(parents=True, exist_ok=True)
    cert, key = tls / "server.pem", tls / "server.key"
    _sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={HOST}",
        "-addext", f"subjectAltName=DNS:{HOST}")
    scope = _cgroup2_root() / f"candela-bench-relay-{os.getpid()}"
    scope.mkdir(exist_ok=True)
    wrapper = b.work / "in-scope.sh"
    wrapper.write_text(f'#!/bin/sh\necho $$ > {scope}/cgroup.procs\nexec {bench.BENCH_PY} "$@"\n')
    wrapper.chmod(0o755)
    _sh("ip", "addr", "add", f"{ADDR}/32", "dev", "lo", check=False)
    dur = b.d(6)
    url = f"http://{HOST}/v1/chat/completions"
    common = ["--tls", "--sni", HOST, "--connect", f"{ADDR}:443", "--cafile", str(cert)]
    loads = {
        "new_connection_c16": ("closed", 16, 0.0, ["--new-connection"]),
        "keepalive_c16": ("closed", 16, 0.0, []),
        "new_connection_50rps": ("open", 16, 50.0, ["--new-connection"]),
    }
    out: dict[str, Any] = {"loads": list(loads)}
    server = b.start("relay-server", [str(bench.BENCH_PY), str(bench.BENCH / "upstream.py"),
                                      "--host", ADDR, "--port", "443", "--tls-cert", str(cert),
                                      "--tls-key", str(key)])
    try:
        time.sleep(1.0)
        out["direct"] = {
            name: b.load(url, mode, c, dur, rate=rate, keys=False, extra=[*common, *flags])
            for name, (mode, c, rate, flags) in loads.items()
        }
        with b.upstream() as plain:
            port = bench.free_port()
            interception = {
                "listen_port": port,
                "certs_dir": str(b.work / "relay-certs"),
                "enforce": "host",
                "enforce_scope": "/" + scope.name,
            }
            with b.candela(plain, tag="relay", mode="transparent",
                           interception=interception) as (_u, cp):
                out["relayed"] = {
                    name: b.load(url, mode, c, dur, rate=rate, keys=False,
                                 extra=[*common, *flags], proc=cp, python=wrapper)
                    for name, (mode, c, rate, flags) in loads.items()
                }
    finally:
        _sh(str(candela_cli), "enforce", "off", check=False)
        b.stop(server)
        _sh("ip", "addr", "del", f"{ADDR}/32", "dev", "lo", check=False)
        try:
            scope.rmdir()
        except OSError:
            pass
    for name in loads:
        d, r = out["direct"][name], out["relayed"][name]
        out.setdefault("ratio", {})[name] = {
            "throughput": round(r["throughput_rps"] / d["throughput_rps"], 3)
            if d["throughput_rps"] else None,
            "added_p50_ms": round(r["latency_ms"]["p50"] - d["latency_ms"]["p50"], 3),
        }
    out["note"] = ("The relay verifies nothing and decrypts nothing: the load generator checks "
                   "the server's own certificate through it. Candela's CPU is the relay's "
                   "(mitmproxy reading the ClientHello, then copying bytes both ways).")
    return out
