"""URLs: scheme checks with the choices named, password masking, SQLAlchemy-style sqlite paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from aqueue.exceptions import ImproperlyConfigured, InvalidURL
from aqueue.urls import BACKEND_SCHEMES, BROKER_SCHEMES, mask_password, parse, sqlite_path


def test_the_schemes_of_the_spec() -> None:
    redis = {"redis", "rediss", "sentinel", "redis+cluster"}
    assert set(BROKER_SCHEMES) == {"memory", "sqlite", *redis, "amqp", "amqps", "pyamqp"}
    assert set(BACKEND_SCHEMES) == {"memory", "sqlite", *redis, "rpc"}


def test_a_sentinel_list_is_parsed_and_masked_part_by_part() -> None:
    # Given Celery's list of sentinels, each with the master's password
    url = "sentinel://:pw@h1:26379;sentinel://:pw@h2:26380/0"
    # Then it parses as the first, and every password is masked
    assert parse(url, kinds=BROKER_SCHEMES, role="broker").port == 26379
    assert mask_password(url) == "sentinel://:**@h1:26379;sentinel://:**@h2:26380/0"
    # And a bad port in any part is an error, as is a list of anything but sentinels
    with pytest.raises(InvalidURL, match="Invalid port"):
        parse("sentinel://h1:26379;sentinel://h2:x", kinds=BROKER_SCHEMES, role="broker")
    with pytest.raises(InvalidURL, match="only sentinel://"):
        parse("redis://h1;redis://h2", kinds=BROKER_SCHEMES, role="broker")


@pytest.mark.parametrize(
    "url", ["amqp://guest@localhost//", "pyamqp://", "redis://localhost:6379/0", "memory://"]
)
def test_parse_accepts_known_schemes(url: str) -> None:
    parts = parse(url, kinds=BROKER_SCHEMES, role="broker")
    assert parts.scheme == url.split("://")[0]


def test_parse_rejects_an_unknown_scheme_naming_the_choices() -> None:
    # When a scheme is not one of the kinds, then the error names it and every accepted scheme
    with pytest.raises(InvalidURL) as raised:
        parse("rpc://", kinds=BROKER_SCHEMES, role="broker")
    message = str(raised.value)
    assert "broker" in message and "'rpc'" in message
    assert all(f"{kind}://" in message for kind in BROKER_SCHEMES)
    # And InvalidURL is a configuration error and a ValueError
    assert isinstance(raised.value, ImproperlyConfigured) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("url", ["localhost:6379", "", None, 42])
def test_parse_rejects_what_is_not_a_url(url: object) -> None:
    with pytest.raises(InvalidURL, match="expected scheme://"):
        parse(url, kinds=BACKEND_SCHEMES, role="result backend")  # type: ignore[arg-type]


def test_parse_rejects_a_bad_port_without_showing_the_password() -> None:
    # Given a URL with a password and a port that is not a number
    url = "redis://:s3cret@127.0.0.1:notaport/0"
    # When it is parsed, then InvalidURL says so and the password is masked
    with pytest.raises(InvalidURL, match="port") as raised:
        parse(url, kinds=BROKER_SCHEMES, role="broker")
    assert "s3cret" not in str(raised.value)


def test_an_unknown_scheme_with_a_password_is_masked_in_the_error() -> None:
    with pytest.raises(InvalidURL) as raised:
        parse("kafka://user:s3cret@host:9092", kinds=BROKER_SCHEMES, role="broker")
    assert "s3cret" not in str(raised.value) and "user:**@host:9092" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:**@127.0.0.1:5672//"),
        ("redis://:s3cret@localhost:6379/0", "redis://:**@localhost:6379/0"),
        ("rediss://user:s3cret@host/1?ssl_cert_reqs=none", "rediss://user:**@host/1?ssl_cert_reqs=none"),
        ("amqp://u:p@[::1]:5672/vhost", "amqp://u:**@[::1]:5672/vhost"),
        ("redis://user@host:6379", "redis://user@host:6379"),
        ("memory://", "memory://"),
        ("sqlite:////tmp/q.db", "sqlite:////tmp/q.db"),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


@pytest.mark.parametrize("url", ["redis://:s3cret@host:notaport/0", "redis://:s3cret@[::1/0"])
def test_mask_password_of_a_malformed_url_never_raises_nor_shows_the_password(url: str) -> None:
    assert "s3cret" not in mask_password(url)


def test_sqlite_path_relative_to_the_working_directory(tmp_cwd: Path) -> None:
    # sqlite:///q.db is relative to the working directory, as in SQLAlchemy
    assert sqlite_path("sqlite:///q.db") == tmp_cwd / "q.db"
    assert sqlite_path("sqlite:///data/q.db?timeout=5") == tmp_cwd / "data" / "q.db"


def test_sqlite_path_absolute(tmp_path: Path) -> None:
    # sqlite:////abs/path.db (four slashes) is absolute
    assert sqlite_path(f"sqlite:///{tmp_path}/q.db") == tmp_path / "q.db"
    assert sqlite_path("sqlite:////var/lib/aqueue/q.db") == Path("/var/lib/aqueue/q.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://q.db"])
def test_sqlite_path_without_a_file_is_invalid(url: str) -> None:
    with pytest.raises(InvalidURL, match=r"sqlite:///relative/path\.db"):
        sqlite_path(url)
