"""When periodic tasks are due: ``schedule`` (every N seconds) and ``crontab`` (Celery's fields and syntax).

A schedule answers two questions about moments (Unix timestamps): the latest due time at or before a
moment (:meth:`~BaseSchedule.last_due`) and the first one after it (:meth:`~BaseSchedule.next_due`). The
answers depend on nothing but the schedule, the moment and the time zone, so every beat process computes
the same due times, which is what lets several of them agree on which due time a run belongs to.

- ``schedule(run_every)`` is due at every multiple of ``run_every`` seconds since the Unix epoch: a 30 s
  schedule at :00 and :30 of each minute, an hourly one on the hour (UTC). Celery counts from the last
  run instead, so its due times drift and differ between processes.
- ``crontab(...)`` is due when the wall clock in the zone matches every field. Around a daylight saving
  change: a time the clock skips (spring forward) is due at the moment of the change, once; a time the
  clock shows twice (fall back) is due at its first occurrence, and at both when ``hour`` is every hour.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as wall_time
from typing import Any, TypeAlias

from aqueue.exceptions import InvalidSchedule

__all__ = ["BaseSchedule", "Cronspec", "crontab", "maybe_schedule", "schedule"]

Cronspec: TypeAlias = int | str | Iterable[int]
"""A crontab field: a number, a pattern such as ``'*/15'`` or ``'mon-fri'``, or a collection of numbers."""

_DAY_NAMES = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTH_NAMES = "january february march april may june july august september october november december"
_DAYS = {key: n for n, name in enumerate(_DAY_NAMES) for key in (name, name[:3])}
_MONTHS = {key: n + 1 for n, name in enumerate(_MONTH_NAMES.split()) for key in (name, name[:3])}
_LONGEST_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
_PATTERNS = "'*', '*/15', ranges such as '8-17' or '8-17/2', or a comma-separated list of these"
_FIELDS: dict[str, tuple[int, int, dict[str, int], str]] = {
    "minute": (0, 59, {}, f"numbers 0-59, {_PATTERNS}"),
    "hour": (0, 23, {}, f"numbers 0-23, {_PATTERNS}"),
    "day_of_week": (0, 6, _DAYS, f"numbers 0-6 (Sunday is 0), day names ('mon', 'mon-fri'), {_PATTERNS}"),
    "day_of_month": (1, 31, {}, f"numbers 1-31, {_PATTERNS}"),
    "month_of_year": (1, 12, _MONTHS, f"numbers 1-12, month names ('jan', 'jun-aug'), {_PATTERNS}"),
}
_HORIZON_DAYS = 366 * 41
"""How far to search for a matching day: a 29 February that is also a Monday can be 40 years away."""


class BaseSchedule(ABC):
    """When an entry of ``beat_schedule`` is due. Moments are Unix timestamps; ``zone`` is the app's zone."""

    @abstractmethod
    def last_due(self, now: float, zone: tzinfo = UTC) -> float:
        """The latest due time at or before ``now``."""

    @abstractmethod
    def next_due(self, after: float, zone: tzinfo = UTC) -> float:
        """The first due time strictly after ``after``."""


class schedule(BaseSchedule):
    """Due every ``run_every`` (seconds, or a timedelta), at its multiples since the Unix epoch.

    Raises:
        InvalidSchedule: ``run_every`` is not a positive number of seconds or a timedelta.
    """

    __slots__ = ("run_every", "seconds")

    def __init__(self, run_every: float | timedelta) -> None:
        seconds = _seconds(run_every)
        if seconds is None:
            raise InvalidSchedule(
                f"Invalid schedule(run_every={run_every!r}): use a positive number of seconds or a timedelta."
            )
        self.seconds = seconds
        self.run_every = timedelta(seconds=seconds)

    def last_due(self, now: float, zone: tzinfo = UTC) -> float:
        k = math.floor(now / self.seconds)
        while (k + 1) * self.seconds <= now:  # float division may land one step short or long
            k += 1
        while k * self.seconds > now:
            k -= 1
        return k * self.seconds

    def next_due(self, after: float, zone: tzinfo = UTC) -> float:
        due = self.last_due(after) + self.seconds
        return due if due > after else due + self.seconds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, schedule) and other.seconds == self.seconds

    def __hash__(self) -> int:
        return hash(self.seconds)

    def __repr__(self) -> str:
        return f"<freq: {self.seconds:g}s>"


