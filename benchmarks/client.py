"""The producer side of one benchmark job: ``python client.py LIB WORKLOAD N``, driven by ``run.py``.

It warms up (a few round trips, which also waits for the worker to be ready), then prints
``{"event": "start"}`` and waits for a line on stdin (run.py snapshots the CPU counters), runs the
workload, prints ``{"event": "end"}`` and waits again, then prints ``{"event": "result", ...}``.

Every library's producer follows one rule: send the way the library's users send many tasks (its bulk
call where it has one, else ``WINDOW`` enqueues at a time with ``asyncio.gather``; Celery and Dramatiq,
which are synchronous, one call after the other), then wait for the results ``WINDOW`` at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))

from _env import POLL

__all__ = ["main"]

WINDOW = 100
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "120"))
WARMUP = 20


async def _windowed(make: Callable[[], Awaitable[Any]], n: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, n, WINDOW):
        out += await asyncio.gather(*(make() for _ in range(min(WINDOW, n - start))))
    return out


async def _each_windowed(fn: Callable[[Any], Awaitable[Any]], items: Sequence[Any]) -> None:
    for start in range(0, len(items), WINDOW):
        await asyncio.gather(*(fn(item) for item in items[start : start + WINDOW]))


class Adapter:
    """One library's client: ``send`` one task, ``wait`` for its result; the many-variants default to
    windows of ``WINDOW`` concurrent calls."""

    async def start(self) -> None:
        pass

    async def send(self, kind: str) -> Any:
        raise NotImplementedError

    async def wait(self, handle: Any) -> None:
        raise NotImplementedError

    async def send_many(self, kind: str, n: int) -> list[Any]:
        return await _windowed(lambda: self.send(kind), n)

    async def wait_many(self, handles: list[Any]) -> None:
        await _each_windowed(self.wait, handles)

    async def stop(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        """Anything worth reporting about how the run went (e.g. recovered lost wake-ups)."""
        return {}


class Aqueue(Adapter):
    async def start(self) -> None:
        import aq_app

        self.app, self.tasks = aq_app.app, {"noop": aq_app.noop, "sleep50": aq_app.sleep50}
        await self.app.connect()

    async def send(self, kind: str) -> Any:
        return await self.tasks[kind].delay()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        task = self.tasks[kind]
        results = [task.delay() for _ in range(n)]
        await asyncio.gather(*results)
        return results

    async def wait(self, handle: Any) -> None:
        await handle.get(timeout=TIMEOUT)

    async def stop(self) -> None:
        await self.app.aclose()


class Taskiq(Adapter):
    module = "taskiq_app"

    async def start(self) -> None:
        app = __import__(self.module)
        self.broker, self.tasks = app.broker, {"noop": app.noop, "sleep50": app.sleep50}
        await self.broker.startup()

    async def send(self, kind: str) -> Any:
        return await self.tasks[kind].kiq()

    async def wait(self, handle: Any) -> None:
        result = await handle.wait_result(check_interval=POLL, timeout=TIMEOUT)
        if result.is_err:
            raise RuntimeError(f"taskiq task failed: {result.error!r}")

    async def stop(self) -> None:
        await self.broker.shutdown()


class TaskiqAmqp(Taskiq):
    module = "taskiq_amqp_app"


class Arq(Adapter):
    async def start(self) -> None:
        from _env import REDIS_URL
        from arq import create_pool
        from arq.connections import RedisSettings

        self.pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))

    async def send(self, kind: str) -> Any:
        return await self.pool.enqueue_job(kind)

    async def wait(self, handle: Any) -> None:
        await handle.result(timeout=TIMEOUT, poll_delay=POLL)

    async def stop(self) -> None:
        await self.pool.aclose()


class Saq(Adapter):
    async def start(self) -> None:
        from saq_app import queue

        self.queue = queue
        await queue.connect()

    async def send(self, kind: str) -> Any:
        return await self.queue.enqueue(kind)

    missed = 0

    async def wait(self, handle: Any) -> None:
        # refresh(until_complete) reads the job, then subscribes to its channel: a job finishing in
        # between is never announced, and the call waits out its whole timeout. Re-check every second,
        # as a careful SAQ user would, and count how often that saved a call.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                await handle.refresh(until_complete=1.0)
                break
            except TimeoutError:
                await handle.refresh()
                if handle.completed:
                    Saq.missed += 1
                    break
                if time.monotonic() > deadline:
                    raise
        if handle.status != "complete":
            raise RuntimeError(f"saq job ended {handle.status}: {handle.error}")

    def counters(self) -> dict[str, int]:
        return {"saq_missed_wakeups": Saq.missed}

    async def stop(self) -> None:
        await self.queue.disconnect()


class Streaq(Adapter):
    async def start(self) -> None:
        import streaq_app

        self.worker, self.tasks = streaq_app.worker, {"noop": streaq_app.noop, "sleep50": streaq_app.sleep50}
        await self.worker.__aenter__()

    async def send(self, kind: str) -> Any:
        return await self.tasks[kind].enqueue()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        tasks = [self.tasks[kind].enqueue() for _ in range(n)]
        await self.worker.enqueue_many(tasks)
        return tasks

    async def wait(self, handle: Any) -> None:
        result = await handle.result(timeout=TIMEOUT)
        if not result.success:
            raise RuntimeError(f"streaq task failed: {result}")

    async def stop(self) -> None:
        await self.worker.__aexit__(None, None, None)


class Celery(Adapter):
    """Synchronous: calls block the (otherwise idle) event loop, one after the other."""

    async def start(self) -> None:
        import celery_app

        self.app, self.tasks = celery_app.app, {"noop": celery_app.noop, "sleep50": celery_app.sleep50}

    async def send(self, kind: str) -> Any:
        return self.tasks[kind].delay()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        task = self.tasks[kind]
        return [task.delay() for _ in range(n)]

    async def wait(self, handle: Any) -> None:
        handle.get(timeout=TIMEOUT)

    async def wait_many(self, handles: list[Any]) -> None:
        from celery.result import ResultSet

        ResultSet(handles).join_native(timeout=TIMEOUT)

    async def stop(self) -> None:
        self.app.close()


class Dramatiq(Adapter):
    """Synchronous: calls block the (otherwise idle) event loop, one after the other."""

    async def start(self) -> None:
        import dramatiq_app

        self.tasks = {"noop": dramatiq_app.noop, "sleep50": dramatiq_app.sleep50}
        self.broker = dramatiq_app.broker

    async def send(self, kind: str) -> Any:
        return self.tasks[kind].send()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        actor = self.tasks[kind]
        return [actor.send() for _ in range(n)]

    async def wait(self, handle: Any) -> None:
        handle.get_result(block=True, timeout=int(TIMEOUT * 1000))

    async def wait_many(self, handles: list[Any]) -> None:
        for handle in handles:
            handle.get_result(block=True, timeout=int(TIMEOUT * 1000))

    async def stop(self) -> None:
        self.broker.close()


class Ceiling(Adapter):
    module = "ceiling_redis"

    async def start(self) -> None:
        self.client = __import__(self.module).Client()
        await self.client.start()

    async def send(self, kind: str) -> Any:
        return await self.client.send(kind)

    async def send_many(self, kind: str, n: int) -> list[Any]:
        return await self.client.send_many(kind, n)  # type: ignore[no-any-return]

    async def wait(self, handle: Any) -> None:
        await asyncio.wait_for(handle, TIMEOUT)

    async def stop(self) -> None:
        await self.client.stop()


class CeilingAmqp(Ceiling):
    module = "ceiling_amqp"


ADAPTERS: dict[str, type[Adapter]] = {
    "aqueue": Aqueue,
    "taskiq": Taskiq,
    "taskiq-amqp": TaskiqAmqp,
    "arq": Arq,
    "saq": Saq,
    "streaq": Streaq,
    "celery": Celery,
    "dramatiq": Dramatiq,
    "ceiling-redis": Ceiling,
    "ceiling-amqp": CeilingAmqp,
}


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _handshake(event: str) -> None:
    _emit(event)
    if not sys.stdin.readline():
        raise SystemExit("run.py went away")


async def _throughput(a: Adapter, kind: str, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    handles = await a.send_many(kind, n)
    t1 = time.perf_counter()
    await a.wait_many(handles)
    t2 = time.perf_counter()
    return {"enqueue_per_s": n / (t1 - t0), "tasks_per_s": n / (t2 - t0), "seconds": t2 - t0}


async def _round_trips(a: Adapter, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.wait(await a.send("noop"))
        latencies.append(time.perf_counter() - t0)
    return latencies


async def _warm_up(a: Adapter) -> None:
    """Round trips until one succeeds (the worker may still be starting), then ``WARMUP`` more."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await asyncio.wait_for(_round_trips(a, 1), max(0.1, min(5, deadline - time.monotonic())))
            break
        except Exception as exc:  # a worker still starting can fail or time out a first call
            if time.monotonic() > deadline:
                raise
            print(f"warm-up round trip failed, retrying: {exc!r}", file=sys.stderr)
            await asyncio.sleep(0.5)
    await asyncio.wait_for(_round_trips(a, WARMUP), TIMEOUT)


async def _job(lib: str, workload: str, n: int) -> None:
    a = ADAPTERS[lib]()
    await a.start()
    try:
        await _warm_up(a)
        _handshake("start")
        cpu0 = time.process_time()
        if workload == "w2":
            latencies = await asyncio.wait_for(_round_trips(a, n), TIMEOUT)
            figures: dict[str, Any] = {"latencies": latencies}
        else:
            kind = "noop" if workload == "w1" else "sleep50"
            figures = await asyncio.wait_for(_throughput(a, kind, n), TIMEOUT)
        cpu = time.process_time() - cpu0
        _handshake("end")
        _emit("result", client_cpu=cpu, counters=a.counters(), **figures)
    finally:
        async with asyncio.timeout(10):  # in this task: streaq's client must exit in the task it entered
            await a.stop()


def main() -> None:
    """``client.py LIB WORKLOAD N``."""
    lib, workload, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import uvloop

    uvloop.run(_job(lib, workload, n))


if __name__ == "__main__":
    main()
