"""Forwarding plans: which upstream a request goes to, with which path, model and body changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from candela_mitm import errors
from candela_mitm.errors import Denial
from candela_mitm.providers.models import canonical_model, is_streaming_method, model_from_path
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import Upstream
from candela_mitm.providers.translate import openai_to_anthropic_request

Translation = Literal["openai-anthropic"]

# POST paths that generate nothing and name no model; everything else must name one.
_MODELLESS_POST_SUFFIXES = ("/api/pull", "/api/show", "/api/tokenize", "/api/detokenize")


@dataclass
class ForwardPlan:
    provider: str
    upstream: Upstream
    path: str  # upstream path, query included, base path not yet joined
    model: str | None  # as the client named it
    stream: bool
    response_wire: (
        str  # the format the upstream answers in (openai, gemini, anthropic, bedrock, ollama)
    )
    translate: Translation | None = None
    body: dict[str, Any] | None = None  # the JSON to send, when it differs from the client's
    client_wants_usage: bool = True
    max_output_tokens: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def canonical_model(self) -> str | None:
        return canonical_model(self.model) if self.model else None


def _split_query(path: str) -> tuple[str, str]:
    p, sep, q = path.partition("?")
    return p, (sep + q)


def _max_tokens(body: dict[str, Any], wire: str) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens", "num_predict"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    if wire == "gemini":
        gc = body.get("generationConfig") or body.get("generation_config") or {}
        if isinstance(gc, dict):
            v = gc.get("maxOutputTokens") or gc.get("max_output_tokens")
            if isinstance(v, int) and v > 0:
                return v
    if wire == "ollama":
        opts = body.get("options") or {}
        if isinstance(opts, dict):
            v = opts.get("num_predict")
            if isinstance(v, int) and v > 0:
                return v
    return None


def _body_model(body: dict[str, Any] | None) -> str | None:
    if not body:
        return None
    m = body.get("model")
    if m is None:
        return None
    if not isinstance(m, str) or not m.strip():
        raise ValueError("'model' must be a non-empty string")
    return m


def _check_same(path_model: str, body_model: str | None) -> Denial | None:
    if body_model is not None and canonical_model(body_model) != canonical_model(path_model):
        return errors.model_mismatch(path_model, body_model)
    return None


def _openai_stream_usage(body: dict[str, Any], path: str) -> tuple[dict[str, Any], bool]:
    """Ask an OpenAI-format upstream for usage in streams; report whether the client asked."""
    opts = body.get("stream_options")
    wants = isinstance(opts, dict) and bool(opts.get("include_usage"))
    if wants or not path.rstrip("/").endswith(("chat/completions", "/completions")):
        return body, True
    new = dict(body)
    new_opts = dict(opts) if isinstance(opts, dict) else {}
    new_opts["include_usage"] = True
    new["stream_options"] = new_opts
    return new, False


def vertex_anthropic_path(up: Upstream, model: str, stream: bool) -> str:
    method = "streamRawPredict" if stream else "rawPredict"
    return (
        f"/v1/projects/{up.project}/locations/{up.region}/publishers/anthropic/models/"
        f"{quote(model, safe='@.-_')}:{method}"
    )


def plan_provider_request(
    up: Upstream, method: str, rest: str, body: dict[str, Any] | None
) -> ForwardPlan | Denial:
    """A request to /proxy/<provider><rest>: the provider's own format, except `anthropic`."""
    spec = up.spec
    path, query = _split_query(rest)
    if not path.startswith("/"):
        path = "/" + path
    try:
        body_model = _body_model(body)
    except ValueError as e:
        return errors.bad_request(str(e))
    writes = method.upper() not in ("GET", "HEAD", "OPTIONS")

    if spec.translates_openai:
        if not path.rstrip("/").endswith("chat/completions") or method.upper() != "POST":
            return errors.not_found(f"/proxy/{spec.name}{path}")
        return plan_openai_to_anthropic(up, body or {})

    if spec.wire in ("gemini", "bedrock") or (
        spec.wire == "anthropic" and spec.auth == "google_adc"
    ):
        found = model_from_path(path)
        if found is None:
            if writes:
                return errors.bad_request(
                    "this request names no model in its path", path=f"/proxy/{spec.name}{path}"
                )
            return ForwardPlan(spec.name, up, path + query, None, False, spec.wire)
        path_model, path_method = found
        mismatch = _check_same(path_model, body_model)
        if mismatch:
            return mismatch
        stream = is_streaming_method(path_method) or bool((body or {}).get("stream"))
        return ForwardPlan(
            spec.name,
            up,
            path + query,
            path_model,
            stream,
            spec.wire,
            max_output_tokens=_max_tokens(body or {}, spec.wire),
        )

    # model in the body: OpenAI-compatible, Anthropic direct, Ollama
    if body_model is None:
        if writes and not path.endswith(_MODELLESS_POST_SUFFIXES):
            return errors.bad_request(
                "this request names no model; Candela forwards only requests it can govern",
                path=f"/proxy/{spec.name}{path}",
            )
        return ForwardPlan(spec.name, up, path + query, None, False, spec.wire)
    assert body is not None
    if spec.wire == "ollama" and path.startswith("/api/"):
        stream = body.get("stream", True) is not False  # Ollama streams unless told not to
        return ForwardPlan(
            spec.name,
            up,
            path + query,
            body_model,
            stream,
            "ollama",
            max_output_tokens=_max_tokens(body, "ollama"),
        )
    stream = bool(body.get("stream"))
    wire = "anthropic" if spec.wire == "anthropic" else "openai"
    plan = ForwardPlan(
        spec.name,
        up,
        path + query,
        body_model,
        stream,
        wire,
        max_output_tokens=_max_tokens(body, wire),
    )
    if stream and wire == "openai":
        new_body, wants = _openai_stream_usage(body, path)
        if new_body is not body:
            plan.body = new_body
        plan.client_wants_usage = wants
    return plan


