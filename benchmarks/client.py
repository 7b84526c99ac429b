"""The producer side of one benchmark job: ``python client.py LIB WORKLOAD SHAPE N``, driven by ``run.py``.

It warms up (a few round trips, which also waits for the worker to be ready), then prints
``{"event": "start"}`` and waits for a line on stdin (run.py snapshots the CPU counters), runs the
workload, prints ``{"event": "end"}`` and waits again, then prints ``{"event": "result", ...}``.

W1 and W3 take the producer's SHAPE:

- ``burst``: the way the library's users send many tasks: its bulk call where it has one (streaq's
  ``enqueue_many``, the ceiling's pipeline), aqueue's ``delay()`` in a loop then awaited together, else
  ``WINDOW`` sends at a time with ``asyncio.gather``; Celery and Dramatiq, which are synchronous, one
  call after the other.
- ``serial``: one at a time, the same loop for every library (:func:`one_at_a_time`): each send awaited,
  or for the synchronous libraries returned, before the next.

Either way the results are then collected the same way: ``WINDOW`` at a time, the waits of a window
concurrent (asyncio tasks; Dramatiq: threads; Celery: one ``ResultSet.join_native`` per window, since
its results belong to the thread that sent the tasks). W2 is one round trip at a time (SHAPE ``-``).
The workflows (``group``, ``chord``, ``chain``) use each library's own primitive, timed from the first
send to the final result, which is checked.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))

from _env import CONCURRENCY, POLL

__all__ = ["main", "one_at_a_time"]

WINDOW = 100
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "120"))
WARMUP = 20


def _windows(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), WINDOW):
        yield items[start : start + WINDOW]


async def _windowed(make: Callable[[], Awaitable[Any]], n: int) -> list[Any]:
    out: list[Any] = []
    for start in range(0, n, WINDOW):
        out += await asyncio.gather(*(make() for _ in range(min(WINDOW, n - start))))
    return out


class Adapter:
    """One library's client: ``send`` one task, ``wait`` for its result; ``send_many`` is the burst
    (``WINDOW`` concurrent sends at a time unless the library has its own way), ``wait_many`` the
    collection (``WINDOW`` concurrent waits at a time), ``workflow`` a group, chord or chain."""

    async def start(self) -> None:
        pass

    async def send(self, kind: str) -> Any:
        raise NotImplementedError

    async def wait(self, handle: Any) -> None:
        raise NotImplementedError

    async def send_many(self, kind: str, n: int) -> list[Any]:
        return await _windowed(lambda: self.send(kind), n)

    async def wait_many(self, handles: list[Any]) -> None:
        for window in _windows(handles):
            await asyncio.gather(*(self.wait(handle) for handle in window))

    async def workflow(self, name: str, n: int) -> Any:
        """Run a ``group`` of n no-op tasks, a ``chord`` of n, or a ``chain`` of n increments from 0,
        and return its result (the group's list, the chord callback's, the chain's last)."""
        raise NotImplementedError(f"{type(self).__name__} has no {name}")

    async def stop(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        """Anything worth reporting about how the run went (e.g. recovered lost wake-ups)."""
        return {}


async def one_at_a_time(a: Adapter, kind: str, n: int) -> list[Any]:
    """The one-at-a-time producer, the same for every library: each send awaited before the next."""
    return [await a.send(kind) for _ in range(n)]


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

    async def workflow(self, name: str, n: int) -> Any:
        try:
            from aqueue import chain, chord, group
        except ImportError:
            raise SystemExit("aqueue canvas not available") from None
        import aq_app

        if name == "group":
            workflow = group([aq_app.noop.s() for _ in range(n)])
        elif name == "chord":
            workflow = chord([aq_app.noop.s() for _ in range(n)], aq_app.count.s())
        else:
            workflow = chain(aq_app.inc.s(0), *(aq_app.inc.s() for _ in range(n - 1)))
        sent = workflow.delay()
        result = await sent if inspect.isawaitable(sent) else sent  # the publish confirmed, as delay()'s
        return await result.get(timeout=TIMEOUT)

    async def stop(self) -> None:
        await self.app.aclose()


class AqueueInProcess(Aqueue):
    """aqueue with its worker in this process (memory://): one event loop runs both."""

    async def start(self) -> None:
        from aqueue.worker import Worker

        await super().start()
        self.worker = Worker(self.app, concurrency=CONCURRENCY)
        await self.worker.__aenter__()

    async def stop(self) -> None:
        await self.worker.__aexit__(None, None, None)
        await super().stop()


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

    async def workflow(self, name: str, n: int) -> Any:
        if name != "group":
            return await super().workflow(name, n)
        return await self.queue.map("noop", [{} for _ in range(n)], timeout=TIMEOUT, poll_interval=POLL)

    def counters(self) -> dict[str, int]:
        return {"saq_missed_wakeups": Saq.missed}

    async def stop(self) -> None:
        await self.queue.disconnect()


class Streaq(Adapter):
    async def start(self) -> None:
        import streaq_app

        self.worker, self.tasks = streaq_app.worker, streaq_app.TASKS
        await self.worker.__aenter__()

    async def send(self, kind: str) -> Any:
        return await self.tasks[kind].enqueue()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        tasks = [self.tasks[kind].enqueue() for _ in range(n)]
        await self.worker.enqueue_many(tasks)
        return tasks

    async def wait(self, handle: Any) -> None:
        await self._result(handle)

    async def _result(self, handle: Any) -> Any:
        result = await handle.result(timeout=TIMEOUT)
        if not result.success:
            raise RuntimeError(f"streaq task failed: {result}")
        return result.result

    async def workflow(self, name: str, n: int) -> Any:
        inc, noop, done = self.tasks["inc"], self.tasks["noop"], self.tasks["done"]
        if name == "chain":
            last = inc.enqueue(0)
            for _ in range(n - 1):
                last = last.then(inc)
            await last  # the whole pipeline, in one transaction
        elif name == "chord":
            header = [noop.enqueue() for _ in range(n)]
            last = done.enqueue().start(after=[task.id for task in header])
            await self.worker.enqueue_many([*header, last])
        else:
            return await super().workflow(name, n)
        return await self._result(last)

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

        for window in _windows(handles):
            ResultSet(list(window)).join_native(timeout=TIMEOUT)

    async def workflow(self, name: str, n: int) -> Any:
        import celery_app as c
        from celery import chain, chord, group

        if name == "group":
            workflow = group(c.noop.s() for _ in range(n))
        elif name == "chord":
            workflow = chord((c.noop.s() for _ in range(n)), c.count.s())
        else:
            workflow = chain(c.inc.s(0), *(c.inc.s() for _ in range(n - 1)))
        return workflow.apply_async().get(timeout=TIMEOUT)

    async def stop(self) -> None:
        self.app.close()


class Dramatiq(Adapter):
    """Synchronous: sends block the (otherwise idle) event loop, one after the other; a window's
    results are waited for by threads."""

    async def start(self) -> None:
        import dramatiq_app

        self.app = dramatiq_app
        self.tasks = {"noop": dramatiq_app.noop, "sleep50": dramatiq_app.sleep50}
        self.threads = ThreadPoolExecutor(WINDOW)

    async def send(self, kind: str) -> Any:
        return self.tasks[kind].send()

    async def send_many(self, kind: str, n: int) -> list[Any]:
        actor = self.tasks[kind]
        return [actor.send() for _ in range(n)]

    @staticmethod
    def _get(handle: Any) -> Any:
        return handle.get_result(block=True, timeout=int(TIMEOUT * 1000))

    async def wait(self, handle: Any) -> None:
        self._get(handle)

    async def wait_many(self, handles: list[Any]) -> None:
        loop = asyncio.get_running_loop()
        for window in _windows(handles):
            await asyncio.gather(
                *(loop.run_in_executor(self.threads, self._get, handle) for handle in window)
            )

    async def workflow(self, name: str, n: int) -> Any:
        import dramatiq

        app, ms = self.app, int(TIMEOUT * 1000)
        if name == "group":
            group = dramatiq.group([app.noop.message() for _ in range(n)]).run()
            return list(group.get_results(block=True, timeout=ms))
        if name == "chord":
            callback = app.done.message()
            group = dramatiq.group([app.noop.message() for _ in range(n)])
            group.add_completion_callback(callback)
            group.run()
            return self._get(callback)
        pipeline = dramatiq.pipeline([app.inc.message(0), *(app.inc.message() for _ in range(n - 1))]).run()
        return pipeline.get_result(block=True, timeout=ms)

    async def stop(self) -> None:
        self.threads.shutdown(wait=False)
        self.app.broker.close()


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
    "aqueue-inprocess": AqueueInProcess,
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


# Workloads: times are time.monotonic(), the same clock in every process (run.py merges producers).


async def _throughput(a: Adapter, kind: str, shape: str, n: int) -> dict[str, Any]:
    t0 = time.monotonic()
    handles = await (a.send_many(kind, n) if shape == "burst" else one_at_a_time(a, kind, n))
    t1 = time.monotonic()
    await a.wait_many(handles)
    t2 = time.monotonic()
    return {"t0": t0, "t1": t1, "t2": t2, "n": n, "tasks": n}


async def _round_trips(a: Adapter, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.wait(await a.send("noop"))
        latencies.append(time.perf_counter() - t0)
    return latencies


def _check(name: str, n: int, result: Any) -> None:
    """The workflow did what it says: n results for a group, n for a chord's callback (None where the
    library's callback does not receive the results), n after n increments from 0."""
    ok = {
        "group": isinstance(result, list | tuple) and len(result) == n,
        "chord": result in (n, None),
        "chain": result == n,
    }[name]
    if not ok:
        raise RuntimeError(f"{name} of {n} returned {str(result)[:200]}")


async def _workflow(a: Adapter, name: str, n: int) -> dict[str, Any]:
    t0 = time.monotonic()
    result = await a.workflow(name, n)
    t2 = time.monotonic()
    _check(name, n, result)
    return {"t0": t0, "t1": t2, "t2": t2, "n": n, "tasks": n + 1 if name == "chord" else n}


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


async def _measure(a: Adapter, workload: str, shape: str, n: int) -> dict[str, Any]:
    if workload == "w2":
        return {"latencies": await _round_trips(a, n)}
    if workload in ("w1", "w3"):
        return await _throughput(a, "noop" if workload == "w1" else "sleep50", shape, n)
    return await _workflow(a, workload, n)


async def _job(lib: str, workload: str, shape: str, n: int) -> None:
    a = ADAPTERS[lib]()
    await a.start()
    try:
        await _warm_up(a)
        _handshake("start")
        cpu0 = time.process_time()
        figures = await asyncio.wait_for(_measure(a, workload, shape, n), TIMEOUT)
        cpu = time.process_time() - cpu0
        _handshake("end")
        _emit("result", client_cpu=cpu, counters=a.counters(), **figures)
    finally:
        async with asyncio.timeout(10):  # in this task: streaq's client must exit in the task it entered
            await a.stop()


def main() -> None:
    """``client.py LIB WORKLOAD SHAPE N``: WORKLOAD w1, w2, w3, group, chord or chain; SHAPE burst,
    serial or - (W2 and the workflows have none)."""
    lib, workload, shape, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if workload in ("w1", "w3") and shape not in ("burst", "serial"):
        raise SystemExit(f"{workload} needs a shape, burst or serial; got {shape!r}")
    import uvloop

    uvloop.run(_job(lib, workload, shape, n))


if __name__ == "__main__":
    main()
