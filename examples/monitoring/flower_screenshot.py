"""Screenshots of an unmodified Flower watching aqueue workers, for the README.

    python examples/monitoring/flower_screenshot.py [--redis redis://127.0.0.1:6379/0] [--out DIR]

Needs Redis, Flower (``pip install flower``) and Chromium (``/usr/bin/chromium``; on Debian
``apt-get install -y chromium``). It starts two aqueue workers with ``-E`` and Flower on the same
Redis (under a key prefix of its own, removed at the end), sends some tasks, and has headless Chromium
photograph Flower's workers dashboard, one worker's page and the task list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

TASKS = """
import asyncio
import random

from aqueue import App

app = App("shop", broker={url!r}, backend={url!r}, broker_transport_options={options!r},
          result_backend_transport_options={options!r})


@app.task(name="shop.charge_card")
async def charge_card(order_id, cents):
    await asyncio.sleep(random.uniform(0.05, 0.3))
    if order_id % 7 == 0:
        raise ValueError(f"card declined for order {{order_id}}")
    return {{"order": order_id, "charged": cents}}


@app.task(name="shop.send_receipt")
async def send_receipt(order_id):
    await asyncio.sleep(random.uniform(0.01, 0.1))
    return f"receipt sent for order {{order_id}}"


@app.task(name="shop.resize_image")
def resize_image(path, width):
    return f"{{path}} at {{width}}px"
"""

CELERY_APP = """
from celery import Celery

app = Celery("flower_side", broker={url!r})
app.conf.broker_transport_options = {options!r}
"""

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,820",
    "--virtual-time-budget=6000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def flower_knows(url: str, wanted: int, timeout: float = 30.0) -> None:
    """Wait until Flower lists ``wanted`` finished tasks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/tasks", timeout=5) as answer:
            tasks = json.loads(answer.read())
        if sum(t["state"] in ("SUCCESS", "FAILURE") for t in tasks.values()) >= wanted:
            return
        time.sleep(0.3)
    raise SystemExit("Flower did not see the tasks in time")


def screenshot(chromium: str, url: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {out}")


async def send_tasks(folder: Path) -> int:
    sys.path.insert(0, str(folder))
    from tasks import app  # type: ignore[import-not-found]

    async with app:
        sent = []
        for order in range(1, 25):
            sent.append(app.send_task("shop.charge_card", [order, 1000 + 37 * order]))
            sent.append(app.send_task("shop.send_receipt", [order]))
            if order % 4 == 0:
                sent.append(app.send_task("shop.resize_image", [f"/img/{order}.png", 640]))
            await asyncio.sleep(0.05)
        for result in sent:
            await result.get(timeout=30, propagate=False)
        return len(sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium is needed: apt-get install -y chromium")
    prefix = f"flowershot-{uuid.uuid4().hex[:8]}:"
    options = {"global_keyprefix": prefix}
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tasks.py").write_text(TASKS.format(url=args.redis, options=options))
        (folder / "flower_side.py").write_text(CELERY_APP.format(url=args.redis, options=options))
        env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO)])
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "flower_side", "flower", "--address=127.0.0.1", f"--port={port}"],
                cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        ]  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/api/workers")
            time.sleep(1)  # Flower's event receiver connects after its web server
            for name, concurrency in (("checkout@shop-1", "50"), ("media@shop-2", "20")):
                command = [
                    sys.executable,
                    "-m",
                    "aqueue",
                    "-A",
                    "tasks",
                    "worker",
                    "-E",
                    "-c",
                    concurrency,
                    "-n",
                    name,
                ]
                processes.append(
                    subprocess.Popen(
                        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
            time.sleep(3)
            sent = asyncio.run(send_tasks(folder))
            flower_knows(url, sent)
            time.sleep(2)  # a heartbeat or two, so the dashboard's counters are current
            args.out.mkdir(parents=True, exist_ok=True)
            screenshot(chromium, f"{url}/workers", args.out / "flower-workers.png")
            screenshot(chromium, f"{url}/worker/checkout@shop-1", args.out / "flower-worker.png")
            screenshot(chromium, f"{url}/tasks", args.out / "flower-tasks.png")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
            _delete_keys(args.redis, prefix)


def _delete_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
