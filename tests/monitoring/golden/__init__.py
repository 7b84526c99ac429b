"""What a real Celery 5.7 worker and Celery's CLI sent for monitoring, captured by ``capture.py`` beside this.

Each transport's file holds every message as it travelled; the helpers below read the parts the tests
compare with aqueue's: events by type, remote-control requests and replies by command.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRANSPORTS = ("redis", "amqp")

__all__ = ["TRANSPORTS", "Wire", "golden"]


class Wire:
    """One message as captured: where it went (exchange or channel, routing key), its envelope and body."""

    def __init__(
        self, exchange: str, routing_key: str, body: Any, headers: dict[str, Any], raw: dict[str, Any]
    ) -> None:
        self.exchange, self.routing_key, self.body, self.headers, self.raw = (
            exchange,
            routing_key,
            body,
            headers,
            raw,
        )

    def __repr__(self) -> str:
        return f"<Wire {self.exchange} {self.routing_key}>"


class Golden:
    """The captured messages of one transport."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.data: dict[str, Any] = json.loads((HERE / f"{transport}.json").read_text())
        self.wires = [w for w in (self._wire(r) for r in self.data["records"]) if w is not None]

    def _wire(self, record: dict[str, Any]) -> Wire | None:
        if self.transport == "amqp":
            properties = record["properties"]
            key = (record["routing_keys"] or [""])[0]
            return Wire(record["exchange"], key, record["payload"], properties.get("headers") or {}, record)
        command, payload = record["command"], record["payload"]
        if command[0] not in ("PUBLISH", "LPUSH") or not isinstance(payload, dict):
            return None
        info = payload["properties"]["delivery_info"]
        body = json.loads(base64.b64decode(payload["body"]))
        return Wire(info["exchange"], info["routing_key"], body, payload["headers"], record)

    def on(self, exchange: str) -> list[Wire]:
        return [w for w in self.wires if w.exchange == exchange]

    def events(self) -> dict[str, dict[str, Any]]:
        """The first event of each type, wherever it was (alone or in a ``task.multi`` list)."""
        found: dict[str, dict[str, Any]] = {}
        for wire in self.on("celeryev"):
            for event in wire.body if isinstance(wire.body, list) else [wire.body]:
                found.setdefault(event["type"], event)
        return found

    def requests(self) -> dict[str, Wire]:
        """The first remote-control request of each command that asked for replies."""
        return {w.body["method"]: w for w in reversed(self.on("celery.pidbox")) if "ticket" in w.body}

    def replies(self) -> dict[str, Any]:
        """The reply of the worker to each command, by command."""
        by_ticket = {w.headers.get("ticket"): w for w in self.on("reply.celery.pidbox")}
        out = {}
        for method, request in self.requests().items():
            reply = by_ticket.get(request.body["ticket"])
            if reply is not None:
                out[method] = reply.body[self.data["node"]]
        return out


@cache
def golden(transport: str) -> Golden:
    return Golden(transport)
