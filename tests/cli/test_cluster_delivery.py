"""The delivery tests of test_delivery.py, with real worker processes, on a private Redis Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import test_delivery
from tests.redis_servers import Cluster, redis_cluster, suite_of

from .conftest import Project

pytestmark = pytest.mark.slow

globals().update(suite_of(test_delivery, "project"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as deployment:
        yield deployment


@pytest.fixture
def project(cluster: Cluster, tmp_path: Path) -> Iterator[Project]:
    """A project whose broker and result backend are the cluster."""
    on_cluster = Project(tmp_path, "redis", redis_url=cluster.url)
    try:
        yield on_cluster
    finally:
        on_cluster.close()
