"""aqueue: an asyncio-native task queue that speaks the Celery API."""

from __future__ import annotations

from aqueue import states
from aqueue.app import App, Celery
from aqueue.canvas import chain, chord, group, signature
from aqueue.result.asyncresult import AsyncResult
from aqueue.task import Task

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncResult",
    "Celery",
    "Task",
    "__version__",
    "chain",
    "chord",
    "group",
    "signature",
    "states",
]
