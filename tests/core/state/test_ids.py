"""Row ids that sort by creation time (state/ids.py)."""

from __future__ import annotations

import re
import time
import uuid

from candela_mitm.state.ids import ordered_id


def test_an_ordered_id_has_the_shape_of_a_random_one() -> None:
    made = ordered_id("r_")
    assert re.fullmatch(r"r_[0-9a-f]{32}", made)
    assert len(made) == len("r_" + uuid.uuid4().hex)


def test_ids_sort_by_the_millisecond_they_were_made_in() -> None:
    first = ordered_id("r_")
    time.sleep(0.002)
    second = ordered_id("r_")
    assert first < second
    made_ms = int(second[2:14], 16)
    assert abs(made_ms - time.time_ns() // 1_000_000) < 60_000


def test_ids_made_in_one_millisecond_stay_apart() -> None:
    ids = {ordered_id("r_") for _ in range(10_000)}
    assert len(ids) == 10_000
