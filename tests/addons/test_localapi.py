"""LocalApi: the endpoints Candela answers itself (traces here; health and models in e2e)."""

import hashlib
import json

import pytest

from candela_mitm.addons.localapi import LocalApi
from candela_mitm.observability.spans import Span

from .conftest import ALICE_KEY, BASE
from .test_auth import authenticate


@pytest.mark.parametrize(
    "command, who, sees",
    [
        ("server", "alice@example.com", {"alice@example.com"}),  # a developer: their own
        ("server", "boss@example.com", {"alice@example.com", "bob@example.com"}),  # an admin
        ("local", None, {"alice@example.com", "bob@example.com"}),  # the laptop's one user
    ],
)
def test_traces_show_a_developer_only_their_own_spans(make_runtime, command, who, sees):
    boss_key = "cdl_boss_key"
    rt = make_runtime(
        command,
        admins=["boss@example.com"],
        api_keys=[
            *BASE["auth"]["api_keys"],
            {"sha256": hashlib.sha256(boss_key.encode()).hexdigest(), "user": "boss@example.com"},
        ],
    )
    for i, user in enumerate(["alice@example.com", "bob@example.com"] * 2):
        rt.spans.add(Span(f"s{i}", "t", None, "2026-01-01T00:00:00Z", user=user))
    key = {"alice@example.com": ALICE_KEY, "boss@example.com": boss_key}.get(who or "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    flow = authenticate(rt, headers, path="/_local/api/traces")
    LocalApi(rt).request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert {s["user"] for s in json.loads(flow.response.content)["spans"]} == sees
