"""iptables and ip6tables: the one runner every firewall change of Candela goes through.

`candela enforce host` replaces its nat chain with `iptables-restore`; `candela run` inserts and
deletes tagged rules per sandbox (netns/firewall.py). Both call the binaries here, so where they
are found, the xtables lock (`-w`), the timeout and what a failure raises are decided once.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Debian installs the binaries in /usr/sbin, which a non-login root shell may not have on PATH.
SBIN = "/usr/sbin:/sbin"
TIMEOUT_S = 30.0  # -w waits for the xtables lock without limit; a stuck holder must not hang us

Runner = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]


def find(name: str) -> str | None:
    """The path of an iptables binary, on PATH or in the sbin folders; None if not installed."""
    return shutil.which(name) or shutil.which(name, path=SBIN)


def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an iptables binary (argv[0] is its name); its exit status is the caller's to judge.

    FileNotFoundError (saying which Debian package has it) if the binary is missing; OSError if
    it does not finish in TIMEOUT_S.
    """
    path = find(argv[0])
    if path is None:
        raise FileNotFoundError(f"{argv[0]} is not installed (Debian: apt-get install iptables)")
    try:
        return subprocess.run(
            [path, *argv[1:]], input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise OSError(f"{argv[0]} did not finish in {TIMEOUT_S:.0f}s") from e


@dataclass(frozen=True)
class Iptables:
    """One family's binaries (`iptables` or `ip6tables`), run through `runner`."""

    binary: str = "iptables"
    runner: Runner = run

    def table(self, table: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`<binary> -w -t <table> ARGS...`"""
        return self.runner([self.binary, "-w", "-t", table, *args], None)

    def ok(self, table: str, *args: str) -> bool:
        return self.table(table, *args).returncode == 0

    def restore(self, text: str) -> subprocess.CompletedProcess[str]:
        """`<binary>-restore -w --noflush`: the chains the text names are replaced atomically,
        the others kept."""
        return self.runner([f"{self.binary}-restore", "-w", "--noflush"], text)

    def save(self) -> subprocess.CompletedProcess[str] | None:
        """`<binary>-save`: every table's rules; None when the binary is not installed."""
        try:
            return self.runner([f"{self.binary}-save"], None)
        except FileNotFoundError:
            return None
