"""Row ids that sort by creation time, for the rows a store looks up by id on the hot path.

A reservation is inserted at admission and looked up by its id at settlement. With random ids
(uuid4) each insert lands on a random leaf of the id's index: once a week of finished
reservations is kept (FINISHED_RESERVATION_TTL_S: ~3 M at 5 requests/s), that index is tens of
thousands of pages, far beyond a connection's page cache: at 1 M reservations an idle user's
admission read 1.3-1.4 pages from the file (a pread each, on the event loop), where a fresh
database reads none (bench/README.md, eleventh session). An id whose head is the time lands on
the index's last leaves, which every recent insert and settlement keeps in the cache.
"""

from __future__ import annotations

import os
import time


def ordered_id(prefix: str) -> str:
    """`prefix` + 32 hex digits: 12 of the time in milliseconds (UUIDv7's layout), 20 random
    (80 bits: ids made in one millisecond by any number of processes stay apart). The same
    length and alphabet as `prefix + uuid4().hex`."""
    return f"{prefix}{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{os.urandom(10).hex()}"
