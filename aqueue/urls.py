"""Broker and backend URLs: parsing, scheme checks and password masking."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from aqueue.exceptions import InvalidURL

__all__ = ["BACKEND_SCHEMES", "BROKER_SCHEMES", "alternatives", "mask_password", "parse", "sqlite_path"]

BROKER_SCHEMES = (
    "memory",
    "sqlite",
    "redis",
    "rediss",
    "sentinel",
    "redis+cluster",
    "amqp",
    "amqps",
    "pyamqp",
)
BACKEND_SCHEMES = ("memory", "sqlite", "redis", "rediss", "sentinel", "redis+cluster", "rpc")


def parse(url: str, *, kinds: tuple[str, ...], role: str) -> SplitResult:
    """Split ``url`` and check that its scheme is one of ``kinds``.

    Raises:
        InvalidURL: the URL is not a string, has no scheme, or a scheme not in ``kinds``.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(
            f"Invalid {role} URL {url!r}: expected scheme://..., one of "
            + ", ".join(f"{k}://" for k in kinds)
        )
    parts = urlsplit(url)
    if parts.scheme not in kinds:
        raise InvalidURL(
            f"Unsupported {role} URL scheme {parts.scheme!r} in {mask_password(url)!r}: use one of "
            + ", ".join(f"{k}://" for k in kinds)
        )
    if ";" in url and parts.scheme != "sentinel":
        raise InvalidURL(
            f"Invalid {role} URL {mask_password(url)!r}: only sentinel:// URLs may name several servers "
            "(joined by ';')"
        )
    for part in alternatives(url):
        try:
            urlsplit(part).port  # noqa: B018  (validates the port)
        except ValueError as exc:
            raise InvalidURL(f"Invalid port in {role} URL {mask_password(url)!r}: {exc}") from exc
    return urlsplit(alternatives(url)[0])


def alternatives(url: str) -> list[str]:
    """The URLs of a ``;``-separated list (Celery's way to name several servers), or ``[url]``."""
    return [part.strip() for part in url.split(";") if part.strip()] if ";" in url else [url]


def mask_password(url: str) -> str:
    """Return ``url`` with any password replaced by ``**``.

    Works on the text of the URL, so a malformed port or host never stops the password being masked.
    Each URL of a ``;``-separated list is masked.
    """
    if ";" in url:
        return ";".join(mask_password(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:**@{hostport}{rest[end:]}"


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite://`` URL, following SQLAlchemy's convention.

    ``sqlite:///q.db`` is relative to the working directory and ``sqlite:////abs/q.db`` is absolute.
    """
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest == "/":
        raise InvalidURL(
            f"Invalid sqlite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = rest[1:].split("?", 1)[0]
    return Path(path).expanduser().resolve()
