"""Readers: how the decoded documents of one wire add up to one usage, whether they carried output,
and the error they reported."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from candela_mitm.providers.observed import OutputCounter
from candela_mitm.providers.usage import (
    METRICS_KEY,
    METRICS_PARTS,
    WIRES,
    Parts,
    Usage,
    anthropic_parts,
    load_json,
    parts_usage,
    pick_parts,
    usage_from_gemini,
    usage_from_ollama,
    usage_from_openai,
)

# ---------------------------------------------------------------------------------------------
# Whether a decoded object carries output, and which error it reports


def _truthy_except(d: object, ignore: tuple[str, ...]) -> bool:
    # any(v for k, v in d.items() if k not in ignore), without a generator's frame per call
    if isinstance(d, dict):
        for k, v in d.items():
            if v and k not in ignore:
                return True
    return False


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


def live_key(text: str, key: str) -> bool:
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
        if self.saw_output and not live_key(text, '"error"'):
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
                live_key(text, '"usage"')
                or live_key(text, '"error"')
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
        self._parts.update(anthropic_parts(obj))
        # message_start carries the input and a first output count; the whole usage comes at
        # the top level (message_delta, a Messages or Converse body, Converse's metadata)
        if isinstance(obj.get("usage"), dict):
            self._final = True
        metrics = obj.get(METRICS_KEY)
        if isinstance(metrics, dict):
            self._metrics.update(pick_parts(metrics, METRICS_PARTS))
            self._final = True

    def usage(self) -> Usage | None:
        if not self._parts and not self._metrics:
            return None
        return parts_usage({**self._parts, **self._metrics})


def reader_for(wire: str) -> Reader:
    if wire == "openai":
        return _LastWinsReader(
            wire,
            usage_from_openai, _openai_has_output, lambda t: live_key(t, '"usage"')
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
            lambda t: "eval_count" in t or live_key(t, '"usage"'),
        )
    if wire in ("anthropic", "bedrock"):
        return _AnthropicReader(wire)
    raise ValueError(f"unknown wire format {wire!r}; expected one of {', '.join(WIRES)}")
