"""Usage: tokens read from each provider's wire format, JSON and streams alike."""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from candela_mitm.providers.eventstream import EventMessage, EventStreamDecoder, EventStreamError
from candela_mitm.providers.sse import SseParser


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


WIRES = ("openai", "anthropic", "gemini", "bedrock", "ollama")
MAX_BODY = 32 * 1024 * 1024  # the most of one body (or one stream line/element) held in memory
_TAIL = 256 * 1024  # past MAX_BODY a JSON body keeps only its end, where every format puts usage


def _count(value: object) -> int | None:
    """A token count as sent, or None when absent, null or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
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
    _openai_details(usage, obj, details, u.get(out_key.replace("_tokens", "_tokens_details")))
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
_METRICS_KEYS = {
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
METRICS_KEY = "amazon-bedrock-invocationMetrics"

# Parts: Anthropic's split of a usage (uncached input, output, cache reads, cache writes), holding
# only the counts a message carried so that a later message can update some and keep the rest.
Parts = dict[str, int]


def _pick(d: Mapping[str, object], names: Mapping[str, str]) -> Parts:
    parts: Parts = {}
    for src, dst in names.items():
        v = _count(d.get(src))
        if v is not None:
            parts[dst] = v
    return parts


def _anthropic_parts(obj: dict[str, object]) -> Parts:
    """The counts of a Messages body, a `message_start` (usage under message) or a `message_delta`."""
    parts: Parts = {}
    msg = obj.get("message")
    if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
        parts.update(_pick(msg["usage"], {k: k for k in _ANTHROPIC_KEYS}))
        parts.update(_billing_parts(msg["usage"]))
    u = obj.get("usage")
    if isinstance(u, dict):
        parts.update(_pick(u, {k: k for k in _ANTHROPIC_KEYS}))
        parts.update(_pick(u, _CONVERSE_KEYS))
        parts.update(_billing_parts(u))
    return parts


def _billing_parts(u: Mapping[str, object]) -> Parts:
    """1-hour cache writes and server-side web searches, nested in a Messages or Converse usage."""
    parts: Parts = {}
    creation = u.get("cache_creation")
    if isinstance(creation, dict):
        parts.update(_pick(creation, {"ephemeral_1h_input_tokens": "cache_write_1h_tokens"}))
    details = u.get("cacheDetails")  # Converse: [{"ttl": "1h", "inputTokens": n}, ...]
    if isinstance(details, list):
        parts["cache_write_1h_tokens"] = sum(
            _n(d.get("inputTokens")) for d in details if isinstance(d, dict) and d.get("ttl") == "1h"
        )
    tools = u.get("server_tool_use")
    if isinstance(tools, dict):
        parts.update(_pick(tools, {"web_search_requests": "web_search_requests"}))
    speed = u.get("speed")  # "fast": Claude's fast mode, billed at its own rates
    if isinstance(speed, str):
        parts["speed_fast"] = int(speed == "fast")
    return parts


def _parts_usage(p: Parts) -> Usage:
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
    parts = _anthropic_parts(obj)
    return _parts_usage(parts) if parts else None


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
    parts = _anthropic_parts(obj)
    metrics = obj.get(METRICS_KEY)
    if isinstance(metrics, dict):
        parts.update(_pick(metrics, _METRICS_KEYS))
    return _parts_usage(parts) if parts else None


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
    return _parts_usage(parts) if parts else None


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


# ---------------------------------------------------------------------------------------------
# Whether a decoded object carries output, and which error it reports


def _truthy_except(d: object, ignore: tuple[str, ...]) -> bool:
    return isinstance(d, dict) and any(v for k, v in d.items() if k not in ignore)


def _openai_has_output(obj: dict[str, object]) -> bool:
    kind = obj.get("type")
    if isinstance(kind, str) and kind.endswith(".delta"):
        return True  # response.output_text.delta, response.function_call_arguments.delta, ...
    choices = obj.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if not isinstance(c, dict):
                continue
            if _truthy_except(c.get("delta"), ("role",)) or c.get("text"):
                return True
            if _truthy_except(c.get("message"), ("role", "refusal", "annotations")):
                return True
    if obj.get("object") == "response":
        return bool(obj.get("output"))
    return obj.get("object") == "list" and bool(obj.get("data"))  # embeddings


def _gemini_has_output(obj: dict[str, object]) -> bool:
    cands = obj.get("candidates")
    if not isinstance(cands, list):
        return False
    for c in cands:
        content = c.get("content") if isinstance(c, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list) and any(_truthy_except(p, ("thoughtSignature",)) for p in parts):
            return True
    return False


def _ollama_has_output(obj: dict[str, object]) -> bool:
    if obj.get("response") or obj.get("thinking") or obj.get("embeddings"):
        return True
    return _truthy_except(obj.get("message"), ("role",)) or _openai_has_output(obj)


def _anthropic_has_output(obj: dict[str, object], event: str) -> bool:
    kind = obj.get("type")
    if kind == "content_block_delta" or event == "contentBlockDelta":
        return True
    if kind == "message":
        return bool(obj.get("content"))
    out = obj.get("output")  # a Converse body
    msg = out.get("message") if isinstance(out, dict) else None
    return isinstance(msg, dict) and bool(msg.get("content"))


def _error_text(obj: dict[str, object]) -> str | None:
    err = obj.get("error")
    if err is None and obj.get("type") == "response.failed":
        resp = obj.get("response")
        err = resp.get("error") if isinstance(resp, dict) else None
    if isinstance(err, str) and err:
        return err
    if isinstance(err, dict):
        kind = err.get("type") or err.get("status") or err.get("code")
        msg = err.get("message")
        if kind and msg:
            return f"{kind}: {msg}"
        return str(msg or kind or "error")
    return None


def _live_key(text: str, key: str) -> bool:
    """A cheap look at a chunk: does `key` occur with a value other than null?

    A false positive only costs a JSON parse; there are no false negatives for JSON a provider
    writes (the key unescaped, as every encoder writes it).
    """
    i = text.find(key)
    while i >= 0:
        j = i + len(key)
        rest = text[j : j + 24].lstrip()
        if rest.startswith(":") and not rest[1:].lstrip().startswith("null"):
            return True
        i = text.find(key, j)
    return False


def _loads(text: str | bytes) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------
# Observed output: tokens counted from a stream's text as it passes, for when no usage comes


OBSERVED_CHARS_PER_TOKEN = 4  # as tokenisers average for English; a count, never a bill alone
# The string values that carry generated output in each wire's incremental events: text, tool-call
# arguments, thinking. One regex pass over a document's text, no JSON parse: O(bytes). Measured
# on an OpenAI chat stream (230-byte chunks): the meter costs 5.2-5.4 us a chunk with the count,
# 3.5 us without it.
_OUTPUT_VALUE = re.compile(
    r'"(?:text|content|partial_json|arguments|thinking|reasoning_content|reasoning|delta|'
    r'response|input)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
_RESPONSES_EVENT = re.compile(r'"type"\s*:\s*"response\.([\w.]*)"')


class OutputCounter:
    """Output tokens seen in a stream's incremental events, estimated from their text.

    Used when a stream ends without its usage (cut by the client or the upstream): the request
    is then charged at least for what passed. Only incremental events count (an OpenAI chunk, a
    Responses `*.delta`, an Anthropic `content_block_delta`, a Gemini or Ollama chunk), never
    the summaries that repeat the text (`response.completed`, `*.done`). Each event with text
    counts at least one token.
    """

    __slots__ = ("wire", "tokens")

    def __init__(self, wire: str) -> None:
        self.wire = wire
        self.tokens = 0

    def see(self, text: str, event: str = "") -> None:
        if self.wire in ("anthropic", "bedrock"):
            if event not in ("content_block_delta", "contentBlockDelta") and (
                "content_block_delta" not in text
            ):
                return
        elif self.wire == "openai" and '"response.' in text:
            m = _RESPONSES_EVENT.search(text)
            if m is None or not m.group(1).endswith("delta"):
                return
        chars = 0
        for m in _OUTPUT_VALUE.finditer(text):
            chars += m.end(1) - m.start(1)
        if chars:
            self.tokens += -(-chars // OBSERVED_CHARS_PER_TOKEN)


# ---------------------------------------------------------------------------------------------
# Readers: how the decoded documents of one wire add up to one usage


class _Reader(ABC):
    def __init__(self, wire: str) -> None:
        self.saw_output = False
        self.error: str | None = None
        self.observed = OutputCounter(wire)

    def take(self, text: str, event: str = "") -> None:
        """One document's JSON text (an SSE data field, an NDJSON line, an array element)."""
        self.observed.see(text, event)
        self._take(text, event)

    @abstractmethod
    def _take(self, text: str, event: str = "") -> None: ...

    @property
    @abstractmethod
    def reported(self) -> bool:
        """Has the answer reported its whole usage (not only a first part of it)?"""

    @abstractmethod
    def take_obj(self, obj: object, event: str = "") -> None:
        """One document already decoded."""

    @abstractmethod
    def usage(self) -> Usage | None:
        """What the documents taken so far add up to (None: they said nothing of usage)."""

    def _note_error(self, obj: dict[str, object]) -> None:
        if self.error is None:
            self.error = _error_text(obj)


