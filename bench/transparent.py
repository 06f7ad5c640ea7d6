"""Scenario 7: transparent mode with TLS interception, one request per new connection.

The client connects to api.openai.com's stand-in address (198.18.0.1:443, put on loopback) and
an iptables OUTPUT rule redirects its connections (only those of the load generator's group,
so the proxies' own connections upstream pass) to the proxy's transparent listener, which
intercepts TLS with its CA. Targets:

- direct: the client's TLS straight to a TLS fake upstream on 198.18.0.1:443;
- mitmproxy: mitmdump --mode transparent, which forwards over TLS to the original destination;
- candela: mode: transparent, which forwards to providers.openai.base_url (plain HTTP here).

Needs root, iptables and openssl; the rule and the address are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

ADDR = "198.18.0.1"
HOST = "api.openai.com"
GROUP = 47011  # the load generator's group id: the iptables rule matches it
COMMENT = "candela-bench"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _redirect(port: int, add: bool) -> None:
    _sh("iptables", "-t", "nat", "-A" if add else "-D", "OUTPUT", "-p", "tcp", "-d", ADDR,
        "--dport", "443", "-m", "owner", "--gid-owner", str(GROUP), "-m", "comment",
        "--comment", COMMENT, "-j", "REDIRECT", "--to-ports", str(port), check=add)


def run(b: Any) -> dict[str, Any]:
    import harness as bench  # its Bench, processes and helpers

    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("openssl"):
        return {"skipped": "needs root, iptables and openssl"}
    tls = b.work / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    cert, key = tls / "upstream.pem", tls / "upstream.key"
    _sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={HOST}",
        "-addext", f"subjectAltName=DNS:{HOST}")
    _sh("ip", "addr", "add", f"{ADDR}/32", "dev", "lo", check=False)
    out: dict[str, Any] = {"mode": "closed loop c16, one request per new TLS connection"}
    dur = b.d(8)
    url = f"http://{HOST}/v1/chat/completions"
    common = ["--tls", "--sni", HOST, "--connect", f"{ADDR}:443", "--new-connection"]
    tls_up = b.start("upstream-tls", [str(bench.BENCH_PY), str(bench.BENCH / "upstream.py"),
                                      "--host", ADDR, "--port", "443", "--tls-cert", str(cert),
                                      "--tls-key", str(key)])
    try:
        time.sleep(1.0)
        out["direct"] = b.load(url, "closed", 16, dur, keys=False,
                               extra=[*common, "--cafile", str(cert)])
        # bare mitmproxy, transparent, TLS on both sides
        port = bench.free_port()
        conf = b.work / "mitmconf"
        p = b.start(f"mitmdump-transparent-{port}", [
            str(bench.ROOT / ".venv" / "bin" / "mitmdump"), "--mode", "transparent",
            "--listen-port", str(port), "-q", "--set", f"confdir={conf}",
            "--set", "ssl_insecure=true"])
        _wait_file(conf / "mitmproxy-ca-cert.pem", p)
        time.sleep(1.0)
        _redirect(port, True)
        try:
            out["mitmproxy"] = _as_group(b, url, dur, common + ["--cafile", str(conf / "mitmproxy-ca-cert.pem")], p)
        finally:
            _redirect(port, False)
            b.stop(p)
        # Candela, transparent
        with b.upstream() as plain:
            port = bench.free_port()
            certs = b.work / "candela-certs"
            with b.candela(plain, tag="transparent", mode="transparent",
                           interception={"listen_port": port, "certs_dir": str(certs)}) as (_u, cp):
                ca = certs / "mitmproxy-ca-cert.pem"
                if not ca.exists():  # certs_path() may put the files in a subfolder
                    found = list(certs.rglob("mitmproxy-ca-cert.pem"))
                    ca = found[0] if found else ca
                _redirect(port, True)
                try:
                    out["candela"] = _as_group(b, url, dur, common + ["--cafile", str(ca)], cp, keys=True)
                finally:
                    _redirect(port, False)
    finally:
        b.stop(tls_up)
        _sh("ip", "addr", "del", f"{ADDR}/32", "dev", "lo", check=False)
    out["note"] = ("mitmproxy forwards each connection over a new TLS connection to the original "
                   "destination; Candela forwards to its configured base_url, plain HTTP here, so "
                   "it makes one TLS handshake per connection where mitmproxy makes two.")
    return out


def _wait_file(path: Any, p: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not p.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{p.name}: no CA at {path}\n{p.tail()}")
        time.sleep(0.1)


def _as_group(b: Any, url: str, dur: float, extra: list[str], proc: Any, keys: bool = False) -> dict[str, Any]:
    """The load generator under group GROUP (the iptables rule redirects only that group)."""
    import harness as bench

    wrapper = b.work / "as-group.sh"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --regid={GROUP} --clear-groups {bench.BENCH_PY} \"$@\"\n")
    wrapper.chmod(0o755)
    return b.load(url, "closed", 16, dur, keys=keys, extra=extra, proc=proc, python=wrapper)
