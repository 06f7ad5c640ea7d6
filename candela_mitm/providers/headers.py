"""Response headers: which of a provider's response headers reach the client (an allowlist)."""

from __future__ import annotations

from collections.abc import Iterable

# What a client and its SDK need of an answer: framing, caching, the provider's request id (for
# support tickets) and the retry hints the SDKs honour. Everything else stays with Candela:
# organisation and project ids (openai-organization, anthropic-organization-id), org-wide rate
# limit state (x-ratelimit-*, anthropic-ratelimit-*), cookies, and whatever a provider adds next.
ALLOWED = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-encoding",
        b"transfer-encoding",
        b"cache-control",
        b"date",
        b"vary",
        b"retry-after",
        b"retry-after-ms",  # the openai SDK's finer retry hint
        b"x-should-retry",  # both the openai and anthropic SDKs
        b"x-request-id",  # OpenAI
        b"request-id",  # Anthropic
        b"x-amzn-requestid",  # Bedrock
        b"x-amzn-errortype",  # boto3 reads the error's type from it
    }
)
# Bedrock's per-request token counts, latency and content type (boto3 fills InvokeModel's
# contentType from x-amzn-bedrock-content-type); they describe only this request.
ALLOWED_PREFIXES = (b"x-amzn-bedrock-",)


# A WebSocket upgrade's 101 answer: the handshake itself (RFC 6455 section 4.2.2), without
# which the client cannot open the session; they describe only this connection.
HANDSHAKE = frozenset(
    {
        b"connection",
        b"upgrade",
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)


def client_response_fields(
    fields: Iterable[tuple[bytes, bytes]],
    switching_protocols: bool = False,
    own: dict[str, str] | None = None,
) -> tuple[tuple[bytes, bytes], ...]:
    """The provider's response header fields a client may see, in their order (a 101 answer
    keeps its WebSocket handshake too), then Candela's own (`own`: the rate limit headers)."""
    kept = tuple(
        (k, v)
        for k, v in fields
        if (low := k.lower()) in ALLOWED
        or low.startswith(ALLOWED_PREFIXES)
        or (switching_protocols and low in HANDSHAKE)
    )
    if not own:
        return kept
    return kept + tuple((k.encode(), v.encode()) for k, v in own.items())
