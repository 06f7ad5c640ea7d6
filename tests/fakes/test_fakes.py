"""Tests of FakeUpstream itself: its wire formats against the real SDKs, its knobs, its SigV4 check."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from candela_mitm.providers.eventstream import EventStreamDecoder
from candela_mitm.providers.usage import Usage
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.sdk import run_sdk, sdk_available
from tests.fakes.upstream import (
    ANTHROPIC_KEY,
    AWS_ACCESS_KEY_ID,
    AWS_REGION,
    AWS_SECRET_ACCESS_KEY,
    GEMINI_KEY,
    OPENAI_KEY,
    FakeUpstream,
    verify_sigv4,
)

GOOD_TOKEN = "ya29.good-token"
AWS_ENV = {"AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(google_token_valid=lambda t: t == GOOD_TOKEN) as f:
        yield f


def call(
    fake: FakeUpstream,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_data(raw: bytes) -> list[Any]:
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


OPENAI_AUTH = {"Authorization": f"Bearer {OPENAI_KEY}"}
ANTHROPIC_AUTH = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
VERTEX_CLAUDE = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
VERTEX_BODY = {
    "anthropic_version": "vertex-2023-10-16",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


# --- recording, keep-alive, routing -----------------------------------------------------------


def test_records_every_request_on_one_keepalive_connection(fake: FakeUpstream) -> None:
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    for i in range(3):
        conn.request(
            "POST",
            f"/v1/chat/completions?n={i}",
            body=json.dumps(CHAT),
            headers={**OPENAI_AUTH, "X-Trace": "t"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["choices"][0]["message"]["content"] == fake.reply_text
    conn.close()
    recs = fake.wait_for(3)
    assert [r.path for r in recs] == [
        "/v1/chat/completions?n=0",
        "/v1/chat/completions?n=1",
        "/v1/chat/completions?n=2",
    ]
    assert (
        len({r.connection for r in recs}) == 1
    )  # keep-alive: one TCP connection carried all three
    assert (
        recs[0].headers["x-trace"] == "t"
        and recs[0].json == CHAT
        and recs[0].body == json.dumps(CHAT).encode()
    )
    assert (
        recs[0].query == {"n": ["0"]}
        and recs[0].route == "openai.chat"
        and recs[0].auth == "openai_key"
    )
    assert recs[0].time <= recs[1].time <= recs[2].time
    fake.clear()
    assert fake.requests == []


def test_unknown_path_is_404_and_recorded(fake: FakeUpstream) -> None:
    status, headers, body = call(fake, "POST", "/v2/nothing", b"not json")
    assert (
        status == 404
        and headers["content-type"] == "application/json"
        and "error" in json.loads(body)
    )
    (rec,) = fake.requests
    assert (
        rec.route == "unknown"
        and rec.status == 404
        and rec.json is None
        and rec.body == b"not json"
    )


def test_wait_for_times_out(fake: FakeUpstream) -> None:
    with pytest.raises(TimeoutError):
        fake.wait_for(1, timeout=0.1)


def test_configure_rejects_unknown_knob(fake: FakeUpstream) -> None:
    with pytest.raises(TypeError):
        fake.configure(latency=1)
    fake.configure(n_chunks=5, reply_text="abc")
    fake.reset()
    assert fake.n_chunks == 3 and fake.reply_text != "abc"


# (method, path, headers, body, expected status, expected auth recorded)
AUTH_CASES = [
    ("POST", "/v1/chat/completions", {}, CHAT, 401, None),
    ("POST", "/v1/chat/completions", {"Authorization": "Bearer sk-wrong"}, CHAT, 401, None),
    ("POST", "/v1/chat/completions", OPENAI_AUTH, CHAT, 200, "openai_key"),
    ("GET", "/v1/models", OPENAI_AUTH, None, 200, "openai_key"),
    (
        "POST",
        "/v1/messages",
        {"anthropic-version": "2023-06-01", "Authorization": f"Bearer {ANTHROPIC_KEY}"},
        MESSAGES,
        401,
        None,
    ),
    ("POST", "/v1/messages", {"x-api-key": ANTHROPIC_KEY}, MESSAGES, 400, None),
    ("POST", "/v1/messages", ANTHROPIC_AUTH, MESSAGES, 200, "anthropic_key"),
    ("GET", "/v1/models", ANTHROPIC_AUTH, None, 200, "anthropic_key"),
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {}, GEMINI, 403, None),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"x-goog-api-key": "bad"},
        GEMINI,
        400,
        None,
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"x-goog-api-key": GEMINI_KEY},
        GEMINI,
        200,
        "gemini_key",
    ),
    (
        "POST",
        f"/v1/models/gemini-2.5-flash:generateContent?key={GEMINI_KEY}",
        {},
        GEMINI,
        200,
        "gemini_key",
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"Authorization": "Bearer ya29.bad"},
        GEMINI,
        401,
        None,
    ),
    (
        "POST",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"Authorization": f"Bearer {GOOD_TOKEN}"},
        GEMINI,
        200,
        "google_token",
    ),
    ("GET", "/v1/models", {"x-goog-api-key": GEMINI_KEY}, None, 200, "gemini_key"),
    (
        "POST",
        "/v1beta/openai/chat/completions",
        {"Authorization": f"Bearer {GEMINI_KEY}"},
        CHAT,
        200,
        "gemini_key",
    ),
    (
        "POST",
        "/v1beta/openai/chat/completions",
        {"Authorization": f"Bearer {GOOD_TOKEN}"},
        CHAT,
        200,
        "google_token",
    ),
    ("POST", "/v1beta/openai/chat/completions", OPENAI_AUTH, CHAT, 400, None),
    ("POST", VERTEX_CLAUDE, {"x-goog-api-key": GEMINI_KEY}, VERTEX_BODY, 403, None),
    ("POST", VERTEX_CLAUDE, {"Authorization": "Bearer ya29.bad"}, VERTEX_BODY, 401, None),
    (
        "POST",
        VERTEX_CLAUDE,
        {"Authorization": f"Bearer {GOOD_TOKEN}"},
        VERTEX_BODY,
        200,
        "google_token",
    ),
    (
        "POST",
        "/model/anthropic.claude-v2/invoke",
        {},
        {"anthropic_version": "bedrock-2023-05-31"},
        403,
        None,
    ),
    ("POST", "/api/chat", {}, {"model": "llama3.2", "messages": [], "stream": False}, 200, "none"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "auth"), AUTH_CASES)
def test_each_route_checks_its_providers_credential(
    fake: FakeUpstream,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    auth: str | None,
) -> None:
    got, _, _ = call(fake, method, path, body, headers)
    assert got == status
    (rec,) = fake.requests
    assert rec.status == status and rec.auth == auth


def test_listing_shapes_follow_the_credential(fake: FakeUpstream) -> None:
    assert json.loads(call(fake, "GET", "/v1/models", None, OPENAI_AUTH)[2])["object"] == "list"
    assert (
        json.loads(call(fake, "GET", "/v1/models", None, ANTHROPIC_AUTH)[2])["data"][0]["type"]
        == "model"
    )
    gem = json.loads(call(fake, "GET", "/v1/models", None, {"x-goog-api-key": GEMINI_KEY})[2])
    assert gem["models"][0]["name"].startswith("models/")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/tags", "/api/version"])
def test_local_servers_need_no_key(path: str) -> None:
    with FakeUpstream(openai_key=None) as f:
        status, _, _ = call(
            f, "POST" if "chat" in path else "GET", path, CHAT if "chat" in path else None
        )
        assert status == 200 and f.requests[0].auth == "none"


# --- knobs ------------------------------------------------------------------------------------


# (path, headers, body, check on the parsed error body, check on the headers)
FAIL_CASES = [
    (
        "/v1/chat/completions",
        OPENAI_AUTH,
        CHAT,
        lambda b: b["error"]["type"] == "rate_limit_exceeded",
    ),
    (
        "/v1/messages",
        ANTHROPIC_AUTH,
        MESSAGES,
        lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error",
    ),
    (
        "/v1beta/models/m:generateContent",
        {"x-goog-api-key": GEMINI_KEY},
        GEMINI,
        lambda b: b["error"]["status"] == "RESOURCE_EXHAUSTED",
    ),
    (
        "/api/generate",
        {},
        {"model": "llama3.2", "prompt": "hi"},
        lambda b: isinstance(b["error"], str),
    ),
]


@pytest.mark.parametrize(("path", "headers", "body", "check"), FAIL_CASES)
def test_fail_status_answers_a_provider_shaped_error(
    fake: FakeUpstream, path: str, headers: dict[str, str], body: Any, check: Any
) -> None:
    fake.fail_status = 429
    status, _, raw = call(fake, "POST", path, body, headers)
    assert status == 429 and check(json.loads(raw))
    assert fake.requests[0].status == 429


def test_fail_status_on_bedrock_names_the_exception(fake: FakeUpstream) -> None:
    fake.fail_status = 429
    status, headers, raw = call(
        fake,
        "POST",
        "/model/m/invoke",
        {"anthropic_version": "bedrock-2023-05-31"},
        signed_headers(fake, b"", "/model/m/invoke"),
    )
    assert status == 403  # a bad signature is refused before the knob applies
    body = b'{"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}'
    status, headers, raw = call(
        fake, "POST", "/model/m/invoke", body, signed_headers(fake, body, "/model/m/invoke")
    )
    assert (
        status == 429
        and headers["x-amzn-errortype"].startswith("ThrottlingException:")
        and "message" in json.loads(raw)
    )


def test_latency_delays_the_answer(fake: FakeUpstream) -> None:
    fake.latency_s = 0.3
    t0 = time.monotonic()
    assert call(fake, "GET", "/api/version")[0] == 200
    assert time.monotonic() - t0 >= 0.3


def test_stream_chunks_are_flushed_one_by_one(fake: FakeUpstream) -> None:
    fake.configure(chunk_delay_s=0.05, n_chunks=3)
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({**CHAT, "stream": True}),
        headers=OPENAI_AUTH,
    )
    resp = conn.getresponse()
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    arrivals, raw = [], b""
    while chunk := resp.read1(65536):
        arrivals.append(time.monotonic())
        raw += chunk
    conn.close()
    # role, 3 pieces, finish, [DONE]: six chunks, each sent after its own delay
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == 6 and all(g >= 0.04 for g in gaps)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_data(raw))
        == fake.reply_text
    )
    assert raw.endswith(b"data: [DONE]\n\n")


def test_cut_after_chunks_drops_the_connection_mid_stream(fake: FakeUpstream) -> None:
    fake.cut_after_chunks = 2
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    conn.request(
        "POST",
        "/v1/messages",
        body=json.dumps({**MESSAGES, "stream": True}),
        headers=ANTHROPIC_AUTH,
    )
    resp = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as exc:
        resp.read()
    assert b"message_start" in exc.value.partial and b"message_stop" not in exc.value.partial
    (rec,) = fake.requests
    assert rec.status == 200 and rec.stream


def test_hang_never_answers_and_close_still_returns() -> None:
    f = FakeUpstream().start()
    f.hang = True
    with pytest.raises(TimeoutError):
        call(f, "POST", "/v1/chat/completions", CHAT, OPENAI_AUTH, timeout=0.3)
    (rec,) = f.wait_for(1)
    assert rec.status is None and rec.json == CHAT
    t0 = time.monotonic()
    f.close()
    assert time.monotonic() - t0 < 2


def test_close_does_not_wait_for_idle_keepalive_connections() -> None:
    f = FakeUpstream().start()
    conn = http.client.HTTPConnection(f.host, f.port, timeout=5)
    conn.request("GET", "/api/version")
    conn.getresponse().read()
    t0 = time.monotonic()
    f.close()
    assert time.monotonic() - t0 < 2
    conn.close()


# --- usage as each provider reports it ----------------------------------------------------------

USAGE = Usage(input_tokens=100, output_tokens=20, cached_tokens=30)
USAGE_CASES = [
    (
        "/v1/chat/completions",
        OPENAI_AUTH,
        CHAT,
        lambda b: (
            b["usage"]["prompt_tokens"],
            b["usage"]["completion_tokens"],
            b["usage"]["prompt_tokens_details"]["cached_tokens"],
        ),
    ),
    (
        "/v1/responses",
        OPENAI_AUTH,
        {"model": "gpt-4o-mini", "input": "hi"},
        lambda b: (
            b["usage"]["input_tokens"],
            b["usage"]["output_tokens"],
            b["usage"]["input_tokens_details"]["cached_tokens"],
        ),
    ),
    # Anthropic's input_tokens leaves out the cache reads
    (
        "/v1/messages",
        ANTHROPIC_AUTH,
        MESSAGES,
        lambda b: (
            b["usage"]["input_tokens"] + b["usage"]["cache_read_input_tokens"],
            b["usage"]["output_tokens"],
            b["usage"]["cache_read_input_tokens"],
        ),
    ),
    (
        "/v1beta/models/m:generateContent",
        {"x-goog-api-key": GEMINI_KEY},
        GEMINI,
        lambda b: (
            b["usageMetadata"]["promptTokenCount"],
            b["usageMetadata"]["candidatesTokenCount"],
            b["usageMetadata"]["cachedContentTokenCount"],
        ),
    ),
    (
        "/api/chat",
        {},
        {"model": "llama3.2", "messages": [], "stream": False},
        lambda b: (b["prompt_eval_count"], b["eval_count"], 30),
    ),
]


@pytest.mark.parametrize(("path", "headers", "body", "read"), USAGE_CASES)
def test_usage_knob_is_reported_in_each_format(
    fake: FakeUpstream, path: str, headers: dict[str, str], body: Any, read: Any
) -> None:
    fake.usage = USAGE
    status, _, raw = call(fake, "POST", path, body, headers)
    assert status == 200 and read(json.loads(raw)) == (100, 20, 30)


def test_anthropic_stream_events_in_order(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=2)
    _, headers, raw = call(
        fake, "POST", "/v1/messages", {**MESSAGES, "stream": True}, ANTHROPIC_AUTH
    )
    events = [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = sse_data(raw)
    assert (
        data[0]["message"]["usage"]["input_tokens"] == 70
        and data[-2]["usage"]["output_tokens"] == 20
    )
    assert (
        "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
        == fake.reply_text
    )


def test_chat_stream_usage_chunk_only_when_asked(fake: FakeUpstream) -> None:
    body = {**CHAT, "stream": True}
    plain = sse_data(call(fake, "POST", "/v1/chat/completions", body, OPENAI_AUTH)[2])
    asked = sse_data(
        call(
            fake,
            "POST",
            "/v1/chat/completions",
            {**body, "stream_options": {"include_usage": True}},
            OPENAI_AUTH,
        )[2]
    )
    assert all("usage" not in c for c in plain)
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["total_tokens"] == 19
    assert all(c["usage"] is None for c in asked[:-1])


def test_gemini_stream_counts_grow_and_json_array_form(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=4)
    h = {"x-goog-api-key": GEMINI_KEY}
    sse = sse_data(
        call(fake, "POST", "/v1beta/models/m:streamGenerateContent?alt=sse", GEMINI, h)[2]
    )
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in sse] == [5, 10, 15, 20]
    assert (
        sse[-1]["candidates"][0]["finishReason"] == "STOP"
        and "finishReason" not in sse[0]["candidates"][0]
    )
    arr = json.loads(call(fake, "POST", "/v1beta/models/m:streamGenerateContent", GEMINI, h)[2])
    assert [(c["candidates"], c["usageMetadata"]) for c in arr] == [
        (c["candidates"], c["usageMetadata"]) for c in sse
    ]
    count = json.loads(call(fake, "POST", "/v1beta/models/m:countTokens", GEMINI, h)[2])
    assert count["totalTokens"] == 100


def test_ollama_ndjson_stream_and_pull(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=3)
    status, headers, raw = call(
        fake, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}
    )
    lines = [json.loads(x) for x in raw.splitlines()]
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    assert [x["done"] for x in lines] == [False, False, False, True]
    assert "".join(x["response"] for x in lines) == fake.reply_text
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (100, 20)
    pull = [
        json.loads(x)
        for x in call(fake, "POST", "/api/pull", {"model": "llama3.2"})[2].splitlines()
    ]
    progress = [x["completed"] for x in pull if "total" in x]
    assert (
        progress == sorted(progress)
        and progress[-1] == pull[1]["total"]
        and pull[-1] == {"status": "success"}
    )


def test_embeddings_float_and_base64(fake: FakeUpstream) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    floats = json.loads(call(fake, "POST", "/v1/embeddings", body, OPENAI_AUTH)[2])
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(
        floats["data"][0]["embedding"]
    ) == 8
    b64 = json.loads(
        call(fake, "POST", "/v1/embeddings", {**body, "encoding_format": "base64"}, OPENAI_AUTH)[2]
    )
    assert isinstance(b64["data"][0]["embedding"], str)


def test_malformed_bodies_are_refused(fake: FakeUpstream) -> None:
    assert call(fake, "POST", "/v1/chat/completions", b"{", OPENAI_AUTH)[0] == 400
    assert (
        call(fake, "POST", "/v1/messages", {"model": "c", "messages": []}, ANTHROPIC_AUTH)[0] == 400
    )  # no max_tokens
    bad_version = {**VERTEX_BODY, "anthropic_version": "bedrock-2023-05-31"}
    assert (
        call(fake, "POST", VERTEX_CLAUDE, bad_version, {"Authorization": f"Bearer {GOOD_TOKEN}"})[0]
        == 400
    )


# --- Bedrock: SigV4 and the event stream --------------------------------------------------------


def signed_headers(
    fake: FakeUpstream,
    body: bytes,
    path: str,
    *,
    secret: str = AWS_SECRET_ACCESS_KEY,
    region: str = AWS_REGION,
    akid: str = AWS_ACCESS_KEY_ID,
) -> dict[str, str]:
    req = AWSRequest(
        method="POST",
        url=f"{fake.url}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(akid, secret), "bedrock", region).add_auth(req)
    # botocore signs the host from the URL without adding the header; a client sends it
    return {**dict(req.headers.items()), "Host": f"{fake.host}:{fake.port}"}


def test_bedrock_invoke_stream_is_an_aws_event_stream(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=2)
    body = json.dumps(
        {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}
    ).encode()
    path = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke-with-response-stream"
    status, headers, raw = call(fake, "POST", path, body, signed_headers(fake, body, path))
    assert status == 200 and headers["content-type"] == "application/vnd.amazon.eventstream"
    messages = EventStreamDecoder().feed(raw)
    assert {m.headers[":event-type"] for m in messages} == {"chunk"}
    events = [json.loads(base64.b64decode(json.loads(m.payload)["bytes"])) for m in messages]
    assert [e["type"] for e in events][0] == "message_start" and events[-1][
        "type"
    ] == "message_stop"
    assert events[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 20
    (rec,) = fake.requests
    assert rec.sigv4 is True and rec.route == "bedrock.invoke"


BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
PATH = "/model/anthropic.claude-v2%3A1/invoke"


def _mutate(what: str, h: dict[str, str]) -> tuple[str, dict[str, str], bytes]:
    h = {k.lower(): v for k, v in h.items()}
    if what == "body":
        return PATH, h, BODY.replace(b"5", b"6")
    if what == "path":
        return PATH.replace("%3A", ":"), h, BODY
    if what == "signed header":
        return PATH, {**h, "content-type": "text/plain"}, BODY
    if what == "no authorization":
        return PATH, {k: v for k, v in h.items() if k != "authorization"}, BODY
    return PATH, h, BODY


# (how the request is signed, what is changed after signing, expected verdict)
SIGV4_CASES = [
    ({}, "nothing", (True, "")),
    ({}, "body", (False, "signature")),
    ({}, "path", (False, "signature")),
    ({}, "signed header", (False, "signature")),
    ({}, "no authorization", (False, "missing")),
    ({"secret": "wrong/secret"}, "nothing", (False, "signature")),
    ({"region": "eu-west-1"}, "nothing", (False, "credential scope")),
    ({"akid": "AKIDSOMEONEELSE00000"}, "nothing", (False, "unknown access key")),
]


@pytest.mark.parametrize(("sign", "mutation", "verdict"), SIGV4_CASES)
def test_verify_sigv4(
    fake: FakeUpstream, sign: dict[str, str], mutation: str, verdict: tuple[bool, str]
) -> None:
    path, headers, body = _mutate(mutation, signed_headers(fake, BODY, PATH, **sign))
    assert (
        verify_sigv4(
            "POST",
            path,
            headers,
            body,
            access_key=AWS_ACCESS_KEY_ID,
            secret_key=AWS_SECRET_ACCESS_KEY,
            region=AWS_REGION,
            service="bedrock",
        )
        == verdict
    )
    status, resp_headers, _ = call(fake, "POST", path, body, headers)
    assert (status == 200) == verdict[0]
    (rec,) = fake.requests
    assert rec.sigv4 is verdict[0] and rec.sigv4_reason == verdict[1]


# --- the real SDKs, straight at the fake -----------------------------------------------------


@pytest.fixture
def sdk() -> None:
    if not sdk_available():
        pytest.fail("the SDK virtual environment is missing: run scripts/sdk-venv.sh")


def run_json(script: str, env: dict[str, str] | None = None) -> list[Any]:
    """Run an SDK snippet that prints one JSON document per line; fail with its stderr otherwise."""
    proc = run_sdk(script, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_openai_sdk(fake: FakeUpstream) -> None:
    fake.usage = USAGE
    out = run_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{fake.url}/v1", api_key="{OPENAI_KEY}", max_retries=0)
        msgs = [{{"role": "user", "content": "hi"}}]
        r = c.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        print(json.dumps({{"text": r.choices[0].message.content, "usage": r.usage.prompt_tokens}}))
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True, stream_options={{"include_usage": True}}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        print(json.dumps({{"text": text, "usage": chunks[-1].usage.completion_tokens}}))
        r = c.responses.create(model="gpt-4o-mini", input="hi")
        print(json.dumps({{"text": r.output_text, "usage": r.usage.input_tokens_details.cached_tokens}}))
        with c.responses.stream(model="gpt-4o-mini", input="hi") as s:
            types = [e.type for e in s]
            final = s.get_final_response()
        print(json.dumps({{"text": final.output_text, "usage": final.usage.output_tokens, "types": types}}))
        e = c.embeddings.create(model="text-embedding-3-small", input="hi")
        print(json.dumps({{"text": str(len(e.data[0].embedding)), "usage": e.usage.prompt_tokens}}))
    """)
    reply = fake.reply_text
    assert [(o["text"], o["usage"]) for o in out] == [
        (reply, 100),
        (reply, 20),
        (reply, 30),
        (reply, 20),
        ("8", 100),
    ]
    assert out[3]["types"][0] == "response.created" and out[3]["types"][-1] == "response.completed"
    recs = fake.requests
    assert [r.route for r in recs] == [
        "openai.chat",
        "openai.chat",
        "openai.responses",
        "openai.responses",
        "openai.embeddings",
    ]
    assert all(
        r.headers["authorization"] == f"Bearer {OPENAI_KEY}" and r.status == 200 for r in recs
    )
    assert (
        recs[1].json["stream_options"] == {"include_usage": True}
        and recs[1].stream
        and not recs[0].stream
    )
    assert recs[0].headers["user-agent"].startswith("OpenAI/Python")


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_anthropic_sdk(fake: FakeUpstream) -> None:
    fake.usage = USAGE
    out = run_json(f"""
        import json, anthropic
        msgs = [{{"role": "user", "content": "hi"}}]
        # anthropic 2.x sends api_key as Authorization: Bearer; the real API (and the fake) want x-api-key
        bearer = anthropic.Anthropic(base_url="{fake.url}", api_key="{ANTHROPIC_KEY}", max_retries=0)
        try:
            bearer.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=msgs)
            print(json.dumps({{"error": None}}))
        except anthropic.AuthenticationError as e:
            print(json.dumps({{"error": e.body["error"]["type"]}}))
        c = anthropic.Anthropic(base_url="{fake.url}", api_key=None, default_headers={{"x-api-key": "{ANTHROPIC_KEY}"}}, max_retries=0)
        m = c.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=msgs)
        print(json.dumps({{"text": m.content[0].text, "usage": [m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens]}}))
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=16, messages=msgs) as s:
            final = s.get_final_message()
        print(json.dumps({{"text": final.content[0].text, "usage": [final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens]}}))
    """)
    assert out[0] == {"error": "authentication_error"}
    assert out[1] == out[2] == {"text": fake.reply_text, "usage": [70, 30, 20]}
    rejected, plain, streamed = fake.requests
    assert (
        rejected.status == 401
        and rejected.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
        and "x-api-key" not in rejected.headers
    )
    assert plain.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in plain.headers
    assert plain.headers["anthropic-version"] == streamed.headers["anthropic-version"] != ""
    assert streamed.json["stream"] is True and streamed.stream and streamed.status == 200


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_google_genai_sdk(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=3)
    out = run_json(f"""
        import json
        from google import genai
        g = genai.Client(api_key="{GEMINI_KEY}", http_options={{"base_url": "{fake.url}"}})
        r = g.models.generate_content(model="gemini-2.5-flash", contents="hi")
        print(json.dumps({{"text": r.text, "usage": [r.usage_metadata.prompt_token_count, r.usage_metadata.candidates_token_count, r.usage_metadata.cached_content_token_count]}}))
        chunks = list(g.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
        u = chunks[-1].usage_metadata
        print(json.dumps({{"text": "".join(c.text for c in chunks), "usage": [u.prompt_token_count, u.candidates_token_count, u.cached_content_token_count], "n": len(chunks)}}))
    """)
    assert out[0] == {"text": fake.reply_text, "usage": [100, 20, 30]}
    assert out[1] == {"text": fake.reply_text, "usage": [100, 20, 30], "n": 3}
    plain, streamed = fake.requests
    assert plain.path == "/v1/models/gemini-2.5-flash:generateContent"
    assert streamed.path == "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert plain.headers["x-goog-api-key"] == GEMINI_KEY and plain.auth == "gemini_key"
    assert plain.json["contents"][0]["parts"][0]["text"] == "hi"


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_boto3_bedrock_runtime(fake: FakeUpstream) -> None:
    fake.configure(usage=USAGE, n_chunks=2)
    out = run_json(
        f"""
        import base64, json, boto3, botocore.exceptions
        b = boto3.client("bedrock-runtime", endpoint_url="{fake.url}", region_name="us-east-1")
        model = "anthropic.claude-3-5-sonnet-20240620-v1:0"
        body = json.dumps({{"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16, "messages": [{{"role": "user", "content": "hi"}}]}})
        r = b.invoke_model(modelId=model, body=body)
        h = r["ResponseMetadata"]["HTTPHeaders"]
        print(json.dumps({{"text": json.loads(r["body"].read())["content"][0]["text"], "usage": [h["x-amzn-bedrock-input-token-count"], h["x-amzn-bedrock-output-token-count"]]}}))
        r = b.invoke_model_with_response_stream(modelId=model, body=body)
        events = [json.loads(e["chunk"]["bytes"]) for e in r["body"]]
        text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        m = events[-1]["amazon-bedrock-invocationMetrics"]
        print(json.dumps({{"text": text, "usage": [m["inputTokenCount"], m["outputTokenCount"]]}}))
        r = b.converse(modelId=model, messages=[{{"role": "user", "content": [{{"text": "hi"}}]}}])
        print(json.dumps({{"text": r["output"]["message"]["content"][0]["text"], "usage": [r["usage"]["inputTokens"], r["usage"]["outputTokens"]]}}))
        # change the body after botocore signed it: the fake must refuse the signature
        def tamper(request, **kw):
            request.body = request.body.replace(b'"max_tokens": 16', b'"max_tokens": 17')
        b.meta.events.register("before-send.bedrock-runtime.InvokeModel", tamper)
        try:
            b.invoke_model(modelId=model, body=body)
            print(json.dumps({{"error": None}}))
        except botocore.exceptions.ClientError as e:
            print(json.dumps({{"error": e.response["Error"]["Code"], "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}}))
        bad = boto3.client("bedrock-runtime", endpoint_url="{fake.url}", region_name="us-east-1", aws_access_key_id="{AWS_ACCESS_KEY_ID}", aws_secret_access_key="not-the-secret")
        try:
            bad.invoke_model(modelId=model, body=body)
        except botocore.exceptions.ClientError as e:
            print(json.dumps({{"error": e.response["Error"]["Code"], "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}}))
    """,
        env={**AWS_ENV, "AWS_MAX_ATTEMPTS": "1"},
    )
    assert out[:3] == [
        {"text": fake.reply_text, "usage": ["70", "20"]},
        {"text": fake.reply_text, "usage": [70, 20]},
        {"text": fake.reply_text, "usage": [70, 20]},
    ]
    assert out[3:] == [{"error": "InvalidSignatureException", "status": 403}] * 2
    recs = fake.requests
    assert [r.sigv4 for r in recs] == [True, True, True, False, False]
    assert recs[0].path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke"
    assert recs[1].route_path.endswith("/invoke-with-response-stream") and recs[1].stream
    assert recs[3].json["max_tokens"] == 17  # what arrived is the tampered body
    assert (
        recs[0]
        .headers["authorization"]
        .startswith(f"AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY_ID}/")
    )


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_vertex_sdks_with_google_tokens(tmp_path: Path) -> None:
    with FakeTokenServer() as tokens, FakeUpstream(google_token_valid=tokens.is_valid) as fake:
        sa = tokens.make_service_account_file(tmp_path)
        out = run_json(
            f"""
            import json
            from anthropic import AnthropicVertex
            from google import genai
            v = AnthropicVertex(region="us-east5", project_id="fake-project", base_url="{fake.url}/v1", max_retries=0)
            msgs = [{{"role": "user", "content": "hi"}}]
            m = v.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=16, messages=msgs)
            print(json.dumps({{"text": m.content[0].text}}))
            with v.messages.stream(model="claude-sonnet-4-5@20250929", max_tokens=16, messages=msgs) as s:
                print(json.dumps({{"text": s.get_final_message().content[0].text}}))
            g = genai.Client(vertexai=True, project="fake-project", location="us-central1", http_options={{"base_url": "{fake.url}"}})
            print(json.dumps({{"text": g.models.generate_content(model="gemini-2.5-flash", contents="hi").text}}))
        """,
            env={"GOOGLE_APPLICATION_CREDENTIALS": str(sa)},
        )
        assert out == [{"text": fake.reply_text}] * 3
        raw, streamed, gem = fake.requests
        assert raw.route_path.endswith(
            "/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
        )
        assert streamed.route_path.endswith(":streamRawPredict") and streamed.json["stream"] is True
        assert "model" not in raw.json and raw.json["anthropic_version"]
        assert gem.route == "vertex.gemini" and gem.route_path.startswith(
            "/v1beta1/projects/fake-project/locations/us-central1/"
        )
        assert all(
            r.auth == "google_token" and r.headers["authorization"].startswith("Bearer ya29.fake-")
            for r in (raw, streamed, gem)
        )


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_sdk_runner_scrubs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-runner")
    proc = run_sdk(
        "import os, sys; print(os.environ.get('OPENAI_API_KEY'), os.environ.get('X_T'), sys.prefix)",
        env={"X_T": "1"},
    )
    seen, given, prefix = proc.stdout.split()
    assert (seen, given) == ("None", "1") and prefix.endswith(".venv-sdk")
