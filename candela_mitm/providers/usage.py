"""Usage: tokens read from each provider's wire format, one JSON document or a stream's documents
added up (the framing of a body is providers/meters.py, a job's answers providers/jobs.py)."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
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


WIRES = ("openai", "anthropic", "gemini", "bedrock", "ollama")


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


def load_json(text: str | bytes) -> object | None:
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


class Reader(ABC):
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


class _LastWinsReader(Reader):
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
        obj = load_json(text)
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
            u = self._extract(load_json(self._pending.pop()))
            if u is not None:
                self._usage = u
                self._pending.clear()
        return self._usage


_ANTHROPIC_SKIP = frozenset({"content_block_delta", "ping", "contentBlockDelta"})


class _AnthropicReader(Reader):
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
        obj = load_json(text)
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


def reader_for(wire: str) -> Reader:
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
