"""FakeRealtime: a WebSocket server speaking OpenAI Realtime, Responses WebSocket mode and Gemini
Live as JSON events, recording every frame it receives; and WsClient, a small blocking client.

The protocol is chosen by the path, as the real services are: `/v1/realtime` (Realtime),
`/v1/responses` (Responses WebSocket mode), `...BidiGenerateContent` (Gemini Live, Vertex Live).
Each request for work (`response.create`, Live's `clientContent`/`realtimeInput`) is answered
with a little output and then the protocol's usage-bearing event carrying `usage`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import wsproto
import wsproto.events as ev
from wsproto import ConnectionType, WSConnection


@dataclass
class RtUsage:
    """Token counts of one response, as each protocol reports them."""

    input_text: int = 100
    input_audio: int = 0
    output_text: int = 20
    output_audio: int = 0
    cached: int = 0


@dataclass
class Session:
    """One WebSocket connection as the fake saw it."""

    path: str
    headers: dict[str, str]
    protocol: str
    frames: list[dict[str, Any]] = field(default_factory=list)  # every client frame, parsed
    close_code: int | None = None  # the close code the fake received (None: the TCP just ended)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


def protocol_of(path: str) -> str:
    p = urlsplit(path).path
    if p.endswith("/v1/realtime"):
        return "openai-realtime"
    if p.endswith("/v1/responses"):
        return "openai-responses"
    if p.endswith("BidiGenerateContent"):
        return "gemini-live"
    return "unknown"


def usage_event(protocol: str, u: RtUsage, seq: int) -> dict[str, Any]:
    if protocol == "openai-realtime":
        return {
            "type": "response.done",
            "event_id": f"event_{seq}",
            "response": {
                "id": f"resp_{seq}",
                "object": "realtime.response",
                "status": "completed",
                "output": [],
                "usage": {
                    "total_tokens": u.input_text + u.input_audio + u.output_text + u.output_audio,
                    "input_tokens": u.input_text + u.input_audio,
                    "output_tokens": u.output_text + u.output_audio,
                    "input_token_details": {
                        "text_tokens": u.input_text,
                        "audio_tokens": u.input_audio,
                        "cached_tokens": u.cached,
                    },
                    "output_token_details": {
                        "text_tokens": u.output_text,
                        "audio_tokens": u.output_audio,
                    },
                },
            },
        }
    if protocol == "openai-responses":
        return {
            "type": "response.completed",
            "sequence_number": seq,
            "response": {
                "id": f"resp_{seq}",
                "object": "response",
                "status": "completed",
                "output": [],
                "usage": {
                    "input_tokens": u.input_text,
                    "input_tokens_details": {"cached_tokens": u.cached},
                    "output_tokens": u.output_text,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": u.input_text + u.output_text,
                },
            },
        }
    prompt_details = [{"modality": "TEXT", "tokenCount": u.input_text}]
    if u.input_audio:
        prompt_details.append({"modality": "AUDIO", "tokenCount": u.input_audio})
    response_details = [{"modality": "TEXT", "tokenCount": u.output_text}]
    if u.output_audio:
        response_details.append({"modality": "AUDIO", "tokenCount": u.output_audio})
    return {
        "serverContent": {"turnComplete": True},
        "usageMetadata": {
            "promptTokenCount": u.input_text + u.input_audio,
            "responseTokenCount": u.output_text + u.output_audio,
            "totalTokenCount": u.input_text + u.input_audio + u.output_text + u.output_audio,
            "promptTokensDetails": prompt_details,
            "responseTokensDetails": response_details,
        },
    }


def _answers(protocol: str, frame: dict[str, Any], u: RtUsage, seq: int) -> list[dict[str, Any]]:
    kind = frame.get("type")
    if protocol == "openai-realtime":
        if kind == "session.update":
            return [{"type": "session.updated", "session": frame.get("session", {})}]
        if kind == "response.create":
            return [
                {"type": "response.created", "response": {"id": f"resp_{seq}"}},
                {"type": "response.output_text.delta", "delta": "Hello"},
                usage_event(protocol, u, seq),
            ]
        return []
    if protocol == "openai-responses":
        if kind == "response.create":
            return [
                {"type": "response.created", "response": {"id": f"resp_{seq}"}},
                {"type": "response.output_text.delta", "delta": "Hello"},
                usage_event(protocol, u, seq),
            ]
        return []
    if "setup" in frame:
        return [{"setupComplete": {}}]
    if any(k in frame for k in ("clientContent", "realtimeInput")):
        return [
            {"serverContent": {"modelTurn": {"parts": [{"text": "Hello"}]}}},
            usage_event(protocol, u, seq),
        ]
    return []


class FakeRealtime:
    """The fake WebSocket provider; `usage` is what every response reports."""

    def __init__(self) -> None:
        self.usage = RtUsage()
        # answer a request for work with its first event, then drop the TCP connection (an
        # upstream that fails mid-response: no usage event ever comes)
        self.cut_mid_response = False
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeRealtime:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        try:  # wakes the accept thread: close() alone leaves it blocked, the port listening
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self.sessions.clear()
        self.usage = RtUsage()
        self.cut_mid_response = False

    def last(self, timeout: float = 30.0) -> Session:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.sessions:
                    return self.sessions[-1]
            time.sleep(0.02)
        raise AssertionError("no WebSocket session reached the fake")

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        session: Session | None = None
        seq = 0
        buf = ""
        try:
            while True:
                data = conn.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, ev.Request):
                        session = Session(
                            event.target,
                            {k.decode().lower(): v.decode() for k, v in event.extra_headers},
                            protocol_of(event.target),
                        )
                        with self._lock:
                            self.sessions.append(session)
                        conn.sendall(ws.send(ev.AcceptConnection()))
                        if session.protocol == "openai-realtime":
                            model = session.query.get("model", [""])[0]
                            hello = {"type": "session.created", "session": {"model": model}}
                            conn.sendall(ws.send(ev.TextMessage(json.dumps(hello))))
                    elif isinstance(event, ev.TextMessage | ev.BytesMessage) and session:
                        part = event.data if isinstance(event.data, str) else event.data.decode()
                        buf += part
                        if not event.message_finished:
                            continue
                        frame = json.loads(buf)
                        buf = ""
                        session.frames.append(frame)
                        seq += 1
                        answers = _answers(session.protocol, frame, self.usage, seq)
                        if self.cut_mid_response and len(answers) > 1:
                            conn.sendall(ws.send(ev.TextMessage(json.dumps(answers[0]))))
                            return
                        for answer in answers:
                            text = json.dumps(answer)
                            if session.protocol == "gemini-live":  # Live sends JSON as binary
                                conn.sendall(ws.send(ev.BytesMessage(text.encode())))
                            else:
                                conn.sendall(ws.send(ev.TextMessage(text)))
                    elif isinstance(event, ev.CloseConnection):
                        if session:
                            session.close_code = event.code
                        if ws.state == wsproto.connection.ConnectionState.REMOTE_CLOSING:
                            conn.sendall(ws.send(event.response()))
                        return
                    elif isinstance(event, ev.Ping):
                        conn.sendall(ws.send(event.response()))
                if not data:
                    return
        except OSError:
            return
        finally:
            if session is not None:
                session.ended.set()
            conn.close()


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class WsClient:
    """A blocking WebSocket client over a plain socket (wsproto), for the end-to-end tests."""

    def __init__(self, port: int, path: str, headers: dict[str, str], timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.status: int | None = None
        self.reject_body = b""
        self.headers: dict[str, str] = {}  # of the answer to the upgrade
        self.close_code: int | None = None
        self._pending: list[Any] = []
        self._buf = b""
        self.sock.sendall(
            self.ws.send(
                ev.Request(
                    host=f"127.0.0.1:{port}",
                    target=path,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                )
            )
        )
        done = False
        while not done:
            for event in self._read():
                if isinstance(event, ev.AcceptConnection):
                    self.status, done = 101, True
                    self.headers = {k.decode().lower(): v.decode() for k, v in event.extra_headers}
                elif isinstance(event, ev.RejectConnection):
                    self.status = event.status_code
                    self.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    done = not event.has_body
                elif isinstance(event, ev.RejectData):
                    self.reject_body += event.data
                    done = event.body_finished
                else:
                    self._pending.append(event)

    def _read(self) -> list[Any]:
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        out = list(self.ws.events())
        if not data and not out:
            raise Closed(1006, "connection ended")
        return out

    @property
    def span_id(self) -> str:
        return self.headers["x-candela-span-id"]

    @property
    def rejection(self) -> dict[str, Any]:
        return json.loads(self.reject_body)

    def send(self, frame: dict[str, Any]) -> None:
        """Send a JSON event; nothing when the server's close has already arrived (a real client
        finds out on its next read, which the caller's recv then raises as Closed)."""
        if self.ws.state is not wsproto.connection.ConnectionState.OPEN:
            return
        self.sock.sendall(self.ws.send(ev.TextMessage(json.dumps(frame))))

    def recv(self) -> dict[str, Any]:
        """The next JSON event (text or binary); Closed when the server closes."""
        buf = b""
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, ev.TextMessage | ev.BytesMessage):
                    data = event.data
                    buf += data.encode() if isinstance(data, str) else bytes(data)
                    if event.message_finished:
                        return json.loads(buf)
                elif isinstance(event, ev.CloseConnection):
                    self.close_code = event.code
                    try:
                        self.sock.sendall(self.ws.send(event.response()))
                    except (OSError, wsproto.utilities.LocalProtocolError):
                        pass
                    raise Closed(event.code, event.reason or "")
            self._pending.extend(self._read())

    def recv_until(self, predicate: Any) -> list[dict[str, Any]]:
        """Every event up to and including the first for which predicate(event) is true."""
        got = []
        while True:
            e = self.recv()
            got.append(e)
            if predicate(e):
                return got

    def close(self, code: int = 1000) -> None:
        try:
            self.sock.sendall(self.ws.send(ev.CloseConnection(code=code)))
            while True:
                self.recv()
        except (Closed, OSError):
            pass
        finally:
            self.sock.close()

    def drop(self) -> None:
        """Go away without a close frame (a client whose process died)."""
        self.sock.close()
