"""Pricing (issue 18): every token kind billed as the provider bills it, on every route.

Each expected amount is worked out by hand from the provider's published per-million prices,
written in the row (USD per million tokens; web searches per thousand), never by calling the
code under test. The usage objects are what each provider's API returns, read by the readers.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from candela_mitm.config import parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.providers import prices_source
from candela_mitm.providers.meters import meter_for
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage, usage_from

M = 1_000_000
TABLE = PricingTable()

# (case, wire, route, model, response body (or its usage-bearing part), expected USD)
CASES = [
    # --- OpenAI: gpt-4o $2.50 in, $1.25 cached in, $10 out
    (
        "openai cached input",
        "openai",
        "openai",
        "gpt-4o-2024-08-06",
        {"usage": {"prompt_tokens": 10_000, "completion_tokens": 1_000,
                   "prompt_tokens_details": {"cached_tokens": 8_000}}},
        (2_000 * 2.50 + 8_000 * 1.25 + 1_000 * 10.00) / M,
    ),
    # o3 $2 in, $8 out: reasoning tokens are output tokens (part of completion_tokens)
    (
        "openai reasoning",
        "openai",
        "openai",
        "o3",
        {"usage": {"prompt_tokens": 1_000, "completion_tokens": 5_000,
                   "completion_tokens_details": {"reasoning_tokens": 4_000}}},
        (1_000 * 2.00 + 5_000 * 8.00) / M,
    ),
    # gpt-audio: text $2.50 in / $10 out, audio $32 in / $64 out
    (
        "openai audio",
        "openai",
        "openai",
        "gpt-audio",
        {"usage": {"prompt_tokens": 1_000, "completion_tokens": 500,
                   "prompt_tokens_details": {"audio_tokens": 600},
                   "completion_tokens_details": {"audio_tokens": 300}}},
        (400 * 2.50 + 600 * 32.00 + 200 * 10.00 + 300 * 64.00) / M,
    ),
    # gpt-5.6-sol: $4 in, $0.40 cached, $5 cache write, $20 out
    (
        "openai cache write",
        "openai",
        "openai",
        "gpt-5.6-sol",
        {"object": "response", "usage": {"input_tokens": 10_000, "output_tokens": 100,
                                         "input_tokens_details": {"cached_tokens": 2_000,
                                                                  "cache_write_tokens": 5_000}}},
        (3_000 * 4.00 + 2_000 * 0.40 + 5_000 * 5.00 + 100 * 20.00) / M,
    ),
    # gpt-5.4 above 272K input: every token at the long-context rate ($5 in, $22.50 out)
    (
        "openai long context",
        "openai",
        "openai",
        "gpt-5.4",
        {"usage": {"prompt_tokens": 300_000, "completion_tokens": 1_000}},
        (300_000 * 5.00 + 1_000 * 22.50) / M,
    ),
    # Responses with two web_search_call items: $10 per 1,000 calls on top of the tokens
    (
        "openai web search",
        "openai",
        "openai",
        "gpt-4o",
        {"object": "response", "output": [{"type": "web_search_call"},
                                          {"type": "web_search_call"}, {"type": "message"}],
         "usage": {"input_tokens": 1_000, "output_tokens": 100}},
        (1_000 * 2.50 + 100 * 10.00) / M + 2 * 10.00 / 1_000,
    ),
    # service_tier priority (as the response reports it): gpt-4o $4.25 in, $17 out
    (
        "openai priority tier",
        "openai",
        "openai",
        "gpt-4o",
        {"service_tier": "priority", "usage": {"prompt_tokens": 1_000, "completion_tokens": 1_000}},
        (1_000 * 4.25 + 1_000 * 17.00) / M,
    ),
    # service_tier flex: gpt-5.5 $2.50 in, $15 out (half the standard $5 / $30)
    (
        "openai flex tier",
        "openai",
        "openai",
        "gpt-5.5",
        {"service_tier": "flex", "usage": {"prompt_tokens": 1_000, "completion_tokens": 1_000}},
        (1_000 * 2.50 + 1_000 * 15.00) / M,
    ),
    # --- Anthropic direct: claude-opus-4-8 $5 in, $6.25 5m write, $10 1h write, $0.50 read, $25 out
    (
        "anthropic cache reads and 5m/1h writes",
        "anthropic",
        "anthropic-direct",
        "claude-opus-4-8",
        {"type": "message", "usage": {
            "input_tokens": 100, "output_tokens": 500,
            "cache_creation_input_tokens": 10_000, "cache_read_input_tokens": 20_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 6_000,
                               "ephemeral_1h_input_tokens": 4_000}}},
        (100 * 5.00 + 6_000 * 6.25 + 4_000 * 10.00 + 20_000 * 0.50 + 500 * 25.00) / M,
    ),
    # fast mode (usage.speed "fast"): claude-opus-4-8 at $10 in, $50 out
    (
        "anthropic fast mode",
        "anthropic",
        "anthropic-direct",
        "claude-opus-4-8",
        {"type": "message", "usage": {"input_tokens": 1_000, "output_tokens": 1_000,
                                      "speed": "fast", "service_tier": "standard"}},
        (1_000 * 10.00 + 1_000 * 50.00) / M,
    ),
    # claude-sonnet-4-5 above 200K input: $6 in, $22.50 out
    (
        "anthropic long context",
        "anthropic",
        "anthropic-direct",
        "claude-sonnet-4-5-20250929",
        {"type": "message", "usage": {"input_tokens": 250_000, "output_tokens": 2_000}},
        (250_000 * 6.00 + 2_000 * 22.50) / M,
    ),
    # server-side web search: $10 per 1,000 searches (claude-sonnet-4-0: $3 in, $15 out)
    (
        "anthropic web search",
        "anthropic",
        "anthropic-direct",
        "claude-sonnet-4-20250514",
        {"type": "message", "usage": {"input_tokens": 2_000, "output_tokens": 300,
                                      "server_tool_use": {"web_search_requests": 3}}},
        (2_000 * 3.00 + 300 * 15.00) / M + 3 * 10.00 / 1_000,
    ),
    # --- Vertex AI (Claude): Google's list, claude-opus-4-8 at $5 / $25, 1h writes at $10
    (
        "vertex claude cache writes",
        "anthropic",
        "anthropic-vertex",
        "claude-opus-4-8@20260101",
        {"type": "message", "usage": {
            "input_tokens": 1_000, "output_tokens": 1_000, "cache_creation_input_tokens": 2_000,
            "cache_creation": {"ephemeral_1h_input_tokens": 2_000}}},
        (1_000 * 5.00 + 2_000 * 10.00 + 1_000 * 25.00) / M,
    ),
    # --- Bedrock: in-region (us.) claude-opus-4-8 carries the 10% regional premium:
    # $5.50 in, $6.875 write, $0.55 read, $27.50 out
    (
        "bedrock regional cache",
        "bedrock",
        "anthropic-bedrock",
        "us.anthropic.claude-opus-4-8-v1:0",
        {"usage": {"inputTokens": 1_000, "outputTokens": 200, "cacheReadInputTokens": 4_000,
                   "cacheWriteInputTokens": 3_000}},
        (1_000 * 5.50 + 3_000 * 6.875 + 4_000 * 0.55 + 200 * 27.50) / M,
    ),
    # global cross-region inference: the list price ($5 in, $10 1h write, $25 out)
    (
        "bedrock global 1h writes",
        "bedrock",
        "anthropic-bedrock",
        "global.anthropic.claude-opus-4-8-v1:0",
        {"usage": {"inputTokens": 1_000, "outputTokens": 200, "cacheWriteInputTokens": 3_000,
                   "cacheDetails": [{"ttl": "1h", "inputTokens": 3_000}]}},
        (1_000 * 5.00 + 3_000 * 10.00 + 200 * 25.00) / M,
    ),
    # --- Gemini: gemini-2.5-flash $0.30 text in, $1 audio in, $0.03 cached, $2.50 out (thinking too)
    (
        "gemini audio, cache and thinking",
        "gemini",
        "google",
        "models/gemini-2.5-flash",
        {"usageMetadata": {"promptTokenCount": 10_000, "cachedContentTokenCount": 4_000,
                           "candidatesTokenCount": 500, "thoughtsTokenCount": 1_500,
                           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7_000},
                                                   {"modality": "AUDIO", "tokenCount": 3_000}]}},
        # the cached 4,000 are text here; the other 3,000 text and 3,000 audio at their rates
        (3_000 * 0.30 + 3_000 * 1.00 + 4_000 * 0.03 + 2_000 * 2.50) / M,
    ),
    # cached audio at its own cache rate ($0.10; cached text $0.03)
    (
        "gemini cached audio",
        "gemini",
        "google",
        "gemini-2.5-flash",
        {"usageMetadata": {"promptTokenCount": 10_000, "cachedContentTokenCount": 6_000,
                           "candidatesTokenCount": 100,
                           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 5_000},
                                                   {"modality": "AUDIO", "tokenCount": 5_000}],
                           "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2_000},
                                                  {"modality": "AUDIO", "tokenCount": 4_000}]}},
        # text: 3,000 fresh at $0.30, 2,000 cached at $0.03; audio: 1,000 fresh at $1, 4,000
        # cached at $0.10
        (3_000 * 0.30 + 2_000 * 0.03 + 1_000 * 1.00 + 4_000 * 0.10 + 100 * 2.50) / M,
    ),
    # gemini-2.5-pro above 200K input: $2.50 in, $15 out
    (
        "gemini long context",
        "gemini",
        "google",
        "gemini-2.5-pro",
        {"usageMetadata": {"promptTokenCount": 250_000, "candidatesTokenCount": 1_000}},
        (250_000 * 2.50 + 1_000 * 15.00) / M,
    ),
    # Google Search grounding on gemini-3-flash-preview: $14 per 1,000 search queries
    (
        "gemini grounding",
        "gemini",
        "google",
        "gemini-3-flash-preview",
        {"candidates": [{"groundingMetadata": {"webSearchQueries": ["a", "b"]}}],
         "usageMetadata": {"promptTokenCount": 1_000, "candidatesTokenCount": 100}},
        (1_000 * 0.50 + 100 * 3.00) / M + 2 * 14.00 / 1_000,
    ),
    # image output: gemini-2.5-flash-image $30 per million image tokens (1,290 per image)
    (
        "gemini image output",
        "gemini",
        "google",
        "gemini-2.5-flash-image",
        {"usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 1_290,
                           "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1_290}]}},
        (20 * 0.30 + 1_290 * 30.00) / M,
    ),
    # the OpenAI-compatible Gemini endpoint: same model, same prices
    (
        "gemini-oai cached",
        "openai",
        "gemini-oai",
        "gemini-2.5-flash",
        {"usage": {"prompt_tokens": 10_000, "completion_tokens": 1_000,
                   "prompt_tokens_details": {"cached_tokens": 8_000}}},
        (2_000 * 0.30 + 8_000 * 0.03 + 1_000 * 2.50) / M,
    ),
]


@pytest.mark.parametrize(
    "wire, route, model, body, expected",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_json_usage_is_billed_as_the_provider_bills_it(wire, route, model, body, expected):
    usage = usage_from(wire, body)
    assert usage is not None
    price = TABLE.get(model, route)
    assert price is not None and price.source == prices_source.label()
    assert price.cost(usage) == pytest.approx(expected, rel=1e-9)


def _sse(*events: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {e}\ndata: {json.dumps(d)}\n\n".encode() for e, d in events)


STREAMS = [
    # Anthropic stream: message_start carries input and cache counts, message_delta the output
    (
        "anthropic stream 1h writes and search",
        "anthropic",
        "anthropic-direct",
        "claude-opus-4-8",
        _sse(
            ("message_start", {"type": "message_start", "message": {"usage": {
                "input_tokens": 50, "output_tokens": 1, "cache_creation_input_tokens": 8_000,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                   "ephemeral_1h_input_tokens": 8_000}}}}),
            ("content_block_delta", {"type": "content_block_delta",
                                     "delta": {"type": "text_delta", "text": "hi"}}),
            ("message_delta", {"type": "message_delta", "usage": {
                "output_tokens": 700, "server_tool_use": {"web_search_requests": 1}}}),
        ),
        (50 * 5.00 + 8_000 * 10.00 + 700 * 25.00) / M + 1 * 10.00 / 1_000,
    ),
    # OpenAI stream with include_usage: the last chunk carries usage and the tier served
    (
        "openai stream reasoning, cached, priority",
        "openai",
        "openai",
        "gpt-4o",
        b"data: " + json.dumps({"choices": [{"delta": {"content": "hi"}}]}).encode() + b"\n\n"
        + b"data: " + json.dumps({"choices": [], "service_tier": "priority", "usage": {
            "prompt_tokens": 2_000, "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 1_000}}}).encode() + b"\n\ndata: [DONE]\n\n",
        (1_000 * 4.25 + 1_000 * 2.125 + 300 * 17.00) / M,
    ),
]


@pytest.mark.parametrize(
    "wire, route, model, body, expected",
    [c[1:] for c in STREAMS],
    ids=[c[0] for c in STREAMS],
)
def test_streamed_usage_is_billed_as_the_provider_bills_it(wire, route, model, body, expected):
    meter = meter_for(wire, True, "text/event-stream")
    for i in range(0, len(body), 37):  # arbitrary chunk boundaries
        meter.feed(body[i : i + 37])
    meter.finish()
    assert meter.fault is None
    assert TABLE.get(model, route).cost(meter.usage) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "model, route, library_id",
    [
        ("gpt-4o-2024-08-06", "openai", "gpt-4o"),
        ("claude-sonnet-4-0", "anthropic-direct", "claude-sonnet-4-0"),
        ("claude-sonnet-4-20250514", "anthropic-direct", "claude-sonnet-4-0"),
        ("anthropic.claude-sonnet-4-20250514-v1:0", "anthropic-bedrock",
         "regional.anthropic.claude-sonnet-4-20250514-v1:0"),
        ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
         "global.anthropic.claude-opus-4-8-v1:0", "anthropic-bedrock",
         "global.anthropic.claude-opus-4-8-v1:0"),
        ("claude-sonnet-4@20250514", "anthropic-vertex", "claude-4-sonnet"),
        ("models/gemini-2.5-flash", "google", "gemini-2.5-flash"),
        ("gemini-2.5-flash", "gemini-oai", "gemini-2.5-flash"),
        ("claude-opus-4-8", None, "claude-opus-4-8"),
        ("ft:gpt-4o-mini:acme::abc123", "openai", "gpt-4o-mini"),
    ],
)
def test_references_resolve_on_their_route(model, route, library_id):
    price = TABLE.get(model, route)
    assert price is not None and price.model == library_id


@pytest.mark.parametrize(
    "model, route",
    [("mystery-model", None), ("gpt-4o", "ollama"), ("claude-opus-4-8", "openai")],
)
def test_unknown_model_or_route_has_no_price(model, route):
    assert TABLE.get(model, route) is None


def test_claude_code_default_model_is_priced_in_the_default_config():
    table = PricingTable.from_config(parse_config({}))
    price = table.get("claude-opus-4-8", "anthropic-direct")
    assert price is not None and (price.input, price.output) == (5.0, 25.0)
    assert "claude-opus-4-8" in {p.model for p in table.models()}


def test_config_overrides_named_fields_and_keeps_the_rest_from_the_library():
    cfg = parse_config({"pricing": {
        "claude-opus-4-8": {"input": 4.0, "output": 20.0},  # negotiated
        "acme-private-1": {"input": 1.0, "output": 2.0, "cached_input": 0.5,
                           "provider": "openai", "max_output_tokens": 8192},
    }})
    table = PricingTable.from_config(cfg)
    opus = table.get("claude-opus-4-8", "anthropic-direct")
    assert opus.source == f"{prices_source.label()} + config"
    # input and output at the negotiated rates; cache reads still at the library's $0.50
    usage = Usage(input_tokens=11_000, output_tokens=1_000, cached_tokens=10_000)
    assert opus.cost(usage) == pytest.approx((1_000 * 4.0 + 10_000 * 0.50 + 1_000 * 20.0) / M)
    # the override covers every spelling of the model, Bedrock ids included
    assert table.get("us.anthropic.claude-opus-4-8-v1:0", "anthropic-bedrock").input == 4.0
    private = table.get("acme-private-1")
    assert (private.source, private.provider, private.max_output_tokens) == ("config", "openai", 8192)
    assert private.cost(Usage(3_000, 1_000, 2_000)) == pytest.approx(
        (1_000 * 1.0 + 2_000 * 0.5 + 1_000 * 2.0) / M
    )
    assert "acme-private-1" in {p.model for p in table.models()}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"input": -1, "output": 1}, "pricing.m.input"),
        ({"input": 1}, "pricing.m.output"),
        ({"input": 1, "output": 1, "provider": "nowhere"}, "unknown provider route"),
        ({"input": 1, "output": 1, "cache_write_1h": -2}, "pricing.m.cache_write_1h"),
    ],
)
def test_bad_price_fails_at_start_with_its_key(entry, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({"pricing": {"m": entry}})


def test_max_cost_is_an_upper_bound_of_every_usage_of_that_size():
    """The dearest input kind (a 1-hour cache write) and the long-context tier both count."""
    price = TABLE.get("claude-sonnet-4-5", "anthropic-direct")
    # 250K input reaches the >200K tier: 1h writes at $12, output at $22.50
    assert price.max_cost(250_000, 1_000) == pytest.approx((250_000 * 12.0 + 1_000 * 22.5) / M)
    for usage in (
        Usage(250_000, 1_000, 0),
        Usage(250_000, 1_000, 100_000),
        Usage(250_000, 1_000, 0, cache_write_tokens=250_000, cache_write_1h_tokens=250_000),
        Usage(10_000, 1_000, 0, cache_write_tokens=10_000),
    ):
        assert price.cost(usage) <= price.max_cost(usage.input_tokens, usage.output_tokens)
    # a service tier the request chooses is priced at that tier
    gpt = TABLE.get("gpt-4o", "openai")
    assert gpt.max_cost(1_000, 1_000, service_tier="priority") == pytest.approx(
        (1_000 * 4.25 + 1_000 * 17.0) / M
    )
    assert gpt.max_cost(1_000, 0, web_searches=5) == pytest.approx(1_000 * 2.5 / M + 5 * 10 / 1_000)


def test_client_model_names_do_not_grow_the_librarys_memo():
    """Model names come from clients: only Candela's bounded memo remembers them."""
    snap = prices_source.snapshot()
    sizes = (len(snap._lookup_cache), len(snap._provider_cache), len(snap._provider_misses))
    table = PricingTable()
    for i in range(300):
        table.get(f"gpt-4o-made-up-{i}", "openai")
        table.get(f"claude-made-up-{i}")
    assert (len(snap._lookup_cache), len(snap._provider_cache), len(snap._provider_misses)) == sizes
    assert len(table._cache) == 600 <= PricingTable._CACHE_MAX


