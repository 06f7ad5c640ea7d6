"""Fake upstream for benchmarks: an OpenAI-format chat completions server on raw asyncio protocols.

It must never be the bottleneck, so it parses only what it needs (the request line,
Content-Length, and three fields of the JSON body found with regular expressions) and sends
prebuilt bytes. Any POST whose path ends in /chat/completions answers:

- JSON (`"stream": false`): one chat.completion with usage, after --latency-ms;
- SSE (`"stream": true`): the first token after --latency-ms, then one token per
  --chunk-gap-ms, `max_tokens` tokens in all (--chunks if the request names none), then
  a usage chunk and `data: [DONE]`; chunked transfer encoding, as providers send it.

Usage reported is fixed: prompt 12 tokens, completion = the tokens streamed (JSON: max_tokens or
--chunks). GET /healthz answers 200. With --stall every connection is accepted and never answered
(a sink that hangs). --procs N runs N processes on the port with SO_REUSEPORT.

Usage: python bench/upstream.py --port 9100 [--latency-ms 0] [--chunk-gap-ms 0] [--procs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from typing import Any

try:
    import uvloop
except ImportError:  # the harness installs it; the fake still works (slower) without
    uvloop = None  # type: ignore[assignment,unused-ignore]

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_MAX_TOKENS = re.compile(rb'"max_(?:completion_)?tokens"\s*:\s*(\d+)')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]{1,200})"')
PROMPT_TOKENS = 12


class Settings:
    latency_s = 0.0
    gap_s = 0.0
    chunks = 16
    stall = False
    tls_cert: str | None = None
    tls_key: str | None = None


S = Settings()
_json_cache: dict[tuple[bytes, int], bytes] = {}


def _usage(completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def json_response(model: bytes, completion: int) -> bytes:
    key = (model, completion)
    cached = _json_cache.get(key)
    if cached is not None:
        return cached
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model.decode(),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "tok " * completion},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(completion),
        },
        separators=(",", ":"),
    ).encode()
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    if len(_json_cache) < 1024:
        _json_cache[key] = head + body
    return head + body


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse_event(model: bytes, content: str | None, usage: int | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model.decode(),
    }
    if usage is not None:
        obj["choices"] = []
        obj["usage"] = _usage(usage)
    elif content is None:
        obj["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    else:
        obj["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


_token_cache: dict[bytes, bytes] = {}


def token_event(model: bytes) -> bytes:
    ev = _token_cache.get(model)
    if ev is None:
        ev = sse_event(model, "tok ")
        if len(_token_cache) < 1024:
            _token_cache[model] = ev
    return ev


def stream_tail(model: bytes, tokens: int) -> bytes:
    return (
        sse_event(model, None)
        + sse_event(model, None, usage=tokens)
        + _chunk(b"data: [DONE]\n\n")
        + b"0\r\n\r\n"
    )


HEALTH = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 21\r\n\r\n{\"error\":\"not_found\"}"


class Server(asyncio.Protocol):
    __slots__ = ("buf", "transport", "busy", "closed")

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a delayed or streamed answer is being written: requests queue in buf
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if S.stall:
            return
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            length = 0
            i = head.lower().find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)].strip())
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self.buf = buf[total:]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        parts = line.split(b" ")
        method, path = parts[0], parts[1] if len(parts) > 1 else b"/"
        path = path.split(b"?", 1)[0]
        if method == b"GET" and path.endswith(b"/healthz"):
            self.transport.write(HEALTH)
            return
        if method != b"POST" or not path.endswith(b"/chat/completions"):
            self.transport.write(NOT_FOUND)
            return
        m = _MODEL.search(body)
        model = m.group(1) if m else b"bench"
        t = _MAX_TOKENS.search(body)
        tokens = int(t.group(1)) if t else S.chunks
        if _STREAM.search(body):
            self.busy = True
            asyncio.get_running_loop().create_task(self.stream(model, max(1, tokens)))
        elif S.latency_s > 0:
            self.busy = True
            asyncio.get_running_loop().call_later(
                S.latency_s, self._delayed, json_response(model, tokens)
            )
        else:
            self.transport.write(json_response(model, tokens))

    def _delayed(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)
        self.busy = False
        self.process()

    async def stream(self, model: bytes, tokens: int) -> None:
        assert self.transport is not None
        w = self.transport.write
        try:
            if S.latency_s > 0:
                await asyncio.sleep(S.latency_s)
            if self.closed:
                return
            ev = token_event(model)
            w(SSE_HEAD + ev)
            if S.gap_s > 0:
                # paced from the start time, not from each wake-up, so pacing does not drift
                start = time.perf_counter()
                for k in range(1, tokens):
                    delay = start + k * S.gap_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if self.closed:
                        return
                    w(ev)
            else:
                if tokens > 1:
                    w(ev * (tokens - 1))
            w(stream_tail(model, tokens))
        finally:
            self.busy = False
        if not self.closed:
            self.process()


async def serve(host: str, port: int, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    ssl_ctx = None
    if S.tls_cert:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(S.tls_cert, S.tls_key)
    server = await loop.create_server(
        Server, host, port, reuse_port=reuse_port, backlog=4096, ssl=ssl_ctx
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _run(host: str, port: int, reuse_port: bool) -> None:
    if uvloop is not None:
        uvloop.run(serve(host, port, reuse_port))
    else:
        asyncio.run(serve(host, port, reuse_port))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--chunk-gap-ms", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--stall", action="store_true")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    a = p.parse_args(argv)
    S.tls_cert, S.tls_key = a.tls_cert, a.tls_key
    S.latency_s, S.gap_s, S.chunks, S.stall = a.latency_ms / 1000, a.chunk_gap_ms / 1000, a.chunks, a.stall
    if a.procs <= 1:
        _run(a.host, a.port, False)
        return 0
    children = []
    for _ in range(a.procs):
        pid = os.fork()
        if pid == 0:
            try:
                _run(a.host, a.port, True)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for c in children:
        os.waitpid(c, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
