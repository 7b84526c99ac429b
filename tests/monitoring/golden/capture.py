"""Capture what a real Celery worker and Celery's CLI put on the wire for monitoring, as golden test data.

    python tests/monitoring/golden/capture.py [redis] [amqp]

For each transport this starts a Celery worker (``-E``, the default prefork pool, one process) on a
broker of its own, sends it tasks that succeed, fail, retry, are rejected, revoked, expired and unknown
(with ``task_send_sent_event``), runs ``celery inspect`` and ``celery control`` commands against it,
stops it, and writes every message as it travelled to ``<transport>.json`` beside this script:

- Redis (database 14 of 127.0.0.1:6379): the commands the processes sent, read with ``MONITOR``
  (``PUBLISH`` of events and remote-control requests, ``LPUSH`` of replies, binding ``SADD``/``EVALSHA``);
- RabbitMQ (127.0.0.1:5672, a vhost made for the run and deleted after): every publish, read from the
  vhost's firehose (``rabbitmqctl trace_on``), and the exchanges and queues Celery and kombu declare.

The output depends on the machine (host names, pids, times); the tests read fields and shapes from it,
not values.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REDIS_DB = 14
NODE = "golden@capture"

TASKS = """
import os
import time

from celery import Celery
from celery.exceptions import Reject

app = Celery("golden_tasks", broker=os.environ["GOLDEN_BROKER"])
app.conf.update(task_send_sent_event=True, worker_send_task_events=True, broker_connection_retry_on_startup=True)


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="tasks.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="tasks.retry", bind=True, max_retries=1)
def retry(self):
    if not self.request.retries:
        raise self.retry(countdown=0, exc=KeyError("again"))
    return "done"


@app.task(name="tasks.reject", acks_late=True)
def reject():
    raise Reject("refused", requeue=False)


@app.task(name="tasks.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds
"""

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}


def split_monitor_line(text: str) -> list[str]:
    """The arguments of one MONITOR line: ``"PUBLISH" "chan" "{\\"a\\": 1}"`` -> ``['PUBLISH', 'chan', '{"a": 1}']``."""
    args, i = [], 0
    while i < len(text):
        if text[i] != '"':
            i += 1
            continue
        i, out = i + 1, []
        while text[i] != '"':
            if text[i] == "\\":
                code = text[i + 1]
                if code == "x":
                    out.append(chr(int(text[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                out.append(_ESCAPES.get(code, code))
                i += 2
                continue
            out.append(text[i])
            i += 1
        args.append("".join(out))
        i += 1
    return args


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


class RedisCapture:
    """Every PUBLISH, LPUSH, SADD, SREM and EVALSHA sent to one database, from MONITOR's raw lines."""

    KEEP = {"PUBLISH", "LPUSH", "SADD", "SREM", "EVALSHA"}

    def __init__(self) -> None:
        self.url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._line = re.compile(rb"^\+(?P<time>[\d.]+) \[(?P<db>\d+) [^\]]*\] (?P<command>.*)$")

    def start(self) -> None:
        _redis_command(b"FLUSHDB")
        self._thread.start()
        time.sleep(0.5)

    def _run(self) -> None:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"MONITOR\r\n")
            pending = b""
            while not self._stop.is_set():
                try:
                    pending += sock.recv(1 << 20)
                except TimeoutError:
                    continue
                *lines, pending = pending.split(b"\r\n")
                for line in lines:
                    self._keep(line)

    def _keep(self, line: bytes) -> None:
        found = self._line.match(line)
        if found is None or int(found["db"]) != REDIS_DB:
            return
        args = split_monitor_line(found["command"].decode("latin-1"))
        if args and args[0].upper() in self.KEEP:
            payload = args[-1].encode("latin-1").decode("utf-8", "replace")
            command = [a.encode("latin-1").decode("utf-8", "replace") for a in args[:-1]]
            self.records.append(
                {"command": command, "payload": _json_or_text(payload), "time": float(found["time"])}
            )

    def stop(self) -> dict[str, Any]:
        time.sleep(1.0)
        self._stop.set()
        self._thread.join(5)
        _redis_command(b"FLUSHDB")
        return {"db": REDIS_DB, "records": self.records}


def _redis_command(command: bytes) -> None:
    with socket.create_connection(("127.0.0.1", 6379), timeout=5) as sock:
        sock.sendall(b"SELECT %d\r\n%s\r\n" % (REDIS_DB, command))
        time.sleep(0.1)


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


