"""Forwarding plans: which upstream a request goes to, with which path, model and body changes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, quote

from candela_mitm import errors
from candela_mitm.errors import Denial
from candela_mitm.providers.catalogue import Found, Operation, find
from candela_mitm.providers.catalogue.anthropic import ANTHROPIC_OPENAI
from candela_mitm.providers.models import canonical_model
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import Upstream
from candela_mitm.providers.target import strip_google_system_params
from candela_mitm.providers.translate.requests import openai_to_anthropic_request

Translation = Literal["openai-anthropic"]
AsyncJobs = Literal["refuse", "reserve"]

# Candela's own local page pulls a model through Ollama's /api/pull: not a proxied operation
LOCAL_PULL = Operation("POST", "/api/pull", "local.pull", model="body", billing="free")


@dataclass
class ForwardPlan:
    provider: str
    upstream: Upstream
    path: str  # upstream path, query included, base path not yet joined
    model: str | None  # as the client named it
    stream: bool
    # the usage reader of the answer's wire format (openai, gemini, anthropic, bedrock, ollama);
    # None: the answer is not metered (a free read) or carries no usage
    response_wire: str | None
    operation: Operation
    translate: Translation | None = None
    body: dict[str, Any] | None = None  # the JSON to send, when it differs from the client's
    client_wants_usage: bool = True
    max_output_tokens: int | None = None
    job_id: str | None = None  # a job_result operation: the job it reads (the path's {job_id})
    # a batch of requests (model source "batch"): each request's model and its body, in order
    batch: tuple[tuple[str, dict[str, Any]], ...] | None = None

    @property
    def canonical_model(self) -> str | None:
        return canonical_model(self.model) if self.model else None

    @property
    def metered(self) -> bool:
        """Reserved before and charged after: not a free read, an allowed read or a local answer."""
        return self.operation.billing in ("metered", "async")

    @property
    def charge_reservation(self) -> bool:
        """Settled at its reservation (at least): a queued job, or an answer with no usage.

        For the settlement side (addons/budget.py): the usage read from the answer, if any, is
        not the whole cost of such a request.
        """
        return self.metered and (self.operation.billing == "async" or self.response_wire is None)

    @property
    def session(self) -> bool:
        """A WebSocket session: a reservation slice at the upgrade, metered frame by frame."""
        return self.operation.billing == "session"


def _split_query(path: str) -> tuple[str, str]:
    p, sep, q = path.partition("?")
    return p, (sep + q)


def _max_tokens(body: dict[str, Any], wire: str | None) -> int | None:
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
    if wire == "bedrock":  # Converse
        ic = body.get("inferenceConfig") or {}
        if isinstance(ic, dict):
            v = ic.get("maxTokens")
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
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


def _streams(op: Operation, body: dict[str, Any]) -> bool:
    if op.stream == "always":
        return True
    if op.stream == "body_flag":
        return bool(body.get("stream"))
    if op.stream == "body_flag_default_on":
        return body.get("stream", True) is not False  # Ollama streams unless told not to
    return False


def _query_model(query: str) -> str | None | Denial:
    """?model= of a WebSocket upgrade (OpenAI Realtime): required, named once."""
    values = parse_qs(query.lstrip("?")).get("model", [])
    if len(values) != 1 or not values[0].strip():
        return errors.bad_request("'model' is required once in the query of this WebSocket upgrade")
    return values[0]


MAX_BATCH_REQUESTS = 100_000  # Anthropic's own limit per Message Batch


def _batch_requests(body: dict[str, Any] | None) -> tuple[tuple[str, dict[str, Any]], ...] | Denial:
    """`requests[]` of a Message Batch: each request's `params.model` and `params` (which must
    name `max_tokens`: the most it can cost is reserved)."""
    reqs = (body or {}).get("requests")
    if not isinstance(reqs, list) or not reqs:
        return errors.bad_request("'requests' must be a non-empty list")
    if len(reqs) > MAX_BATCH_REQUESTS:
        return errors.bad_request(f"a batch holds at most {MAX_BATCH_REQUESTS} requests")
    out: list[tuple[str, dict[str, Any]]] = []
    for i, req in enumerate(reqs):
        params = req.get("params") if isinstance(req, dict) else None
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(params, dict) or not isinstance(model, str) or not model.strip():
            return errors.bad_request(f"'requests[{i}].params.model' is required")
        max_tokens = params.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            return errors.bad_request(f"'requests[{i}].params.max_tokens' must be a positive integer")
        out.append((model, params))
    return tuple(out)


def _model(found: Found, body: dict[str, Any] | None) -> str | None | Denial:
    """The operation's model, from where its row says; a Denial when it is missing or differs."""
    try:
        body_model = _body_model(body)
    except ValueError as e:
        return errors.bad_request(str(e))
    source = found.operation.model
    if source == "path":
        path_model = found.model
        assert path_model is not None, found.operation.key
        return _check_same(path_model, body_model) or path_model
    if source == "body":
        if body_model is None:
            return errors.bad_request(f"'model' is required by {found.operation.key}")
        return body_model
    if source == "body_optional":
        return body_model
    return None


