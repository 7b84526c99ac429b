"""A transport whose extra is not installed names the pip command; other import errors pass through."""

from __future__ import annotations

import sys

import pytest

from aqueue.broker import from_url as broker_from_url
from aqueue.exceptions import MissingExtra
from aqueue.result import from_url as backend_from_url


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` and its modules unimportable, as if it were not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [
        n
        for n in sys.modules
        if n.startswith(
            ("aqueue.broker.redis", "aqueue.broker.amqp", "aqueue.result.redis", "aqueue.result.rpc")
        )
    ]:
        monkeypatch.delitem(sys.modules, name)
    return monkeypatch


@pytest.mark.parametrize(
    ("url", "package", "extra"),
    [
        ("redis://127.0.0.1/0", "redis", "redis"),
        ("amqp://127.0.0.1//", "aio_pika", "amqp"),
        ("pyamqp://127.0.0.1//", "aio_pika", "amqp"),
    ],
)
def test_missing_broker_extra_names_the_pip_command(
    without: pytest.MonkeyPatch, url: str, package: str, extra: str
) -> None:
    # Given the transport's package cannot be imported
    hide(without, package)
    # When a broker is made for its URL; Then the error says what to install
    with pytest.raises(MissingExtra, match=rf"pip install 'aqueue\[{extra}\]'"):
        broker_from_url(url)


def test_missing_backend_extra_names_the_pip_command(without: pytest.MonkeyPatch) -> None:
    hide(without, "redis")
    with pytest.raises(MissingExtra, match=r"pip install 'aqueue\[redis\]'"):
        backend_from_url("redis://127.0.0.1/0")


def test_missing_module_that_is_not_the_extra_is_not_blamed_on_it(without: pytest.MonkeyPatch) -> None:
    # Given the transport module itself fails to import for another reason
    without.setitem(sys.modules, "aqueue.broker.redis", None)
    # Then that error comes through as it is, not as a missing extra
    with pytest.raises(ModuleNotFoundError) as caught:
        broker_from_url("redis://127.0.0.1/0")
    assert not isinstance(caught.value, MissingExtra)
