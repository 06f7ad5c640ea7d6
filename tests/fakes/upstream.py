"""FakeUpstream: a local HTTP server that speaks each LLM provider's wire format and records requests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from candela_mitm.providers.usage import Usage

# Credentials the fake accepts unless a test passes others. They are test values, not secrets.
OPENAI_KEY = "sk-test-openai-fake"
ANTHROPIC_KEY = "sk-ant-test-fake"
GEMINI_KEY = "AIzaTestGeminiFakeKey"
AWS_ACCESS_KEY_ID = "AKIDCANDELATEST00000"
AWS_SECRET_ACCESS_KEY = "candela+test/secret/key/0000000000000000"
AWS_REGION = "us-east-1"

ANTHROPIC_VERTEX_VERSION = "vertex-2023-10-16"
ANTHROPIC_BEDROCK_VERSION = "bedrock-2023-05-31"
DEFAULT_MODELS = ("gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash", "llama3.2:latest")
DEFAULT_REPLY = "Hello from the fake upstream."


@dataclass
class Recorded:
    """One request as the fake received it. Fields after `connection` are filled while it is answered."""

    method: str
    path: str  # as received: percent-encoding kept, query included
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    json: Any  # the body parsed as JSON; None when it is not JSON
    time: float  # time.monotonic() when the request had been read in full
    connection: int  # sequence number of the TCP connection that carried it (keep-alive reuse)
    route: str = (
        ""  # e.g. "openai.chat", "anthropic.messages", "bedrock.invoke"; "unknown" for a 404
    )
    status: int | None = None  # the status answered; None while pending or when the fake hangs
    auth: str | None = (
        None  # credential accepted: openai_key, anthropic_key, gemini_key, google_token, sigv4, none
    )
    sigv4: bool | None = None  # Bedrock routes only: did the SigV4 signature verify
    sigv4_reason: str = ""  # why it did not
    stream: bool = False  # answered as a stream (SSE, NDJSON, event stream)
    error: str = ""  # traceback when the fake itself failed (answered 500)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    @property
    def route_path(self) -> str:
        return urlsplit(self.path).path


@dataclass
class _Knobs:
    latency_s: float
    chunk_delay_s: float
    n_chunks: int
    fail_status: int | None
    hang: bool
    cut_after_chunks: int | None
    usage: Usage
    reply_text: str
    omit_usage: bool


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: Iterable[bytes] | None = None  # set: sent with chunked encoding, one flush per chunk


@dataclass
class _Ctx:
    rec: Recorded
    knobs: _Knobs
    params: dict[str, str]

    @property
    def body(self) -> dict[str, Any]:
        return self.rec.json if isinstance(self.rec.json, dict) else {}


_RouteFn = Callable[["FakeUpstream", _Ctx], _Reply]


class FakeUpstream:
    """A threaded HTTP/1.1 server on a free port that answers as OpenAI, Anthropic, Gemini, Vertex,
    Bedrock, Ollama and LM Studio do, and records every request (rejected ones too).

    One instance serves every provider's routes; each route checks its provider's credential:
    OpenAI routes under /v1 want `Authorization: Bearer <openai_key>` (openai_key=None: no auth, as
    LM Studio and Ollama), /v1/messages wants `x-api-key: <anthropic_key>` and `anthropic-version`,
    Gemini native wants `x-goog-api-key: <gemini_key>` (or ?key=) or a Google token, Vertex and
    /v1beta/openai want a Google token (google_token_valid; None rejects every token), Bedrock
    wants a SigV4 signature the fake recomputes with botocore. The knobs (latency_s, chunk_delay_s,
    n_chunks, fail_status, hang, cut_after_chunks, usage, reply_text, omit_usage: OpenAI chat
    answers without a usage, as a queued job or an unknown shape does) are read once per request.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        openai_key: str | None = OPENAI_KEY,
        anthropic_key: str | None = ANTHROPIC_KEY,
        gemini_key: str | None = GEMINI_KEY,
        google_token_valid: Callable[[str], bool] | None = None,
        aws_access_key_id: str = AWS_ACCESS_KEY_ID,
        aws_secret_access_key: str = AWS_SECRET_ACCESS_KEY,
        aws_region: str = AWS_REGION,
        models: Iterable[str] = DEFAULT_MODELS,
    ) -> None:
        self.host = host
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.gemini_key = gemini_key
        self.google_token_valid = google_token_valid
        self.aws_access_key_id = aws_access_key_id
        self.aws_secret_access_key = aws_secret_access_key
        self.aws_region = aws_region
        self.models = list(models)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[Recorded] = []
        self._stopping = threading.Event()
        self._conn_seq = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self.reset()

    # knobs ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the defaults: immediate, well-behaved answers."""
        self.configure(
            latency_s=0.0,
            chunk_delay_s=0.0,
            n_chunks=3,
            fail_status=None,
            hang=False,
            cut_after_chunks=None,
            usage=Usage(input_tokens=12, output_tokens=7, cached_tokens=0),
            reply_text=DEFAULT_REPLY,
            omit_usage=False,
        )

    def configure(self, **knobs: Any) -> None:
        """Set several knobs at once, so no request sees half of the change."""
        allowed = _Knobs.__dataclass_fields__.keys()
        with self._lock:
            for name, value in knobs.items():
                if name not in allowed:
                    raise TypeError(f"unknown knob {name!r}")
                setattr(self, name, value)

    def _knobs(self) -> _Knobs:
        with self._lock:
            k = _Knobs(
                latency_s=self.latency_s,
                chunk_delay_s=self.chunk_delay_s,
                n_chunks=self.n_chunks,
                fail_status=self.fail_status,
                hang=self.hang,
                cut_after_chunks=self.cut_after_chunks,
                usage=replace(self.usage),
                reply_text=self.reply_text,
                omit_usage=self.omit_usage,
            )
        return k

    # declared for type checkers; set by configure()
    latency_s: float
    chunk_delay_s: float
    n_chunks: int
    fail_status: int | None
    hang: bool
    cut_after_chunks: int | None
    usage: Usage
    reply_text: str
    omit_usage: bool

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._stopping.clear()
        server = _Server((self.host, self._port), self)
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        server = self._server
        if server is None:
            return
        self._stopping.set()  # releases hanging handlers
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    # recordings ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of what was received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least n requests were received; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"fake upstream got {len(self._requests)} requests, wanted {n}"
                    )
                self._cond.wait(left)
            return list(self._requests)

    def _record(self, rec: Recorded) -> None:
        with self._cond:
            self._requests.append(rec)
            self._cond.notify_all()

    def _next_connection(self) -> int:
        with self._lock:
            self._conn_seq += 1
            return self._conn_seq

    # dispatch ------------------------------------------------------------------------------------

    def _answer(self, rec: Recorded, knobs: _Knobs) -> _Reply:
        route = _match(rec.method, rec.route_path, rec.headers, rec.query)
        if route is None:
            rec.route = "unknown"
            return _json_reply(
                404,
                {
                    "error": {
                        "message": f"no route for {rec.method} {rec.route_path}",
                        "type": "not_found",
                    }
                },
            )
        name, family, auth_kind, handler, params = route
        rec.route = name
        denied = self._authenticate(rec, auth_kind)
        if denied is not None:
            return denied
        if knobs.fail_status is not None:
            return provider_error(family, knobs.fail_status)
        return handler(self, _Ctx(rec, knobs, params))

    def _authenticate(self, rec: Recorded, kind: str) -> _Reply | None:
        h = rec.headers
        bearer = _bearer(h)
        if kind == "none":
            rec.auth = "none"
            return None
        if kind == "openai":
            if self.openai_key is None:
                rec.auth = "none"
                return None
            if bearer is not None and hmac.compare_digest(bearer, self.openai_key):
                rec.auth = "openai_key"
                return None
            return _json_reply(
                401,
                _openai_error(
                    "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
                ),
            )
        if kind == "anthropic":
            if self.anthropic_key is not None:
                key = h.get("x-api-key")
                if key is None or not hmac.compare_digest(key, self.anthropic_key):
                    return _json_reply(
                        401, _anthropic_error("authentication_error", "invalid x-api-key")
                    )
                rec.auth = "anthropic_key"
            else:
                rec.auth = "none"
            if not h.get("anthropic-version"):
                rec.auth = None
                return _json_reply(
                    400,
                    _anthropic_error(
                        "invalid_request_error", "anthropic-version: header is required"
                    ),
                )
            return None
        if kind in ("google", "gemini", "gemini_openai"):
            if (
                bearer is not None
                and self.google_token_valid is not None
                and self.google_token_valid(bearer)
            ):
                rec.auth = "google_token"
                return None
            if kind != "google" and self.gemini_key is not None:
                presented = (
                    bearer
                    if kind == "gemini_openai"
                    else h.get("x-goog-api-key") or next(iter(rec.query.get("key", [])), None)
                )
                if presented is not None and hmac.compare_digest(presented, self.gemini_key):
                    rec.auth = "gemini_key"
                    return None
                if presented is not None:
                    return _json_reply(
                        400,
                        _google_error(
                            400,
                            "API key not valid. Please pass a valid API key.",
                            "INVALID_ARGUMENT",
                        ),
                    )
            if bearer is not None:
                return _json_reply(
                    401,
                    _google_error(
                        401,
                        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                        "login cookie or other valid authentication credential.",
                        "UNAUTHENTICATED",
                    ),
                )
            return _json_reply(
                403,
                _google_error(
                    403,
                    "Method doesn't allow unregistered callers. Please use API Key or other form of API consumer identity to call this API.",
                    "PERMISSION_DENIED",
                ),
            )
        if kind == "sigv4":
            ok, reason = verify_sigv4(
                rec.method,
                rec.path,
                rec.headers,
                rec.body,
                access_key=self.aws_access_key_id,
                secret_key=self.aws_secret_access_key,
                region=self.aws_region,
                service="bedrock",
            )
            rec.sigv4 = ok
            rec.sigv4_reason = reason
            if ok:
                rec.auth = "sigv4"
                return None
            if reason == "missing":
                return _bedrock_error(
                    403, "MissingAuthenticationTokenException", "Missing Authentication Token"
                )
            if reason == "unknown access key":
                return _bedrock_error(
                    403,
                    "UnrecognizedClientException",
                    "The security token included in the request is invalid.",
                )
            return _bedrock_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
            )
        raise AssertionError(f"unknown auth kind {kind}")


