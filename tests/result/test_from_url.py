"""result.from_url: the scheme picks the backend; transport options reach it and are checked."""

from __future__ import annotations

import pytest

from aqueue import App
from aqueue.exceptions import ImproperlyConfigured, InvalidURL
from aqueue.result.disabled import DisabledBackend
from aqueue.result.memory import MemoryBackend
from aqueue.result.redis import RedisBackend


def test_result_backend_transport_options_reach_the_redis_backend() -> None:
    app = App(backend="redis://127.0.0.1:6379/0", result_backend_transport_options={"global_keyprefix": "p:"})
    backend = app.backend
    assert isinstance(backend, RedisBackend)
    assert backend.prefix == "p:"


def test_unknown_result_backend_transport_option_suggests_the_closest() -> None:
    app = App(backend="redis://127.0.0.1:6379/0", result_backend_transport_options={"global_keyprefx": "p:"})
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'global_keyprefix'"):
        app.backend  # noqa: B018


def test_no_backend_is_the_disabled_one_and_memory_is_memory() -> None:
    assert isinstance(App().backend, DisabledBackend)
    assert isinstance(App(backend="memory://x").backend, MemoryBackend)


def test_unknown_backend_scheme_lists_the_known_ones() -> None:
    with pytest.raises(InvalidURL, match="redis://"):
        App(backend="mongodb://localhost").backend  # noqa: B018
