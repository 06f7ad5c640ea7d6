"""Identity: who is calling (a Principal, or a 401 Denial), from the credential a request carries:
configured and minted Candela API keys, OIDC ID tokens and access tokens (governance/tokens.py),
the local user; and the role each principal has."""

from __future__ import annotations

import getpass
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

from candela_mitm.config import Auth
from candela_mitm.errors import Denial, governance_unavailable, unauthenticated
from candela_mitm.governance.credentials import (
    KEY_SOURCES,
    MalformedCredential,
    display_source,
    extract_credentials,
    key_id,
)
from candela_mitm.governance.tokens import (
    JWT,
    Fetcher,
    Invalid,
    Saturated,
    TokenVerifier,
    Unverifiable,
    urllib_fetcher,
)
from candela_mitm.state.ports import KeyRecord

log = logging.getLogger(__name__)

Role = Literal["admin", "tenant_admin", "developer"]
Via = Literal["api_key", "oidc", "access_token", "local", "workload"]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Keys minted through the admin API (POST /admin/v1/keys) start with this; only they are looked
# up in the state store, so a provider key or an ID token never costs a store read.
MINTED_KEY_PREFIX = "cdk_"

# The minted key with this digest while it is valid, or None (unknown, revoked, expired); raises
# when the store cannot say (the request is then refused 503).
MintedKeyLookup = Callable[[str], Awaitable[KeyRecord | None]]


@dataclass(frozen=True)
class KeyScope:
    """What a key minted through the admin API narrows its user to."""

    key_id: str  # its public name (k_...)
    models: tuple[str, ...] = ()  # model names or patterns; (): whatever the user may use
    budget_usd: float | None = None  # a part of the user's budget; None: the user's
    budget_id: str = ""  # the key's budget row (its lineage: shared across rotations)


@dataclass(frozen=True)
class Principal:
    user: str
    role: Role
    via: Via
    key_id: str | None  # sha256(credential)[:8]: the only trace of a credential ever logged
    proxy_identity: str | None = None  # the IAP-verified identity from Proxy-Authorization
    key_scope: KeyScope | None = None  # a minted key's own limits


def _role(value: str | None) -> Role | None:
    return cast(Role, value) if value in ("admin", "tenant_admin", "developer") else None


