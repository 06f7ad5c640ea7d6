"""A fake webhook receiver (generic JSON or Slack incoming webhook) that records every post."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    body: Any  # the JSON it carried
    status: int  # what the receiver answered
    at: float  # time.monotonic() when it arrived


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: WebhookReceiver


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with fake.lock:
            status = fake.statuses.pop(0) if fake.statuses else 200
            fake.posts.append(
                Post(self.path, {k.lower(): v for k, v in self.headers.items()},
                     json.loads(raw or b"null"), status, time.monotonic())
            )
            fake.lock.notify_all()
        body = b"ok" if status < 400 else b"no"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 (free port) in a thread; `statuses` are answered to the
    first posts in order (a failing webhook), 200 after them."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.posts: list[Post] = []
        self.lock = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def wait_for(self, pred: Callable[[list[Post]], bool], timeout: float = 30.0) -> list[Post]:
        """The posts once `pred` holds of them; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not pred(self.posts):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"webhook: condition not met; got {self.posts!r}")
                self.lock.wait(left)
            return list(self.posts)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
