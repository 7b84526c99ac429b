"""Task ids: random version-4 UUIDs as text, as ``str(uuid.uuid4())`` gives them."""

from __future__ import annotations

import re
import uuid

from aqueue import App
from aqueue.ids import new_id


def test_ids_are_version_4_uuids_in_canonical_text() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text
    # Every random digit takes every value: the variant digit each of 8, 9, a, b
    assert {text[19] for text in ids} == set("89ab")
    for position in (0, 9, 15, 20, 35):
        assert {text[position] for text in ids} == set("0123456789abcdef")
    assert all(
        re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", t) for t in ids
    )


async def test_sent_tasks_get_such_ids() -> None:
    app = App("ids", broker="memory://", backend="memory://")
    async with app:
        result = await app.send_task("tasks.add", [1, 2])
    assert uuid.UUID(result.id).version == 4
