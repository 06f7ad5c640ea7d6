"""admin/resources/keys.py: mint, list, narrow, budget, rotate and revoke keys."""

from __future__ import annotations

import json

import pytest

from tests.core.admin.support import ADMIN, ALICE, BOB, admin_actions, call, q, sha

# -- API keys ----------------------------------------------------------------------------------


def test_mint_list_revoke_a_key(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "name": "ci",
                                             "expires_at": "2099-01-01T00:00:00Z"})
    assert r.status == 201
    key, kid = r.payload["key"], r.payload["id"]
    assert key.startswith("cdk_") and len(key) > 40
    assert (r.payload["user_id"], r.payload["name"], r.payload["state"]) == (BOB, "ci", "active")
    assert r.payload["fingerprint"] == sha(key)[:8] and r.payload["actor"] == ADMIN
    # only the digest is kept: the key is nowhere in the store nor in the audit trail
    [stored] = rt.store.api_keys(BOB)
    assert stored.sha256 == sha(key) and key not in json.dumps(stored.to_json())
    [created] = admin_actions(rt)
    assert created["action"] == "key.create" and created["target"] == BOB
    assert key not in json.dumps(created) and created["after"]["id"] == kid
    listed = call(rt, "GET", f"/admin/v1/keys?user={q(BOB)}").payload
    assert [k["id"] for k in listed["keys"]] == [kid] and "key" not in listed["keys"][0]
    r = call(rt, "DELETE", f"/admin/v1/keys/{kid}")
    assert r.status == 200 and r.payload["state"] == "revoked" and r.payload["revoked_at"]
    assert not rt.store.api_key(sha(key)).valid_at(0)
    again = call(rt, "DELETE", f"/admin/v1/keys/{kid}")  # a repeat changes nothing
    assert again.status == 200 and again.payload["revoked_at"] == r.payload["revoked_at"]
    assert [a["action"] for a in admin_actions(rt)] == ["key.create", "key.revoke"]


def test_a_key_narrowed_to_models_keeps_them_through_rotation(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "models": ["gpt-4o-mini", "claude-*"]})
    assert r.status == 201 and r.payload["models"] == ["gpt-4o-mini", "claude-*"]
    [stored] = rt.store.api_keys(BOB)
    assert stored.models == ("gpt-4o-mini", "claude-*")
    [created] = admin_actions(rt)
    assert created["after"]["models"] == ["gpt-4o-mini", "claude-*"]  # audited
    rotated = call(rt, "POST", f"/admin/v1/keys/{r.payload['id']}/rotate", {"grace_s": 0})
    assert rotated.status == 201 and rotated.payload["models"] == ["gpt-4o-mini", "claude-*"]
    plain = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    assert plain["models"] == []


def test_a_key_budget_is_stored_listed_audited_and_kept_by_rotation(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 2.5})
    assert r.status == 201 and r.payload["budget_usd"] == 2.5
    [stored] = rt.store.api_keys(BOB)
    assert stored.budget_usd == 2.5 and stored.budget_id == r.payload["id"]
    [created] = admin_actions(rt)
    assert created["action"] == "key.create" and created["after"]["budget_usd"] == 2.5
    listed = call(rt, "GET", f"/admin/v1/keys?user={q(BOB)}").payload
    assert [k["budget_usd"] for k in listed["keys"]] == [2.5]
    rotated = call(rt, "POST", f"/admin/v1/keys/{r.payload['id']}/rotate", {"grace_s": 0})
    assert rotated.status == 201 and rotated.payload["budget_usd"] == 2.5
    new = rt.store.api_key(sha(rotated.payload["key"]))
    # the rotated key spends from the first key's row: rotating gives no fresh budget
    assert new is not None and new.budget_id == r.payload["id"] != new.key_id
    again = call(rt, "POST", f"/admin/v1/keys/{rotated.payload['id']}/rotate", {"grace_s": 0})
    assert rt.store.api_key(sha(again.payload["key"])).budget_id == r.payload["id"]
    # the whole user's budget is a part of it too; no budget: the user's
    assert call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 10}).status == 201
    assert call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload["budget_usd"] is None


@pytest.mark.parametrize(
    "budget",
    [0, -1, 10.01, "5", True, [1], 1e308, 1e-12],
)
def test_key_budget_validation_names_the_field(rt, budget):
    # BOB's budget is the default, $10 per day: a key's is a part of it
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": budget})
    assert (r.status, r.payload["error"], r.payload["field"]) == (
        400, "invalid_parameter", "budget_usd"
    )
    assert rt.store.api_keys(BOB) == [] and admin_actions(rt) == []


