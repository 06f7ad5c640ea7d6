"""Cost estimates: the most a request can cost, reserved before it is forwarded.

The reservation is an upper bound of what the provider can bill (issue 18): every output token
the request allows (times the completions it asks for), every input token it sends or refers
to, each at the dearest rate it may be billed at. One pass over the decoded body: O(body bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from candela_mitm.providers.pricing import ModelPrice

CHARS_PER_TOKEN = 3  # conservative: real tokenisers average ~4 chars per token for English
IMAGE_TOKENS = 1600  # an image part, whatever its encoding (a generous upper bound per image)
# Media counted by size. Upper bounds at low bitrates: Gemini bills audio at 32 tokens a second
# (at 4 kbit/s, 1 token per 16 bytes) and video at ~300 a second (at 20 kbit/s, 1 per 8 bytes);
# a document page is billed as its text plus an image, and compressed text holds about 3
# characters per byte: 1 token per byte covers both. Base64 carries 3 bytes per 4 characters.
BYTES_PER_TOKEN = {"audio": 16, "video": 8, "document": 1}
# A server-side search tool with no stated max_uses: the searches reserved for it.
UNBOUNDED_SEARCHES = 10
# A body this large is rate limited from its head, before it is read (addons/ratelimit.py), and
# scanned in slices (addons/router.py): work that grows with a body waits for the rate limit,
# and then does not hold the loop.
LARGE_BODY_BYTES = 256 * 1024
# Referenced context of a model whose context window Candela does not know.
UNKNOWN_CONTEXT_TOKENS = 1_048_576

_MIME_KEYS = ("mimeType", "mime_type", "media_type")
# context the request points at instead of sending it (Responses, Gemini context caches)
_REFERENCE_KEYS = ("previous_response_id", "conversation", "cachedContent", "cached_content")
# files sent by reference (an uploaded file id, a URI): their size is not in the body
_FILE_REF_KEYS = ("file_id", "fileUri", "file_uri")
_REFERENCE_OR_FILE_KEYS = frozenset(_REFERENCE_KEYS + _FILE_REF_KEYS)
_BEDROCK_BLOCKS = ("image", "document", "video", "audio")
_MAX_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "num_predict")
_SEARCH_TOOLS = ("web_search", "google_search", "googleSearch", "googleSearchRetrieval")

# every key _scan_dict looks for before it walks a dict's items: a dict with none of them is
# only walked (one C-level pass instead of some twenty probes)
_PROBED = frozenset(
    {"type", "data", "format", "cache_control", "cachePoint"}
    | set(_MIME_KEYS) | set(_BEDROCK_BLOCKS) | set(_SEARCH_TOOLS)
)


@dataclass
class BodyScan:
    """What one pass over a request body found."""

    chars: int = 0
    images: int = 0
    media_tokens: int = 0  # audio, video and documents, counted by their size
    references: bool = False  # context referred to, not sent
    caching: bool = False  # the request marks content for the prompt cache
    searches: int = 0

    def input_tokens(self) -> int:
        return math.ceil(self.chars / CHARS_PER_TOKEN) + self.images * IMAGE_TOKENS + self.media_tokens


def _kind(mime: str) -> str:
    mime = mime.lower()
    if mime.startswith("image/"):
        return "image"
    if mime.startswith("audio/") or mime in ("wav", "mp3", "pcm16", "flac", "opus", "aac"):
        return "audio"
    if mime.startswith("video/"):
        return "video"
    return "document"


def _media_tokens(kind: str, encoded_len: int) -> int:
    return math.ceil(encoded_len * 3 / 4 / BYTES_PER_TOKEN[kind])


def _data_url(s: str) -> tuple[str, int] | None:
    """(kind, encoded length) of a `data:<mime>;base64,...` string."""
    head, sep, data = s[:256].partition(",")
    if not sep or not head.startswith("data:"):
        return None
    return _kind(head[5:].split(";", 1)[0]), len(s) - len(head) - 1


def _search_tool(tool: dict[str, Any]) -> int:
    kind = tool.get("type", "")
    if not isinstance(kind, str):
        kind = str(kind)
    if kind.startswith(_SEARCH_TOOLS) or _has_any(tool, _SEARCH_TOOLS):
        uses = _number(tool.get("max_uses"))
        return uses if uses is not None else UNBOUNDED_SEARCHES
    return 0


def scan(node: Any) -> BodyScan:
    """Characters of text, images, media by size, references and search tools in a JSON body."""
    work = scan_sliced(node)
    while True:
        try:
            next(work)
        except StopIteration as done:
            return done.value


SCAN_SLICE = 500  # nodes between two yields of scan_sliced


def scan_sliced(node: Any) -> Generator[None, None, BodyScan]:
    """`scan`, yielding every SCAN_SLICE nodes: a large body's scan shares the event loop
    (addons/flowstate.py `sliced`; on a thread, a CPU-bound walk makes every turn of the loop
    wait for the GIL)."""
    out = BodyScan()
    stack = [node]
    walked = 0
    while stack:
        walked += 1
        if walked % SCAN_SLICE == 0:
            yield
        n = stack.pop()
        if isinstance(n, str):
            media = _data_url(n) if n.startswith("data:") else None
            if media is not None:
                kind, size = media
                if kind == "image":
                    out.images += 1
                else:
                    out.media_tokens += _media_tokens(kind, size)
            elif len(n) > 20_000 and " " not in n[:2000]:
                out.media_tokens += _media_tokens("document", len(n))  # binary of unknown type
            else:
                out.chars += len(n)
        elif isinstance(n, dict):
            _scan_dict(n, out, stack)
        elif isinstance(n, list):
            yield from _scan_list(n, out, stack)
        elif type(n) is int or type(n) is bool:  # as JSON writes them: 12, true, false
            out.chars += len(repr(n))
        elif n is not None:
            out.chars += len(json.dumps(n))
    return out


_NUMBERS = (int, float, bool)
_SLICE = 4096


def _scan_list(items: list[Any], out: BodyScan, stack: list[Any]) -> Generator[None, None, None]:
    """A list's numbers counted a slice at a time in one C call each (a body of a million
    numbers would otherwise cost a Python step each: seconds for 10 MB of `[0,0,...]`); the rest
    goes on the stack. Yields between slices."""
    for i in range(0, len(items), _SLICE):
        part = items[i : i + _SLICE]
        numbers = [x for x in part if type(x) in _NUMBERS]
        if numbers:
            # "[a,b,c]" is the numbers' characters, a comma between each two and two brackets
            out.chars += len(json.dumps(numbers, separators=(",", ":"))) - len(numbers) - 1
        if len(numbers) < len(part):
            stack.extend(x for x in part if type(x) not in _NUMBERS and x is not None)
        yield


def _media(out: BodyScan, kind: str, encoded_len: int) -> None:
    if kind == "image":
        out.images += 1
    else:
        out.media_tokens += _media_tokens(kind, encoded_len)


def _has_any(d: dict[str, Any], keys: tuple[str, ...]) -> bool:
    for k in keys:  # a few hash probes (any() over a generator costs more than the probes)
        if k in d:
            return True
    return False


def _scan_dict(d: dict[str, Any], out: BodyScan, stack: list[Any]) -> None:
    if _PROBED.isdisjoint(d):  # a plain object (a message, the body itself): its keys and values
        _scan_items(d, out, stack)
        return
    kind = d.get("type")
    if kind in ("image", "input_image"):  # Anthropic, Responses: one image, however sent
        out.images += 1
        return
    mime = None
    for k in _MIME_KEYS:
        v = d.get(k)
        if isinstance(v, str):
            mime = v
            break
    data = d.get("data")
    if mime is None and isinstance(d.get("format"), str) and isinstance(data, str):
        mime = "audio/" + d["format"]  # OpenAI input_audio: {"data": ..., "format": "wav"}
    if mime is not None and isinstance(data, str):
        _media(out, _kind(mime), len(data))  # Gemini inlineData, Anthropic base64 sources
        return
    if mime is not None and any(d.get(k) for k in _FILE_REF_KEYS):  # (rare: no fast path)
        if _kind(mime) == "image":
            out.images += 1
        else:
            out.references = True  # Gemini fileData: a file whose size is not in the body
        return
    for key in _BEDROCK_BLOCKS:  # Bedrock Converse content blocks
        if key not in d:
            continue
        block = d[key]
        source = block.get("source") if isinstance(block, dict) else None
        if isinstance(source, dict):
            raw = source.get("bytes")
            if isinstance(raw, str):
                _media(out, key, len(raw))
            else:
                out.references = True  # an S3 location
            return
    if kind == "document":
        source = d.get("source")
        if isinstance(source, dict) and source.get("type") in ("url", "file"):
            out.references = True  # a document the provider fetches: its size is unknown
            return
    if "cache_control" in d or "cachePoint" in d:
        out.caching = True
    out.searches += _search_tool(d)
    _scan_items(d, out, stack)


def _scan_items(d: dict[str, Any], out: BodyScan, stack: list[Any]) -> None:
    for k, v in d.items():
        if k in _REFERENCE_OR_FILE_KEYS and v:
            out.references = True
        if k == "image_url":
            url = v.get("url") if isinstance(v, dict) else v
            media = _data_url(url) if isinstance(url, str) else None
            _media(out, media[0] if media else "image", media[1] if media else 0)
            continue
        out.chars += len(k)
        stack.append(v)


def _number(v: Any) -> int | None:
    """A positive count as sent: an int, an integral float, or a numeric string ("65536")."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        v = v.strip()
        if not v.isdigit():
            return None
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and v > 0 else None


