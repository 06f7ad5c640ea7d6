"""What a forked child of the test process says: for state kept per process (ids read ahead,
a process's owner name) that a fork's child must not share with its parent."""

from __future__ import annotations

import os
from collections.abc import Callable


def in_a_fork(say: Callable[[], str]) -> tuple[int, str]:
    """Fork; the child runs `say` and writes its answer to the parent, which returns the
    child's pid and that answer."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, leave at once
        try:
            os.write(w, say().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as got:
        answer = got.read()
    os.waitpid(pid, 0)
    return pid, answer