# ------------------------------------------------------------------------------------------------
# the HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], fake: FakeUpstream) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handlers blocked on idle keep-alive connections so that close() does not wait."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeUpstream/1"
    disable_nagle_algorithm = True  # small SSE chunks must leave at once for timing tests
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.conn_id = self.server.fake._next_connection()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _serve(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        rec = Recorded(
            method=self.command,
            path=self.path,
            headers=headers,
            body=body,
            json=_parse_json(body),
            time=time.monotonic(),
            connection=self.conn_id,
        )
        knobs = fake._knobs()
        fake._record(rec)
        if knobs.hang:
            fake._stopping.wait()
            self.close_connection = True
            return
        if knobs.latency_s > 0:
            time.sleep(knobs.latency_s)
        try:
            reply = fake._answer(rec, knobs)
        except Exception:
            rec.error = traceback.format_exc()
            print(f"fake upstream failed on {rec.method} {rec.path}:\n{rec.error}", file=sys.stderr)
            reply = _json_reply(
                500, {"error": {"message": "fake upstream failed", "type": "server_error"}}
            )
        rec.status = reply.status
        rec.stream = reply.chunks is not None
        self._send(reply, knobs)

    def _send(self, reply: _Reply, knobs: _Knobs) -> None:
        self.send_response(reply.status)
        for k, v in reply.headers:
            self.send_header(k, v)
        if reply.chunks is None:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, chunk in enumerate(reply.chunks):
            if knobs.cut_after_chunks is not None and i >= knobs.cut_after_chunks:
                # drop the connection without the terminating chunk: the client sees a cut stream
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if i > 0 and knobs.chunk_delay_s > 0:
                time.sleep(knobs.chunk_delay_s)
            if not chunk:
                continue  # an empty HTTP chunk would end the body
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            except OSError:
                self.close_connection = True
                return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# ------------------------------------------------------------------------------------------------
# routing

_ROUTES: list[tuple[str, re.Pattern[str], str, str, str, _RouteFn]] = []


def _route(
    method: str, pattern: str, name: str, family: str, auth: str
) -> Callable[[_RouteFn], _RouteFn]:
    def deco(fn: _RouteFn) -> _RouteFn:
        _ROUTES.append((method, re.compile(pattern + r"\Z"), name, family, auth, fn))
        return fn

    return deco


def _match(
    method: str, path: str, headers: dict[str, str], query: dict[str, list[str]]
) -> tuple[str, str, str, _RouteFn, dict[str, str]] | None:
    # /v1/models is OpenAI's, Anthropic's and (with a custom base URL) Gemini's listing: tell them
    # apart by the credential the client presents, as a reader of the request would.
    if method == "GET" and re.fullmatch(r"/v1/models(/[^/]+)?", path):
        if "x-goog-api-key" in headers or "key" in query:
            path = "/v1beta" + path[3:]
        elif "anthropic-version" in headers:
            return ("anthropic.models", "anthropic", "anthropic", _anthropic_models, {})
    # Anthropic's OpenAI SDK compatibility: OpenAI's chat format, Anthropic's credential
    if method == "POST" and path == "/v1/chat/completions" and "x-api-key" in headers:
        return ("anthropic.openai_chat", "openai", "anthropic", _openai_chat, {})
    for m, rx, name, family, auth, fn in _ROUTES:
        if m != method:
            continue
        hit = rx.match(path)
        if hit:
            params = {k: unquote(v) for k, v in hit.groupdict().items() if v is not None}
            return name, family, auth, fn, params
    return None


# ------------------------------------------------------------------------------------------------
# reply helpers


def _json_reply(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> _Reply:
    hs = [("Content-Type", "application/json")] + (headers or [])
    return _Reply(status, json.dumps(obj).encode(), hs)


def _stream_reply(
    content_type: str, chunks: Iterable[bytes], headers: list[tuple[str, str]] | None = None
) -> _Reply:
    hs = [("Content-Type", content_type), ("Cache-Control", "no-cache")] + (headers or [])
    return _Reply(200, b"", hs, chunks)


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


def _parse_json(body: bytes) -> Any | None:
    if body.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def _pieces(text: str, n: int) -> list[str]:
    """Split text into n pieces of near-equal length (some may be empty when text is short)."""
    n = max(1, n)
    cuts = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[cuts[i] : cuts[i + 1]] for i in range(n)]


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _openai_error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _anthropic_error(type_: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": type_, "message": message},
        "request_id": _id("req_"),
    }


def _google_error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _bedrock_error(status: int, type_: str, message: str) -> _Reply:
    return _json_reply(
        status,
        {"message": message},
        [
            ("x-amzn-ErrorType", f"{type_}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            ("x-amzn-RequestId", str(uuid.uuid4())),
        ],
    )


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_denied",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_BEDROCK_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
}


def provider_error(family: str, status: int) -> _Reply:
    """The error body each provider sends for this status (what fail_status answers)."""
    message = f"fake upstream failure {status}"
    if family == "openai":
        return _json_reply(
            status, _openai_error(message, _OPENAI_TYPES.get(status, "server_error"))
        )
    if family == "anthropic":
        return _json_reply(
            status, _anthropic_error(_ANTHROPIC_TYPES.get(status, "api_error"), message)
        )
    if family == "google":
        return _json_reply(
            status, _google_error(status, message, _GOOGLE_STATUS.get(status, "UNKNOWN"))
        )
    if family == "bedrock":
        return _bedrock_error(
            status, _BEDROCK_TYPES.get(status, "InternalServerException"), message
        )
    if family == "ollama":
        return _json_reply(status, {"error": message})
    raise AssertionError(f"unknown family {family}")


def _bad_request(family: str, message: str) -> _Reply:
    if family == "openai":
        return _json_reply(400, _openai_error(message, "invalid_request_error"))
    if family == "anthropic":
        return _json_reply(400, _anthropic_error("invalid_request_error", message))
    if family == "google":
        return _json_reply(400, _google_error(400, message, "INVALID_ARGUMENT"))
    if family == "bedrock":
        return _bedrock_error(400, "ValidationException", message)
    return _json_reply(400, {"error": message})


# ------------------------------------------------------------------------------------------------
# OpenAI (also Gemini's /v1beta/openai, LM Studio and Ollama's /v1)


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_chat(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or not isinstance(body.get("messages"), list):
        return _bad_request("openai", "'model' and 'messages' are required")
    model = str(body["model"])
    k = ctx.knobs
    cid, created = _id("chatcmpl-"), int(time.time())
    headers = [("x-request-id", _id("req_")), ("openai-processing-ms", "1")]
    if not body.get("stream"):
        answer: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": k.reply_text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _openai_usage(k.usage),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if k.omit_usage:
            del answer["usage"]
        return _json_reply(200, answer, headers)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    include_usage = include_usage and not k.omit_usage

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    def gen() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield chunk({"content": piece}, None)
        yield chunk({}, "stop")
        if include_usage:
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": _openai_usage(k.usage),
                }
            )
        yield b"data: [DONE]\n\n"

    return _stream_reply("text/event-stream; charset=utf-8", gen(), headers)


