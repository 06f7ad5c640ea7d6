"""Runs inside a sandbox: tries every way around Candela and reports, as JSON, what happened.

    python bypass_probe.py PROVIDER_IP

Each attempt runs in this process, in a child process and in a worker thread, each with a comm of
its own, so the test can match the audit entries to who made the call.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import ssl
import subprocess
import sys
import threading

PR_SET_NAME = 15
libc = ctypes.CDLL(None, use_errno=True)


def set_comm(name: str) -> None:
    libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def tcp(ip: str, port: int) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((ip, port))
        except OSError as e:
            return {"outcome": "error", "errno": e.errno}
    return {"outcome": "connected"}


def udp(ip: str, port: int) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"\x00" * 32, (ip, port))
        except OSError as e:
            return {"outcome": "error", "errno": e.errno}
    return {"outcome": "sent"}


def tls_without_sni(ip: str) -> dict[str, object]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((ip, 443), timeout=3) as raw:
            with ctx.wrap_socket(raw) as s:  # no server_hostname: no SNI
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
                data = s.recv(200)
    except (OSError, ssl.SSLError) as e:
        return {"outcome": "error", "error": type(e).__name__}
    return {"outcome": "answered", "data": data.decode("latin-1")}


def tls_to_provider_ip(ip: str) -> dict[str, object]:
    """The provider's address directly, with the provider's name: Candela answers it."""
    ctx = ssl.create_default_context()  # SSL_CERT_FILE: the bundle with Candela's CA
    try:
        # answered by Candela (a certificate made for the name): 30 s for a loaded machine
        with socket.create_connection((ip, 443), timeout=30) as raw:
            with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
                issuer = dict(x[0] for x in s.getpeercert()["issuer"])
                s.sendall(
                    b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n"
                )
                status = s.recv(200).split(b"\r\n", 1)[0].decode()
    except (OSError, ssl.SSLError) as e:
        return {"outcome": "error", "error": f"{type(e).__name__}: {e}"}
    return {"outcome": "intercepted", "issuer": issuer.get("commonName"), "status": status}


def https_proxy(proxy: str) -> dict[str, object]:
    """An HTTP client told to use another proxy (urllib reads HTTPS_PROXY like the SDKs do)."""
    import urllib.request

    os.environ["HTTPS_PROXY"] = proxy
    try:
        # a new opener: ProxyHandler reads the environment when it is made
        opener = urllib.request.build_opener(urllib.request.ProxyHandler())
        opener.open("https://api.openai.com/v1/models", timeout=3)
    except Exception as e:
        return {"outcome": "error", "error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        del os.environ["HTTPS_PROXY"]
    return {"outcome": "answered"}


# Runs in the new namespace: one connect to the provider's port 443, reported with who made it.
NETNS_COMM = "cdl-netns"
NETNS_CODE = """
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(15, {comm!r}.encode(), 0, 0, 0)
s = socket.socket()
s.settimeout(3)
try:
    s.connect(({ip!r}, 443))
    err = 0
except OSError as e:
    err = e.errno
print(json.dumps({{"pid": os.getpid(), "comm": {comm!r}, "errno": err}}))
"""


def new_netns(ip: str) -> dict[str, object]:
    """A namespace of its own, if privileges allow: plain, else inside a new user namespace."""
    code = NETNS_CODE.format(ip=ip, comm=NETNS_COMM)
    out = {}
    for flags in (["--net"], ["--user", "--map-root-user", "--net"]):
        p = subprocess.run(
            ["unshare", *flags, sys.executable, "-c", code], capture_output=True, text=True
        )
        out[" ".join(flags)] = {
            "returncode": p.returncode,
            "stderr": p.stderr.strip()[-200:],
            # None: unshare itself failed, the connect never ran
            "connect": json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else None,
        }
    return {"outcome": "tried", "attempts": out}


def attempts(ip: str) -> dict[str, object]:
    return {
        "other_port": lambda: tcp(ip, 8443),
        "ipv6": lambda: tcp("fd00:c0de::1", 443),
        "udp_443": lambda: udp(ip, 443),
        "dns_other_resolver": lambda: udp("198.18.0.53", 53),
        "dot": lambda: tcp("198.18.0.53", 853),
        "tls_without_sni": lambda: tls_without_sni(ip),
        "direct_ip_with_sni": lambda: tls_to_provider_ip(ip),
        "https_proxy_other_port": lambda: https_proxy("http://198.18.0.99:3128"),
        "https_proxy_port_80": lambda: https_proxy("http://198.18.0.99:80"),
        "new_netns": lambda: new_netns(ip),
    }


def run_all(ip: str, who: str) -> dict[str, object]:
    set_comm(f"cdl-{who}")
    me = {"pid": os.getpid(), "tid": threading.get_native_id(), "comm": f"cdl-{who}"}
    return {name: {**fn(), **me} for name, fn in attempts(ip).items()}  # type: ignore[operator]


def main() -> None:
    ip = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "--child":
        print(json.dumps(run_all(ip, "child")))
        return
    results = {"main": run_all(ip, "main")}
    child = subprocess.run(
        [sys.executable, __file__, ip, "--child"], capture_output=True, text=True
    )
    results["child"] = (
        json.loads(child.stdout) if child.returncode == 0 else {"error": child.stderr}
    )
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(run_all(ip, "thread")))
    t.start()
    t.join()
    results["thread"] = box
    print(json.dumps(results))


if __name__ == "__main__":
    main()