def plan_openai_to_anthropic(up: Upstream, body: dict[str, Any]) -> ForwardPlan | Denial:
    """An OpenAI chat completion answered by Anthropic's Messages API (Vertex or direct)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return errors.bad_request("'model' is required")
    try:
        messages_body = openai_to_anthropic_request(body)
    except ValueError as e:
        return errors.bad_request(f"cannot translate this request to the Messages API: {e}")
    stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    wants_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    if up.spec.auth == "google_adc":
        messages_body.pop("model", None)
        messages_body["anthropic_version"] = up.anthropic_version
        path = vertex_anthropic_path(up, model, stream)
    else:
        path = "/v1/messages"
    return ForwardPlan(
        up.spec.name,
        up,
        path,
        model,
        stream,
        "anthropic",
        translate="openai-anthropic",
        body=messages_body,
        client_wants_usage=wants_usage,
        max_output_tokens=messages_body.get("max_tokens"),
    )


def plan_chat_completion(
    upstreams: dict[str, Upstream], provider: str, body: dict[str, Any]
) -> ForwardPlan | Denial:
    """POST /v1/chat/completions, already routed by model name to `provider`."""
    up = upstreams[provider]
    spec = up.spec
    if spec.wire == "anthropic" or spec.translates_openai:
        return plan_openai_to_anthropic(up, body)
    if spec.wire == "bedrock":
        return errors.bad_request(
            "Bedrock models are served on /proxy/anthropic-bedrock, not /v1/chat/completions"
        )
    if spec.wire == "gemini":
        up = upstreams["gemini-oai"]
    if up.spec.name == "gemini-oai":
        rest = "/chat/completions"
    else:
        rest = "/v1/chat/completions"
    return plan_provider_request(up, "POST", rest, body)


_PREFIX_ROUTES = (
    (("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-", "davinci", "babbage"), "openai"),
    (("gemini-",), "gemini-oai"),
    (("claude-",), "anthropic"),
)


def route_for_model(
    model: str,
    pricing: PricingTable,
    local_models: dict[str, str],
    vertex_configured: bool,
) -> str | None:
    """The provider route /v1/chat/completions sends a model to; None when nothing serves it."""
    if model in local_models:
        return local_models[model]
    name = canonical_model(model)
    price = pricing.get(name)
    route = price.provider if price and price.provider else None
    if route is None:
        for prefixes, r in _PREFIX_ROUTES:
            if name.startswith(prefixes):
                route = r
                break
    if route == "anthropic" and not vertex_configured:
        # Claude through Vertex needs a GCP project; without one, Anthropic's own API serves it
        route = "anthropic-direct"
    return route
