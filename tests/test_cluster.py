"""Redis Cluster (``redis+cluster://``): the tour, the broker contract, and where keys go.

One private 3-master cluster (tests/redis_servers.py) serves the whole module; each test keeps apart
by its key prefix and queue names. The tour's and the broker contract's own tests run here unchanged,
on the cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from aqueue import App
from aqueue.broker import Broker
from aqueue.broker import from_url as broker_from_url
from aqueue.exceptions import InvalidURL
from aqueue.message import Envelope
from aqueue.result import from_url as backend_from_url
from aqueue.worker import Worker
from tests import test_tour
from tests.broker import test_contract
from tests.conftest import Transport
from tests.redis_servers import Cluster, redis_cluster, suite_of, transport_on

WAIT = 10.0


globals().update(suite_of(test_tour, "app", "transport"))
globals().update(suite_of(test_contract, "broker", "broker_transport"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as deployment:
        yield deployment


@pytest.fixture
def transport(cluster: Cluster, tmp_path: Path, unique: str) -> Transport:
    return transport_on(cluster.url, {}, tmp_path, unique)


@pytest.fixture
def app(make_app: Callable[..., App], transport: Transport) -> App:
    return make_app(transport)


@pytest.fixture
def broker_transport(transport: Transport) -> Transport:
    """The transport of conftest's ``broker`` fixture, which the contract's tests take."""
    return transport


def slots_and_nodes(cluster: Cluster, pattern: str) -> tuple[set[int], set[int]]:
    """The hash slots of the keys matching ``pattern``, and the ports of the nodes holding them."""
    slots, ports = set(), set()
    for node in cluster.nodes:
        client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)
        try:
            for key in client.scan_iter(match=pattern, count=1000):
                slots.add(int(client.cluster("keyslot", key)))
                ports.add(node.port)
        finally:
            client.close()
    return slots, ports


async def test_the_keys_of_a_queue_share_a_slot_and_results_spread(cluster: Cluster, unique: str) -> None:
    # Given an app on the cluster, with a countdown task waiting and a dead letter
    prefix = f"t{unique}:"
    options = {"global_keyprefix": prefix}
    app = App(
        "tasks",
        broker=cluster.url,
        backend=cluster.url,
        broker_transport_options=options,
        result_backend_transport_options=options,
        task_default_queue=f"q-{unique}",
    )

    @app.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, Worker(app, concurrency=8, hostname=f"w-{uuid.uuid4().hex[:8]}"):
        results = [add.delay(i, i) for i in range(60)]
        assert [await r.get(timeout=WAIT) for r in results] == [2 * i for i in range(60)]
        await add.apply_async((1, 1), countdown=60)
        await app.broker.publish([Envelope("bad", f"q-{unique}", b"garbage", "application/json")])
        with anyio.fail_after(WAIT):
            while not await app.broker.dead_letters(f"q-{unique}"):
                await anyio.sleep(0.05)
        # Then the stream, the delayed set and the dead letters are in one slot
        queue_slots, _ = slots_and_nodes(cluster, f"{prefix}{{q-{unique}}}*")
        assert len(queue_slots) == 1
        # And the results are spread over the slots of every node
        result_slots, nodes = slots_and_nodes(cluster, f"{prefix}celery-task-meta-*")
        assert len(result_slots) > 30 and len(nodes) == 3
        await app.broker.purge(f"q-{unique}")


def test_a_cluster_url_has_database_0_only() -> None:
    with pytest.raises(InvalidURL, match="database 0 only"):
        broker_from_url("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(InvalidURL, match="database 0 only"):
        backend_from_url("redis+cluster://127.0.0.1:7000/3")


async def test_shared_rate_limit_buckets_and_beat_marks_work(broker: Broker) -> None:
    from aqueue.broker.redis_cluster import RedisClusterBroker
    from aqueue.rates import parse_rate

    assert isinstance(broker, RedisClusterBroker)
    # Given a bucket of 2 per second shared by every worker: the first token is free, the next one waits
    rate = parse_rate("2/s")
    assert rate is not None
    key = uuid.uuid4().hex
    assert await broker.take_token(key, rate) == 0.0
    assert 0.0 < await broker.take_token(key, rate) <= 0.5
    # And a beat mark only goes up, saying what it was
    assert await broker.advance(key, 10.0) is None
    assert await broker.advance(key, 5.0) == 10.0
    assert await broker.advance(key, 20.0) == 10.0
