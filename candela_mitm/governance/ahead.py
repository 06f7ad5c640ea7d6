"""When a slice or rate block asked in the background is taken: not beside the request that
asked it (issue 21, scenario 3).

A request admitted in memory (or checked in the store) may ask for the next budget slice or rate
block (governance/slices.py, governance/rate_leases.py). The ask is a store call: a write
transaction on the event loop (SQLite) or a script (Redis), a few hundred microseconds on the
cold caches of a request every few seconds. Run at once, it lands in the event-loop turns in
which the asking request is being forwarded, ahead of its first upstream byte. Nothing needs the
new slice or block before the user's next request, so the take waits a quarter of the gap seen
between the user's requests, at most ASK_AFTER_MAX_S, and none under ASK_AFTER_MIN_GAP_S (a busy
user's next request is milliseconds away: its take runs at once, as before)."""

from __future__ import annotations

ASK_AFTER_MAX_S = 0.5
ASK_AFTER_MIN_GAP_S = 0.004


def ask_after(gap_s: float) -> float:
    """How long a take asked now may wait, for a user whose requests come `gap_s` apart."""
    if gap_s < ASK_AFTER_MIN_GAP_S:
        return 0.0
    return min(ASK_AFTER_MAX_S, gap_s / 4)