class _LastWinsReader(_Reader):
    """OpenAI, Gemini, Ollama: each document that carries usage carries all of it; the last wins.

    After the first output, chunks are not parsed as they pass: one whose bytes may carry usage
    is kept (the newest few) and parsed only when the usage is read.
    """

    def __init__(
        self,
        wire: str,
        extract: Callable[[object], Usage | None],
        has_output: Callable[[dict[str, object]], bool],
        carries_usage: Callable[[str], bool],
    ) -> None:
        super().__init__(wire)
        self._extract = extract
        self._has_output = has_output
        self._carries = carries_usage
        self._usage: Usage | None = None
        self._pending: deque[str] = deque(maxlen=4)  # newest last; older ones cover a bad newest

    def _take(self, text: str, event: str = "") -> None:
        if self.saw_output and not _live_key(text, '"error"'):
            if self._carries(text):
                self._pending.append(text)
            return
        obj = _loads(text)
        if obj is not None:
            self.take_obj(obj, event)

    def take_obj(self, obj: object, event: str = "") -> None:
        if not isinstance(obj, dict):
            return
        if not self.saw_output and self._has_output(obj):
            self.saw_output = True
        self._note_error(obj)
        u = self._extract(obj)
        if u is not None:
            self._usage = u
            self._pending.clear()

    @property
    def reported(self) -> bool:
        return self.usage() is not None  # each document that carries usage carries all of it

    def usage(self) -> Usage | None:
        while self._pending:
            u = self._extract(_loads(self._pending.pop()))
            if u is not None:
                self._usage = u
                self._pending.clear()
        return self._usage


