"""Usage: tokens read from one decoded JSON document of each provider's wire format (a stream's
documents add up in providers/readers.py, a body's framing is providers/meters.py, a job's
answers providers/jobs.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class Usage:
    """Token counts of one request. input_tokens includes cached_tokens (cached is a subset)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    # What pricing needs beyond the three counts (issue 18): each a subset of input_tokens or
    # output_tokens as named, 0 when the provider does not report it. Cache writes count every
    # TTL, the 1-hour ones apart (Anthropic, Bedrock, Vertex); image input includes documents
    # (Gemini bills them as images); web searches are billed per call, not per token.
    # Left out of ==: two usages are equal when their token counts are.
    cache_write_tokens: int = field(default=0, compare=False)
    cache_write_1h_tokens: int = field(default=0, compare=False)
    reasoning_tokens: int = field(default=0, compare=False)
    input_audio_tokens: int = field(default=0, compare=False)
    cached_audio_tokens: int = field(default=0, compare=False)  # of cached_tokens
    input_image_tokens: int = field(default=0, compare=False)
    input_video_tokens: int = field(default=0, compare=False)
    output_audio_tokens: int = field(default=0, compare=False)
    output_image_tokens: int = field(default=0, compare=False)
    web_search_requests: int = field(default=0, compare=False)
    service_tier: str | None = field(default=None, compare=False)  # as served: priority, flex

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def copy(self) -> Usage:
        """dataclasses.replace(self) without its walk over the fields (every field is a plain
        init field, no __post_init__): a meter hands out a copy at each read of its usage."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


WIRES = ("openai", "anthropic", "gemini", "bedrock", "ollama")


_NUMBER = (int, float)  # (`int | float` made a union object on every call)


def _count(value: object) -> int | None:
    """A token count as sent, or None when absent, null or not a number."""
    if type(value) is int:  # the count as every provider sends it: max(0, int(value)) below
        return value if value > 0 else 0
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        return None
    return max(0, int(value))


def _n(value: object) -> int:
    return _count(value) or 0


def _usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> Usage:
    return Usage(input_tokens, output_tokens, min(cached_tokens, input_tokens))


# ---------------------------------------------------------------------------------------------
# One decoded JSON object -> Usage


_OPENAI_SHAPES = (
    ("prompt_tokens", "completion_tokens", "prompt_tokens_details"),  # chat, embeddings
    ("input_tokens", "output_tokens", "input_tokens_details"),  # Responses
)
_OUTPUT_DETAILS = {out: out.replace("_tokens", "_tokens_details") for _, out, _ in _OPENAI_SHAPES}


def usage_from_openai(obj: object) -> Usage | None:
    """Chat Completions, Responses (also inside `response.*` stream events) and embeddings."""
    if not isinstance(obj, dict):
        return None
    resp = obj.get("response")
    if isinstance(resp, dict) and str(obj.get("type", "")).startswith("response."):
        obj = resp
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    total = _count(u.get("total_tokens"))
    for inp_key, out_key, details_key in _OPENAI_SHAPES:
        inp_n, out_n = _count(u.get(inp_key)), _count(u.get(out_key))
        if inp_n is not None or out_n is not None:
            inp, out, details = inp_n or 0, out_n or 0, u.get(details_key)
            break
    else:
        return None
    if total is not None:
        # some OpenAI-compatible servers (Gemini's) leave reasoning out of completion_tokens but
        # count it in total_tokens; OpenAI's own total is exactly prompt + completion
        out = max(out, total - inp)
    cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
    usage = _usage(inp, out, cached)
    _openai_details(usage, obj, details, u.get(_OUTPUT_DETAILS[out_key]))
    return usage


def _openai_details(usage: Usage, obj: dict, details: object, out_details: object) -> None:
    """Cache writes, audio, reasoning, server-side searches and the tier served, as billed."""
    if isinstance(details, dict):
        usage.cache_write_tokens = min(_n(details.get("cache_write_tokens")), usage.input_tokens)
        usage.input_audio_tokens = min(_n(details.get("audio_tokens")), usage.input_tokens)
    if isinstance(out_details, dict):
        usage.reasoning_tokens = min(_n(out_details.get("reasoning_tokens")), usage.output_tokens)
        usage.output_audio_tokens = min(_n(out_details.get("audio_tokens")), usage.output_tokens)
    output = obj.get("output")  # a Responses object: each web search is an output item
    if isinstance(output, list):
        usage.web_search_requests = sum(
            1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call"
        )
    tier = obj.get("service_tier")
    usage.service_tier = tier if isinstance(tier, str) and tier else None


_ANTHROPIC_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)
_CONVERSE_KEYS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "cacheReadInputTokens": "cache_read_input_tokens",
    "cacheWriteInputTokens": "cache_creation_input_tokens",
}
METRICS_PARTS = {
    "inputTokenCount": "input_tokens",
    "outputTokenCount": "output_tokens",
    "cacheReadInputTokenCount": "cache_read_input_tokens",
    "cacheWriteInputTokenCount": "cache_creation_input_tokens",
}
_BEDROCK_HEADERS = {
    "x-amzn-bedrock-input-token-count": "input_tokens",
    "x-amzn-bedrock-output-token-count": "output_tokens",
    "x-amzn-bedrock-cache-read-input-token-count": "cache_read_input_tokens",
    "x-amzn-bedrock-cache-write-input-token-count": "cache_creation_input_tokens",
}
BEDROCK_TOKEN_HEADERS = frozenset(_BEDROCK_HEADERS)  # their names, lower-case
METRICS_KEY = "amazon-bedrock-invocationMetrics"

# Parts: Anthropic's split of a usage (uncached input, output, cache reads, cache writes), holding
# only the counts a message carried so that a later message can update some and keep the rest.
Parts = dict[str, int]


def pick_parts(d: Mapping[str, object], names: Mapping[str, str]) -> Parts:
    parts: Parts = {}
    for src, dst in names.items():
        v = _count(d.get(src))
        if v is not None:
            parts[dst] = v
    return parts


def anthropic_parts(obj: dict[str, object]) -> Parts:
    """The counts of a Messages body, a `message_start` (usage under message) or a `message_delta`."""
    parts: Parts = {}
    msg = obj.get("message")
    if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
        parts.update(pick_parts(msg["usage"], {k: k for k in _ANTHROPIC_KEYS}))
        parts.update(_billing_parts(msg["usage"]))
    u = obj.get("usage")
    if isinstance(u, dict):
        parts.update(pick_parts(u, {k: k for k in _ANTHROPIC_KEYS}))
        parts.update(pick_parts(u, _CONVERSE_KEYS))
        parts.update(_billing_parts(u))
    return parts


def _billing_parts(u: Mapping[str, object]) -> Parts:
    """1-hour cache writes and server-side web searches, nested in a Messages or Converse usage."""
    parts: Parts = {}
    creation = u.get("cache_creation")
    if isinstance(creation, dict):
        parts.update(pick_parts(creation, {"ephemeral_1h_input_tokens": "cache_write_1h_tokens"}))
    details = u.get("cacheDetails")  # Converse: [{"ttl": "1h", "inputTokens": n}, ...]
    if isinstance(details, list):
        parts["cache_write_1h_tokens"] = sum(
            _n(d.get("inputTokens")) for d in details if isinstance(d, dict) and d.get("ttl") == "1h"
        )
    tools = u.get("server_tool_use")
    if isinstance(tools, dict):
        parts.update(pick_parts(tools, {"web_search_requests": "web_search_requests"}))
    speed = u.get("speed")  # "fast": Claude's fast mode, billed at its own rates
    if isinstance(speed, str):
        parts["speed_fast"] = int(speed == "fast")
    return parts


def parts_usage(p: Parts) -> Usage:
    read = p.get("cache_read_input_tokens", 0)
    written = p.get("cache_creation_input_tokens", 0)
    # Anthropic and Bedrock count cache reads and writes apart from input_tokens
    usage = _usage(p.get("input_tokens", 0) + read + written, p.get("output_tokens", 0), read)
    usage.cache_write_tokens = written
    usage.cache_write_1h_tokens = min(p.get("cache_write_1h_tokens", 0), written)
    usage.web_search_requests = p.get("web_search_requests", 0)
    usage.service_tier = "fast" if p.get("speed_fast") else None
    return usage


def usage_from_anthropic(obj: object) -> Usage | None:
    """Messages API body, `message_start` or `message_delta` event (the counts that one carries)."""
    if not isinstance(obj, dict):
        return None
    parts = anthropic_parts(obj)
    return parts_usage(parts) if parts else None


def usage_from_gemini(obj: object) -> Usage | None:
    """generateContent / streamGenerateContent `usageMetadata`, camelCase or snake_case."""
    if not isinstance(obj, dict):
        return None
    m = obj.get("usageMetadata", obj.get("usage_metadata"))
    if not isinstance(m, dict):
        return None

    def get(camel: str, snake: str) -> int | None:
        v = _count(m.get(camel))
        return v if v is not None else _count(m.get(snake))

    prompt = get("promptTokenCount", "prompt_token_count")
    tool_prompt = get("toolUsePromptTokenCount", "tool_use_prompt_token_count")
    candidates = get("candidatesTokenCount", "candidates_token_count")
    thoughts = get("thoughtsTokenCount", "thoughts_token_count")
    cached = get("cachedContentTokenCount", "cached_content_token_count")
    total = get("totalTokenCount", "total_token_count")
    if prompt is None and candidates is None and total is None:
        return None
    # tool-use prompts are billed as input, thinking as output; total counts all of them
    inp = (prompt or 0) + (tool_prompt or 0)
    out = (candidates or 0) + (thoughts or 0)
    if total is not None:
        out = max(out, total - inp)
    usage = _usage(inp, out, cached or 0)
    _gemini_details(usage, obj, m, thoughts or 0)
    return usage


_GEMINI_INPUT_MODALITIES = {
    "AUDIO": "input_audio_tokens",
    "IMAGE": "input_image_tokens",
    "DOCUMENT": "input_image_tokens",
    "VIDEO": "input_video_tokens",
}
_GEMINI_OUTPUT_MODALITIES = {"AUDIO": "output_audio_tokens", "IMAGE": "output_image_tokens"}


def _gemini_details(usage: Usage, obj: dict, m: dict, thoughts: int) -> None:
    """Thinking, tokens by modality (prompt and tool-use prompt, candidates) and grounding searches."""
    usage.reasoning_tokens = min(thoughts, usage.output_tokens)
    for key, fields, total in (
        ("cacheTokensDetails", {"AUDIO": "cached_audio_tokens"}, usage.cached_tokens),
        ("promptTokensDetails", _GEMINI_INPUT_MODALITIES, usage.input_tokens),
        ("toolUsePromptTokensDetails", _GEMINI_INPUT_MODALITIES, usage.input_tokens),
        ("candidatesTokensDetails", _GEMINI_OUTPUT_MODALITIES, usage.output_tokens),
    ):
        details = m.get(key)
        for d in details if isinstance(details, list) else ():
            attr = fields.get(d.get("modality", "")) if isinstance(d, dict) else None
            if attr is not None:
                setattr(usage, attr, min(getattr(usage, attr) + _n(d.get("tokenCount")), total))
    # Google Search grounding is billed per search query the model ran
    candidates = obj.get("candidates")
    for c in candidates if isinstance(candidates, list) else ():
        grounding = c.get("groundingMetadata") if isinstance(c, dict) else None
        queries = grounding.get("webSearchQueries") if isinstance(grounding, dict) else None
        if isinstance(queries, list):
            usage.web_search_requests += len(queries)


def usage_from_ollama(obj: object) -> Usage | None:
    """Native /api/chat, /api/generate, /api/embed: counts on the final `done: true` object."""
    if not isinstance(obj, dict) or ("prompt_eval_count" not in obj and "eval_count" not in obj):
        return None
    return Usage(_n(obj.get("prompt_eval_count")), _n(obj.get("eval_count")), 0)


def usage_from_bedrock(obj: object) -> Usage | None:
    """An InvokeModel (Anthropic) body or event, a Converse body or `metadata` event.

    `amazon-bedrock-invocationMetrics`, Bedrock's own count, wins over the model's usage for the
    counts it carries.
    """
    if not isinstance(obj, dict):
        return None
    parts = anthropic_parts(obj)
    metrics = obj.get(METRICS_KEY)
    if isinstance(metrics, dict):
        parts.update(pick_parts(metrics, METRICS_PARTS))
    return parts_usage(parts) if parts else None


def _header_parts(headers: Mapping[str, str]) -> Parts:
    # names first, a value only for Bedrock's: mitmproxy's Headers.items() looks every name up
    # again (a scan of all headers each), on every proxied response
    parts: Parts = {}
    for name in headers:
        key = _BEDROCK_HEADERS.get(name.lower())
        if key is not None:
            raw = headers[name]
            if raw is not None and raw.strip().isdigit():
                parts[key] = int(raw)  # of two spellings of one name, the last (as dict() keeps)
    return parts


def usage_from_bedrock_headers(headers: Mapping[str, str]) -> Usage | None:
    """`x-amzn-bedrock-input-token-count` and friends on a non-streamed InvokeModel response."""
    parts = _header_parts(headers)
    return parts_usage(parts) if parts else None


def usage_from(wire: str, obj: object) -> Usage | None:
    """The usage one decoded JSON object of `wire` carries, or None."""
    if wire == "openai":
        return usage_from_openai(obj)
    if wire == "anthropic":
        return usage_from_anthropic(obj)
    if wire == "gemini":
        return usage_from_gemini(obj)
    if wire == "bedrock":
        return usage_from_bedrock(obj)
    if wire == "ollama":
        # Ollama also serves the OpenAI shape on /v1
        return usage_from_ollama(obj) or usage_from_openai(obj)
    raise ValueError(f"unknown wire format {wire!r}")


def load_json(text: str | bytes) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
