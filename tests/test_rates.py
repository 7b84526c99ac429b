"""Rate strings: Celery's N/s, N/m, N/h parsed once into a frozen Rate; errors quote the string."""

from __future__ import annotations

import dataclasses

import pytest

from aqueue.exceptions import ImproperlyConfigured, InvalidRate
from aqueue.rates import Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("10/s", 10.0, 1.0),
        ("10/m", 10.0, 60.0),
        ("10/h", 10.0, 3600.0),
        ("100/min", 100.0, 60.0),
        ("5/sec", 5.0, 1.0),
        ("2/hour", 2.0, 3600.0),
        (" 7 / m ", 7.0, 60.0),
        ("0.5/s", 0.5, 1.0),
        ("3", 3.0, 1.0),
        ("3/", 3.0, 1.0),
    ],
)
def test_rate_strings_parse(text: str, count: float, per: float) -> None:
    # Given a Celery rate string, when parsed, then count and period come back
    assert parse_rate(text) == Rate(count, per)


def test_numbers_are_per_second() -> None:
    assert parse_rate(4) == Rate(4.0, 1.0)
    assert parse_rate(2.5) == Rate(2.5, 1.0)


@pytest.mark.parametrize("no_limit", [None, 0, 0.0, "0", "0/m"])
def test_none_and_zero_mean_no_limit(no_limit: str | float | None) -> None:
    assert parse_rate(no_limit) is None


def test_a_rate_passes_through() -> None:
    rate = Rate(1.0, 60.0)
    assert parse_rate(rate) is rate


@pytest.mark.parametrize(
    "bad", ["10/x", "fast", "10/ms", "-1/s", "ten/m", "", "1/m/s", "nan/s", "inf/m", True]
)
def test_bad_rates_raise_invalid_rate_quoting_them(bad: object) -> None:
    # When a bad rate is parsed, then InvalidRate quotes it and shows what to write instead
    with pytest.raises(InvalidRate) as raised:
        parse_rate(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(raised.value)
    assert "'10/s'" in str(raised.value)
    assert raised.value.rate == bad
    # And it is a configuration error and a ValueError
    assert isinstance(raised.value, ImproperlyConfigured | ValueError)


def test_rate_per_second_and_str() -> None:
    assert Rate(10.0, 60.0).per_second == pytest.approx(1 / 6)
    assert [str(Rate(10.0, 60.0)), str(Rate(2.0, 1.0)), str(Rate(1.5, 3600.0))] == ["10/m", "2/s", "1.5/h"]
    assert str(Rate(1.0, 7.0)) == f"{1 / 7}/s"


def test_rate_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Rate(1.0, 1.0).count = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -1])
def test_numbers_that_are_not_a_rate_raise(number: float) -> None:
    # A NaN or infinite rate used to parse, and then broke str(rate) (worker statistics)
    with pytest.raises(InvalidRate):
        parse_rate(number)
