"""`candela keys`: a key minted into a config as its sha256 only, and the first-start hint."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from candela_mitm.cli import keys
from candela_mitm.config import load_config, parse_config


def minted(out: str) -> str:
    [key] = [w for w in out.split() if w.startswith(keys.KEY_PREFIX)]
    return key


def test_create_admin_writes_a_new_config(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.yaml"
    out = io.StringIO()
    assert keys.main(["create-admin", "--config", str(path)], out) == 0
    key = minted(out.getvalue())
    cfg = load_config(path)
    assert [(k.sha256, k.user) for k in cfg.auth.api_keys] == [(keys.digest(key), "admin")]
    assert cfg.auth.admins == ["admin"]
    assert key not in path.read_text()


def test_appends_auth_to_a_config_without_one_keeping_comments(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# my comment\nlisten:\n  port: 9000  # why\n")
    out = io.StringIO()
    assert keys.main(["add", "--user", "alice@example.com", "--config", str(path)], out) == 0
    text = path.read_text()
    assert text.startswith("# my comment\nlisten:\n  port: 9000  # why\n")
    cfg = load_config(path)
    assert cfg.listen.port == 9000 and cfg.auth.admins == []
    assert cfg.auth.api_keys[0].sha256 == keys.digest(minted(out.getvalue()))


def test_a_config_with_auth_is_left_alone_unless_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    original = "auth:\n  admins: [root@example.com]  # keep\n"
    path.write_text(original)
    out = io.StringIO()
    assert keys.main(["create-admin", "--config", str(path)], out) == 0
    assert path.read_text() == original
    key = minted(out.getvalue())
    printed = out.getvalue().split("for admin, then reload Candela:", 1)[1].split("(or run", 1)[0]
    shown = parse_config(yaml.safe_load(printed))
    assert shown.auth.admins == ["root@example.com", "admin"]
    assert shown.auth.api_keys[0].sha256 == keys.digest(key)
    out = io.StringIO()
    assert keys.main(["create-admin", "--config", str(path), "--rewrite"], out) == 0
    cfg = load_config(path)
    assert cfg.auth.api_keys[0].sha256 == keys.digest(minted(out.getvalue()))


def test_an_invalid_config_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("listen:\n  port: not-a-port\n")
    assert keys.main(["create-admin", "--config", str(path)], io.StringIO()) == 2
    assert path.read_text() == "listen:\n  port: not-a-port\n"


def test_first_start_hint_only_when_nobody_can_get_in() -> None:
    out = io.StringIO()
    keys.first_start_hint(parse_config({}), None, out)
    assert "keys create-admin --config ~/.candela/config.yaml" in out.getvalue()
    for data in (
        {"auth": {"api_keys": [{"sha256": "0" * 64, "user": "u"}]}},
        {"auth": {"oidc": {"audiences": ["x"]}}},
        {"auth": {"required": False}},
    ):
        out = io.StringIO()
        keys.first_start_hint(parse_config(data), None, out)
        assert out.getvalue() == ""
