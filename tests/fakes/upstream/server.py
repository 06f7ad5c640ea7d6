"""FakeUpstream: a local HTTP server that speaks each LLM provider's wire format and records
requests. This module holds the server, the recording, the routing table and the shared reply
helpers; each wire format registers its routes from a module of its own."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
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
        # objects the fake created and serves back by id, as the provider stores them: background
        # Responses, Assistants runs, message batches (guarded by _lock)
        self.objects: dict[str, dict[str, Any]] = {}
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

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far, a request on them or not (`Recorded.connection`
        numbers them)."""
        with self._lock:
            return self._conn_seq

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Recorded]:
        """Block until at least n requests were received (returns as soon as they are: the
        deadline is for a loaded machine); TimeoutError otherwise."""
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
        if kind in ("sigv4", "sigv4_mantle"):
            ok, reason = verify_sigv4(
                rec.method,
                rec.path,
                rec.headers,
                rec.body,
                access_key=self.aws_access_key_id,
                secret_key=self.aws_secret_access_key,
                region=self.aws_region,
                service="bedrock-mantle" if kind == "sigv4_mantle" else "bedrock",
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
# credentials: AWS SigV4, as Bedrock checks it


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
_BY_NAME: dict[str, _RouteFn] = {}  # route name -> handler, for the routes _match picks by header


def _route(
    method: str, pattern: str, name: str, family: str, auth: str
) -> Callable[[_RouteFn], _RouteFn]:
    def deco(fn: _RouteFn) -> _RouteFn:
        _ROUTES.append((method, re.compile(pattern + r"\Z"), name, family, auth, fn))
        _BY_NAME.setdefault(name, fn)
        return fn

    return deco


def _named(name: str) -> Callable[[_RouteFn], _RouteFn]:
    """A handler _match picks by the request's headers rather than by a path of its own."""

    def deco(fn: _RouteFn) -> _RouteFn:
        _BY_NAME[name] = fn
        return fn

    return deco


def _match(
    method: str, path: str, headers: dict[str, str], query: dict[str, list[str]]
) -> tuple[str, str, str, _RouteFn, dict[str, str]] | None:
    # Bedrock Mantle: OpenAI's wire format under /v1 or /openai/v1, signed for the bedrock-mantle
    # service: told apart from OpenAI by that signature, as Mantle itself would be reached
    if "/bedrock-mantle/aws4_request" in headers.get("authorization", ""):
        hit = re.fullmatch(r"(?:/openai)?/v1/(chat/completions|responses|models(?:/([^/]+))?)", path)
        if hit:
            op = hit.group(1).split("/", 1)[0]
            name = {"chat": "openai.chat", "responses": "openai.responses"}.get(op, "openai.models")
            params = {"id": unquote(hit.group(2))} if hit.group(2) else {}
            return ("mantle." + name.split(".")[1], "openai", "sigv4_mantle", _BY_NAME[name], params)
    # /v1/models is OpenAI's, Anthropic's and (with a custom base URL) Gemini's listing: tell them
    # apart by the credential the client presents, as a reader of the request would.
    if method == "GET" and re.fullmatch(r"/v1/models(/[^/]+)?", path):
        if "x-goog-api-key" in headers or "key" in query:
            path = "/v1beta" + path[3:]
        elif "anthropic-version" in headers:
            return ("anthropic.models", "anthropic", "anthropic", _BY_NAME["anthropic.models"], {})
    # Anthropic's OpenAI SDK compatibility: OpenAI's chat format, Anthropic's credential
    if method == "POST" and path == "/v1/chat/completions" and "x-api-key" in headers:
        return ("anthropic.openai_chat", "openai", "anthropic", _BY_NAME["openai.chat"], {})
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




# the path prefix of Vertex's publisher models (Claude and Gemini)
_VERTEX = r"/(?:v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/publishers"
