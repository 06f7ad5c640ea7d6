"""enforcement/host.py: the state file, the scope, enabling for the proxy."""

from __future__ import annotations

from pathlib import Path

import pytest

from candela_mitm.config import Config
from candela_mitm.enforcement import host as enforce
from candela_mitm.enforcement.host import EnforceState


def test_the_scope_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ci.slice").mkdir()
    assert enforce.enforced_scope(None, tmp_path) is None
    assert enforce.enforced_scope("/", tmp_path) is None
    assert enforce.enforced_scope("/ci.slice", tmp_path) == tmp_path / "ci.slice"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        enforce.enforced_scope("/nobody-here", tmp_path)


@pytest.mark.parametrize(
    "value, ok",
    [(None, True), ("/ci.slice", True), ("/a/b-c", True), ("ci.slice", False), ("/a/../b", False)],
)
def test_config_enforce_scope_is_a_cgroup_path(value: str | None, ok: bool) -> None:
    config = {"interception": {"enforce_scope": value}}
    if ok:
        assert Config.model_validate(config).interception.enforce_scope == value
    else:
        with pytest.raises(ValueError, match="interception.enforce_scope"):
            Config.model_validate(config)


def test_state_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "enforce.json")
    state = EnforceState(8443, "/sys/fs/cgroup/candela-proxy", {"a": ["10.0.0.1"]}, [1, 2], 5.0)
    state.save(path)
    assert EnforceState.load(path) == state
    Path(path).write_text("{not json")
    assert EnforceState.load(path) is None
    Path(path).write_text('{"unexpected": 1}')
    assert EnforceState.load(path) is None
    assert EnforceState.load(str(tmp_path / "missing.json")) is None


def test_join_without_enforcement_does_nothing(tmp_path: Path) -> None:
    assert enforce.join(state_path=str(tmp_path / "none.json")) is None


# -- the proxy's side: --enforce host and the refusal feed --------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, "needs transparent mode"),
        ({"mode": "reverse", "interception": {"enforce": "host"}}, "needs transparent mode"),
        ({"mode": "transparent", "interception": {"listen_port": 0}}, "fixed interception"),
    ],
)
def test_enable_for_proxy_refuses_what_cannot_be_enforced(
    config: dict[str, object], expected: str
) -> None:
    from candela_mitm.config import Config
    from candela_mitm.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        enforce.enable_for_proxy(Config.model_validate(config))


@pytest.mark.parametrize(
    "argv, yaml_text",
    [
        (["--enforce", "host"], ""),
        ([], "interception: {enforce: host}\n"),
        (["--enforce", "host", "--mode", "reverse"], "mode: transparent\n"),
    ],
)
def test_server_with_enforce_host_in_reverse_mode_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], yaml_text: str
) -> None:
    from candela_mitm.cli import main as cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert cli.server_main(["--config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err
    assert "enforce host needs transparent mode" in err


def test_config_enforce_is_none_or_host() -> None:
    from candela_mitm.config import Config

    assert Config().interception.enforce == "none"
    host = Config.model_validate({"interception": {"enforce": "host"}})
    assert host.interception.enforce == "host"
    with pytest.raises(ValueError):
        Config.model_validate({"interception": {"enforce": "everything"}})


def test_joined_needs_enforcement_and_the_cgroup(tmp_path: Path) -> None:
    state = str(tmp_path / "enforce.json")
    assert not enforce.joined(state_path=state)
    EnforceState(8443, "/nonexistent/cgroup/candela-proxy", {}, [], 0.0).save(state)
    assert not enforce.joined(state_path=state)


