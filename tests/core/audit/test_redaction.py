"""Tests for redaction: credential-named keys masked anywhere in an entry, bearer and basic
tokens cut out of text (candela_mitm/audit/redaction.py; what the ledger keeps of them is in
test_writer.py)."""

from __future__ import annotations

import pytest

from candela_mitm.audit.redaction import _BEARER, REDACTED, redact

_TEXTS = [
    "alice",
    "Bearer sk-abc.def",
    "bearer   tok",
    "BASIC dXNlcjpwYXNz",
    "see basic auth",
    "xbearer tok",  # no word boundary: kept
    "prefix Bearer tok and basic tok2",
    "0123456789abcdef",
    "Bearer",
    "bearerTOKENabc123",
    "b\u00e9arer\u00b2",  # letters and a digit outside ASCII: alphanumeric, no whitespace
    "bearer\u2003tok",  # an em space is whitespace to the pattern
    "caf\u00e9 B\u00e9arer",
    "",
]


@pytest.mark.parametrize("text", _TEXTS)
def test_redact_of_a_field_is_redact_of_its_text(text: str) -> None:
    # the dict loop redacts a text field itself (without a call for a text with no "b"): the
    # same as the text redacted alone, the general path, and as the pattern's substitution
    expected = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    assert redact(text) == expected
    assert redact({"k": text, "n": 1}) == {"k": expected, "n": 1}
    assert redact({"outer": {"k": text}}) == {"outer": {"k": expected}}


def test_redact_masks_credential_keys_in_any_case_each_time_and_past_the_key_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a key's verdict is remembered (bounded): the same masking on the first call, the next
    # ones, and for keys seen after the cache is full; the copy keeps the order and is new
    import candela_mitm.audit.redaction as w

    monkeypatch.setattr(w, "_KEY_IS_CREDENTIAL", {})
    monkeypatch.setattr(w, "_KEYS_KEPT", 3)
    entry = {"model": "m", "Authorization": "Bearer abc", "n": 1, "API_KEY": "k", 7: "seven",
             "nested": {"Password": "p", "ok": [1, {"token": "t"}]}, "note": "bearer xyz"}  # fmt: skip
    want = {"model": "m", "Authorization": REDACTED, "n": 1, "API_KEY": REDACTED, 7: "seven",
            "nested": {"Password": REDACTED, "ok": [1, {"token": REDACTED}]},
            "note": f"bearer {REDACTED}"}  # fmt: skip
    for _ in range(3):
        out = redact(entry)
        assert out == want and list(out) == list(entry)
        out["model"] = "changed"
        assert entry["model"] == "m"
    assert len(w._KEY_IS_CREDENTIAL) == 3  # the bound held; later keys were looked at each time
