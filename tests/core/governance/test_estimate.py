"""The reservation is an upper bound of what a request can cost (issue 18)."""

from __future__ import annotations

import base64
import math

import pytest

from candela_mitm.governance.estimate import (
    BYTES_PER_TOKEN,
    CHARS_PER_TOKEN,
    UNBOUNDED_SEARCHES,
    completions,
    estimate_cost,
    scan,
    stated_max_output,
)
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage

M = 1_000_000
TABLE = PricingTable()
DEFAULT_MAX = 4096
B64_160K = base64.b64encode(b"\0" * 160_000).decode()  # 213,336 characters


def text_tokens(body) -> int:
    return math.ceil(scan(body).chars / CHARS_PER_TOKEN)


@pytest.mark.parametrize(
    "body, stated, n",
    [
        ({"max_tokens": 100, "n": 3}, 100, 3),
        ({"max_completion_tokens": "250", "n": "2"}, 250, 2),
        ({"generationConfig": {"maxOutputTokens": "65536", "candidateCount": "4"}}, 65536, 4),
        ({"generation_config": {"max_output_tokens": 512, "candidate_count": 2}}, 512, 2),
        ({"inferenceConfig": {"maxTokens": 300}}, 300, 1),
        ({"options": {"num_predict": "64"}}, 64, 1),
        ({"max_tokens": "lots", "n": True}, None, 1),
        ({"max_tokens": -5, "n": 0}, None, 1),
        ({"max_tokens": 100.0}, 100, 1),
    ],
)
def test_stated_limits_and_completions_are_read_as_sent(body, stated, n):
    assert stated_max_output(body) == stated
    assert completions(body) == n


def test_n_multiplies_the_output_reserved():
    price = TABLE.get("gpt-4o", "openai")  # $2.50 in, $10 out
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 3}
    assert estimate_cost(body, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(body) * 2.50 + 300 * 10.00) / M
    )


def test_candidate_count_and_a_numeric_string_limit_multiply():
    price = TABLE.get("gemini-2.5-flash", "google")  # $2.50 out
    body = {"contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {"maxOutputTokens": "1000", "candidateCount": "2"}}
    dearest_in = 1.00  # gemini-2.5-flash audio input, dearer than its $0.30 text
    assert estimate_cost(body, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(body) * dearest_in + 2_000 * 2.50) / M
    )


@pytest.mark.parametrize(
    "model, route, in_rate, out_rate, expected_output",
    [
        ("gpt-4o", "openai", 2.50, 10.00, 16_384),  # the model's own limit (data/pricing.json)
        ("o1-pro", "openai", 150.00, 600.00, 100_000),
        # limit unknown: the configured default; no cache_control, so no cache-write rate
        ("claude-opus-4-8", "anthropic-direct", 5.00, 25.00, DEFAULT_MAX),
    ],
)
def test_without_a_stated_maximum_the_model_limit_is_reserved(
    model, route, in_rate, out_rate, expected_output
):
    price = TABLE.get(model, route)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert estimate_cost(body, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(body) * in_rate + expected_output * out_rate) / M
    )


@pytest.mark.parametrize(
    "part, media_tokens, images",
    [
        # OpenAI input_audio: 160,000 bytes of audio at 16 bytes a token
        ({"type": "input_audio", "input_audio": {"data": B64_160K, "format": "wav"}},
         160_000 // BYTES_PER_TOKEN["audio"], 0),
        # Gemini inline video
        ({"inlineData": {"mimeType": "video/mp4", "data": B64_160K}},
         160_000 // BYTES_PER_TOKEN["video"], 0),
        # Anthropic base64 PDF document
        ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": B64_160K}},
         160_000 // BYTES_PER_TOKEN["document"], 0),
        # OpenAI file as a data URL
        ({"type": "file", "file": {"file_data": "data:application/pdf;base64," + B64_160K}},
         160_000 // BYTES_PER_TOKEN["document"], 0),
        # Bedrock Converse document bytes
        ({"document": {"format": "pdf", "name": "a", "source": {"bytes": B64_160K}}},
         160_000 // BYTES_PER_TOKEN["document"], 0),
        # images stay one image each, however large
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_160K}}, 0, 1),
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                      "data": B64_160K}}, 0, 1),
        ({"inline_data": {"mime_type": "image/jpeg", "data": B64_160K}}, 0, 1),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, 0, 1),
        # binary of unknown type: by its size, as a document
        ({"blob": B64_160K}, 160_000 // BYTES_PER_TOKEN["document"], 0),
    ],
)
def test_inline_media_is_counted_by_size_images_by_count(part, media_tokens, images):
    found = scan({"messages": [{"role": "user", "content": [part]}]})
    assert found.media_tokens == pytest.approx(media_tokens, abs=3)  # base64 padding
    assert found.images == images