_ANTHROPIC_SKIP = frozenset({"content_block_delta", "ping", "contentBlockDelta"})


class _AnthropicReader(_Reader):
    """Anthropic and Bedrock: `message_start` brings input, `message_delta` the cumulative output.

    Each count keeps its latest value (never a sum); Bedrock's invocationMetrics override the
    counts they carry.
    """

    def __init__(self, wire: str) -> None:
        super().__init__(wire)
        self._parts: Parts = {}
        self._metrics: Parts = {}
        self._final = False  # a count past `message_start`'s first one has come

    @property
    def reported(self) -> bool:
        return self._final

    def _take(self, text: str, event: str = "") -> None:
        if self.saw_output:
            if event in _ANTHROPIC_SKIP:
                return
            if not event and not (
                _live_key(text, '"usage"')
                or _live_key(text, '"error"')
                or "invocationMetrics" in text
            ):
                return
        obj = _loads(text)
        if obj is not None:
            self.take_obj(obj, event)

    def take_obj(self, obj: object, event: str = "") -> None:
        if not isinstance(obj, dict):
            return
        if not self.saw_output and _anthropic_has_output(obj, event):
            self.saw_output = True
        self._note_error(obj)
        self._parts.update(_anthropic_parts(obj))
        # message_start carries the input and a first output count; the whole usage comes at
        # the top level (message_delta, a Messages or Converse body, Converse's metadata)
        if isinstance(obj.get("usage"), dict):
            self._final = True
        metrics = obj.get(METRICS_KEY)
        if isinstance(metrics, dict):
            self._metrics.update(_pick(metrics, _METRICS_KEYS))
            self._final = True

    def usage(self) -> Usage | None:
        if not self._parts and not self._metrics:
            return None
        return _parts_usage({**self._parts, **self._metrics})


