"""Budget periods (governance/periods.py): the store key, start and reset of each kind, in UTC or
a time zone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from candela_mitm.governance.periods import BudgetPeriod

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
MONTHLY = BudgetPeriod("monthly")
WEEKLY_PARIS = BudgetPeriod("weekly", "Europe/Paris")


@pytest.mark.parametrize(
    ("period", "now", "key", "starts", "resets"),
    [
        (BudgetPeriod(), T0, "2026-05-17", "2026-05-17T00:00:00Z", "2026-05-18T00:00:00Z"),
        (BudgetPeriod("weekly"), T0, "weekly:2026-05-11", "2026-05-11T00:00:00Z",
         "2026-05-18T00:00:00Z"),  # 17 May 2026 is a Sunday
        (MONTHLY, T0, "monthly:2026-05-01", "2026-05-01T00:00:00Z", "2026-06-01T00:00:00Z"),
        (MONTHLY, datetime(2026, 12, 31, 23, 59, tzinfo=UTC), "monthly:2026-12-01",
         "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        # Paris is UTC+2 in May: the local Monday starts on Sunday 22:00 UTC
        (WEEKLY_PARIS, T0, "weekly:2026-05-11@Europe/Paris", "2026-05-10T22:00:00Z",
         "2026-05-17T22:00:00Z"),
        (WEEKLY_PARIS, datetime(2026, 5, 17, 22, 30, tzinfo=UTC),
         "weekly:2026-05-18@Europe/Paris", "2026-05-17T22:00:00Z", "2026-05-24T22:00:00Z"),
        # a day across the end of summer time is 25 hours long
        (BudgetPeriod("daily", "Europe/Paris"), datetime(2026, 10, 25, 12, tzinfo=UTC),
         "daily:2026-10-25@Europe/Paris", "2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
        (BudgetPeriod("monthly", "America/New_York"), datetime(2026, 3, 1, 3, tzinfo=UTC),
         "monthly:2026-02-01@America/New_York", "2026-02-01T05:00:00Z", "2026-03-01T05:00:00Z"),
    ],
)
def test_period_keys_and_bounds(
    period: BudgetPeriod, now: datetime, key: str, starts: str, resets: str
) -> None:
    from candela_mitm.state.ports import rfc3339

    assert period.key(now) == key
    assert rfc3339(period.starts_at(now)) == starts
    assert rfc3339(period.resets_at(now)) == resets


def test_period_refuses_unknown_kinds_and_zones() -> None:
    with pytest.raises(ValueError, match="period"):
        BudgetPeriod("yearly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time zone"):
        BudgetPeriod("daily", "Mars/Olympus")


def test_zone_names_utc_and_iana_zones_only() -> None:
    from candela_mitm.governance.periods import zone

    assert zone("UTC") is UTC
    assert datetime(2026, 1, 1, tzinfo=zone("Europe/Paris")).utcoffset().total_seconds() == 3600
    for bad in ("Mars/Olympus", "", "../etc/passwd"):
        with pytest.raises(ValueError, match="unknown time zone"):
            zone(bad)
