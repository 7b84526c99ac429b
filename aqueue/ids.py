"""Task ids: random UUIDs (version 4) as text, as Celery's ``uuid()`` makes them, made cheaply.

``str(uuid.uuid4())`` builds a ``UUID`` object only to format it; one id per task is on the path of
every ``delay()``, so :func:`new_id` formats 16 random bytes itself (the same 122 random bits, the same
version and variant bits, the same text).
"""

from __future__ import annotations

import os

__all__ = ["new_id"]

_VARIANT = "89ab89ab89ab89ab"
"""The id's 17th hex digit, from a random one: RFC 4122's variant (binary 10xx)."""


def new_id() -> str:
    """A new random id, ``xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx`` (V one of 8, 9, a, b)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"