def _responses_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


def _openai_responses(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or "input" not in body:
        return _bad_request("openai", "'model' and 'input' are required")
    k = ctx.knobs
    rid, mid, created = _id("resp_"), _id("msg_"), int(time.time())

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def message(status: str, text: str) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if status == "completed"
            else []
        )
        return {
            "id": mid,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    headers = [("x-request-id", _id("req_"))]
    if not body.get("stream"):
        return _json_reply(
            200,
            response("completed", [message("completed", k.reply_text)], _responses_usage(k.usage)),
            headers,
        )

    def gen() -> Iterator[bytes]:
        seq = iter(range(1_000_000))

        def ev(type_: str, **fields: Any) -> bytes:
            return _sse({"type": type_, "sequence_number": next(seq), **fields}, type_)

        yield ev("response.created", response=response("in_progress", [], None))
        yield ev("response.in_progress", response=response("in_progress", [], None))
        yield ev("response.output_item.added", output_index=0, item=message("in_progress", ""))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield ev(
            "response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part
        )
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield ev(
                "response.output_text.delta",
                item_id=mid,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        yield ev(
            "response.output_text.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            text=k.reply_text,
            logprobs=[],
        )
        yield ev(
            "response.content_part.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={**part, "text": k.reply_text},
        )
        done = message("completed", k.reply_text)
        yield ev("response.output_item.done", output_index=0, item=done)
        yield ev(
            "response.completed", response=response("completed", [done], _responses_usage(k.usage))
        )

    return _stream_reply("text/event-stream; charset=utf-8", gen(), headers)


def _openai_embeddings(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or "input" not in body:
        return _bad_request("openai", "'model' and 'input' are required")
    inputs = (
        body["input"]
        if isinstance(body["input"], list)
        and body["input"]
        and not isinstance(body["input"][0], int)
        else [body["input"]]
    )
    data = []
    for i, item in enumerate(inputs):
        seed = hashlib.sha256(json.dumps(item).encode()).digest()
        vec = [b / 255.0 for b in seed[:8]]
        emb: Any = vec
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    u = ctx.knobs.usage
    return _json_reply(
        200,
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
        },
    )


def _openai_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
        for m in fake.models
    ]
    if "id" in ctx.params:
        if ctx.params["id"] not in fake.models:
            return _json_reply(
                404,
                _openai_error(
                    f"The model '{ctx.params['id']}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                ),
            )
        return _json_reply(200, next(d for d in data if d["id"] == ctx.params["id"]))
    return _json_reply(200, {"object": "list", "data": data})


_route("POST", r"/v1/chat/completions", "openai.chat", "openai", "openai")(_openai_chat)
_route("POST", r"/v1/responses", "openai.responses", "openai", "openai")(_openai_responses)
_route("POST", r"/v1/embeddings", "openai.embeddings", "openai", "openai")(_openai_embeddings)
# Gemini's OpenAI-compatible endpoint: the same wire format, Google credentials
_route("POST", r"/v1beta/openai/chat/completions", "gemini_openai.chat", "openai", "gemini_openai")(
    _openai_chat
)
_route("POST", r"/v1beta/openai/embeddings", "gemini_openai.embeddings", "openai", "gemini_openai")(
    _openai_embeddings
)
_route("GET", r"/v1/models", "openai.models", "openai", "openai")(_openai_models)
_route("GET", r"/v1/models/(?P<id>[^/]+)", "openai.models", "openai", "openai")(_openai_models)
_route("GET", r"/v1beta/openai/models", "gemini_openai.models", "openai", "gemini_openai")(
    _openai_models
)


# ------------------------------------------------------------------------------------------------
# Anthropic Messages (direct, Vertex rawPredict, Bedrock invoke)


def _anthropic_usage(u: Usage, output_tokens: int) -> dict[str, Any]:
    # Anthropic counts cache reads apart from input_tokens; the fake's Usage includes them
    return {
        "input_tokens": u.input_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": output_tokens,
    }


def _anthropic_message(model: str, k: _Knobs, mid: str) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": k.reply_text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(k.usage, k.usage.output_tokens),
    }


def _anthropic_events(model: str, k: _Knobs, mid: str) -> Iterator[tuple[str, dict[str, Any]]]:
    start = {
        **_anthropic_message(model, k, mid),
        "content": [],
        "stop_reason": None,
        "usage": _anthropic_usage(k.usage, 1),
    }
    yield "message_start", {"type": "message_start", "message": start}
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield "ping", {"type": "ping"}
    for piece in _pieces(k.reply_text, k.n_chunks):
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": k.usage.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _check_anthropic_body(
    body: dict[str, Any], version: str | None, need_model: bool
) -> str | None:
    if need_model and not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("messages"), list):
        return "messages: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    # The platforms document one value; anthropic SDK 2.x sends its API date there instead
    # (AnthropicVertex/AnthropicBedrock 2.12: "2026-10-21"), so a date is accepted as well.
    got = body.get("anthropic_version")
    if version is not None and got != version and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(got)):
        return f"anthropic_version: must be {version}"
    return None


