"""Load generator: HTTP/1.1 keep-alive over raw asyncio protocols, open-loop or closed-loop.

closed: `--concurrency C` connections each send the next request as soon as the last answer
        ends, for `--duration` seconds: the maximum throughput the target sustains.
open:   requests are due at a fixed rate (`--rate R`, request i at t0 + i/R) whatever the target
        does; C connections take them in turn and a due request waits for a free one. Latency is
        measured from the time the request was *due*, not sent, so a stall is charged to every
        request it delayed (no coordinated omission). `--start-at T` (seconds since the epoch):
        request 0 is due at T, so that several load generators started together, each on its
        own target, send on one schedule staggered as the caller chose (paired measurements).

Reported (JSON on stdout): completed, errors by kind, throughput, latency p50/p90/p99/max (ms);
for streams also time to first body byte (ttft) and the gaps between SSE events as they arrive.
`--keys a,b,c` spreads `Authorization: Bearer` keys over the connections (one per connection).

Usage: python bench/loadgen.py --url http://127.0.0.1:8181/proxy/openai/v1/chat/completions \
         --mode closed --concurrency 16 --duration 10 [--stream] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # the harness installs it; plain asyncio works (slower) without
    uvloop = None  # type: ignore[assignment,unused-ignore]

now = time.perf_counter  # uvloop's loop.time() has millisecond resolution: too coarse


def percentiles(values: array | list[float], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q:g}": float("nan") for q in qs} | {"max": float("nan"), "mean": float("nan")}
    s = sorted(values)
    out = {f"p{q:g}": round(s[min(len(s) - 1, int(len(s) * q / 100))], 4) for q in qs}
    out["max"] = round(s[-1], 4)
    out["mean"] = round(sum(s) / len(s), 4)
    return out


class Response:
    __slots__ = ("status", "first_byte", "events", "gaps")

    def __init__(self) -> None:
        self.status = 0
        self.first_byte = 0.0
        self.events = 0
        self.gaps: list[float] = []


class Conn(asyncio.Protocol):
    """One keep-alive connection; `request` sends bytes and resolves when the answer has ended."""

    def __init__(self, track_events: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.track = track_events
        self.fut: asyncio.Future[Response] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reset()

    def reset(self) -> None:
        self.buf = b""
        self.resp = Response()
        self.in_body = False
        self.remaining = -1  # content-length bytes left; -1: chunked
        self.chunk_left = 0  # bytes left in the current chunk (+2 for its CRLF)
        self.last_event = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(str(exc or "connection closed")))
        if not self.lost.done():
            self.lost.set_result(None)

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.reset()
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.fut

    def _done(self) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_result(self.resp)

    def data_received(self, data: bytes) -> None:
        t = now()
        r = self.resp
        if not self.in_body:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            data = self.buf[end + 4 :]
            self.buf = b""
            r.status = int(head[9:12])
            low = head.lower()
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                j = low.find(b"\r\n", i + 2)
                self.remaining = int(low[i + 17 : j if j >= 0 else len(low)].strip())
            elif b"transfer-encoding: chunked" in low:
                self.remaining = -1
            else:
                self.remaining = -2  # until close: not used by the targets here
            self.in_body = True
            if self.remaining == 0:
                self._done()
                return
            if not data:
                return
        if r.first_byte == 0.0:
            r.first_byte = t
        if self.track:
            n = data.count(b"\n\n")
            if n:
                if self.last_event:
                    r.gaps.append(t - self.last_event)
                self.last_event = t
                r.events += n
        if self.remaining >= 0:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._done()
            return
        if self.remaining == -1:
            self._chunked(data)

    def _chunked(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            if self.chunk_left > 0:
                take = min(self.chunk_left, n - pos)
                self.chunk_left -= take
                pos += take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                # last chunk: the trailer ends with an empty line (no trailers here)
                self.buf = b""
                self._done()
                return
            self.chunk_left = size + 2
        self.buf = buf[pos:]


def build_request(url: str, body: bytes | None, key: str | None, extra: list[str]) -> bytes:
    u = urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", f"Host: {u.netloc}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += extra
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Stats:
    def __init__(self) -> None:
        self.lat = array("d")
        self.ttft = array("d")
        self.gaps = array("d")
        self.lag = array("d")  # open loop: how late a request was sent after it was due
        self.errors: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.completed = 0
        self.events = 0

    def add(self, due: float, sent: float, r: Response, end: float) -> None:
        self.statuses[r.status] += 1
        if not 200 <= r.status < 300:
            self.errors[f"http_{r.status}"] += 1
            return
        self.completed += 1
        self.lat.append((end - due) * 1000)
        self.lag.append((sent - due) * 1000)
        if r.first_byte:
            self.ttft.append((r.first_byte - due) * 1000)
        self.events += r.events
        self.gaps.extend(g * 1000 for g in r.gaps)


async def run(a: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    u = urlsplit(a.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    body: bytes | None = None
    if a.method == "POST":
        if a.body:
            body = a.body.encode()
        else:
            obj: dict[str, Any] = {
                "model": a.model,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": a.max_tokens,
            }
            if a.stream:
                obj["stream"] = True
            body = json.dumps(obj).encode()
    keys = [k for k in (a.keys or "").split(",") if k] or [None]
    extra = list(a.header or [])
    stats = Stats()
    track = a.stream
    conns: list[Conn] = []

    ssl_ctx = None
    if a.tls:
        import ssl

        ssl_ctx = ssl.create_default_context(cafile=a.cafile) if a.cafile else ssl.create_default_context()
        if a.insecure:
            ssl_ctx.check_hostname = False
            ssl_ctx.verify_mode = ssl.CERT_NONE
    c_host, c_port = host, port
    if a.connect:
        c_host, _, p = a.connect.rpartition(":")
        c_port = int(p)
    tls_kw: dict[str, Any] = {"ssl": ssl_ctx, "server_hostname": a.sni or host} if ssl_ctx else {}

    async def connect(i: int) -> tuple[Conn, bytes]:
        for attempt in range(50):
            try:
                _, c = await loop.create_connection(lambda: Conn(track), c_host, c_port, **tls_kw)
                break
            except OSError as e:
                stats.errors[f"connect_{type(e).__name__}"] += 1
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        conns.append(c)
        return c, build_request(a.url, body, keys[i % len(keys)], extra)

    start = now()
    deadline = start + a.warmup + a.duration
    measure_from = start + a.warmup
    total_requests = a.requests or 0

    async def one(c: Conn, req: bytes, due: float, i: int) -> tuple[Conn, bytes]:
        sent = now()
        try:
            if c.transport is None or c.transport.is_closing():
                raise ConnectionError("closed")
            r = await asyncio.wait_for(c.request(req), a.timeout)
        except (TimeoutError, ConnectionError, OSError) as e:
            if due >= measure_from:
                stats.errors[type(e).__name__] += 1
            if c.transport is not None:
                c.transport.close()
            return await connect(i)
        if due >= measure_from:
            stats.add(due, sent, r, now())
        if a.new_connection:  # one request per connection: connect (and handshake) every time
            if c.transport is not None:
                c.transport.close()
            return await connect(i)
        return c, req

    issued = 0

    async def closed_worker(i: int) -> None:
        nonlocal issued
        if a.ramp:  # spread the connections' start: a thousand SYNs at once overflow a backlog
            await asyncio.sleep(a.ramp * i / a.concurrency)
        c, req = await connect(i)
        while True:
            t = now()
            if t >= deadline or (total_requests and issued >= total_requests):
                return
            issued += 1
            c, req = await one(c, req, t, i)

    async def open_loop() -> None:
        queue: asyncio.Queue[float | None] = asyncio.Queue()

        async def worker(i: int) -> None:
            c, req = await connect(i)
            while True:
                due = await queue.get()
                if due is None:
                    return
                c, req = await one(c, req, due, i)

        workers = [asyncio.create_task(worker(i)) for i in range(a.concurrency)]
        await asyncio.sleep(0.05)  # connections up before the schedule starts
        if a.start_at:  # request 0 due at that wall-clock moment (paired with other loads)
            await asyncio.sleep(max(0.0, a.start_at - time.time()))
        t0 = now()
        n = int(a.rate * (a.warmup + a.duration))
        if total_requests:
            n = min(n, total_requests)
        nonlocal measure_from
        measure_from = t0 + a.warmup
        for k in range(n):
            due = t0 + k / a.rate
            delay = due - now()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            queue.put_nowait(due)
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.wait_for(asyncio.gather(*workers), a.duration + a.timeout + 5)

    if a.mode == "closed":
        await asyncio.gather(*(closed_worker(i) for i in range(a.concurrency)))
        elapsed = now() - measure_from
    else:
        await open_loop()
        elapsed = a.duration
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {
        "mode": a.mode,
        "concurrency": a.concurrency,
        "rate": a.rate if a.mode == "open" else None,
        "duration_s": round(elapsed, 3),
        "completed": stats.completed,
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "throughput_rps": round(stats.completed / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(stats.lat),
        "ttft_ms": percentiles(stats.ttft) if a.stream else None,
        "gap_ms": percentiles(stats.gaps, (50, 90, 99, 99.9)) if a.stream else None,
        "events_per_response": round(stats.events / stats.completed, 2) if stats.completed else 0,
        "send_lag_ms": percentiles(stats.lag) if a.mode == "open" else None,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--method", default="POST", choices=["GET", "POST"])
    p.add_argument("--mode", default="closed", choices=["closed", "open"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=100.0, help="open loop: requests per second")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--start-at", type=float, default=0.0, help="open loop: request 0 due then (epoch s)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=0, help="stop after this many (0: no limit)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--ramp", type=float, default=0.0, help="closed loop: open connections over this many seconds")
    p.add_argument("--tls", action="store_true", help="HTTPS (the URL's scheme may stay http)")
    p.add_argument("--sni", help="TLS server name (default: the URL's host)")
    p.add_argument("--cafile", help="CA bundle to verify the server with")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--connect", help="HOST:PORT to connect to instead of the URL's")
    p.add_argument("--new-connection", action="store_true", help="a new connection per request")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--body", help="raw JSON body instead of the generated one")
    p.add_argument("--keys", help="comma-separated bearer keys, one per connection in turn")
    p.add_argument("--header", action="append", help="extra header line, 'Name: value'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    result = uvloop.run(run(a)) if uvloop is not None else asyncio.run(run(a))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