@pytest.mark.parametrize(
    "model, route, window, in_rate, out_rate, body",
    [
        ("gpt-4o", "openai", 128_000, 2.50, 10.00,
         {"input": "and then?", "previous_response_id": "resp_123"}),
        ("gpt-4o", "openai", 128_000, 2.50, 10.00, {"input": "hi", "conversation": "conv_123"}),
        # gemini-2.5-flash: 1,048,576 tokens, audio input ($1) its dearest input rate
        ("gemini-2.5-flash", "google", 1_048_576, 1.00, 2.50,
         {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": "cachedContents/abc"}),
        ("gpt-4o", "openai", 128_000, 2.50, 10.00,
         {"input": [{"type": "input_file", "file_id": "file-abc"}]}),
        ("gemini-2.5-flash", "google", 1_048_576, 1.00, 2.50,
         {"contents": [{"parts": [{"fileData": {"mimeType": "application/pdf",
                                                "fileUri": "gs://b/x.pdf"}}]}]}),
    ],
)
def test_referenced_context_counts_at_the_context_window(
    model, route, window, in_rate, out_rate, body
):
    price = TABLE.get(model, route)
    assert scan(body).references
    assert estimate_cost(body, 10, DEFAULT_MAX, price) == pytest.approx(
        (window * in_rate + 10 * out_rate) / M
    )


def test_claude_cache_writes_are_reserved_only_when_the_request_marks_content():
    price = TABLE.get("claude-opus-4-8", "anthropic-direct")  # $5 in, $10 1h write, $25 out
    plain = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    marked = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
        "max_tokens": 10}
    assert estimate_cost(plain, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(plain) * 5.00 + 10 * 25.00) / M
    )
    assert estimate_cost(marked, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(marked) * 10.00 + 10 * 25.00) / M
    )


@pytest.mark.parametrize(
    "tool, searches",
    [
        ({"type": "web_search_20250305", "name": "web_search", "max_uses": 3}, 3),
        ({"type": "web_search"}, UNBOUNDED_SEARCHES),
        ({"google_search": {}}, UNBOUNDED_SEARCHES),
        ({"type": "function", "function": {"name": "f"}}, 0),
    ],
)
def test_search_tools_reserve_their_fees(tool, searches):
    assert scan({"tools": [tool]}).searches == searches


def test_the_service_tier_the_request_chooses_is_reserved_at_its_price():
    price = TABLE.get("gpt-4o", "openai")  # priority: $4.25 in, $17 out
    body = {"messages": [], "max_tokens": 1_000, "service_tier": "priority"}
    assert estimate_cost(body, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(body) * 4.25 + 1_000 * 17.00) / M
    )


