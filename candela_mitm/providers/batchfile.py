"""Batch input files: OpenAI's multipart `POST /v1/files` upload of a batch's JSONL, read line by line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

# the endpoints a batch line may call (https://platform.openai.com/docs/api-reference/batch)
BATCH_URLS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions")
MAX_LINES = 50_000  # OpenAI's most requests per batch


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    url: str
    model: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchInput:
    purpose: str
    lines: tuple[BatchLine, ...]

    @property
    def models(self) -> tuple[str, ...]:
        """Every model the lines name, once, in their order."""
        return tuple(dict.fromkeys(line.model for line in self.lines))


def parse_upload(raw: bytes, content_type: str) -> BatchInput | str:
    """A multipart/form-data upload: its `purpose` and, for a batch, its file's lines; a
    sentence saying what is wrong otherwise. Pure and CPU-bound: call it off the event loop."""
    if not content_type.lower().startswith("multipart/form-data"):
        return "the upload must be multipart/form-data"
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + raw)
    if not msg.is_multipart():
        return "the multipart body cannot be read"
    purpose: str | None = None
    data: bytes | None = None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        if name == "purpose":
            purpose = payload.decode("utf-8", "replace").strip()
        elif name == "file":
            data = payload
    if purpose is None:
        return "the upload names no 'purpose'"
    if purpose != "batch":
        return BatchInput(purpose, ())
    if data is None:
        return "the upload has no 'file'"
    return _lines(data)


def _lines(data: bytes) -> BatchInput | str:
    out: list[BatchLine] = []
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(out) >= MAX_LINES:
            return f"a batch holds at most {MAX_LINES} requests"
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return f"line {n} is not JSON"
        body = obj.get("body") if isinstance(obj, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(obj, dict) or not isinstance(body, dict):
            return f"line {n}: a batch line is an object with a 'body'"
        if obj.get("method") != "POST" or obj.get("url") not in BATCH_URLS:
            return f"line {n}: 'method' must be POST and 'url' one of {', '.join(BATCH_URLS)}"
        if not isinstance(model, str) or not model.strip():
            return f"line {n}: 'body.model' is required"
        out.append(BatchLine(str(obj.get("custom_id", "")), obj["url"], model, body))
    if not out:
        return "the batch file holds no request"
    return BatchInput("batch", tuple(out))