class crontab(BaseSchedule):
    """Due when the wall clock matches every field, in the app's zone (Celery's fields and syntax).

    ``crontab(minute=0, hour='*/3')``, ``crontab(hour=7, minute=30, day_of_week='mon-fri')``,
    ``crontab(0, 0, day_of_month='1-7', day_of_week='mon')`` (the first Monday of each month: a day must
    match day_of_week, day_of_month and month_of_year, as in Celery).

    Raises:
        InvalidSchedule: a field that cannot be parsed (the message quotes it and says what it takes), or
            days of the month that no month of ``month_of_year`` has.
    """

    __slots__ = ("_day_minutes", "_every_hour", "_spec", *_FIELDS)

    minute: frozenset[int]
    hour: frozenset[int]
    day_of_week: frozenset[int]
    day_of_month: frozenset[int]
    month_of_year: frozenset[int]

    def __init__(
        self,
        minute: Cronspec = "*",
        hour: Cronspec = "*",
        day_of_week: Cronspec = "*",
        day_of_month: Cronspec = "*",
        month_of_year: Cronspec = "*",
    ) -> None:
        specs = {
            "minute": minute,
            "hour": hour,
            "day_of_week": day_of_week,
            "day_of_month": day_of_month,
            "month_of_year": month_of_year,
        }
        for field, spec in specs.items():
            setattr(self, field, _expand(field, spec))
        self._spec = " ".join(
            _shown(specs[f]) for f in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        if not any(day <= _LONGEST_MONTH[month] for month in self.month_of_year for day in self.day_of_month):
            raise InvalidSchedule(
                f"crontab(day_of_month={day_of_month!r}, month_of_year={month_of_year!r}) is never due: "
                "no month in month_of_year has any of those days."
            )
        self._day_minutes = sorted(h * 60 + m for h in self.hour for m in self.minute)
        self._every_hour = len(self.hour) == 24

    @classmethod
    def from_string(cls, line: str) -> crontab:
        """A crontab from a cron line, ``'minute hour day_of_month month_of_year day_of_week'``."""
        fields = line.split()
        if len(fields) != 5:
            raise InvalidSchedule(
                f"Invalid cron line {line!r}: give five fields, 'minute hour day_of_month month_of_year "
                "day_of_week', such as '30 7 * * mon-fri'."
            )
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute, hour, day_of_week, day_of_month, month_of_year)

    def last_due(self, now: float, zone: tzinfo = UTC) -> float:
        for day in self._days(now, zone, -1):
            instants = self._instants(day, zone)
            i = bisect.bisect_right(instants, now)
            if i:
                return instants[i - 1]
        raise self._never()

    def next_due(self, after: float, zone: tzinfo = UTC) -> float:
        for day in self._days(after, zone, 1):
            instants = self._instants(day, zone)
            i = bisect.bisect_right(instants, after)
            if i < len(instants):
                return instants[i]
        raise self._never()

    def _days(self, moment: float, zone: tzinfo, step: int) -> Iterator[date]:
        """Matching days from the local day of ``moment`` on, forwards (step 1) or backwards (-1)."""
        start = datetime.fromtimestamp(moment, zone).date().toordinal()
        for ordinal in range(start, start + step * _HORIZON_DAYS, step):
            day = date.fromordinal(ordinal)
            if (
                day.month in self.month_of_year
                and day.day in self.day_of_month
                and day.isoweekday() % 7 in self.day_of_week
            ):
                yield day

    def _instants(self, day: date, zone: tzinfo) -> list[float]:
        """The due moments of a matching local ``day``, ascending."""
        midnight = datetime.combine(day, wall_time(), zone)
        if midnight.utcoffset() == datetime.combine(day, wall_time(23, 59, 59), zone).utcoffset():
            base = midnight.timestamp()  # no clock change today: minutes after midnight are seconds after it
            return [base + 60.0 * m for m in self._day_minutes]
        due: set[float] = set()
        for m in self._day_minutes:
            due.update(
                _wall_instants(datetime.combine(day, wall_time(m // 60, m % 60)), zone, self._every_hour)
            )
        return sorted(due)

    def _never(self) -> InvalidSchedule:
        return InvalidSchedule(f"{self!r} is not due in the {_HORIZON_DAYS // 366} years searched.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, crontab) and all(getattr(other, f) == getattr(self, f) for f in _FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f) for f in _FIELDS))

    def __repr__(self) -> str:
        return f"<crontab: {self._spec} (m/h/dM/MY/d)>"


def maybe_schedule(value: Any) -> BaseSchedule:
    """A schedule from what ``beat_schedule`` takes: a schedule, seconds, or a timedelta.

    Raises:
        InvalidSchedule: anything else, or seconds that are not positive.
    """
    if isinstance(value, BaseSchedule):
        return value
    if _seconds(value) is not None:
        return schedule(value)
    raise InvalidSchedule(
        f"Invalid schedule {value!r}: give a number of seconds, a timedelta, schedule(...) or crontab(...)."
    )


def _seconds(value: Any) -> float | None:
    """Positive finite seconds from a number or timedelta, else None."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < math.inf else None


def _wall_instants(wall: datetime, zone: tzinfo, both: bool) -> tuple[float, ...]:
    """The moments a local wall time stands for, by the rules in the module docstring."""
    early = wall.replace(tzinfo=zone, fold=0).timestamp()
    late = wall.replace(tzinfo=zone, fold=1).timestamp()
    if early == late:
        return (early,)
    if late < early:  # the clock skips this time (PEP 495: fold=1 reads it with the offset after the change)
        return (_change(late, early, zone),)
    return (early, late) if both else (early,)


def _change(low: float, high: float, zone: tzinfo) -> float:
    """The moment in (low, high] at which the zone's offset changes: the first second of the new offset."""
    before = datetime.fromtimestamp(low, zone).utcoffset()
    lo, hi = math.floor(low), math.ceil(high)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return float(hi)


def _expand(field: str, spec: Cronspec) -> frozenset[int]:
    low, high, _, _ = _FIELDS[field]
    if isinstance(spec, str):
        values: set[int] = set()
        for part in spec.split(","):
            values |= _expand_part(field, spec, part.strip().lower())
    elif isinstance(spec, int) and not isinstance(spec, bool):
        values = {spec}
    elif isinstance(spec, Iterable):
        values = set(spec)
        if not all(_is_int(v) for v in values):
            raise _invalid(field, spec, "a collection must hold whole numbers only")
    else:
        raise _invalid(field, spec, "give a number, a pattern string, or a collection of numbers")
    if not values:
        raise _invalid(field, spec, "it names no value")
    outside = sorted(v for v in values if not low <= v <= high)
    if outside:
        raise _invalid(field, spec, f"{outside[0]} is not in {low}-{high}")
    return frozenset(values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expand_part(field: str, spec: str, part: str) -> set[int]:
    low, high, _, _ = _FIELDS[field]
    span, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) < 1:
            raise _invalid(field, spec, f"the step in {part!r} is not a whole number of at least 1")
        step = int(step_text)
    if span == "*":
        first, last = low, high
    elif "-" in span:
        start, _, end = span.partition("-")
        first, last = _number(field, spec, start.strip()), _number(field, spec, end.strip())
    else:
        first = _number(field, spec, span)
        last = high if slash else first  # '5/15' is '5-max/15', as in cron
    if first > last:  # a range that wraps around: 'fri-mon', '22-2'
        return set([*range(first, high + 1), *range(low, last + 1)][::step])
    return set(range(first, last + 1, step))


def _number(field: str, spec: str, text: str) -> int:
    names = _FIELDS[field][2]
    if text.isdigit():
        return int(text)
    if text in names:
        return names[text]
    raise _invalid(field, spec, f"{text!r} is not a number{' or a name' if names else ''}")


def _invalid(field: str, spec: object, reason: str) -> InvalidSchedule:
    return InvalidSchedule(f"Invalid crontab {field}={spec!r}: {reason}. {field} takes {_FIELDS[field][3]}.")


def _shown(spec: Cronspec) -> str:
    if isinstance(spec, str | int):
        return str(spec)
    return ",".join(str(v) for v in sorted(spec))
