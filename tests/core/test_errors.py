"""Errors: every Denial is built in errors.py, by a named factory; Refused carries one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import candela_mitm
from candela_mitm import errors
from candela_mitm.errors import Denial, Refused

ROOT = Path(candela_mitm.__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "candela_mitm").rglob("*.py"), *(ROOT / "addons").rglob("*.py")])


def denials_built_in(path: Path) -> list[int]:
    """Lines of `path` that call Denial(...) directly."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name == "Denial":
                lines.append(node.lineno)
    return lines


def test_no_denial_is_built_outside_errors_py():
    assert len(SOURCES) > 50
    built = {
        f"{p.relative_to(ROOT)}:{line}"
        for p in SOURCES
        if p.name != "errors.py" or p.parent.name != "candela_mitm"
        for line in denials_built_in(p)
    }
    assert built == set()
    assert denials_built_in(ROOT / "candela_mitm" / "errors.py")  # the check does see them


@pytest.mark.parametrize(
    "denial, status, code, fields",
    [
        (errors.invalid_field("tenants", "must be a list"), 400, "invalid_parameter", {"field": "tenants"}),
        (errors.invalid_parameter("by", "must be 'tenant'"), 400, "invalid_parameter", {"field": "by", "parameter": "by"}),
        (errors.runtime_action_failed(409, "already running"), 409, "runtime_action_failed", {}),
        (errors.misdirected("api.openai.com", "evil.example"), 421, "misdirected_request",
         {"sni": "api.openai.com", "host": "evil.example"}),
        (errors.region_not_configured("anthropic-bedrock", "a", "b"), 421, "misdirected_request",
         {"sni": "a", "provider": "anthropic-bedrock", "upstream_host": "b"}),
        (errors.proxy_request_denied("CONNECT", "x" * 300), 403, "proxy_not_allowed",
         {"method": "CONNECT", "target": "x" * 200}),
        (errors.host_not_intercepted("example.com"), 403, "host_not_intercepted",
         {"host": "example.com"}),
    ],
)
def test_factories(denial, status, code, fields):
    assert (denial.status, denial.error) == (status, code)
    payload = denial.payload()
    assert payload["error"] == code and payload["message"]
    assert {k: payload[k] for k in fields} == fields


def test_refused_carries_its_denial():
    d = errors.forbidden("no")
    with pytest.raises(errors.CandelaError) as info:
        raise Refused(d)
    assert info.value.denial is d and "403 forbidden" in str(info.value)
    assert isinstance(d, Denial)
