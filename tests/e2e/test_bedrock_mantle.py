"""Bedrock Mantle (issue 17) end to end: the real openai SDK -> Candela's bedrock-mantle route ->
a fake Mantle that checks the SigV4 signature for the bedrock-mantle service."""

from __future__ import annotations

import json

import pytest
import requests

from candela_mitm.providers.usage import Usage
from tests.fakes.upstream import FakeUpstream

from .conftest import ALICE_KEY, sdk_json

pytestmark = [pytest.mark.e2e, pytest.mark.sdk]
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
MODEL = "openai.gpt-oss-120b"  # Mantle's id; Bedrock prices it as openai.gpt-oss-120b-1:0
PRICE_IN, PRICE_OUT = 0.15, 0.6  # USD per million tokens, Bedrock on-demand


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream):
    upstream.reset()
    upstream.clear()
    yield


def _spans(candela) -> list[dict]:
    r = requests.get(f"{candela.url}/_local/api/traces?limit=50", headers=AUTH, timeout=5)
    assert r.status_code == 200
    return [s for s in r.json()["spans"] if s.get("provider") == "bedrock-mantle"]


@pytest.mark.usefixtures("sdk")
def test_the_openai_sdk_on_bedrock_mantle_is_signed_metered_and_priced(candela, upstream):
    upstream.configure(usage=Usage(input_tokens=40, output_tokens=12), n_chunks=3)
    out = sdk_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{candela.url}/proxy/bedrock-mantle/v1", api_key="{ALICE_KEY}",
                          max_retries=0)
        msgs = [{{"role": "user", "content": "hi"}}]
        r = c.chat.completions.create(model="{MODEL}", messages=msgs, max_tokens=30)
        chunks = list(c.chat.completions.create(model="{MODEL}", messages=msgs, max_tokens=30,
                                               stream=True, stream_options={{"include_usage": True}}))
        resp = c.responses.create(model="{MODEL}", input="hi", max_output_tokens=30)
        models = [m.id for m in c.models.list()]
        print(json.dumps({{"text": r.choices[0].message.content,
                          "stream": "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                          "responses": resp.output_text, "models": bool(models)}}))
    """)
    assert out == [
        {"text": upstream.reply_text, "stream": upstream.reply_text,
         "responses": upstream.reply_text, "models": True}
    ]  # fmt: skip
    recs = upstream.wait_for(4)
    assert [(r.method, r.path) for r in recs] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/models"),
    ]
    for rec in recs:
        # the organisation's AWS credential, signed for Mantle's own service name
        assert rec.route.startswith("mantle.") and rec.sigv4 is True, rec.sigv4_reason
        assert "/us-east-1/bedrock-mantle/aws4_request" in rec.headers["authorization"]
        assert ALICE_KEY not in json.dumps(rec.headers)
    spans = _spans(candela)
    metered = [s for s in spans if s["model"] is not None]
    assert len(spans) == 4 and len(metered) == 3  # the listing is forwarded free, unpriced
    for s in metered:
        assert s["model"] == MODEL and (s["input_tokens"], s["output_tokens"]) == (40, 12)
        assert s["cost_usd"] == pytest.approx((40 * PRICE_IN + 12 * PRICE_OUT) / 1e6)


def test_a_model_without_a_price_is_refused_before_it_reaches_mantle(candela, upstream):
    r = requests.post(
        f"{candela.url}/proxy/bedrock-mantle/openai/v1/chat/completions",
        headers=AUTH,
        json={"model": "nobody.unpriced-model", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert r.status_code == 402 and r.json()["error"] == "model_price_unknown", r.text
    assert upstream.requests == []


def test_a_stored_response_is_not_read_with_the_organisations_credential(candela, upstream):
    r = requests.get(
        f"{candela.url}/proxy/bedrock-mantle/v1/responses/resp_someone_elses",
        headers=AUTH,
        timeout=10,
    )
    assert (r.status_code, r.json()["error"]) == (404, "endpoint_not_governed"), r.text
    assert upstream.requests == []
