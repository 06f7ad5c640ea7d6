"""Request targets: what a proxied target may hold, and the Google parameters that reshape answers.

Candela decides on one reading of the path; the upstream must not read another. A fragment
(`#`) is dropped by some servers and not others, dot segments and encoded slashes are resolved
by some and not others, and control characters end or split a line: such a target is refused.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode

_CONTROL = re.compile(r"[\x00-\x20\x7f]|%(?:[01][0-9a-f]|7f)", re.IGNORECASE)
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)


def target_problem(target: str) -> str | None:
    """Why a proxied request target (path and query, as sent) is refused, or None."""
    if "#" in target:
        return "it holds a fragment ('#')"
    if _CONTROL.search(target):
        return "it holds a control character or a space"
    path = target.split("?", 1)[0]
    if "\\" in path or _ENCODED_SEPARATOR.search(path):
        return "its path holds an encoded slash or a backslash"
    for segment in path.split("/"):
        # only a segment with a dot or an escape can decode to one (unquote costs ~1 µs each)
        if ("." in segment or "%" in segment) and unquote(segment) in (".", ".."):
            return "its path holds a dot segment ('.' or '..', raw or %2e)"
    return None


# Google's system parameters that change the shape of an answer (and can leave usageMetadata
# out of it): https://cloud.google.com/apis/docs/system-parameters
_GOOGLE_SHAPE_PARAMS = frozenset({"fields", "$fields", "prettyprint", "$prettyprint"})
_GOOGLE_ALT_KEPT = frozenset({"sse", "json"})
# Headers that would make the upstream answer another operation or shape than the one Candela
# planned: Google's field mask and billing-project override, and the method overrides Google's
# front end honours on POST (a planned POST must stay that POST).
STRIPPED_HEADERS = (
    "x-goog-fieldmask",
    "x-goog-user-project",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


def strip_google_system_params(query: str) -> str:
    """The query (without its '?') minus the parameters that reshape a Google answer:
    `fields`, `$fields`, `prettyPrint`, and `alt` other than sse or json."""
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if not _reshapes(k.lower(), v.lower())]
    return query if len(kept) == len(pairs) else urlencode(kept)


def _reshapes(key: str, value: str) -> bool:
    if key in _GOOGLE_SHAPE_PARAMS:
        return True
    # google-api-core's REST transport sends `$alt=json;enum-encoding=int`: still JSON
    return key in ("alt", "$alt") and value.split(";", 1)[0] not in _GOOGLE_ALT_KEPT
