"""aqueue._redis: commands packed by hand are redis-py's bytes; a Line shares writes and survives failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError, ResponseError

from aqueue._redis import Line, connection_kwargs, pack
from tests.conftest import REDIS_URL, require_server

PARTS: list[tuple[Any, ...]] = [
    ("PING",),
    (b"XADD", "q", b"*", b"body", b"\x00\xff\r\n", "content_type", "application/json", b"priority", b""),
    ("ZADD", "q.delayed", 1764600000.123456, b"member"),
    ("SET", "k", "été", "PX", 15000),
    ("XACK", b"q", "aqueue", b"1-0", b"2-0"),
]


@pytest.mark.parametrize("parts", PARTS)
def test_packed_commands_are_what_redis_py_packs(parts: tuple[Any, ...]) -> None:
    conn = Connection()
    assert pack(*parts) == b"".join(conn.pack_command(*parts))


@pytest.mark.parametrize("bad", [True, None, 1j])
def test_a_part_of_another_type_is_refused(bad: Any) -> None:
    with pytest.raises(DataError):
        pack("SET", "k", bad)


@pytest.fixture
async def line() -> Any:
    require_server("redis")
    opened = Line(Connection(**connection_kwargs(f"{REDIS_URL}/0", client_name="aqueue-line-test")), 5.0)
    yield opened
    await opened.aclose()


async def test_concurrent_sends_each_get_their_own_replies(line: Line) -> None:
    # Given 50 sends at once, one of which is refused by Redis
    sends = [
        line.send(pack("NOSUCHCOMMAND"), 1)
        if i == 20
        else line.send(pack("ECHO", str(i)) + pack("ECHO", f"{i}!"), 2)
        for i in range(50)
    ]
    replies = await asyncio.gather(*sends)
    # Then each got the replies of its own commands, the refused one its error in place
    assert replies[19] == [b"19", b"19!"] and replies[21] == [b"21", b"21!"]
    assert isinstance(replies[20][0], ResponseError)
    assert all(replies[i] == [str(i).encode(), f"{i}!".encode()] for i in range(50) if i != 20)


async def test_a_send_cancelled_mid_round_trip_leaves_the_line_usable(line: Line) -> None:
    # Given a send whose reply takes a while (a blocking command), cancelled before it comes
    blocked = asyncio.ensure_future(line.send(pack("BLPOP", "aqueue-line-test-nothing", 5), 1))
    await asyncio.sleep(0.1)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    # Then the next send gets its own reply, not the one still due
    assert await asyncio.wait_for(line.send(pack("ECHO", "after"), 1), 5) == [b"after"]
