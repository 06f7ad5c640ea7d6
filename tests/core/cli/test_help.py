"""`candela --help` lists every subcommand with one line, and each answers its own --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from candela_mitm.cli import main as cli

CANDELA = str(Path(sys.executable).parent / "candela")


def test_help_lists_every_subcommand_once() -> None:
    out = subprocess.run([CANDELA, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {
        line.split()[0]
        for line in out.stdout.split("subcommands (candela <subcommand> --help):", 1)[
            1
        ].splitlines()
        if line.strip()
    }
    assert listed == set(cli.SUBCOMMANDS) | {"serve"}
    assert set(cli.SUBCOMMAND_HELP) == set(cli.SUBCOMMANDS) | {"serve"}


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_each_subcommand_answers_help(name: str) -> None:
    out = subprocess.run([CANDELA, name, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: candela {name}")