def _reader_for(wire: str) -> _Reader:
    if wire == "openai":
        return _LastWinsReader(
            wire,
            usage_from_openai, _openai_has_output, lambda t: _live_key(t, '"usage"')
        )
    if wire == "gemini":
        return _LastWinsReader(
            wire,
            usage_from_gemini,
            _gemini_has_output,
            lambda t: "usageMetadata" in t or "usage_metadata" in t,
        )
    if wire == "ollama":
        return _LastWinsReader(
            wire,
            lambda o: usage_from_ollama(o) or usage_from_openai(o),
            _ollama_has_output,
            lambda t: "eval_count" in t or _live_key(t, '"usage"'),
        )
    if wire in ("anthropic", "bedrock"):
        return _AnthropicReader(wire)
    raise ValueError(f"unknown wire format {wire!r}; expected one of {', '.join(WIRES)}")


# ---------------------------------------------------------------------------------------------
# Meters: the framing of a response body (SSE, NDJSON, AWS event stream, JSON)


class UsageMeter(ABC):
    """Reads one response's usage as its body passes. feed() never raises; usage reads any time.

    `usage` is what the body has shown so far (the response headers' counts when it shows
    none), so a stream cut short still settles on the tokens it carried.
    """

    def __init__(self, reader: _Reader, fallback: Usage | None = None) -> None:
        self._reader = reader
        self._fallback = fallback
        self._finished = False
        self.fault: str | None = None  # why the meter stopped reading the body, if it did

    @property
    def saw_output(self) -> bool:
        """True once the first output content (a token, a tool call, a body with content) passed."""
        return self._reader.saw_output

    @property
    def error(self) -> str | None:
        """The first error the provider reported inside the body or stream."""
        return self._reader.error

    @property
    def reported(self) -> bool:
        """Did the answer report its whole usage? False: none, or a first part only (a stream
        cut after Anthropic's `message_start`), and `usage` is what passed."""
        return self._fallback is not None or self._reader.reported

    @property
    def observed_output(self) -> int:
        """Output tokens estimated from the streamed text that passed (OutputCounter)."""
        return self._reader.observed.tokens

    @property
    def usage(self) -> Usage:
        u = self._reader.usage() or self._fallback
        return replace(u) if u else Usage()

    def feed(self, data: bytes) -> None:
        if not data or self._finished or self.fault is not None:
            return
        try:
            self._feed(bytes(data))
        except Exception as e:  # metering must never break the response it watches
            self.fault = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        """The body ended: read what a last unterminated event or the buffered JSON holds."""
        if self._finished:
            return
        self._finished = True
        if self.fault is not None:
            return
        try:
            self._finish()
        except Exception as e:
            self.fault = f"{type(e).__name__}: {e}"

    @abstractmethod
    def _feed(self, data: bytes) -> None:
        """Read the next bytes of the body (may raise: feed() turns that into a fault)."""

    def _finish(self) -> None:  # noqa: B027 - a hook: most meters read everything in _feed
        """The body ended: read what is left over (a last unterminated event, a buffered body)."""