def test_me_with_a_budgeted_key_shows_its_budget_and_spend(rt):
    from candela_mitm.governance.identity import KeyScope
    from candela_mitm.governance.ledger import KeyBudget, Reservation

    minted = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 2.0}).payload
    record = rt.store.api_key(sha(minted["key"]))
    scope = KeyScope(record.key_id, record.models, record.budget_usd, record.budget_id)
    r = rt.ledger.reserve(BOB, None, 0.5, 10.0, "req", key_budget=KeyBudget(
        record.key_id, record.budget_id, 2.0))
    assert isinstance(r, Reservation)
    rt.ledger.settle(r, 0.75, 1, 1, "gpt-4o-mini", "openai")
    held = rt.ledger.reserve(BOB, None, 0.25, 10.0, "req", key_budget=KeyBudget(
        record.key_id, record.budget_id, 2.0))
    assert isinstance(held, Reservation)
    me = call(rt, "GET", "/admin/v1/me", as_=BOB, key_scope=scope).payload
    kb = me["key_budget"]
    assert (kb["key_id"], kb["budget_usd"], kb["period"]) == (minted["id"], 2.0, "daily")
    assert (kb["spent_usd"], kb["reserved_usd"], kb["remaining_usd"]) == (0.75, 0.25, 1.0)
    assert kb["resets_at"] == me["resets_at"]  # the user's period
    assert call(rt, "GET", "/admin/v1/me", as_=BOB).payload["key_budget"] is None


@pytest.mark.parametrize(
    "models",
    [[], "gpt-4o", [""], ["gpt\n4o"], ["x" * 257], [1], ["m"] * 65],
)
def test_key_models_validation_names_the_field(rt, models):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "models": models})
    assert (r.status, r.payload["error"], r.payload["field"]) == (400, "invalid_parameter", "models")
    assert rt.store.api_keys(BOB) == []


def test_developers_mint_and_revoke_only_their_own_keys(rt):
    mine = call(rt, "POST", "/admin/v1/keys", {}, as_=ALICE)
    assert mine.status == 201 and mine.payload["user_id"] == ALICE
    bobs = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    listed = call(rt, "GET", "/admin/v1/keys", as_=ALICE).payload
    assert listed["user_id"] == ALICE and [k["id"] for k in listed["keys"]] == [mine.payload["id"]]
    r = call(rt, "DELETE", f"/admin/v1/keys/{bobs['id']}", as_=ALICE)
    assert r.status == 404 and r.payload["error"] == "key_not_found"
    assert rt.store.api_key(sha(bobs["key"])).revoked_us is None
    assert call(rt, "DELETE", f"/admin/v1/keys/{mine.payload['id']}", as_=ALICE).status == 200


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"user_id": 5}, "user_id", 400),
        ({"name": 7}, "name", 400),
        ({"expires_at": "tomorrow"}, "expires_at", 400),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", 400),
        ({"scopes": []}, "scopes", 400),
    ],
)
def test_mint_refuses_bad_fields(rt, body, field, status):
    r = call(rt, "POST", "/admin/v1/keys", body)
    assert r.status == status and r.payload["field"] == field
    assert rt.store.api_keys() == [] and admin_actions(rt) == []


def test_mint_for_an_unknown_user_is_404(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": "nobody@example.com"})
    assert r.status == 404 and r.payload["error"] == "user_not_found"


def test_rotate_keeps_the_old_key_for_its_grace_period(rt):
    old = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "name": "ci",
                                               "expires_at": "2099-01-01T00:00:00Z"}).payload
    r = call(rt, "POST", f"/admin/v1/keys/{old['id']}/rotate", {"grace_s": 600})
    assert r.status == 201
    new = r.payload
    assert new["key"].startswith("cdk_") and new["key"] != old["key"]
    assert (new["user_id"], new["name"], new["expires_at"]) == (BOB, "ci", "2099-01-01T00:00:00Z")
    assert new["replaces"]["id"] == old["id"]
    stored_old = rt.store.api_key(sha(old["key"]))
    stored_new = rt.store.api_key(sha(new["key"]))
    grace_end = stored_old.expires_us
    created = stored_new.created_us
    assert grace_end == created + 600 * 1_000_000
    assert stored_old.valid_at(grace_end - 1) and not stored_old.valid_at(grace_end)
    assert stored_new.valid_at(grace_end)
    [_, rotated] = admin_actions(rt)
    assert rotated["action"] == "key.rotate" and rotated["after"]["new"]["id"] == new["id"]
    assert old["key"] not in json.dumps(rotated) and new["key"] not in json.dumps(rotated)
    # a rotation never lengthens a key's life, and a dead key is not rotated
    call(rt, "DELETE", f"/admin/v1/keys/{new['id']}")
    r = call(rt, "POST", f"/admin/v1/keys/{new['id']}/rotate", {})
    assert r.status == 400 and r.payload["field"] == "key"


@pytest.mark.parametrize("grace", [-1, "60", 10**9, True])
def test_rotate_refuses_a_bad_grace(rt, grace):
    old = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    r = call(rt, "POST", f"/admin/v1/keys/{old['id']}/rotate", {"grace_s": grace})
    assert r.status == 400 and r.payload["field"] == "grace_s"
    assert len(rt.store.api_keys()) == 1