# Realistic requests and the largest usage the provider could report for them: the bill never
# passes the reservation.
BOUNDS = [
    ("gpt-4o", "openai",
     {"messages": [{"role": "user", "content": "x" * 3_000}], "max_tokens": 500, "n": 2},
     Usage(1_000, 1_000, 900)),
    ("claude-opus-4-8", "anthropic-direct",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 30_000,
                                                 "cache_control": {"type": "ephemeral",
                                                                   "ttl": "1h"}}]}],
      "max_tokens": 2_000},
     Usage(10_000, 2_000, 0, cache_write_tokens=10_000, cache_write_1h_tokens=10_000)),
    ("claude-sonnet-4-5", "anthropic-direct",
     {"messages": [{"role": "user", "content": "z " * 375_000}], "max_tokens": 100},
     Usage(250_000, 100, 0)),  # past the 200K tier
    ("gemini-2.5-flash", "google",
     {"contents": [{"parts": [{"inlineData": {"mimeType": "audio/ogg", "data": B64_160K}}]}],
      "generationConfig": {"maxOutputTokens": "200"}},
     Usage(10_000, 200, 0, input_audio_tokens=10_000)),
    ("gpt-4o", "openai",
     {"input": "more", "previous_response_id": "resp_1", "max_output_tokens": 100},
     Usage(127_000, 100, 100_000)),
]


@pytest.mark.parametrize("model, route, body, usage", BOUNDS)
def test_the_bill_never_passes_the_reservation(model, route, body, usage):
    price = TABLE.get(model, route)
    assert price.cost(usage) <= estimate_cost(body, None, DEFAULT_MAX, price)


def test_claude_fast_mode_is_reserved_at_its_price():
    price = TABLE.get("claude-opus-4-8", "anthropic-direct")  # fast: $10 in, $50 out
    body = {"messages": [], "max_tokens": 1_000, "speed": "fast"}
    assert estimate_cost(body, None, DEFAULT_MAX, price) == pytest.approx(
        (text_tokens(body) * 10.00 + 1_000 * 50.00) / M
    )


def _reference_chars(node):
    """The walk before numbers were counted in bulk: one json.dumps per scalar."""
    import json as _json

    if isinstance(node, str):
        return len(node)
    if isinstance(node, list):
        return sum(_reference_chars(x) for x in node)
    if isinstance(node, dict):
        return sum(len(k) + _reference_chars(v) for k, v in node.items())
    return 0 if node is None else len(_json.dumps(node))


@pytest.mark.parametrize(
    "body",
    [
        {"input": [1, 22, 333, -4, 5.5, 1e300, True, False, None]},
        {"input": [[1, 2], "ab", {"k": [0.1, "x", None]}, 7]},
        {"messages": [], "logit_bias": {"50256": -100}},
        {"input": list(range(1000))},
    ],
)
def test_numbers_in_lists_count_as_their_characters(body):
    assert scan(body).chars == _reference_chars(body)


def test_a_batch_reserves_the_sum_of_its_requests_at_the_batch_price():
    from candela_mitm.config import parse_config
    from candela_mitm.governance.estimate import estimate_batch_cost

    table = PricingTable.from_config(parse_config({}))
    one = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}
    two = {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": "ho"}]}
    sonnet, haiku = table.get("claude-sonnet-4-5"), table.get("claude-haiku-4-5")
    assert sonnet is not None and haiku is not None
    assert sonnet.batch_priced() and haiku.batch_priced()  # genai-prices knows Anthropic's batch price
    total = estimate_batch_cost([("claude-sonnet-4-5", one), ("claude-haiku-4-5", two)], 4096, table.get)
    listed = estimate_cost(one, 1000, 4096, sonnet) + estimate_cost(two, 200, 4096, haiku)
    assert total == pytest.approx(listed / 2)  # Anthropic's batches: half the list price
    # a model with no known batch price is reserved at its list price
    custom = PricingTable.from_config(parse_config({"pricing": {"house-model": {"input": 1.0, "output": 2.0}}}))
    price = custom.get("house-model")
    assert price is not None and not price.batch_priced()
    body = {"model": "house-model", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}
    assert estimate_batch_cost([("house-model", body)], 4096, custom.get) == pytest.approx(
        estimate_cost(body, 100, 4096, price)
    )
    with pytest.raises(KeyError):
        estimate_batch_cost([("nobody-knows", body)], 4096, custom.get)
