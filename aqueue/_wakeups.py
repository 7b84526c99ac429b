"""Wake-ups between processes sharing a SQLite file: Unix datagram sockets in a folder beside it.

SQLite cannot tell another process that a row changed. So a process that waits on the file (a broker
consuming or subscribed, a result backend waiting for a result) binds a datagram socket in the folder
``<file>-wake`` (``aqueue.db-wake/`` beside ``aqueue.db``), named after what it waits for: ``b-…`` for a
broker, ``r-…`` for a result backend. A process that commits a change then sends one datagram to every
socket of that kind, naming what changed (queue or channel names, task ids), and the waiter reads the
file again at once instead of at its next poll.

A wake-up is a hint: waiters still poll, rarely, so a lost wake-up costs latency, never a message or a
result. One is lost when
- the sender's list of sockets is out of date: it lists the folder again whenever its mtime changes, and
  on every send while the folder changed in the last ``_SETTLE`` seconds (mtimes may be coarse);
- the receiver's queue was full (``net.unix.max_dgram_qlen`` datagrams): the datagram is dropped, and
  the receiver, having read a full queue at once, checks everything it waits for;
- the sender died between its commit and its send, or may not write to the folder.
A socket whose process died refuses datagrams; the first sender to meet it deletes the file. The folder
holds nothing else. Paths too long for a socket address go through ``/proc/self/fd`` (Linux); where
that is missing, waiters poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["Listener", "Wakeups"]

logger = logging.getLogger("aqueue.sqlite")

_SETTLE = 2.0
_MAX_ADDRESS = 100  # sun_path holds 104 to 108 bytes, depending on the system
_NAME_LENGTH = 32
_NAMES_PER_DATAGRAM = 100


def _queue_length() -> int:
    try:
        return int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    except (OSError, ValueError):
        return 8  # where queues are counted in bytes, a small count errs on the safe side


_FULL = _queue_length()


class Wakeups:
    """The folder of one database file's sockets, and the sending side (used on the event loop's thread)."""

    def __init__(self, database: Path) -> None:
        self.folder = database.absolute().with_name(database.name + "-wake")
        self.own: frozenset[str] = frozenset()
        """This process's sockets, which are woken in-process instead."""
        self._prefix: str | None = None
        self._folder_fd: int | None = None
        self._sender: socket.socket | None = None
        self._listed: tuple[int, float] | None = None
        self._peers: tuple[str, ...] = ()

    def address(self, name: str) -> str | None:
        """The socket address of ``name`` in the folder (which exists), or None when it cannot have one."""
        if self._prefix is None:
            if len(str(self.folder)) + _NAME_LENGTH < _MAX_ADDRESS:
                self._prefix = f"{self.folder}/"
            elif os.path.isdir("/proc/self/fd"):
                try:
                    self._folder_fd = os.open(self.folder, os.O_RDONLY)
                except OSError:
                    return None
                self._prefix = f"/proc/self/fd/{self._folder_fd}/"
            else:
                return None
        return self._prefix + name

    def send(self, kind: str, names: Collection[str]) -> None:
        """Tell every other process waiting for ``kind`` that ``names`` changed (after the commit)."""
        peers = [name for name in self._list() if name[0] == kind and name not in self.own]
        if peers:
            names = list(names)
            for start in range(0, max(1, len(names)), _NAMES_PER_DATAGRAM):
                payload = "\0".join(names[start : start + _NAMES_PER_DATAGRAM]).encode()
                for name in peers:
                    self._send(name, payload)

    def _send(self, name: str, payload: bytes) -> None:
        address = self.address(name)
        if address is None:
            return
        if self._sender is None:
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
        try:
            self._sender.sendto(payload, address)
        except BlockingIOError:
            pass  # its queue is full: it will read a full queue and check everything
        except (ConnectionRefusedError, FileNotFoundError):  # its process died: nobody reads it
            self._peers = tuple(peer for peer in self._peers if peer != name)
            _unlink(address)
        except OSError as exc:
            logger.debug("Could not wake %s: %s", address, exc)

    def _list(self) -> tuple[str, ...]:
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except OSError:
            return ()
        now = time.time()
        if self._listed is None or self._listed[0] != mtime or self._listed[1] - mtime / 1e9 < _SETTLE:
            try:
                self._peers = tuple(name for name in os.listdir(self.folder) if name.endswith(".sock"))
            except OSError:
                self._peers = ()
            self._listed = (mtime, now)
        return self._peers

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._folder_fd is not None:
            os.close(self._folder_fd)
            self._folder_fd = self._prefix = None


class Listener:
    """This process's socket of ``kind`` in the folder; ``on_notice`` is called with the names that
    changed, or None when some wake-ups may have been dropped (check everything)."""

    def __init__(self, wakeups: Wakeups, kind: str, on_notice: Callable[[set[str] | None], None]) -> None:
        self.wakeups, self.kind, self.on_notice = wakeups, kind, on_notice
        self.received = 0
        """Datagrams read, for tests and statistics."""
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._name = self._address = ""
        self._pid = 0
        self._failed = False

    @property
    def listening(self) -> bool:
        """Bound, in this process (not a fork's copy), and read by the running loop."""
        return (
            self._socket is not None and self._pid == os.getpid() and self._loop is asyncio.get_running_loop()
        )

    def listen(self) -> bool:
        """Bind the socket (once) and read it from the running loop; False when wake-ups cannot work."""
        if self.listening or self._failed:
            return not self._failed
        self.close()  # a socket bound before a fork, or read by a loop that has gone
        name = f"{self.kind}-{os.getpid()}-{secrets.token_hex(4)}.sock"
        try:
            self.wakeups.folder.mkdir(exist_ok=True)
            address = self.wakeups.address(name)
            if address is None:
                raise OSError("the socket path is too long")
            if not hasattr(socket, "AF_UNIX"):
                raise OSError("this system has no Unix sockets")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            logger.info("No wake-ups in %s (%s): waiting processes poll", self.wakeups.folder, exc)
            self._failed = True
            return False
        self._socket, self._name, self._address, self._pid = sock, name, address, os.getpid()
        self.wakeups.own |= {name}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)
        return True

    def _read(self) -> None:
        assert self._socket is not None
        names: set[str] = set()
        count = 0
        while True:
            try:
                data = self._socket.recv(65536)
            except OSError:
                break
            count += 1
            names.update(data.decode(errors="replace").split("\0"))
        if count:
            self.received += count
            self.on_notice(None if count >= _FULL else names)

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is None:
            return
        self.wakeups.own -= {self._name}
        if self._pid == os.getpid():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            _unlink(self._address)
        sock.close()


def _unlink(address: str) -> None:
    try:
        os.unlink(address)
    except OSError:
        pass