def _anthropic_messages(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    err = _check_anthropic_body(body, None, need_model=True)
    if err:
        return _bad_request("anthropic", err)
    return _anthropic_answer(str(body["model"]), bool(body.get("stream")), ctx.knobs)


def _anthropic_answer(model: str, stream: bool, k: _Knobs) -> _Reply:
    mid = _id("msg_")
    headers = [("request-id", _id("req_"))]
    if not stream:
        return _json_reply(200, _anthropic_message(model, k, mid), headers)
    return _stream_reply(
        "text/event-stream; charset=utf-8",
        (_sse(o, e) for e, o in _anthropic_events(model, k, mid)),
        headers,
    )


def _anthropic_count(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _json_reply(200, {"input_tokens": ctx.knobs.usage.input_tokens})


def _anthropic_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
        for m in fake.models
    ]
    return _json_reply(
        200,
        {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        },
    )


def _vertex_anthropic(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    err = _check_anthropic_body(body, ANTHROPIC_VERTEX_VERSION, need_model=False)
    if err:
        return _bad_request("anthropic", err)
    stream = ctx.params["method"] == "streamRawPredict"
    if stream != bool(body.get("stream")):
        return _bad_request(
            "anthropic", f"{ctx.params['method']} wants stream={str(stream).lower()}"
        )
    return _anthropic_answer(ctx.params["model"], stream, ctx.knobs)


_route("POST", r"/v1/messages", "anthropic.messages", "anthropic", "anthropic")(_anthropic_messages)
_route("POST", r"/v1/messages/count_tokens", "anthropic.count_tokens", "anthropic", "anthropic")(
    _anthropic_count
)
_VERTEX = r"/(?:v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/publishers"
_route(
    "POST",
    _VERTEX + r"/anthropic/models/(?P<model>[^/:]+):(?P<method>rawPredict|streamRawPredict)",
    "vertex.anthropic",
    "anthropic",
    "google",
)(_vertex_anthropic)


# ------------------------------------------------------------------------------------------------
# Bedrock


def _bedrock_metrics(k: _Knobs) -> dict[str, Any]:
    u = k.usage
    return {
        "inputTokenCount": u.input_tokens - u.cached_tokens,
        "outputTokenCount": u.output_tokens,
        "invocationLatency": 10,
        "firstByteLatency": 5,
        "cacheReadInputTokenCount": u.cached_tokens,
        "cacheWriteInputTokenCount": 0,
    }


def _bedrock_invoke(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    from candela_mitm.providers.eventstream import (
        encode_message,  # the other half of this module's contract
    )

    body = ctx.body
    err = _check_anthropic_body(body, ANTHROPIC_BEDROCK_VERSION, need_model=False)
    if err:
        return _bad_request("bedrock", err)
    k = ctx.knobs
    model, mid = ctx.params["model"], _id("msg_")
    rid = [("x-amzn-RequestId", str(uuid.uuid4()))]
    if ctx.params["op"] == "invoke":
        u = k.usage
        return _json_reply(
            200,
            _anthropic_message(model, k, mid),
            rid
            + [
                ("X-Amzn-Bedrock-Invocation-Latency", "10"),
                ("X-Amzn-Bedrock-Input-Token-Count", str(u.input_tokens - u.cached_tokens)),
                ("X-Amzn-Bedrock-Output-Token-Count", str(u.output_tokens)),
                ("X-Amzn-Bedrock-Cache-Read-Input-Token-Count", str(u.cached_tokens)),
                ("X-Amzn-Bedrock-Cache-Write-Input-Token-Count", "0"),
            ],
        )

    def gen() -> Iterator[bytes]:
        for name, obj in _anthropic_events(model, k, mid):
            if name == "ping":
                continue  # Bedrock does not relay Anthropic's pings
            if name == "message_stop":
                obj = {**obj, "amazon-bedrock-invocationMetrics": _bedrock_metrics(k)}
            payload = {
                "bytes": base64.b64encode(json.dumps(obj).encode()).decode(),
                "p": "abcdefgh",
            }
            yield encode_message(_event_headers("chunk"), json.dumps(payload).encode())

    return _stream_reply(
        "application/vnd.amazon.eventstream",
        gen(),
        rid + [("X-Amzn-Bedrock-Content-Type", "application/json")],
    )


def _event_headers(event_type: str) -> dict[str, str]:
    return {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }


def _converse_usage(u: Usage) -> dict[str, Any]:
    return {
        "inputTokens": u.input_tokens - u.cached_tokens,
        "outputTokens": u.output_tokens,
        "totalTokens": u.input_tokens + u.output_tokens,
        "cacheReadInputTokens": u.cached_tokens,
        "cacheWriteInputTokens": 0,
    }


def _bedrock_converse(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    from candela_mitm.providers.eventstream import encode_message

    body = ctx.body
    if not isinstance(body.get("messages"), list):
        return _bad_request("bedrock", "messages: required")
    k = ctx.knobs
    rid = [("x-amzn-RequestId", str(uuid.uuid4()))]
    if ctx.params["op"] == "converse":
        return _json_reply(
            200,
            {
                "output": {"message": {"role": "assistant", "content": [{"text": k.reply_text}]}},
                "stopReason": "end_turn",
                "usage": _converse_usage(k.usage),
                "metrics": {"latencyMs": 10},
            },
            rid,
        )

    def gen() -> Iterator[bytes]:
        def ev(name: str, obj: dict[str, Any]) -> bytes:
            return encode_message(_event_headers(name), json.dumps({**obj, "p": "abcd"}).encode())

        yield ev("messageStart", {"role": "assistant"})
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
        yield ev("contentBlockStop", {"contentBlockIndex": 0})
        yield ev("messageStop", {"stopReason": "end_turn"})
        yield ev("metadata", {"usage": _converse_usage(k.usage), "metrics": {"latencyMs": 10}})

    return _stream_reply("application/vnd.amazon.eventstream", gen(), rid)


_BEDROCK = r"/model/(?P<model>[^/]+)/(?P<op>"
_route(
    "POST", _BEDROCK + r"invoke|invoke-with-response-stream)", "bedrock.invoke", "bedrock", "sigv4"
)(_bedrock_invoke)
_route("POST", _BEDROCK + r"converse|converse-stream)", "bedrock.converse", "bedrock", "sigv4")(
    _bedrock_converse
)


def verify_sigv4(
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
) -> tuple[bool, str]:
    """Recompute the SigV4 signature of a received request with botocore; (ok, reason when not ok).

    Only the headers the client listed in SignedHeaders are signed over, the path is used exactly as
    received (AWS double-encodes it again, as botocore does) and the body is hashed byte for byte.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    m = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,\s*"
        r"SignedHeaders=([^,]+),\s*Signature=([0-9a-f]{64})",
        headers.get("authorization", "").strip(),
    )
    if not m:
        return False, "missing"
    akid, day, scope_region, scope_service, signed, signature = m.groups()
    if akid != access_key:
        return False, "unknown access key"
    amz_date = headers.get("x-amz-date", "")
    if scope_region != region or scope_service != service or amz_date[:8] != day:
        return False, "credential scope"
    names = signed.split(";")
    if "host" not in names or any(n not in headers for n in names):
        return False, "signed headers"
    declared = headers.get("x-amz-content-sha256")
    if (
        declared is not None
        and declared != "UNSIGNED-PAYLOAD"
        and declared != hashlib.sha256(body).hexdigest()
    ):
        return False, "body hash"
    req = AWSRequest(
        method=method,
        url=f"http://{headers['host']}{path}",
        data=body,
        headers={n: headers[n] for n in names},
    )
    req.context["timestamp"] = amz_date
    signer = SigV4Auth(
        Credentials(access_key, secret_key, headers.get("x-amz-security-token")), service, region
    )
    canonical = signer.canonical_request(req)
    expected = signer.signature(signer.string_to_sign(req, canonical), req)
    if not hmac.compare_digest(expected, signature):
        return False, "signature"
    return True, ""


# ------------------------------------------------------------------------------------------------
# Gemini native (Google AI and Vertex)


def _gemini_chunk(
    text: str, model: str, rid: str, k: _Knobs, output_so_far: int, final: bool
) -> dict[str, Any]:
    u = k.usage
    cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if final:
        cand["finishReason"] = "STOP"
    meta: dict[str, Any] = {
        "promptTokenCount": u.input_tokens,
        "candidatesTokenCount": output_so_far,
        "totalTokenCount": u.input_tokens + output_so_far,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.input_tokens}],
    }
    if u.cached_tokens:
        meta["cachedContentTokenCount"] = u.cached_tokens
    return {"candidates": [cand], "usageMetadata": meta, "modelVersion": model, "responseId": rid}


def _gemini_generate(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    method, model = ctx.params["method"], ctx.params["model"]
    k = ctx.knobs
    if method == "countTokens":
        total = k.usage.input_tokens
        return _json_reply(
            200,
            {
                "totalTokens": total,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}],
            },
        )
    if not isinstance(body.get("contents"), list):
        return _bad_request(
            "google", "* GenerateContentRequest.contents: contents is not specified"
        )
    rid = _id("")
    if method == "generateContent":
        return _json_reply(
            200, _gemini_chunk(k.reply_text, model, rid, k, k.usage.output_tokens, True)
        )
    pieces = _pieces(k.reply_text, k.n_chunks)
    # candidatesTokenCount grows chunk by chunk: a reader must keep the last value, not add them
    counts = [round((i + 1) * k.usage.output_tokens / len(pieces)) for i in range(len(pieces))]
    chunks = [
        _gemini_chunk(p, model, rid, k, c, i == len(pieces) - 1)
        for i, (p, c) in enumerate(zip(pieces, counts, strict=True))
    ]
    if ctx.rec.query.get("alt") == ["sse"]:
        return _stream_reply("text/event-stream", (_sse(c) for c in chunks))

    def json_array() -> Iterator[bytes]:
        for i, c in enumerate(chunks):
            yield (b"[" if i == 0 else b",\r\n") + json.dumps(c).encode()
        yield b"]"

    return _stream_reply("application/json; charset=UTF-8", json_array())


def _gemini_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    def entry(m: str) -> dict[str, Any]:
        return {
            "name": f"models/{m}",
            "version": "001",
            "displayName": m,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 8192,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }

    if "model" in ctx.params:
        if ctx.params["model"] not in fake.models:
            return _json_reply(
                404, _google_error(404, f"models/{ctx.params['model']} is not found", "NOT_FOUND")
            )
        return _json_reply(200, entry(ctx.params["model"]))
    return _json_reply(200, {"models": [entry(m) for m in fake.models]})


_GEMINI_METHODS = r":(?P<method>generateContent|streamGenerateContent|countTokens)"
_route(
    "POST",
    r"/(?:v1|v1beta|v1alpha)/models/(?P<model>[^/:]+)" + _GEMINI_METHODS,
    "gemini.generate",
    "google",
    "gemini",
)(_gemini_generate)
_route(
    "POST",
    _VERTEX + r"/google/models/(?P<model>[^/:]+)" + _GEMINI_METHODS,
    "vertex.gemini",
    "google",
    "google",
)(_gemini_generate)
_route("GET", r"/(?:v1beta|v1alpha)/models", "gemini.models", "google", "gemini")(_gemini_models)
_route("GET", r"/(?:v1beta|v1alpha)/models/(?P<model>[^/:]+)", "gemini.models", "google", "gemini")(
    _gemini_models
)


# ------------------------------------------------------------------------------------------------
# Ollama native


def _ollama_final(model: str, k: _Knobs) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _now_iso(),
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": k.usage.input_tokens,
        "prompt_eval_duration": 200_000,
        "eval_count": k.usage.output_tokens,
        "eval_duration": 700_000,
    }


def _ollama_generate(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model"):
        return _bad_request("ollama", "model is required")
    model, k = str(body["model"]), ctx.knobs
    chat = ctx.params["op"] == "chat"

    def part(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

    if body.get("stream") is False:
        return _json_reply(200, {**_ollama_final(model, k), **part(k.reply_text)})

    def gen() -> Iterator[bytes]:
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield (
                json.dumps(
                    {"model": model, "created_at": _now_iso(), **part(piece), "done": False}
                ).encode()
                + b"\n"
            )
        yield json.dumps({**_ollama_final(model, k), **part("")}).encode() + b"\n"

    return _stream_reply("application/x-ndjson", gen())


def _ollama_tags(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    models = [
        {
            "name": m,
            "model": m,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 2019393189,
            "digest": hashlib.sha256(m.encode()).hexdigest(),
            "details": {
                "format": "gguf",
                "family": "llama",
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }
        for m in fake.models
    ]
    return _json_reply(200, {"models": models})


def _ollama_version(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _json_reply(200, {"version": "0.6.0"})


def _ollama_pull(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    name = body.get("model") or body.get("name")
    if not name:
        return _bad_request("ollama", "model is required")
    if body.get("stream") is False:
        return _json_reply(200, {"status": "success"})
    digest = "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
    total, n = 4096, max(1, ctx.knobs.n_chunks)

    def gen() -> Iterator[bytes]:
        yield b'{"status":"pulling manifest"}\n'
        for i in range(n + 1):
            line = {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total * i // n,
            }
            yield json.dumps(line).encode() + b"\n"
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield json.dumps({"status": status}).encode() + b"\n"

    return _stream_reply("application/x-ndjson", gen())


_route("POST", r"/api/(?P<op>chat|generate)", "ollama.generate", "ollama", "none")(_ollama_generate)
_route("GET", r"/api/tags", "ollama.tags", "ollama", "none")(_ollama_tags)
_route("GET", r"/api/version", "ollama.version", "ollama", "none")(_ollama_version)
_route("POST", r"/api/pull", "ollama.pull", "ollama", "none")(_ollama_pull)
