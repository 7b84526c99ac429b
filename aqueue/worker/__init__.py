"""The worker: ``Worker(app, concurrency=..., queues=[...])``, embeddable in any event loop."""

from __future__ import annotations

from aqueue.worker.worker import Worker

__all__ = ["Worker"]
