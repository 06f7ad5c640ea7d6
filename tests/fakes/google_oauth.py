"""A fake Google OAuth2 token endpoint for service-account (JWT bearer) grants, on loopback."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs this audience whatever the file's token_uri says, as Google expects.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeTokenServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        status, payload = fake._grant(self.path, form)
        self._answer(status, payload)


class FakeTokenServer:
    """The token endpoint google-auth's service-account flow POSTs its signed assertion to.

    A context manager: a real HTTP server on 127.0.0.1 (free port) in a thread. It owns the
    RSA key of the one service account it knows (`make_service_account_file`), verifies each
    assertion's RS256 signature and claims, and issues random `ya29.fake-...` tokens.
    Tests can change `expires_in`, `fail_status` (answer that status with an OAuth error) and
    `delay_s` (hold each answer, to make concurrent callers overlap) at any time.
    requests honours HTTP(S)_PROXY even for loopback: tests set NO_PROXY=127.0.0.1.
    """

    def __init__(self, expires_in: int = 3600) -> None:
        self.expires_in = expires_in
        self.fail_status: int | None = None
        self.delay_s = 0.0
        self.calls = 0  # every POST, good or bad
        self.rejected: list[str] = []  # why each refused assertion was refused
        self.scopes: list[str] = []  # the scope claim of each accepted assertion
        self.issued: set[str] = set()
        self.client_email = "candela-test@fake-project.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._expires_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeTokenServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            # A short poll interval: shutdown() waits for the loop's next poll.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-google-oauth",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def token_uri(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeTokenServer is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def make_service_account_file(self, directory: Path, *, foreign_key: bool = False) -> Path:
        """Write a service-account JSON whose token_uri is this server; return its path.

        With foreign_key the file holds a fresh key this server does not know, so every
        assertion it signs is refused: an invalid credential.
        """
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if foreign_key
            else self._key
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": "fake-project",
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "http://127.0.0.1/unused-auth",
            "token_uri": self.token_uri,
        }
        path = Path(directory) / (
            "foreign-service-account.json" if foreign_key else "service-account.json"
        )
        path.write_text(json.dumps(info))
        return path

    def is_valid(self, token: str) -> bool:
        """True if this server issued `token` and it has not expired: for fake providers."""
        with self._lock:
            expires_at = self._expires_at.get(token)
        return expires_at is not None and time.time() < expires_at

    def _refuse(self, why: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.rejected.append(why)
        return 400, {"error": "invalid_grant", "error_description": why}

    def _grant(self, path: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_status is not None:
            return self.fail_status, {
                "error": "unauthorized_client",
                "error_description": "told to fail",
            }
        if path != "/token":
            return 404, {"error": "not_found"}
        if form.get("grant_type") != [JWT_BEARER] or len(form.get("assertion", [])) != 1:
            return self._refuse("not a JWT bearer grant")
        claims = self._verify(form["assertion"][0])
        if isinstance(claims, str):
            return self._refuse(claims)
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        expires_in = self.expires_in
        with self._lock:
            self.issued.add(token)
            self._expires_at[token] = time.time() + expires_in
            self.scopes.append(str(claims.get("scope", "")))
        return 200, {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}

    def _verify(self, assertion: str) -> dict[str, Any] | str:
        """The assertion's claims, or why it is refused."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return "assertion is not a JWS compact serialization"
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except ValueError:
            return "assertion is not base64url JSON"
        if header.get("alg") != "RS256":
            return "assertion is not RS256"
        try:
            self._key.public_key().verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        now = time.time()
        if claims.get("iss") != self.client_email:
            return "issuer is not the service account"
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri):
            return "audience is not the token endpoint"
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            return "assertion expired"
        if not isinstance(claims.get("iat"), int) or claims["iat"] > now + 60:
            return "assertion issued in the future"
        if not claims.get("scope"):
            return "assertion names no scope"
        return claims
