"""Admin API: minted API keys (create, list, rotate, revoke)."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import uuid
from typing import Any

from candela_mitm import errors
from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.params import (
    DEFAULT_ROTATION_GRACE_S,
    MAX_REASON_CHARS,
    MAX_ROTATION_GRACE_S,
)
from candela_mitm.admin.parsing import (
    int_field,
    invalid,
    key_models,
    no_unknown_fields,
    parse_rfc3339,
    parse_user_id,
    usd_field,
)
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import key_json
from candela_mitm.errors import Refused
from candela_mitm.governance.identity import MINTED_KEY_PREFIX
from candela_mitm.state.ports import KeyRecord, to_us


def _mint(
    user: str,
    name: str,
    actor: str,
    now_us: int,
    expires_us: int | None,
    models: tuple[str, ...] = (),
    budget_usd: float | None = None,
    lineage: str = "",
) -> tuple[str, KeyRecord]:
    """A new key and its record (which holds only the key's SHA-256)."""
    secret = MINTED_KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, KeyRecord(
        key_id="k_" + uuid.uuid4().hex[:16],
        sha256=hashlib.sha256(secret.encode()).hexdigest(),
        user_id=user,
        name=name,
        actor=actor,
        created_us=now_us,
        expires_us=expires_us,
        models=models,
        budget_usd=budget_usd,
        lineage=lineage,
    )



class Keys(AdminBase):
    """The /keys routes."""

    def create_key(self, req: AdminRequest, _p: Any, _q: Any, body: dict[str, Any]) -> Handled:
        """Mint a key for a user (a developer: only for themselves); shown once, stored as its
        SHA-256 in the state store."""
        no_unknown_fields(body, ("user_id", "name", "expires_at", "models", "budget_usd"))
        user = parse_user_id(body.get("user_id", req.user), "user_id", invalid)
        if req.role != "admin" and user != req.user:
            raise Refused(errors.forbidden("A developer may only mint keys for themselves"))
        if not self._known(user) and user != req.user:
            raise Refused(errors.user_not_found(user))
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_REASON_CHARS:
            raise invalid("name", f"must be a string of at most {MAX_REASON_CHARS} characters")
        now = self._now()
        expires_us = None
        if body.get("expires_at") is not None:
            expires = parse_rfc3339(body["expires_at"])
            if expires is None:
                raise invalid(
                    "expires_at",
                    "must be an RFC 3339 time with an offset, e.g. 2030-01-31T00:00:00Z",
                )
            if expires <= now:
                raise invalid("expires_at", "must be in the future")
            expires_us = to_us(expires)
        models = key_models(body.get("models"))
        budget_usd = None
        if body.get("budget_usd") is not None:
            budget_usd = usd_field(body, "budget_usd", True)
            # a part of the user's budget, as it is now (a later change of it is not tracked:
            # a request still has to fit the user's budget as well as the key's)
            owner = self.rt.users.settings(user)
            if budget_usd > owner.daily_budget_usd:
                raise invalid(
                    "budget_usd",
                    f"must be at most the user's budget (${owner.daily_budget_usd:g} per "
                    f"{owner.budget_period.kind} period)",
                )
        secret, record = _mint(
            user, name, req.user, to_us(now), expires_us, models, budget_usd
        )
        view = key_json(record, to_us(now))
        self._audited(
            req, "key.create", user, None, view, lambda: self.rt.store.put_api_key(record)
        )
        return AdminResponse(201, {**view, "key": secret})

    def list_keys(self, req: AdminRequest, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        user = q.get("user")
        if req.role != "admin":
            if user is None:
                user = req.user
            elif user != req.user:
                raise Refused(errors.forbidden("A developer may only list their own keys"))
        now_us = to_us(self._now())
        keys = [key_json(k, now_us) for k in self.rt.store.api_keys(user)]
        return AdminResponse(200, {"user_id": user, "count": len(keys), "keys": keys})

    def _own_key(self, req: AdminRequest, key_id: str) -> KeyRecord:
        current = next((k for k in self.rt.store.api_keys() if k.key_id == key_id), None)
        # a developer learns nothing about other users' keys: theirs or "no such key"
        if current is None or (req.role != "admin" and current.user_id != req.user):
            raise Refused(errors.key_not_found(key_id))
        return current

    def rotate_key(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        """A new key for the same user, name and expiry; the old one keeps working for
        `grace_s` seconds (default an hour), then is refused like an expired key."""
        old = self._own_key(req, p["key"])
        no_unknown_fields(body, ("grace_s",))
        grace = DEFAULT_ROTATION_GRACE_S
        if "grace_s" in body:
            grace = int_field(body, "grace_s", MAX_ROTATION_GRACE_S)
        now_us = to_us(self._now())
        if not old.valid_at(now_us):
            raise invalid("key", "is revoked or expired: mint a new key instead")
        # the same budget row: a rotation does not give the key a fresh budget
        secret, new = _mint(
            old.user_id, old.name, req.user, now_us, old.expires_us, old.models,
            old.budget_usd, old.budget_id,
        )
        ends = now_us + grace * 1_000_000
        if old.expires_us is not None:
            ends = min(ends, old.expires_us)
        old_after = key_json(dataclasses.replace(old, expires_us=ends), now_us)
        new_view = key_json(new, now_us)

        def rotate() -> None:
            self.rt.store.put_api_key(new)
            self.rt.store.expire_api_key(old.key_id, ends)

        self._audited(
            req,
            "key.rotate",
            old.user_id,
            key_json(old, now_us),
            {"old": old_after, "new": new_view},
            rotate,
        )
        return AdminResponse(201, {**new_view, "key": secret, "replaces": old_after})

    def revoke_key(self, req: AdminRequest, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        key_id = p["key"]
        current = self._own_key(req, key_id)
        now = self._now()
        now_us = to_us(now)
        before = key_json(current, now_us)
        if current.revoked_us is not None:
            return AdminResponse(200, before)  # already revoked: nothing changes
        after = key_json(dataclasses.replace(current, revoked_us=now_us), now_us)
        self._audited(
            req,
            "key.revoke",
            current.user_id,
            before,
            after,
            lambda: self.rt.store.revoke_api_key(key_id, now_us),
        )
        return AdminResponse(200, after)