def _outside_configured_place(up: Upstream, params: dict[str, str]) -> str | None:
    """A Vertex path naming another project than the route's configured one: the service
    account would act (and bill) in a project Candela does not govern."""
    if up.project and "project" in params and params["project"] != up.project:
        return f"project '{params['project']}' is not the route's project"
    return None


def plan_provider_request(
    up: Upstream,
    method: str,
    rest: str,
    body: dict[str, Any] | None,
    *,
    allowed: tuple[str, ...] = (),
    async_jobs: AsyncJobs = "refuse",
    websocket: bool = False,
) -> ForwardPlan | Denial:
    """A request to a provider route: the catalogue's operation for it, or a refusal.

    `rest` is the route-relative target (query included) whose form has already been checked
    (providers/target.py); `allowed` is the route's `providers.<route>.allow`; `websocket`: the
    request asks for a WebSocket upgrade (only the catalogue's session rows answer one).
    """
    spec = up.spec
    method = method.upper()
    path, query = _split_query(rest)
    if not path.startswith("/"):
        path = "/" + path
    found = find(spec.name, method, path, allowed, websocket=websocket)
    if found is None:
        if websocket:
            return errors.endpoint_not_governed(
                method, path, spec.name, "no WebSocket operation is governed at this path"
            )
        return errors.endpoint_not_governed(method, path, spec.name)
    op = found.operation
    if op.billing == "refused":
        return errors.endpoint_not_governed(method, path, spec.name, op.why)
    elsewhere = _outside_configured_place(up, found.params)
    if elsewhere:
        return errors.endpoint_not_governed(method, path, spec.name, elsewhere)
    b = body or {}
    if op.billing in ("job_result", "batch_input") and async_jobs != "reserve":
        return errors.endpoint_not_governed(
            method,
            path,
            spec.name,
            "an asynchronous job's input or result goes through Candela only under "
            "governance.async_jobs: reserve (its creator's, trued up to its real cost)",
        )
    if op.billing == "async" or (op.async_flag and b.get(op.async_flag)):
        if async_jobs != "reserve":
            return errors.endpoint_not_governed(
                method,
                path,
                spec.name,
                "an asynchronous job (its result is read later); set governance.async_jobs: "
                "reserve to forward it charged at its reservation",
            )
        if op.model == "none":
            return errors.endpoint_not_governed(method, path, spec.name, op.why)
        op = dataclasses.replace(op, billing="async", stream="never")
    batch: tuple[tuple[str, dict[str, Any]], ...] | None = None
    if op.model == "batch":
        requests = _batch_requests(body)
        if isinstance(requests, Denial):
            return requests
        batch = requests
        model: str | None | Denial = batch[0][0]  # the batch is recorded under its first model
    else:
        model = _query_model(query) if op.model == "query" else _model(found, body)
    if isinstance(model, Denial):
        return model
    if op.billing == "async" and model is None and op.model != "file":
        return errors.bad_request(f"'model' is required to reserve the cost of {op.key}")
    if op.translate == "openai-anthropic":
        return plan_openai_to_anthropic(up, b, op)
    if spec.auth == "google_adc" and query:
        kept = strip_google_system_params(query[1:])
        query = "?" + kept if kept else ""
    stream = _streams(op, b)
    wire = op.reader if op.billing in ("metered", "async") else None
    max_out: int | None = None
    if op.estimate == "prompt":
        max_out = 0
    elif op.estimate == "prompt_and_output":
        max_out = _max_tokens(b, wire)
    plan = ForwardPlan(
        spec.name,
        up,
        path + query,
        model,
        stream,
        wire,
        op,
        max_output_tokens=max_out,
        job_id=found.params.get("job_id") if op.billing == "job_result" else None,
        batch=batch,
    )
    if stream and wire == "openai" and body is not None:
        new_body, wants = _openai_stream_usage(body, path)
        if new_body is not body:
            plan.body = new_body
        plan.client_wants_usage = wants
    return plan


def plan_local_pull(up: Upstream, body: dict[str, Any]) -> ForwardPlan:
    """candela's local page: a model pulled through Ollama's /api/pull (progress streamed back)."""
    return ForwardPlan(
        up.spec.name, up, "/api/pull", body.get("model"), True, None, LOCAL_PULL
    )


def plan_openai_to_anthropic(
    up: Upstream, body: dict[str, Any], op: Operation = ANTHROPIC_OPENAI[0]
) -> ForwardPlan | Denial:
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
        op,
        translate="openai-anthropic",
        body=messages_body,
        client_wants_usage=wants_usage,
        max_output_tokens=messages_body.get("max_tokens"),
    )


def plan_chat_completion(
    upstreams: dict[str, Upstream],
    provider: str,
    body: dict[str, Any],
    async_jobs: AsyncJobs = "refuse",
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
    return plan_provider_request(up, "POST", rest, body, async_jobs=async_jobs)


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
