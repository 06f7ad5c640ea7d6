import pytest

from candela_mitm.config import parse_config
from candela_mitm.errors import Denial
from candela_mitm.providers.forwarding import (
    plan_chat_completion,
    plan_provider_request,
    route_for_model,
)
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import resolve_all

CFG = parse_config({"providers": {"anthropic": {"project": "proj", "region": "us-east5"}}})
UP = resolve_all(CFG)
PRICING = PricingTable.from_config(CFG)


def plan(provider, method, rest, body):
    return plan_provider_request(UP[provider], method, rest, body)


@pytest.mark.parametrize(
    "provider, rest, body, model, stream, path",
    [
        (
            "openai",
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": []},
            "gpt-4o",
            False,
            "/v1/chat/completions",
        ),
        (
            "gemini-oai",
            "/chat/completions",
            {"model": "gemini-2.5-flash", "stream": True},
            "gemini-2.5-flash",
            True,
            "/chat/completions",
        ),
        (
            "google",
            "/v1beta/models/gemini-2.5-pro:generateContent",
            {"contents": []},
            "gemini-2.5-pro",
            False,
            "/v1beta/models/gemini-2.5-pro:generateContent",
        ),
        (
            "google",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            {"contents": []},
            "gemini-2.5-pro",
            True,
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        ),
        (
            "anthropic-direct",
            "/v1/messages",
            {"model": "claude-sonnet-4-20250514", "max_tokens": 10},
            "claude-sonnet-4-20250514",
            False,
            "/v1/messages",
        ),
        (
            "anthropic-vertex",
            "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict",
            {"anthropic_version": "vertex-2023-10-16"},
            "claude-sonnet-4@20250514",
            True,
            None,
        ),
        (
            "anthropic-bedrock",
            "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke",
            {"max_tokens": 5},
            "anthropic.claude-sonnet-4-20250514-v1:0",
            False,
            None,
        ),
        ("ollama", "/api/chat", {"model": "llama3.2:3b"}, "llama3.2:3b", True, "/api/chat"),
        (
            "ollama",
            "/api/chat",
            {"model": "llama3.2:3b", "stream": False},
            "llama3.2:3b",
            False,
            "/api/chat",
        ),
        (
            "lmstudio",
            "/v1/chat/completions",
            {"model": "qwen"},
            "qwen",
            False,
            "/v1/chat/completions",
        ),
    ],
)
def test_plans(provider, rest, body, model, stream, path):
    p = plan(provider, "POST", rest, body)
    assert not isinstance(p, Denial), p
    assert p.model == model and p.stream == stream
    assert p.path == (path or rest)


def test_openai_stream_asks_for_usage_and_remembers_the_client_did_not():
    body = {"model": "gpt-4o", "stream": True, "messages": []}
    p = plan("openai", "POST", "/v1/chat/completions", body)
    assert p.body["stream_options"] == {"include_usage": True}
    assert p.client_wants_usage is False
    assert "stream_options" not in body  # the client's body is not mutated


def test_openai_stream_client_asked_for_usage():
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    p = plan("openai", "POST", "/v1/chat/completions", body)
    assert p.body is None and p.client_wants_usage is True


@pytest.mark.parametrize(
    "provider, rest, body, code",
    [
        (
            "google",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            {"model": "gemini-2.5-pro"},
            "model_mismatch",
        ),
        (
            "anthropic-bedrock",
            "/model/anthropic.claude-sonnet-4-20250514-v1:0/invoke",
            {"model": "claude-opus-4-20250514"},
            "model_mismatch",
        ),
        ("openai", "/v1/chat/completions", {"messages": []}, "bad_request"),
        ("openai", "/v1/chat/completions", {"model": 42}, "bad_request"),
        # not in the route's catalogue: refused, whatever the body names
        ("openai", "/v1/files", None, "endpoint_not_governed"),
        ("openai", "/v1/files", {"model": "gpt-4o"}, "endpoint_not_governed"),
        ("openai", "/v1/anything/else", {"model": "gpt-4o"}, "endpoint_not_governed"),
        ("google", "/v1beta/cachedContents", {"x": 1}, "endpoint_not_governed"),
        ("google", "/v1beta/cachedContents", {"model": "gemini-2.5-pro"}, "endpoint_not_governed"),
        ("anthropic", "/v1/models", None, "endpoint_not_governed"),
        ("ollama", "/api/pull", {"model": "llama3.2:3b"}, "endpoint_not_governed"),
        ("ollama", "/api/create", {"model": "x"}, "endpoint_not_governed"),
    ],
)
def test_denied_plans(provider, rest, body, code):
    p = plan(provider, "POST", rest, body)
    assert isinstance(p, Denial) and p.error == code


def test_same_model_in_path_and_body_is_fine_after_canonicalisation():
    p = plan(
        "anthropic-bedrock",
        "POST",
        "/model/anthropic.claude-sonnet-4-20250514-v1:0/invoke",
        {"model": "claude-sonnet-4-20250514"},
    )
    assert not isinstance(p, Denial)


def test_get_without_model_passes_at_no_cost():
    p = plan("openai", "GET", "/v1/models", None)
    assert not isinstance(p, Denial) and p.model is None


def test_anthropic_route_translates_to_vertex_raw_predict():
    body = {
        "model": "claude-sonnet-4-20250514",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    p = plan("anthropic", "POST", "/v1/chat/completions", body)
    assert not isinstance(p, Denial)
    assert p.translate == "openai-anthropic"
    assert (
        p.path
        == "/v1/projects/proj/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-20250514:streamRawPredict"
    )
    assert "model" not in p.body and p.body["anthropic_version"] == "vertex-2023-10-16"
    assert p.upstream.host == "us-east5-aiplatform.googleapis.com"


@pytest.mark.parametrize(
    "model, vertex, route",
    [
        ("gpt-4o-mini", True, "openai"),
        ("o1-pro", True, "openai"),
        ("gemini-2.5-flash", True, "gemini-oai"),
        ("claude-sonnet-4-20250514", True, "anthropic"),
        ("claude-sonnet-4-20250514", False, "anthropic-direct"),
        ("gpt-5-turbo-unpriced", True, "openai"),
        ("mystery-model", True, None),
    ],
)
def test_route_for_model(model, vertex, route):
    assert route_for_model(model, PRICING, {}, vertex) == route


def test_local_models_route_to_their_runtime():
    assert route_for_model("llama3.2:3b", PRICING, {"llama3.2:3b": "ollama"}, True) == "ollama"


def test_chat_completion_to_anthropic_direct_uses_messages():
    body = {"model": "claude-sonnet-4-20250514", "messages": [{"role": "user", "content": "hi"}]}
    p = plan_chat_completion(UP, "anthropic-direct", body)
    assert (
        p.path == "/v1/messages"
        and p.translate == "openai-anthropic"
        and p.body["model"] == body["model"]
    )


def test_chat_completion_to_gemini_uses_openai_compat():
    p = plan_chat_completion(UP, "gemini-oai", {"model": "gemini-2.5-flash", "messages": []})
    assert p.upstream.name == "gemini-oai" and p.path == "/chat/completions"
