"""addons/server.py: what serve() does to the process before mitmproxy runs."""

from __future__ import annotations

import gc

from candela_mitm.addons.server import freeze_startup_heap


def test_the_startup_heap_is_frozen_out_of_the_collectors_sight() -> None:
    kept: list[object] = []
    kept.append(kept)  # a cycle: the collector tracks it
    garbage: list[object] = []
    garbage.append(garbage)
    del garbage  # unreachable: collected first, not frozen
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: never walked again
        made_after: list[object] = []
        made_after.append(made_after)
        assert any(o is made_after for o in gc.get_objects())  # later objects are collected
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