class _SseMeter(UsageMeter):
    def __init__(self, reader: _Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._parser = SseParser(max_buffer=max_body)

    def _feed(self, data: bytes) -> None:
        for ev in self._parser.feed(data):
            self._take(ev.data, ev.event)

    def _finish(self) -> None:
        for ev in self._parser.flush():
            self._take(ev.data, ev.event)

    def _take(self, data: str, event: str) -> None:
        if data and data != "[DONE]":
            self._reader.take(data, event)


class _NdjsonMeter(UsageMeter):
    def __init__(self, reader: _Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._buf = bytearray()
        self._max = max_body

    def _feed(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            if len(self._buf) > self._max:
                self._buf.clear()  # a line past the bound: its rest will not parse and is skipped
            return
        lines = bytes(self._buf[:end])
        del self._buf[: end + 1]
        for line in lines.split(b"\n"):
            self._take(line)

    def _finish(self) -> None:
        self._take(bytes(self._buf))
        self._buf.clear()

    def _take(self, line: bytes) -> None:
        line = line.strip()
        if line:
            self._reader.take(line.decode("utf-8", "replace"))


class _EventStreamMeter(UsageMeter):
    """Bedrock's invoke-with-response-stream (base64 model events) and converse-stream."""

    def __init__(self, reader: _Reader, fallback: Usage | None) -> None:
        super().__init__(reader, fallback)
        self._decoder = EventStreamDecoder()

    def _feed(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except EventStreamError as e:
            for m in e.messages:
                self._take(m)
            self.fault = str(e)
            return
        for m in messages:
            self._take(m)

    def _finish(self) -> None:
        if self._decoder.pending:
            self.fault = f"event stream cut mid-message ({self._decoder.pending} bytes)"

    def _take(self, m: EventMessage) -> None:
        kind = m.headers.get(":message-type")
        if kind in ("exception", "error"):
            if self._reader.error is None:
                name = m.headers.get(":exception-type") or m.headers.get(":error-code") or kind
                obj = _loads(m.payload)
                msg = None
                if isinstance(obj, dict):
                    msg = obj.get("message") or obj.get("Message")
                self._reader.error = f"{name}: {msg}" if msg else str(name)
            return
        event = str(m.headers.get(":event-type") or "")
        if event == "chunk" or m.payload.startswith(_CHUNK_PREFIX):
            inner = _chunk_bytes(m.payload)
            if inner is not None:
                self._reader.take(inner.decode("utf-8", "replace"))
        else:
            # converse-stream: the event type names the event, the payload is its JSON
            self._reader.take(m.payload.decode("utf-8", "replace"), event)


_CHUNK_PREFIX = b'{"bytes":"'


def _chunk_bytes(payload: bytes) -> bytes | None:
    """The model event inside an invoke-with-response-stream chunk `{"bytes": "<base64>"}`."""
    if payload.startswith(_CHUNK_PREFIX):
        # the usual shape: slice the base64 out instead of parsing the wrapper
        end = payload.find(b'"', len(_CHUNK_PREFIX))
        try:
            return base64.b64decode(payload[len(_CHUNK_PREFIX) : end], validate=True)
        except (ValueError, binascii.Error):
            pass  # an escaped character or an odd wrapper: parse it properly below
    obj = _loads(payload)
    b64 = obj.get("bytes") if isinstance(obj, dict) else None
    if not isinstance(b64, str):
        return None
    try:
        return base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error):
        return None


class _JsonArrayScanner:
    """Cuts a top-level JSON array into its elements' text as each one closes.

    Gemini's streamGenerateContent without alt=sse streams such an array. Only structural
    characters are visited (a regex jumps over the rest), so the cost stays linear.
    """

    _SPECIAL = re.compile(rb'[{}\[\]"\\]')

    def __init__(self, max_element: int) -> None:
        self._buf = bytearray()
        self._max = max_element
        self._scan = 0  # where the next scan starts
        self._depth = 0  # 1 inside the top-level array
        self._in_str = False
        self._skip = -1  # the position of a character escaped by a backslash
        self._start = -1  # where the element being read starts

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        cut = 0
        for m in self._SPECIAL.finditer(self._buf, self._scan):
            i = m.start()
            if i == self._skip:
                continue
            c = self._buf[i]
            if self._in_str:
                if c == 0x5C:  # backslash
                    self._skip = i + 1
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 1:
                    self._start = i
                self._depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 1 and self._start >= 0:
                    out.append(bytes(self._buf[self._start : i + 1]))
                    self._start = -1
                    cut = i + 1
        self._scan = len(self._buf)
        if self._start < 0:
            cut = len(self._buf)  # between elements: nothing to keep
        elif self._start > cut:
            cut = self._start
        if cut:
            del self._buf[:cut]
            self._scan -= cut
            self._skip -= cut
            if self._start >= 0:
                self._start -= cut
        if len(self._buf) > self._max:
            raise ValueError(f"a JSON array element is larger than {self._max} bytes")
        return out


_BODY_MARKERS = (b'"usage', b"eval_count", b"invocationMetrics")


class _JsonBodyMeter(UsageMeter):
    """A body read whole at the end: a JSON object, or a JSON array read element by element."""

    def __init__(self, reader: _Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._max = max_body
        self._buf = bytearray()
        self._tail: bytearray | None = None  # past max_body: only the end of the body
        self._array: _JsonArrayScanner | None = None
        self._sniffed = False
        self._marked = False  # a usage key has been seen in the body
        self._seen = 0
        self._parsed_at = -1

    def _feed(self, data: bytes) -> None:
        self._seen += len(data)
        if self._array is not None:
            self._take_elements(data)
        elif self._tail is not None:
            self._tail += data
            self._mark(self._tail, len(data))
            if len(self._tail) > 2 * _TAIL:
                del self._tail[:-_TAIL]
        else:
            self._buf += data
            self._mark(self._buf, len(data))
            if not self._sniffed:
                first = self._buf.lstrip()[:1]
                if not first:
                    return
                self._sniffed = True
                if first == b"[":
                    self._array = _JsonArrayScanner(self._max)
                    buffered = bytes(self._buf)
                    self._buf.clear()
                    self._take_elements(buffered)
                    return
            if len(self._buf) > self._max:
                self._tail = bytearray(self._buf[-_TAIL:])
                self._buf = bytearray()

    def _mark(self, buf: bytearray, added: int) -> None:
        # until a usage key has passed, a read before the end has nothing new to parse
        if not self._marked:
            window = bytes(buf[-(added + 32) :])
            self._marked = any(m in window for m in _BODY_MARKERS)

    def _take_elements(self, data: bytes) -> None:
        assert self._array is not None
        for element in self._array.feed(data):
            self._reader.take(element.decode("utf-8", "replace"))

    def _finish(self) -> None:
        self._parse()

    def _read_now(self) -> None:
        if not self._finished and self.fault is None and self._marked:
            try:
                self._parse()
            except Exception as e:
                self.fault = f"{type(e).__name__}: {e}"

    @property
    def usage(self) -> Usage:
        self._read_now()
        return super().usage

    @property
    def reported(self) -> bool:
        self._read_now()
        return super().reported

    def _parse(self) -> None:
        if self._array is not None or self._seen == self._parsed_at:
            return
        self._parsed_at = self._seen
        if self._tail is not None:
            self._reader.saw_output = True  # a body past the bound carries output
            docs = _salvage(bytes(self._tail))
        else:
            docs = _documents(bytes(self._buf)) or _salvage(bytes(self._buf))
        for doc in docs:
            self._reader.take_obj(doc)


def _documents(body: bytes) -> list[object]:
    """Every whole JSON document in a body: one object, an array's elements, NDJSON, or SSE."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return []
    obj = _loads(text)
    if obj is not None:
        return obj if isinstance(obj, list) else [obj]
    if text.startswith(("data:", "event:", ":")):
        parser = SseParser(max_buffer=len(body) + 1)
        events = parser.feed(body) + parser.flush()
        found = (_loads(ev.data) for ev in events if ev.data and ev.data != "[DONE]")
        return [o for o in found if o is not None]
    # a cut-off array or a run of documents: everything up to the first one that does not parse
    decoder = json.JSONDecoder()
    docs: list[object] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n[,]":
            i += 1
        if i >= n:
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            break
        docs.append(obj)
    return docs


_USAGE_VALUE = re.compile(r'"(usage|usageMetadata|usage_metadata|' + METRICS_KEY + r')"\s*:\s*\{')
_OLLAMA_COUNT = re.compile(r'"(prompt_eval_count|eval_count)"\s*:\s*(\d+)')


def _salvage(body: bytes) -> list[object]:
    """The usage objects found in part of a JSON body (its end, or a prefix of it)."""
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    found: dict[str, object] = {}
    for m in _USAGE_VALUE.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, m.end() - 1)
        except ValueError:
            continue
        found[m.group(1)] = value  # the last complete one of each key
    for m in _OLLAMA_COUNT.finditer(text):
        found[m.group(1)] = int(m.group(2))
    return [found] if found else []


def _media_type(content_type: str | None, headers: Mapping[str, str] | None) -> str:
    if content_type is None and headers is not None:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    return (content_type or "").split(";", 1)[0].strip().lower()


_NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)


def meter_for(
    wire: str,
    stream: bool,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    max_body: int = MAX_BODY,
) -> UsageMeter:
    """The meter for one response of `wire`, chosen by its content type (then by `stream`).

    `headers` are the response headers: their content type is used when `content_type` is None,
    and Bedrock's token-count headers are the usage until the body shows one.
    """
    reader = _reader_for(wire)
    parts = _header_parts(headers) if headers is not None else {}
    fallback = _parts_usage(parts) if parts else None
    media = _media_type(content_type, headers)
    if media == "text/event-stream":
        return _SseMeter(reader, fallback, max_body)
    if media == "application/vnd.amazon.eventstream":
        return _EventStreamMeter(reader, fallback)
    if media in _NDJSON_TYPES or (wire == "ollama" and stream):
        return _NdjsonMeter(reader, fallback, max_body)
    if stream and not media:
        if wire == "bedrock":
            return _EventStreamMeter(reader, fallback)
        return _SseMeter(reader, fallback, max_body)
    return _JsonBodyMeter(reader, fallback, max_body)


# ---------------------------------------------------------------------------------------------
# Asynchronous jobs (providers/catalogue: the `job` of an async or job_result row): the id a
# creation answer names, and the usage of a result once the job is over


# the statuses after which a job's usage no longer changes, by kind
_JOB_FINAL = {
    # a Response: https://platform.openai.com/docs/api-reference/responses/object (status)
    "openai.response": frozenset({"completed", "incomplete", "failed", "cancelled"}),
    # an Assistants run: https://platform.openai.com/docs/api-reference/runs/object (status)
    "openai.run": frozenset({"completed", "incomplete", "failed", "cancelled", "expired"}),
    # an OpenAI batch: https://platform.openai.com/docs/api-reference/batch/object (status)
    "openai.batch": frozenset({"completed", "failed", "expired", "cancelled"}),
    # a Gemini batch: the long-running operation's metadata.state (GenerateContentBatch)
    "gemini.batch": frozenset(
        {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
         "BATCH_STATE_EXPIRED"}
    ),
}
# batches are billed at the provider's batch price (where genai-prices knows one)
BATCH_JOBS = frozenset({"openai.batch", "gemini.batch", "anthropic.batch"})
MAX_JOB_ID = 256


def job_id_from(kind: str, obj: object) -> str | None:
    """The job's id in its creation answer (a Response's, a run's or a Message Batch's `id`;
    the `batches/<id>` name of a Gemini batch operation, as its GET names it: after `batches/`)."""
    if (kind not in _JOB_FINAL and kind != "anthropic.batch") or not isinstance(obj, dict):
        return None
    if kind == "gemini.batch":
        name = obj.get("name")
        if not isinstance(name, str) or not name.startswith("batches/"):
            return None
        job_id: object = name[len("batches/") :]
    else:
        job_id = obj.get("id")
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID or "/" in job_id:
        return None
    return job_id


def job_final_usage(kind: str, obj: object) -> Usage | None:
    """The usage of a job's result once the job is over (a final status, its usage reported);
    None while it is queued or running, or when it ended without a usage."""
    final = _JOB_FINAL.get(kind)
    if final is None or not isinstance(obj, dict):
        return None
    if kind == "gemini.batch":
        return _gemini_batch_usage(obj, final)
    if obj.get("status") not in final:
        return None
    return usage_from_openai(obj)


def _gemini_batch_usage(op: dict[str, object], final: frozenset[str]) -> Usage | None:
    """A Gemini batch operation: the sum of its inlined responses' usageMetadata once its state
    is final. A batch whose results went to a file carries none here: None."""
    meta = op.get("metadata")
    if not isinstance(meta, dict) or meta.get("state") not in final:
        return None
    output = meta.get("output")
    if not isinstance(output, dict):
        response = op.get("response")
        output = response if isinstance(response, dict) else {}
    inlined = output.get("inlinedResponses")
    items = inlined.get("inlinedResponses") if isinstance(inlined, dict) else None
    if not isinstance(items, list):
        return None
    total = Usage()
    seen = False
    for item in items:
        resp = item.get("response") if isinstance(item, dict) else None
        u = usage_from_gemini(resp) if resp is not None else None
        if u is not None:
            seen = True
            total = Usage(
                total.input_tokens + u.input_tokens,
                total.output_tokens + u.output_tokens,
                total.cached_tokens + u.cached_tokens,
            )
    return total if seen else None


MAX_BATCH_RESULT_LINES = 200_000  # twice Anthropic's most requests per batch


def batch_results_usage(raw: bytes) -> list[tuple[str | None, Usage]] | None:
    """An Anthropic Message Batch's results (`.jsonl`, one line per request): the model and
    usage of every `succeeded` result (errored, canceled and expired requests are not billed).
    None when the body is not such a file (no line parses as a result)."""
    out: list[tuple[str | None, Usage]] = []
    results = 0
    for n, line in enumerate(raw.splitlines()):
        if n >= MAX_BATCH_RESULT_LINES:
            return None  # more lines than any batch holds: not read, the job stays as charged
        if not line.strip():
            continue
        obj = _loads(line)
        result = obj.get("result") if isinstance(obj, dict) else None
        if not isinstance(result, dict):
            continue
        results += 1
        message = result.get("message")
        if result.get("type") != "succeeded" or not isinstance(message, dict):
            continue
        u = usage_from_anthropic(message)
        if u is not None:
            model = message.get("model")
            out.append((model if isinstance(model, str) and model else None, u))
    return out if results else None


def batch_output_usage(raw: bytes) -> list[tuple[str | None, Usage]] | None:
    """An OpenAI batch's output file (`.jsonl`, one line per request that ran): the model and
    usage of every answer with status 200 (failed requests are in the error file, unbilled).
    None when the body is not such a file."""
    out: list[tuple[str | None, Usage]] = []
    lines = 0
    for n, line in enumerate(raw.splitlines()):
        if n >= MAX_BATCH_RESULT_LINES:
            return None
        if not line.strip():
            continue
        obj = _loads(line)
        response = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(response, dict):
            continue
        lines += 1
        body = response.get("body")
        if response.get("status_code") != 200 or not isinstance(body, dict):
            continue
        u = usage_from_openai(body)
        if u is not None:
            model = body.get("model")
            out.append((model if isinstance(model, str) and model else None, u))
    return out if lines else None
