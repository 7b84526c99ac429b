"""aqueue inside a FastAPI app.

Everything in one process (the worker runs inside the web server), on the embedded store:

    EMBED_WORKER=1 uvicorn fastapi_app:api          # from the examples/ folder

Or the web process and workers apart, on Redis:

    export AQUEUE_BROKER_URL=redis://127.0.0.1:6379/0 AQUEUE_RESULT_BACKEND=redis://127.0.0.1:6379/0
    uvicorn fastapi_app:api                         # terminal 1
    python -m aqueue -A fastapi_app worker -l info  # terminal 2

    curl -X POST localhost:8000/add -H 'content-type: application/json' -d '{"x": 4, "y": 4}'
    curl localhost:8000/tasks/<id>
    curl -X POST 'localhost:8000/add/wait?timeout=5' -H 'content-type: application/json' -d '{"x": 4, "y": 4}'
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from pydantic import BaseModel

from aqueue import App
from aqueue.contrib.fastapi import AqueueApp, lifespan
from aqueue.exceptions import TimeoutError

app = App("fastapi_app", backend=os.environ.get("AQUEUE_RESULT_BACKEND", "sqlite:///aqueue-results.db"))


class Numbers(BaseModel):
    x: int
    y: int


@app.task(name="example.add")
async def add(x: int, y: int) -> int:
    return x + y


api = FastAPI(lifespan=lifespan(app, worker=os.environ.get("EMBED_WORKER") == "1", concurrency=100))


@api.post("/add", status_code=status.HTTP_202_ACCEPTED)
async def enqueue_add(numbers: Numbers, request: Request) -> dict[str, str]:
    """Send add(x, y); answer at once with the task id and where to look for its result."""
    result = await add.delay(numbers.x, numbers.y)
    return {"id": result.id, "status_url": str(request.url_for("task_status", task_id=result.id))}


@api.get("/tasks/{task_id}", name="task_status")
async def task_status(task_id: str, aqueue: AqueueApp) -> dict[str, Any]:
    """The task's state, and its result or error once it has one; an unknown id is PENDING."""
    result = aqueue.AsyncResult(task_id)
    state = await result.refresh()
    body: dict[str, Any] = {"id": task_id, "state": state}
    if state == "SUCCESS":
        body["result"] = result.result
    elif state == "FAILURE":
        body["error"] = f"{type(result.result).__name__}: {result.result}"
    return body


@api.post("/add/wait")
async def add_and_wait(numbers: Numbers, timeout: float = 10.0) -> dict[str, Any]:
    """Send add(x, y) and wait for its result; 504 when it takes longer than ``timeout`` seconds."""
    result = add.delay(numbers.x, numbers.y)
    try:
        value = await result.get(timeout=timeout)
    except TimeoutError:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT, f"Task {result.id} did not finish in {timeout}s"
        ) from None
    return {"id": result.id, "result": value}