def test_contradictory_counts_fall_back_to_input_and_output():
    """A provider reporting more cached and written tokens than input is priced, not refused."""
    price = TABLE.get("gpt-5.6-sol", "openai")  # $4 in, $0.40 cached, $20 out
    usage = Usage(10_000, 100, 8_000, cache_write_tokens=5_000)  # 8,000 + 5,000 > 10,000
    assert price.cost(usage) == pytest.approx((2_000 * 4.00 + 8_000 * 0.40 + 100 * 20.00) / M)


@pytest.mark.parametrize(
    "model, library_id",
    [
        ("openai.gpt-oss-120b", "openai.gpt-oss-120b-1:0"),  # Mantle's id, Bedrock's price
        ("qwen.qwen3-32b", "qwen.qwen3-32b-v1:0"),
        ("openai.gpt-oss-120b-1:0", "openai.gpt-oss-120b-1:0"),
    ],
)
def test_bedrock_mantle_prices_a_model_at_its_bedrock_price(model: str, library_id: str) -> None:
    table = PricingTable()
    price = table.get(model, "bedrock-mantle")
    assert price is not None and price.model == library_id and price.library_provider == "aws"
    assert price == table.get(library_id, "anthropic-bedrock")
    assert table.get(model, "openai") is None  # not OpenAI's model, whatever its prefix says


def test_a_price_change_in_the_library_is_picked_up_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compilation is reused only while the library names the same price in force (asked
    again each second): a start date or time of day that moves it makes a new one."""
    price = TABLE.get("gpt-4o", "openai")
    usage = Usage(1_000_000, 0, 0)
    before = price.cost(usage)
    compiled = len(price._compiled)
    assert price.cost(usage) == before and len(price._compiled) == compiled
    dearer = copy.copy(price.info.get_prices(datetime.now(UTC)))
    dearer.input_mtok = Decimal(100)
    monkeypatch.setattr(price.info, "get_prices", lambda when, context=None: dearer)
    assert price.cost(usage) == before  # within the second: the price asked for last
    price._recent.clear()  # a second later
    assert price.cost(usage) == pytest.approx(100.0)