class Authenticator:
    """Turns a request's headers and query into a Principal, or a 401 Denial."""

    def __init__(
        self,
        auth: Auth,
        required: bool,
        local_user: str | None = None,
        http: Fetcher | None = None,
        role_override: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.time,
        minted_keys: MintedKeyLookup | None = None,
    ) -> None:
        self._auth = auth
        self._minted_keys = minted_keys
        self.required = required
        self._tokens = TokenVerifier(auth, http or urllib_fetcher(), clock)
        self._role_override = role_override
        self._local_user = local_user or _os_user()
        self._admins = frozenset(auth.admins)
        self._api_keys: dict[str, str] = {}
        for k in auth.api_keys:
            self._api_keys[k.sha256] = k.user
        tokens = auth.access_tokens
        self._token_prefixes = tuple(tokens.token_prefixes) if tokens is not None else ()

    # API keys may be added and revoked at run time (admin API); only digests are held.
    def add_api_key(self, sha256: str, user: str) -> None:
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        self._api_keys[sha256] = user

    def remove_api_key(self, sha256: str) -> bool:
        return self._api_keys.pop(sha256, None) is not None

    async def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Principal | Denial:
        try:
            return await self._authenticate(headers, query)
        except Exception as e:  # an auth hook must deny, never raise (mitmproxy would forward)
            # Only the type: messages from token parsers can quote the token.
            log.warning("authentication failed unexpectedly: %s", type(e).__name__)
            return unauthenticated("The credential could not be verified")

    async def _authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Principal | Denial:
        try:
            proxy_token, cred = extract_credentials(headers, query)
        except MalformedCredential as e:
            log.info("401: malformed credential in %s", e.source)
            return unauthenticated(f"The credential in {display_source(e.source)} is malformed")

        proxy_identity: str | None = None
        if proxy_token is not None:
            try:
                proxy_identity = (await self._tokens.verify_id_token(proxy_token)).user
            except Saturated:
                return governance_unavailable("too many identity checks are in progress")
            except (Invalid, Unverifiable) as e:
                log.info("401: Proxy-Authorization key_id=%s: %s", key_id(proxy_token), e)
                return unauthenticated(f"The Proxy-Authorization token is not accepted: {e}")

        if cred is None:
            if self.required:
                return unauthenticated(
                    "A credential is required: send Authorization: Bearer <token>"
                )
            return self._principal(self._local_user, "local", None, proxy_identity)

        source, token = cred
        digest = hashlib.sha256(token.encode()).hexdigest()  # once: the key's id and lookup
        kid = digest[:8]  # key_id(token)
        user = self._match_api_key(digest)
        if user is not None:
            return self._principal(user, "api_key", kid, proxy_identity)
        if self._minted_keys is not None and token.startswith(MINTED_KEY_PREFIX):
            # read from the store on every request: a revoked key is refused at once in every
            # process sharing it (no process may remember a key as valid)
            try:
                record = await self._minted_keys(digest)
            except Exception as e:
                log.warning("API key lookup failed: %s", type(e).__name__)
                return governance_unavailable("the key store cannot be read")
            if record is None:
                log.info("401: %s key_id=%s: unknown, revoked or expired key", source, kid)
                return unauthenticated(
                    f"The credential in {display_source(source)} is not accepted: "
                    "the key is unknown, revoked or expired"
                )
            scope = KeyScope(record.key_id, record.models, record.budget_usd, record.budget_id)
            return self._principal(record.user_id, "api_key", kid, proxy_identity, scope)
        try:
            if source in KEY_SOURCES:
                raise Invalid("it is not a known Candela API key")
            if self._auth.oidc is None and self._auth.access_tokens is None:
                raise Invalid("it is not a known Candela API key")
            if JWT.fullmatch(token):
                verified = await self._tokens.verify_id_token(token)
                via: Via = "oidc"
            elif token.startswith(self._token_prefixes) and self._token_prefixes:
                verified = await self._tokens.verify_access_token(token)
                via = "access_token"
            else:
                # Not the issuer's shape (a provider key, a typo'd Candela key): never sent out.
                raise Invalid("it is not a known Candela API key")
        except Saturated:
            log.warning("503: identity lookups saturated (%d pending)", self._tokens.pending)
            return governance_unavailable("too many identity checks are in progress")
        except (Invalid, Unverifiable) as e:
            log.info("401: %s key_id=%s: %s", source, kid, e)
            return unauthenticated(f"The credential in {display_source(source)} is not accepted: {e}")
        return self._principal(verified.user, via, kid, proxy_identity)

    def _principal(
        self,
        user: str,
        via: Via,
        kid: str | None,
        proxy_identity: str | None,
        key_scope: KeyScope | None = None,
    ) -> Principal | Denial:
        role: Role | None = None
        if self._role_override is not None:
            try:
                role = _role(self._role_override(user))
            except Exception as e:  # the user store is down: fail closed
                log.warning("role lookup failed: %s", type(e).__name__)
                return governance_unavailable("the user store cannot be read")
        if role is None:
            role = "admin" if user in self._admins else "developer"
        return Principal(user, role, via, kid, proxy_identity, key_scope)

    def _match_api_key(self, digest: str) -> str | None:
        # Looked up by its SHA-256 (`digest`, hex): one dict probe whatever the number of keys
        # (comparing every stored digest cost 64 compare_digest calls per request with 64
        # users, and would cost 10,000 with 10,000). The probe's timing can only tell about
        # digests, and learning a stored digest, even whole, does not give the key it was made
        # from.
        return self._api_keys.get(digest)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "local"
