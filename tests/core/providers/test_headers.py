"""providers/headers.py: which of a provider's response headers reach the client."""

from __future__ import annotations

from candela_mitm.providers.headers import client_response_fields

UPSTREAM = (
    (b"Content-Type", b"application/json"),
    (b"openai-organization", b"org-secret"),
    (b"x-request-id", b"req_1"),
    (b"anthropic-ratelimit-tokens-remaining", b"99"),
    (b"Set-Cookie", b"session=1"),
    (b"X-Amzn-Bedrock-Input-Token-Count", b"12"),
    (b"Retry-After", b"3"),
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    (b"x-request-id", b"req_2"),
)


def test_only_allowed_fields_pass_in_their_order_and_case() -> None:
    assert client_response_fields(UPSTREAM) == (
        (b"Content-Type", b"application/json"),
        (b"x-request-id", b"req_1"),
        (b"X-Amzn-Bedrock-Input-Token-Count", b"12"),
        (b"Retry-After", b"3"),
        (b"x-request-id", b"req_2"),
    )


def test_a_101_answer_keeps_its_websocket_handshake() -> None:
    kept = client_response_fields(UPSTREAM, switching_protocols=True)
    assert (b"Upgrade", b"websocket") in kept
    assert (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in kept
    assert all(k.lower() not in (b"openai-organization", b"set-cookie") for k, _ in kept)


def test_nothing_in_nothing_out() -> None:
    assert client_response_fields(()) == ()


def test_candelas_own_rate_headers_follow_and_a_providers_namesake_does_not_pass() -> None:
    own = {"RateLimit-Policy": '"requests";q=60;w=60', "RateLimit": '"requests";r=59;t=60'}
    fields = ((b"RateLimit", b'"org";r=1'), *UPSTREAM)  # the provider's: the org's state
    kept = client_response_fields(fields, own=own)
    assert kept[-2:] == (
        (b"RateLimit-Policy", b'"requests";q=60;w=60'),
        (b"RateLimit", b'"requests";r=59;t=60'),
    )
    assert (b"RateLimit", b'"org";r=1') not in kept
