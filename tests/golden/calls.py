"""Calls the golden captures make, shared by the capture scripts and the tests that repeat them."""

from __future__ import annotations

from typing import Any

OPTIONS: dict[str, Any] = {
    "countdown": 30,
    "expires": 60,
    "priority": 5,
    "time_limit": 10,
    "soft_time_limit": 5,
    "ignore_result": True,
    "headers": {"custom": "value"},
}
"""The options of the captured ``add.apply_async((2, 3), {"z": 1}, **OPTIONS)``."""
