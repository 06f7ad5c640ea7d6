"""`candela run`'s command line (cli/run.py); the sandbox itself: tests/privileged/test_sandbox.py."""

import argparse

import pytest

from candela_mitm.cli import main as cli
from candela_mitm.cli import run


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("api.openai.com:198.18.0.1", ("api.openai.com", "198.18.0.1")),
        ("API.OpenAI.com.:10.0.0.1", ("api.openai.com", "10.0.0.1")),
    ],
)
def test_add_host(value, parsed):
    assert run.parse_add_host(value) == parsed


@pytest.mark.parametrize("value", ["api.openai.com", ":1.2.3.4", "x:fd00::1", "x:300.1.1.1"])
def test_add_host_refuses(value):
    with pytest.raises(argparse.ArgumentTypeError):
        run.parse_add_host(value)


@pytest.mark.parametrize("argv", [[], ["--user", "u"], ["--"]])
def test_run_needs_a_command(argv):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2


def test_candela_run_dispatches_here():
    assert cli.SUBCOMMANDS["run"] == "candela_mitm.cli.run:main"
