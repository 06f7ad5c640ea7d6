"""`candela enforce`'s command line (cli/enforce.py); on the real kernel: tests/privileged/test_enforce.py."""

from __future__ import annotations

import io

import pytest

from candela_mitm.cli import enforce
from candela_mitm.cli import main as cli
from candela_mitm.enforcement import host


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["host"], {"command_name": "host", "proxy_port": None, "provider": [],
                    "cgroup": host.DEFAULT_CGROUP, "proxy_pid": [], "state": host.STATE_PATH}),
        (["host", "--proxy-port", "8443", "--provider", "a", "--provider", "b", "--proxy-pid", "7"],
         {"proxy_port": 8443, "provider": ["a", "b"], "proxy_pid": [7]}),
        (["off"], {"command_name": "off", "cgroup": host.DEFAULT_CGROUP}),
        (["status", "--json"], {"command_name": "status", "json": True}),
        (["exec", "--", "candela", "serve"], {"command_name": "exec", "command": ["--", "candela", "serve"]}),
    ],
)  # fmt: skip
def test_parser(argv, expected):
    args = vars(enforce.build_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


def test_a_subcommand_is_required():
    with pytest.raises(SystemExit) as e:
        enforce.main([])
    assert e.value.code == 2


def test_exec_wants_a_command(capsys):
    assert enforce.main(["exec", "--"]) == 2
    assert "give a command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "removal, code, said",
    [
        (host.Removal(2, True, "/cg/candela-proxy", []), 0,
         "off (2 eBPF program(s) detached, chain removed, cgroup removed)"),
        (host.Removal(0, False, None, []), 0, "off (0 eBPF program(s) detached, no chain)"),
        (host.Removal(0, True, None, ["eBPF: busy"]), 1, "chain removed"),
    ],
)  # fmt: skip
def test_off_reports_what_was_removed(monkeypatch, capsys, tmp_path, removal, code, said):
    asked = {}

    def disable(**kw):
        asked.update(kw)
        return removal

    monkeypatch.setattr(host, "disable", disable)
    monkeypatch.setattr(enforce.os, "geteuid", lambda: 0)
    out = io.StringIO()
    state = str(tmp_path / "enforce.json")
    assert enforce.main(["--state", state, "off", "--cgroup", "x"], out=out) == code
    assert said in out.getvalue()
    assert asked["state_path"] == state and asked["cgroup"] == "x"
    assert ("error: eBPF: busy" in capsys.readouterr().err) == bool(removal.failures)


def test_candela_enforce_dispatches_here():
    assert cli.SUBCOMMANDS["enforce"] == "candela_mitm.cli.enforce:main"


@pytest.mark.parametrize(
    "argv, config, scope",
    [
        ([], "", None),
        (["--scope", "/ci.slice"], "", "/ci.slice"),
        ([], "interception: {enforce_scope: /agents.slice}\n", "/agents.slice"),
        (["--scope", "/ci.slice"], "interception: {enforce_scope: /agents.slice}\n", "/ci.slice"),
    ],
)
def test_the_scope_comes_from_the_flag_else_the_config(monkeypatch, tmp_path, argv, config, scope):
    asked = {}

    def enable(names, port, **kw):
        asked.update(kw)
        (tmp_path / "cgroup.procs").write_text("")  # Candela's cgroup, empty: a warning only
        return host.EnforceState(port, str(tmp_path), {})

    monkeypatch.setattr(host, "enable", enable)
    monkeypatch.setattr(enforce.os, "geteuid", lambda: 0)
    path = tmp_path / "candela.yaml"
    path.write_text(config)
    out = io.StringIO()
    rc = enforce.main(["host", "--proxy-port", "8443", "--config", str(path), *argv], out=out)
    assert rc == 0 and asked["scope"] == scope