def _configs(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The places a body keeps its generation settings: top level and nested configs."""
    found = [body]
    for key in _CONFIG_KEYS:
        if key in body:
            v = body[key]
            if isinstance(v, dict):
                found.append(v)
    return found


_CONFIG_KEYS = ("generationConfig", "generation_config", "inferenceConfig", "options", "config")


def _stated(body: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The largest count stated under any of `keys` in the body's configs (None: none is).
    Only the keys present are read (`_number(None)` is None): the usual body states none."""
    found = None
    for cfg in _configs(body):
        for key in keys:
            if key in cfg:
                n = _number(cfg[key])
                if n is not None and (found is None or n > found):
                    found = n
    return found


_STATED_MAX_KEYS = (*_MAX_KEYS, "maxOutputTokens", "maxTokens")
_COMPLETIONS_KEYS = ("n", "candidateCount", "candidate_count")


def stated_max_output(body: dict[str, Any] | None) -> int | None:
    """The output limit the request states, wherever its wire format puts it."""
    if not body:
        return None
    return _stated(body, _STATED_MAX_KEYS)


def completions(body: dict[str, Any] | None) -> int:
    """How many completions the request asks for (`n`, `candidateCount`): each is billed."""
    if not body:
        return 1
    found = _stated(body, _COMPLETIONS_KEYS)
    return found if found is not None else 1


def estimate_input_tokens(body: dict[str, Any] | None) -> int:
    if not body:
        return 0
    return scan(body).input_tokens()


def output_tokens_limit(requested: int | None, default: int, price: ModelPrice) -> int:
    """The output a request may produce: what it states, else the model's own limit (else the
    configured default); never more than the model's limit."""
    if requested is not None:
        n = requested
    elif price.max_output_tokens is not None:
        n = price.max_output_tokens
    else:
        n = default
    if price.max_output_tokens is not None:
        n = min(n, price.max_output_tokens)
    return max(n, 0)


def estimate_cost(
    body: dict[str, Any] | None,
    requested_max: int | None,
    default_max: int,
    price: ModelPrice,
    found: BodyScan | None = None,
    processing: str | None = None,
) -> float:
    """The most the request can cost; `found`: the body's scan, if made already;
    `processing="batch"`: at the batch price, where genai-prices knows one."""
    if found is None:
        found = scan(body) if body else BodyScan()
    input_tokens = found.input_tokens()
    context = price.context_window
    if found.references:
        # the reference can hold up to a whole context window, which Candela cannot see. (No
        # cap the other way: the library's window can be below what a beta admits, e.g.
        # claude-sonnet-4-5 lists 200K and prices the tier above it.)
        window = context if context is not None else UNKNOWN_CONTEXT_TOKENS
        input_tokens = max(input_tokens, window)
    stated = requested_max if requested_max is not None else stated_max_output(body)
    output_tokens = output_tokens_limit(stated, default_max, price) * completions(body)
    tier = body.get("service_tier") if body else None
    if body and body.get("speed") == "fast":
        tier = "fast"  # Claude's fast mode
    return price.max_cost(
        input_tokens,
        output_tokens,
        service_tier=tier if isinstance(tier, str) else None,
        web_searches=found.searches,
        # Anthropic-style caches (a 1-hour rate) write only what the request marks
        cache_writes=found.caching or price.cache_write_1h is None,
        processing=processing,
    )


def estimate_batch_cost(
    requests: Sequence[tuple[str, dict[str, Any]]],
    default_max: int,
    price_of: Callable[[str], ModelPrice | None],
) -> float:
    """The most a batch can cost: the sum of every request's most, each at its model's batch
    price where genai-prices knows one (else its list price). A model without a price raises
    KeyError (the caller refuses the batch first: addons/jobs.py, governance/jobs.upload_record)."""
    total = 0.0
    for model, params in requests:
        price = price_of(model)
        if price is None:
            raise KeyError(model)
        processing = "batch" if price.batch_priced() else None
        total += estimate_cost(
            params, params.get("max_tokens"), default_max, price, processing=processing
        )
    return total
