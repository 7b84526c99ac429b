"""Schedules: crontab parsing (Celery's fields and syntax), due times, daylight saving changes, errors."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from aqueue.exceptions import ImproperlyConfigured, InvalidSchedule
from aqueue.schedules import crontab, maybe_schedule, schedule

OSLO = ZoneInfo("Europe/Oslo")
NEW_YORK = ZoneInfo("America/New_York")


def at(zone: Any, year: int, month: int, day: int, hour: int = 0, minute: int = 0, fold: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold).timestamp()


def local(moment: float, zone: Any) -> str:
    return datetime.fromtimestamp(moment, zone).strftime("%Y-%m-%d %H:%M%z")


def runs(when: crontab, start: float, count: int, zone: Any = UTC) -> list[str]:
    out, moment = [], start
    for _ in range(count):
        moment = when.next_due(moment, zone)
        out.append(local(moment, zone))
    return out


# Parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "spec", "expected"),
    [
        ("minute", "*/15", {0, 15, 30, 45}),
        ("minute", "1,13,30-45,50-59/2", {1, 13, *range(30, 46), 50, 52, 54, 56, 58}),
        ("minute", "50-10/5", {50, 55, 0, 5, 10}),
        ("hour", "0,8-17/2", {0, 8, 10, 12, 14, 16}),
        ("hour", 7, {7}),
        ("hour", [1, 2, 3], {1, 2, 3}),
        ("day_of_week", "mon-fri", {1, 2, 3, 4, 5}),
        ("day_of_week", "fri-mon", {5, 6, 0, 1}),
        ("day_of_week", "Sunday,sat", {0, 6}),
        ("day_of_week", "*/2", {0, 2, 4, 6}),
        ("day_of_month", "*/3", {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31}),
        ("day_of_month", "1-7,15-21", {*range(1, 8), *range(15, 22)}),
        ("month_of_year", "2-12/2", {2, 4, 6, 8, 10, 12}),
        ("month_of_year", "jan,JUN-aug", {1, 6, 7, 8}),
        ("month_of_year", {3}, {3}),
    ],
)
def test_fields_expand_as_in_celery(field: str, spec: Any, expected: set[int]) -> None:
    from celery.schedules import crontab as celery_crontab

    # Given a field in Celery's syntax; Then it expands to these values, and to the same ones as Celery's
    assert getattr(crontab(**{field: spec}), field) == expected
    assert getattr(celery_crontab(**{field: spec}), field) == expected


def test_a_start_with_a_step_runs_to_the_end_as_in_cron() -> None:
    assert crontab(minute="5/20").minute == {5, 25, 45}


def test_unset_fields_are_every_value() -> None:
    every = crontab()
    assert (every.minute, every.hour) == (frozenset(range(60)), frozenset(range(24)))
    assert every.day_of_week == frozenset(range(7))
    assert every.day_of_month == frozenset(range(1, 32))
    assert every.month_of_year == frozenset(range(1, 13))


def test_from_string_reads_a_cron_line() -> None:
    assert crontab.from_string("30 7 * * mon-fri") == crontab(minute=30, hour=7, day_of_week="mon-fri")
    assert repr(crontab.from_string("*/5 * 1 jan *")) == "<crontab: */5 * 1 jan * (m/h/dM/MY/d)>"
    with pytest.raises(InvalidSchedule, match="five fields"):
        crontab.from_string("30 7 * *")


@pytest.mark.parametrize(
    ("fields", "quoted", "says"),
    [
        ({"minute": "61"}, "minute='61'", "61 is not in 0-59"),
        ({"minute": 60}, "minute=60", "numbers 0-59"),
        ({"hour": "*/0"}, "hour='*/0'", "step"),
        ({"hour": "a"}, "hour='a'", "'a' is not a number."),
        ({"day_of_week": "7"}, "day_of_week='7'", "Sunday is 0"),
        ({"day_of_week": "moon"}, "day_of_week='moon'", "'moon' is not a number or a name"),
        ({"day_of_week": "jan"}, "day_of_week='jan'", "day names"),
        ({"day_of_month": "0"}, "day_of_month='0'", "numbers 1-31"),
        ({"month_of_year": "13"}, "month_of_year='13'", "month names"),
        ({"minute": "1,,2"}, "minute='1,,2'", "'' is not a number"),
        ({"minute": True}, "minute=True", "give a number"),
        ({"minute": 1.5}, "minute=1.5", "give a number"),
        ({"minute": [1, "2"]}, "minute=[1, '2']", "whole numbers"),
        ({"minute": []}, "minute=[]", "names no value"),
    ],
)
def test_a_bad_field_is_quoted_with_what_it_takes(fields: dict[str, Any], quoted: str, says: str) -> None:
    # When a field cannot be used; Then the error quotes it, says why, and what the field takes
    with pytest.raises(InvalidSchedule) as caught:
        crontab(**fields)
    assert quoted in str(caught.value) and says in str(caught.value)
    assert "takes" in str(caught.value)
    assert isinstance(caught.value, ImproperlyConfigured | ValueError)


def test_days_no_month_has_are_refused() -> None:
    with pytest.raises(InvalidSchedule, match="never due"):
        crontab(day_of_month=30, month_of_year=2)
    crontab(day_of_month=29, month_of_year=2)  # leap years have it


# Intervals ----------------------------------------------------------------------------------------


def test_an_interval_is_due_at_its_multiples_since_the_epoch() -> None:
    every_30s = schedule(30)
    assert every_30s.last_due(1000.0) == 990.0
    assert every_30s.next_due(990.0) == 1020.0
    assert every_30s.last_due(1020.0) == 1020.0  # a due time counts at its own moment
    assert schedule(timedelta(minutes=1)).run_every == timedelta(seconds=60)


@pytest.mark.parametrize("seconds", [0.1, 0.3, 1.0, 7.0, 86400.0])
def test_an_interval_brackets_every_moment(seconds: float) -> None:
    every, rng = schedule(seconds), random.Random(seconds)
    for _ in range(2000):
        moment = rng.uniform(0, 2e9)
        last = every.last_due(moment)
        assert last <= moment < every.next_due(moment) == every.next_due(last)


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "30", None])
def test_an_interval_that_is_not_positive_seconds_is_refused(value: Any) -> None:
    with pytest.raises(InvalidSchedule, match="number of seconds"):
        maybe_schedule(value)


def test_beat_schedule_values_become_schedules() -> None:
    assert maybe_schedule(30.0) == schedule(30)
    assert maybe_schedule(timedelta(seconds=30)) == schedule(30)
    daily = crontab(minute=0, hour=0)
    assert maybe_schedule(daily) is daily


# Crontab due times -------------------------------------------------------------------------------

CELERY_SPECS = [
    {"minute": "*/15", "hour": "8-17", "day_of_week": "mon-fri"},
    {"minute": 30, "hour": 7},
    {"minute": 0, "hour": 0, "day_of_month": "1-7", "day_of_week": "mon"},
    {"minute": 0, "hour": "*/3"},
    {"minute": 0, "hour": 12, "day_of_month": 31},
    {"minute": 5, "hour": 4, "day_of_month": 29, "month_of_year": 2},
]


@pytest.mark.parametrize("fields", CELERY_SPECS)
def test_next_due_time_in_utc_agrees_with_celery(fields: dict[str, Any]) -> None:
    from celery import Celery
    from celery.schedules import crontab as celery_crontab

    celery_app = Celery(set_as_current=False)
    celery_app.conf.timezone = "UTC"
    theirs, ours = celery_crontab(**fields, app=celery_app), crontab(**fields)
    rng = random.Random(repr(fields))
    for _ in range(40):
        # Given a moment (a whole minute, so that Celery's and our rounding agree)
        moment = datetime.fromtimestamp(rng.randrange(1_600_000_000, 1_900_000_000) // 60 * 60, UTC)
        # Then the next due time after it is Celery's next run after a last run at that moment
        last_run, delta, _ = theirs.remaining_delta(moment, tz=UTC)
        assert ours.next_due(moment.timestamp()) == (last_run + delta).timestamp(), moment


@pytest.mark.parametrize("fields", CELERY_SPECS)
@pytest.mark.parametrize("zone", [UTC, OSLO, NEW_YORK])
def test_last_and_next_due_bracket_every_moment(fields: dict[str, Any], zone: Any) -> None:
    when, rng = crontab(**fields), random.Random(repr(fields))
    for _ in range(50):
        moment = rng.uniform(1_600_000_000, 1_900_000_000)
        last = when.last_due(moment, zone)
        assert last <= moment < when.next_due(moment, zone) == when.next_due(last, zone)
        assert when.last_due(last, zone) == last


def test_weekday_office_hours() -> None:
    # Given every quarter of an hour from 8 to 17 on weekdays; When a Friday evening has passed
    when = crontab(minute="*/15", hour="8-17", day_of_week="mon-fri")
    # Then the next runs are on Monday morning
    assert runs(when, at(UTC, 2024, 5, 3, 17, 50), 2) == ["2024-05-06 08:00+0000", "2024-05-06 08:15+0000"]
    assert local(when.last_due(at(UTC, 2024, 5, 5, 12, 0)), UTC) == "2024-05-03 17:45+0000"


def test_the_day_fields_must_all_match_as_in_celery() -> None:
    # The first Monday of a month: day_of_month 1-7 *and* a Monday
    when = crontab(minute=0, hour=0, day_of_month="1-7", day_of_week="mon")
    assert runs(when, at(UTC, 2024, 1, 10), 3) == [
        "2024-02-05 00:00+0000",
        "2024-03-04 00:00+0000",
        "2024-04-01 00:00+0000",
    ]


def test_crontab_reads_the_wall_clock_of_the_zone() -> None:
    when = crontab(minute=30, hour=7)
    assert local(when.next_due(at(UTC, 2024, 6, 1), OSLO), UTC) == "2024-06-01 05:30+0000"
    assert local(when.next_due(at(UTC, 2024, 12, 1), OSLO), UTC) == "2024-12-01 06:30+0000"


# Daylight saving -------------------------------------------------------------------------------


def test_spring_forward_runs_a_skipped_time_at_the_change() -> None:
    # Given 02:30 every night in Oslo, where 2024-03-31 goes from 02:00 straight to 03:00
    nightly = crontab(minute=30, hour=2)
    # Then that night it runs at 03:00, the moment of the change, once; then at 02:30 again
    assert runs(nightly, at(OSLO, 2024, 3, 30, 12), 3, OSLO) == [
        "2024-03-31 03:00+0200",
        "2024-04-01 02:30+0200",
        "2024-04-02 02:30+0200",
    ]
    assert local(nightly.last_due(at(OSLO, 2024, 3, 31, 12), OSLO), OSLO) == "2024-03-31 03:00+0200"


def test_spring_forward_keeps_every_quarter_hour_15_real_minutes_apart() -> None:
    quarterly = crontab(minute="*/15")
    assert runs(quarterly, at(OSLO, 2024, 3, 31, 1, 30), 3, OSLO) == [
        "2024-03-31 01:45+0100",
        "2024-03-31 03:00+0200",  # 02:00-02:45 do not exist; they are the change itself
        "2024-03-31 03:15+0200",
    ]
    assert runs(quarterly, at(NEW_YORK, 2024, 3, 10, 1, 40), 2, NEW_YORK) == [
        "2024-03-10 01:45-0500",
        "2024-03-10 03:00-0400",
    ]


def test_fall_back_runs_a_repeated_time_once() -> None:
    # Given 02:30 every night in Oslo, where 2024-10-27 shows 02:00-02:59 twice
    nightly = crontab(minute=30, hour=2)
    # Then it runs at the first 02:30 only
    assert runs(nightly, at(OSLO, 2024, 10, 26, 12), 2, OSLO) == [
        "2024-10-27 02:30+0200",
        "2024-10-28 02:30+0100",
    ]
    second = at(OSLO, 2024, 10, 27, 2, 45, fold=1)
    assert local(nightly.last_due(second, OSLO), OSLO) == "2024-10-27 02:30+0200"


def test_fall_back_runs_an_every_hour_entry_in_both_hours() -> None:
    half_hourly = crontab(minute="0,30")
    assert runs(half_hourly, at(OSLO, 2024, 10, 27, 1, 45), 5, OSLO) == [
        "2024-10-27 02:00+0200",
        "2024-10-27 02:30+0200",
        "2024-10-27 02:00+0100",
        "2024-10-27 02:30+0100",
        "2024-10-27 03:00+0100",
    ]
