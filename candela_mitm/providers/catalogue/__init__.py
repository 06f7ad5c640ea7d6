"""Operation catalogue: per provider route, the operations Candela forwards; everything else is refused.

Each route's table lives in the module of its provider family (openai.py, anthropic.py, gemini.py,
vertex.py, bedrock.py, local.py). `find` matches a request's method and route-relative path
(percent-decoded, after the request-target checks of providers/target.py) against the route's
table, then against the operator's `providers.<route>.allow` reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from .anthropic import ANTHROPIC_DIRECT, ANTHROPIC_OPENAI
from .bedrock import BEDROCK, BEDROCK_MANTLE
from .gemini import GEMINI, GEMINI_OPENAI
from .local import LMSTUDIO, OLLAMA
from .openai import OPENAI
from .operation import ALLOWED_METHODS, Operation, parse_allowed
from .vertex import VERTEX

__all__ = ["ALLOWED_METHODS", "CATALOGUE", "Found", "Operation", "find", "parse_allowed"]

CATALOGUE: dict[str, tuple[Operation, ...]] = {
    "openai": OPENAI,
    "google": GEMINI,
    "gemini-oai": GEMINI_OPENAI,
    "anthropic": ANTHROPIC_OPENAI,
    "anthropic-vertex": VERTEX,
    "anthropic-direct": ANTHROPIC_DIRECT,
    "anthropic-bedrock": BEDROCK,
    "bedrock-mantle": BEDROCK_MANTLE,
    "ollama": OLLAMA,
    "lmstudio": LMSTUDIO,
}


@dataclass(frozen=True)
class Found:
    operation: Operation
    params: dict[str, str]  # the template's placeholders, percent-decoded

    @property
    def model(self) -> str | None:
        return self.params.get("model")


def find(
    route: str, method: str, path: str, allowed: Iterable[str] = (), *, websocket: bool = False
) -> Found | None:
    """`find_uncached`, kept per (route, method, path, allow entries, websocket): the catalogue
    is code and the allow entries are in the key, so an answer never goes stale; a request
    walked the route's templates (a regular expression each) until its own. Each caller gets
    its own params."""
    key = (route, method, path, tuple(allowed), websocket)
    if key in _FOUND:
        hit = _FOUND[key]
    else:
        hit = find_uncached(route, method, path, key[3], websocket=websocket)
        if len(_FOUND) >= _FOUND_MAX:
            _FOUND.clear()
        _FOUND[key] = hit
    return None if hit is None else Found(hit.operation, dict(hit.params))


_FOUND: dict[tuple[object, ...], Found | None] = {}
_FOUND_MAX = 4096  # paths naming models or ids vary: a bound, not a working set


def find_uncached(
    route: str, method: str, path: str, allowed: Iterable[str] = (), *, websocket: bool = False
) -> Found | None:
    """The operation `method path` is on `route` (path without query), or None: not governed.

    The route's rows come first, in table order (a literal row before a `{model}` one), so an
    operator's allow entry never turns a metered operation into a free read; a row the table
    refuses by name is refused unless an allow entry names that read.
    """
    method = method.upper()
    decoded = unquote(path)
    refusal: Found | None = None
    for op in CATALOGUE.get(route, ()):
        if (op.protocol is not None) != websocket:
            continue
        params = op.match(method, decoded)
        if params is not None:
            if op.billing != "refused":
                return Found(op, params)
            refusal = refusal or Found(op, params)
    if websocket:
        return refusal
    for entry in allowed:
        op = parse_allowed(entry)
        params = op.match(method, decoded)
        if params is not None:
            return Found(op, params)
    return refusal
