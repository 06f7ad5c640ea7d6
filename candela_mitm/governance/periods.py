"""Budget periods: daily, weekly (ISO weeks, from Monday) or monthly, in UTC or a time zone."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PeriodKind = Literal["daily", "weekly", "monthly"]
PERIOD_KINDS: tuple[str, ...] = get_args(PeriodKind)


@functools.cache
def zone(name: str) -> tzinfo:
    """The time zone named `name` (IANA, e.g. Europe/Paris); ValueError if there is none."""
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Paris)") from None


def _first_day(kind: str, day: date) -> date:
    if kind == "weekly":
        return day - timedelta(days=day.weekday())
    if kind == "monthly":
        return day.replace(day=1)
    return day


def _next_first_day(kind: str, first: date) -> date:
    if kind == "weekly":
        return first + timedelta(days=7)
    if kind == "monthly":
        return date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first + timedelta(days=1)


@dataclass(frozen=True)
class BudgetPeriod:
    """The span a budget covers and when it starts again.

    Its `key` names the span in the state store: a daily UTC period keeps the plain
    `YYYY-MM-DD` of the UTC day (the rows every Candela before periods wrote), the others
    `<kind>:<first local day>[@<zone>]`, so two settings never share a row.
    """

    kind: PeriodKind = "daily"
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        if self.kind not in PERIOD_KINDS:
            raise ValueError(f"period must be one of {', '.join(PERIOD_KINDS)}, got {self.kind!r}")
        zone(self.time_zone)

    def _local_first_day(self, now: datetime) -> date:
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return _first_day(self.kind, now.astimezone(zone(self.time_zone)).date())

    def key(self, now: datetime) -> str:
        first = self._local_first_day(now)
        if self.kind == "daily" and self.time_zone == "UTC":
            return first.isoformat()
        suffix = "" if self.time_zone == "UTC" else f"@{self.time_zone}"
        return f"{self.kind}:{first.isoformat()}{suffix}"

    def starts_at(self, now: datetime) -> datetime:
        """When the period holding `now` began, in UTC."""
        first = self._local_first_day(now)
        return datetime.combine(first, time(), tzinfo=zone(self.time_zone)).astimezone(UTC)

    def resets_at(self, now: datetime) -> datetime:
        """When the period holding `now` ends (the next one begins), in UTC."""
        nxt = _next_first_day(self.kind, self._local_first_day(now))
        return datetime.combine(nxt, time(), tzinfo=zone(self.time_zone)).astimezone(UTC)


DAILY_UTC = BudgetPeriod()
