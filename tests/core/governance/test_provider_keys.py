"""Provider keys an intercepted app brings: found where each SDK puts them, fingerprinted, ours or not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from candela_mitm.config import parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.governance import provider_keys
from candela_mitm.governance.provider_keys import OrganisationKeys, fingerprint, presented

SECRET = b"s3cret"


@pytest.mark.parametrize(
    "headers, query, key",
    [
        ({"Authorization": "Bearer sk-proj-abc"}, {}, "sk-proj-abc"),  # OpenAI, Anthropic 2.x
        ({"authorization": "bearer  sk-x "}, {}, "sk-x"),
        ({"x-api-key": "sk-ant-1"}, {}, "sk-ant-1"),  # Anthropic
        ({"x-goog-api-key": "AIza1"}, {}, "AIza1"),  # Gemini
        ({}, {"key": "AIza2"}, "AIza2"),
        (
            {
                "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261205/"
                "us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=abc"
            },
            {},
            "AKIAIOSFODNN7EXAMPLE",  # Bedrock: the access key id (the secret never travels)
        ),
        ({"Authorization": "Bearer "}, {}, None),
        ({"Content-Type": "application/json"}, {}, None),
    ],
)
def test_the_key_is_read_where_each_sdk_sends_it(headers, query, key):
    assert presented(headers, query) == key


def test_a_fingerprint_is_an_hmac_and_only_the_configured_ones_are_ours():
    fp = fingerprint(SECRET, "sk-org")
    assert fp == hmac.new(SECRET, b"sk-org", hashlib.sha256).hexdigest()
    assert fp != hashlib.sha256(b"sk-org").hexdigest()  # keyed: no guessing from the trail
    keys = OrganisationKeys(SECRET, [fp])
    assert keys.check("sk-org") == provider_keys.KeyCheck(fp, True)
    other = keys.check("sk-personal")
    assert other is not None and not other.organisation and "sk-personal" not in other.fingerprint
    assert OrganisationKeys(None, [fp]).check("sk-org") is None  # no secret: nothing to compare


def test_fingerprints_without_their_secret_fail_at_start():
    cfg = parse_config({"interception": {"organisation_keys": [fingerprint(SECRET, "k")]}})
    with pytest.raises(ConfigError, match="CANDELA_KEY_FINGERPRINT_SECRET"):
        provider_keys.from_config(cfg.interception, {})
    keys = provider_keys.from_config(cfg.interception, {"CANDELA_KEY_FINGERPRINT_SECRET": "s3cret"})
    assert keys.check("k").organisation
    assert provider_keys.from_config(parse_config({}).interception, {}).check("k") is None
