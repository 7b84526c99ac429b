"""Rate strings ('10/s', '10/m', '10/h') parsed once into a frozen Rate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aqueue.exceptions import InvalidRate

__all__ = ["Rate", "Tokens", "parse_rate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` tasks per ``per`` seconds."""

    count: float
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per)
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count}/{unit}" if unit else f"{self.per_second}/s"


def parse_rate(rate: str | float | int | Rate | None) -> Rate | None:
    """Parse a Celery rate: ``'10/s'``, ``'10/m'``, ``'10/h'``, or a number (per second).

    ``None``, ``0`` and ``'0'`` mean no limit and return ``None``.

    Raises:
        InvalidRate: quoting the string that could not be parsed.
    """
    if rate is None or isinstance(rate, Rate):
        return rate
    if isinstance(rate, bool):
        raise InvalidRate(rate)
    if isinstance(rate, int | float):
        count, per = float(rate), 1.0
    elif isinstance(rate, str):
        count, per = _split(rate)
    else:
        raise InvalidRate(rate)
    if count < 0 or not math.isfinite(count):
        raise InvalidRate(rate)
    return Rate(count, per) if count else None


def _split(rate: str) -> tuple[float, float]:
    text = rate.strip()
    number, _, unit = text.partition("/")
    unit = unit.strip() or "s"
    try:
        count = float(number)
    except ValueError:
        raise InvalidRate(rate) from None
    if unit[0] not in _UNITS or unit not in (unit[0], {"s": "sec", "m": "min", "h": "hour"}[unit[0]]):
        raise InvalidRate(rate)
    return count, _UNITS[unit[0]]


class Tokens:
    """Celery's token-bucket arithmetic: capacity 1, starting full, refilled at ``rate`` (None: no limit)."""

    capacity = 1.0

    def __init__(self, rate: Rate | None) -> None:
        self.rate, self.tokens, self.stamp = rate, self.capacity, time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 when one was taken, else the seconds until one is due (nothing is taken)."""
        if self.rate is None:
            return 0.0
        self.refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate.per_second

    def refill(self) -> None:
        now = time.monotonic()
        if self.rate is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate.per_second)
        self.stamp = now

    def set_rate(self, rate: Rate | None) -> None:
        self.refill()
        self.rate = rate