class AMQPCapture:
    """Every message published in a vhost of its own, from its firehose; and what was declared there."""

    def __init__(self) -> None:
        self.vhost = f"aqueue-golden-{uuid.uuid4().hex[:8]}"
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
        self.records: list[dict[str, Any]] = []
        self.declared: dict[str, Any] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        rabbitmqctl("trace_on", "-p", self.vhost)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the firehose consumer did not start")

    def _run(self) -> None:
        kombu: Any = importlib.import_module("kombu")
        trace = kombu.Exchange("amq.rabbitmq.trace", type="topic", passive=True)
        queue = kombu.Queue(f"golden-{uuid.uuid4().hex}", trace, routing_key="publish.#", exclusive=True)
        with (
            kombu.Connection(self.url) as conn,
            kombu.Consumer(conn, [queue], on_message=self._keep, no_ack=True),
        ):
            self._ready.set()
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass

    def _keep(self, message: Any) -> None:
        headers = message.headers
        exchange = headers.get("exchange_name")
        if exchange == "amq.rabbitmq.trace":
            return
        self.records.append(
            {
                "exchange": exchange,
                "routing_keys": headers.get("routing_keys"),
                "properties": _plain(headers.get("properties") or {}),
                "payload": _json_or_text(message.body.decode("utf-8", "replace")),
            }
        )

    def snapshot(self, label: str) -> None:
        """What the vhost holds now: exchanges, queues (with their arguments) and bindings."""
        fields = {
            "exchanges": [
                "list_exchanges",
                "-p",
                self.vhost,
                "name",
                "type",
                "durable",
                "auto_delete",
                "arguments",
            ],
            "queues": [
                "list_queues",
                "-p",
                self.vhost,
                "name",
                "durable",
                "auto_delete",
                "exclusive",
                "arguments",
            ],
            "bindings": ["list_bindings", "-p", self.vhost, "source_name", "destination_name", "routing_key"],
        }
        self.declared[label] = {
            key: json.loads(rabbitmqctl(*argv, "--formatter", "json")) for key, argv in fields.items()
        }

    def stop(self) -> dict[str, Any]:
        time.sleep(1.0)
        self._stop.set()
        self._thread.join(5)
        rabbitmqctl("delete_vhost", self.vhost)
        return {"records": self.records, "declared": self.declared}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def run_session(capture: RedisCapture | AMQPCapture, folder: Path) -> dict[str, Any]:
    """Drive a Celery worker and Celery's CLI while ``capture`` records; returns what the CLI printed."""
    env = {**os.environ, "GOLDEN_BROKER": capture.url, "PYTHONPATH": str(folder)}
    env.pop("CELERY_BROKER_URL", None)
    log = (folder / "worker.log").open("w")
    worker = subprocess.Popen(
        ["celery", "-A", "golden_tasks", "worker", "-E", "-l", "info", "-c", "1", "-n", NODE],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    cli: dict[str, str] = {}
    try:
        _wait_for(folder / "worker.log", " ready.", 60)
        sys.path.insert(0, str(folder))
        os.environ["GOLDEN_BROKER"] = capture.url
        app = importlib.import_module("golden_tasks").app
        app.conf.broker_url = capture.url
        for name in ("tasks.add", "tasks.fail", "tasks.retry", "tasks.reject"):
            app.send_task(
                name, args=[2, 2] if name == "tasks.add" else (["boom"] if name == "tasks.fail" else [])
            )
        revoked_id = str(uuid.uuid4())
        app.control.revoke(revoked_id)
        time.sleep(0.5)
        app.send_task("tasks.add", args=[3, 3], task_id=revoked_id)
        app.send_task("tasks.add", args=[4, 4], expires=-10.0)
        app.send_task("tasks.unknown", args=[])
        time.sleep(3)
        app.send_task("tasks.sleep", args=[4])
        time.sleep(1)

        def celery(*args: str) -> None:
            done = subprocess.run(
                ["celery", "-A", "golden_tasks", *args], cwd=folder, env=env, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            cli[" ".join(args)] = done.stdout

        celery("inspect", "active")
        for what in (
            "ping",
            "stats",
            "registered",
            "active_queues",
            "revoked",
            "conf",
            "scheduled",
            "reserved",
        ):
            celery("inspect", what)
        celery("control", "rate_limit", "tasks.add", "10/m")
        celery("control", "revoke", revoked_id)
        celery("control", "enable_events")
        celery("control", "heartbeat")
        if isinstance(capture, AMQPCapture):
            _declare_client_queues(app, capture)
        time.sleep(2.5)  # at least one worker-heartbeat
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
    return cli


def _declare_client_queues(app: Any, capture: AMQPCapture) -> None:
    """Declare a remote-control reply queue and an event receiver's queue as kombu does, and snapshot."""
    from celery.events import EventReceiver

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        app.control.mailbox(conn).reply_queue(channel).declare()
        EventReceiver(conn, app=app).queue(channel).declare()
        capture.snapshot("with a client")


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the worker did not log {text!r}:\n{path.read_text(errors='replace')}")


def capture(kind: str) -> Path:
    import celery
    import kombu

    recorder: RedisCapture | AMQPCapture = RedisCapture() if kind == "redis" else AMQPCapture()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "golden_tasks.py").write_text(TASKS)
        recorder.start()
        try:
            cli = run_session(recorder, folder)
        finally:
            data = recorder.stop()
    out = HERE / f"{kind}.json"
    data = {"celery": celery.__version__, "kombu": kombu.__version__, "node": NODE, **data, "cli": cli}
    out.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or ["redis", "amqp"]
    for name in names:
        if not re.fullmatch(r"redis|amqp", name):
            raise SystemExit(f"unknown transport {name!r}: use redis or amqp")
    if len(names) == 1:
        print(capture(names[0]))
    else:  # one process per transport: the Celery app is configured once per process
        for name in names:
            subprocess.run([sys.executable, __file__, name], check=True)
