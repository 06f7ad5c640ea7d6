"""A fake Google identity provider on loopback: x509 certs endpoint, tokeninfo, and token minting."""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from candela_mitm.config import AccessTokens, Oidc

GOOGLE_ISSUER = "https://accounts.google.com"
CERTS_PATH = "/oauth2/v1/certs"
TOKENINFO_PATH = "/tokeninfo"
CLIENT_ID = "fake-client.apps.googleusercontent.com"  # the OAuth client access tokens are for


@functools.lru_cache(maxsize=4)
def _rsa_key(slot: int) -> rsa.RSAPrivateKey:
    # Key generation costs ~50 ms; every provider in a test run shares these few keys.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed_pem(key: rsa.RSAPrivateKey, cn: str) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


class FakeOidcProvider:
    """Serves `{kid: PEM cert}` at certs_url and Google-style tokeninfo at tokeninfo_url.

    Counts every fetch (`certs_fetches`, `tokeninfo_fetches`, `tokeninfo_by_token`) so tests can
    assert caching. `certs_max_age` sets the Cache-Control max-age of the certs (None: omitted).
    """

    def __init__(self, certs_max_age: int | None = 3600, kid: str = "fake-key-1") -> None:
        self.kid = kid
        self.key = _rsa_key(0)
        self.foreign_key = _rsa_key(1)  # signs tokens the provider never issued
        self.certs_max_age = certs_max_age
        self.certs = {kid: _self_signed_pem(self.key, "fake-oidc")}
        self.certs_fetches = 0
        self.tokeninfo_fetches = 0
        self.tokeninfo_by_token: Counter[str] = Counter()
        self.tokeninfo_methods: list[str] = []
        self.certs_status = 200
        self._access: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def __enter__(self) -> FakeOidcProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider._handle(self)

            def do_POST(self) -> None:
                provider._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the request line carries access tokens

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "provider not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def certs_url(self) -> str:
        return self.base_url + CERTS_PATH

    @property
    def tokeninfo_url(self) -> str:
        return self.base_url + TOKENINFO_PATH

    def oidc_config(
        self, audiences: list[str] | None = None, issuers: list[str] | None = None
    ) -> Oidc:
        return Oidc(
            audiences=["candela"] if audiences is None else audiences,
            issuers=[GOOGLE_ISSUER] if issuers is None else issuers,
            certs_url=self.certs_url,
        )

    def access_tokens_config(self, audiences: list[str] | None = None) -> AccessTokens:
        return AccessTokens(
            tokeninfo_url=self.tokeninfo_url,
            audiences=[CLIENT_ID] if audiences is None else audiences,
        )

    # -- minting --

    def rotate_key(self, kid: str) -> None:
        """Publish a second key (the foreign one) under `kid`, as Google does before rotating."""
        with self._lock:
            self.certs[kid] = _self_signed_pem(self.foreign_key, "fake-oidc-rotated")

    def id_token(
        self,
        email: str | None,
        aud: str = "candela",
        iss: str = GOOGLE_ISSUER,
        exp_delta: float = 3600,
        kid: str | None = None,
        alg: str = "RS256",
        foreign: bool = False,
        iat_delta: float = 0,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A JWT as Google mints it. `alg` "none" leaves it unsigned; "HS256" HMACs it with the
        provider's public key PEM (the alg-confusion attack); `foreign` signs RS256 with a key
        the provider never published, still under the provider's kid."""
        now = int(time.time())
        header: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid or self.kid}
        payload: dict[str, Any] = {
            "iss": iss,
            "aud": aud,
            "sub": hashlib.sha256((email or "").encode()).hexdigest()[:21],
            "iat": int(now + iat_delta),
            "exp": int(now + exp_delta),
            "jti": secrets.token_hex(8),  # every token distinct, as real ones are
        }
        if email is not None:
            payload["email"] = email
            payload["email_verified"] = True
        for k, v in (extra or {}).items():  # None removes a claim
            if v is None:
                payload.pop(k, None)
            else:
                payload[k] = v
        signing_input = f"{_segment(header)}.{_segment(payload)}".encode()
        if alg == "none":
            signature = b""
        elif alg == "HS256":
            public_pem = self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
        else:
            key = self.foreign_key if foreign else self.key
            signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{b64url(signature)}"

    def access_token(
        self,
        email: str | None,
        ttl: float = 3600,
        aud: str = CLIENT_ID,
        email_verified: bool = True,
    ) -> str:
        """An opaque token tokeninfo will describe until `ttl` seconds from now."""
        token = "ya29." + secrets.token_urlsafe(48)
        info: dict[str, Any] = {"exp": time.time() + ttl, "aud": aud, "azp": aud}
        if email is not None:
            info["email"] = email
            info["email_verified"] = "true" if email_verified else "false"
        with self._lock:
            self._access[token] = info
        return token

    # -- serving --

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        if url.path == CERTS_PATH:
            with self._lock:
                self.certs_fetches += 1
                body = json.dumps(self.certs).encode()
                status = self.certs_status
            headers = {}
            if self.certs_max_age is not None:
                headers["Cache-Control"] = f"public, max-age={self.certs_max_age}"
            self._send(req, status, body, headers)
        elif url.path == TOKENINFO_PATH:
            if req.command == "POST":  # Google's tokeninfo takes the token as a form field
                length = int(req.headers.get("Content-Length") or 0)
                form = req.rfile.read(length).decode()
            else:
                form = url.query
            token = urllib.parse.parse_qs(form).get("access_token", [""])[0]
            with self._lock:
                self.tokeninfo_methods.append(req.command)
                self.tokeninfo_fetches += 1
                self.tokeninfo_by_token[token] += 1
                info = self._access.get(token)
            now = time.time()
            if info is None or info["exp"] <= now:
                # Google's answer for unknown and expired tokens alike.
                self._send(req, 400, b'{"error": "invalid_token"}')
                return
            doc = {k: v for k, v in info.items() if k != "exp"}
            doc["exp"] = str(int(info["exp"]))
            doc["expires_in"] = str(int(info["exp"] - now))
            doc["scope"] = "openid https://www.googleapis.com/auth/userinfo.email"
            self._send(req, 200, json.dumps(doc).encode())
        else:
            self._send(req, 404, b'{"error": "not_found"}')

    @staticmethod
    def _send(
        req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        req.send_response(status)
        req.send_header("Content-Type", "application/json; charset=UTF-8")
        req.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(body)
