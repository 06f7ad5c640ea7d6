"""Local guard: which Hosts name this machine's Candela, which bodies are JSON, the UI token."""

from __future__ import annotations

import pytest

from candela_mitm.local.guard import (
    allowed_host_names,
    host_allowed,
    is_json_content_type,
    token_path,
    ui_token,
    with_token,
)

NAMES = allowed_host_names("127.0.0.1")


@pytest.mark.parametrize(
    "host, port, ok",
    [
        ("127.0.0.1:1234", 1234, True),
        ("localhost:1234", 1234, True),
        ("LOCALHOST:1234", 1234, True),
        ("[::1]:1234", 1234, True),
        ("127.0.0.2:1234", 1234, True),  # all of 127/8 is this machine
        ("localhost", 80, True),
        ("localhost", 1234, False),  # no port means 80
        ("localhost:1235", 1234, False),
        ("evil.example:1234", 1234, False),  # DNS rebinding
        ("127.0.0.1.nip.io:1234", 1234, False),
        ("10.0.0.5:1234", 1234, False),
        ("[::2]:1234", 1234, False),
        ("localhost:12x4", 1234, False),
        ("", 1234, False),
        (None, 1234, False),
        ("a" * 400, 1234, False),
    ],
)
def test_host_allowed(host, port, ok):
    assert host_allowed(host, NAMES, port) is ok


def test_a_specific_listen_host_is_allowed_too():
    names = allowed_host_names("192.0.2.10")
    assert host_allowed("192.0.2.10:1234", names, 1234)
    assert not host_allowed("192.0.2.11:1234", names, 1234)
    wildcard = allowed_host_names("0.0.0.0")
    assert "0.0.0.0" not in wildcard and wildcard == allowed_host_names("::")


@pytest.mark.parametrize(
    "ctype, ok",
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("text/plain; charset=utf-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("text/json+xml", False),
        ("", False),
        (None, False),
    ],
)
def test_is_json_content_type(ctype, ok):
    assert is_json_content_type(ctype) is ok


def test_ui_token_is_made_once_private_and_kept(tmp_path):
    path = token_path(str(tmp_path / "cdl" / "audit.db"))
    first = ui_token(path)
    assert path.parent == tmp_path / "cdl" and path.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32 and ui_token(path) == first
    path.write_text("short\n")  # damaged: replaced
    assert ui_token(path) not in ("short", first)


def test_with_token_puts_a_meta_tag_in_the_head():
    page = with_token(b"<html><head><title>x</title></head></html>", "tok")
    assert b'<head>\n<meta name="candela-local-token" content="tok">' in page
