"""Celery's ``Signal``, reduced to what apps use: ``@signal.connect`` receivers called by ``send``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, overload

__all__ = ["Signal"]

logger = logging.getLogger("aqueue")

Receiver = Callable[..., Any]


class Signal:
    """Receivers are called as ``receiver(signal=..., sender=..., **named)``, in the order connected.

    ``@app.on_after_configure.connect`` and ``app.on_after_configure.connect(fn)`` both connect ``fn``;
    ``@signal.connect(sender=app)`` only hears that sender. A receiver that raises is logged and the
    others still run, as in Celery.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[tuple[Receiver, object | None]] = []

    @overload
    def connect(self, receiver: Receiver, /, **options: Any) -> Receiver: ...
    @overload
    def connect(self, /, **options: Any) -> Callable[[Receiver], Receiver]: ...

    def connect(self, receiver: Receiver | None = None, /, **options: Any) -> Any:
        """Connect ``receiver`` (or decorate one). Options: ``sender``; Celery's ``weak`` and ``dispatch_uid``
        are accepted and change nothing."""
        sender = options.get("sender")

        def add(fn: Receiver) -> Receiver:
            if all(existing is not fn for existing, _ in self.receivers):
                self.receivers.append((fn, sender))
            return fn

        return add(receiver) if receiver is not None else add

    def disconnect(self, receiver: Receiver) -> None:
        self.receivers = [(fn, sender) for fn, sender in self.receivers if fn is not receiver]

    def send(self, sender: object, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call every receiver of ``sender``; returns ``(receiver, what it returned or raised)`` pairs."""
        replies: list[tuple[Receiver, Any]] = []
        for fn, only in list(self.receivers):
            if only is not None and only is not sender:
                continue
            try:
                replies.append((fn, fn(signal=self, sender=sender, **named)))
            except Exception as exc:
                logger.exception("Signal handler %r of %s raised: %r", fn, self.name, exc)
                replies.append((fn, exc))
        return replies

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"
