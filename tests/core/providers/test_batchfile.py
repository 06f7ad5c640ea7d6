"""Batch input files: the multipart upload of OpenAI's Batch API, read line by line."""

from __future__ import annotations

import json

import pytest

from candela_mitm.providers.batchfile import MAX_LINES, BatchInput, parse_upload

BOUNDARY = "----candela-test-boundary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(fields: dict[str, bytes], filename: str = "batch.jsonl") -> bytes:
    """A body as httpx writes it for `files.create(file=..., purpose=...)`."""
    out = b""
    for name, value in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if name == "file" else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n".encode()
        if name == "file":
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def line(custom_id: str, model: str, url: str = "/v1/chat/completions", **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": model, **body}}).encode()


def test_a_batch_upload_is_read_line_by_line():
    data = b"\n".join([line("a", "gpt-4o-mini", max_tokens=10), b"",
                       line("b", "gpt-4o", "/v1/responses", max_output_tokens=5),
                       line("c", "gpt-4o-mini", "/v1/embeddings")])
    got = parse_upload(multipart({"purpose": b"batch", "file": data}), CTYPE)
    assert isinstance(got, BatchInput) and got.purpose == "batch"
    assert [(x.custom_id, x.url, x.model) for x in got.lines] == [
        ("a", "/v1/chat/completions", "gpt-4o-mini"), ("b", "/v1/responses", "gpt-4o"),
        ("c", "/v1/embeddings", "gpt-4o-mini"),
    ]
    assert got.models == ("gpt-4o-mini", "gpt-4o")  # each once, in order
    assert got.lines[0].body["max_tokens"] == 10


def test_another_purpose_is_read_but_not_its_file():
    got = parse_upload(multipart({"purpose": b"fine-tune", "file": b"not jsonl"}), CTYPE)
    assert isinstance(got, BatchInput) and got.purpose == "fine-tune" and got.lines == ()


@pytest.mark.parametrize(
    "raw, ctype, why",
    [
        (b"{}", "application/json", "multipart/form-data"),
        (multipart({"file": line("a", "m")}), CTYPE, "no 'purpose'"),
        (multipart({"purpose": b"batch"}), CTYPE, "no 'file'"),
        (multipart({"purpose": b"batch", "file": b""}), CTYPE, "no request"),
        (multipart({"purpose": b"batch", "file": line("a", "m") + b"\n{nope"}), CTYPE, "line 2 is not JSON"),
        (multipart({"purpose": b"batch", "file": b'{"custom_id": "a"}'}), CTYPE, "line 1"),
        (multipart({"purpose": b"batch", "file": line("a", "m", "/v1/files")}), CTYPE, "'url'"),
        (multipart({"purpose": b"batch", "file": line("a", "")}), CTYPE, "'body.model'"),
        (multipart({"purpose": b"batch",
                    "file": b'{"method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}'}),
         CTYPE, "'method' must be POST"),
    ],
)
def test_what_is_wrong_is_said(raw, ctype, why):
    got = parse_upload(raw, ctype)
    assert isinstance(got, str) and why in got


def test_a_file_longer_than_a_batch_is_refused():
    data = b"\n".join(line(str(i), "m") for i in range(MAX_LINES + 1))
    got = parse_upload(multipart({"purpose": b"batch", "file": data}), CTYPE)
    assert isinstance(got, str) and str(MAX_LINES) in got
