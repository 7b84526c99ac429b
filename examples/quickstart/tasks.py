"""The tasks of the quickstart: Celery's first-steps ``tasks.py``, with ``async def``."""

from aqueue import App

# No broker given: the embedded SQLite store (aqueue.db in the working directory) is used.
app = App("tasks", backend="sqlite:///aqueue-results.db")


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def divide(x: float, y: float) -> float:
    return x / y
