"""The two systemd protocols the daemon speaks, with the standard library only.

* **sd_notify** (``sd_notify(3)``): newline-separated ``KEY=VALUE`` assignments in one
  datagram to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
  abstract namespace). ``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1``,
  ``WATCHDOG=1``; ``FDSTORE=1`` + ``FDNAME=`` with the fds as ``SCM_RIGHTS`` keeps them in
  the service's fd store (``FileDescriptorStoreMax=``) across a restart, and
  ``FDSTOREREMOVE=1`` + ``FDNAME=`` drops them again.
* **socket activation** (``sd_listen_fds(3)``): fds start at 3; ``$LISTEN_FDS`` says how
  many, ``$LISTEN_PID`` which process they are for (anything else must ignore them) and
  ``$LISTEN_FDNAMES`` their colon-separated names (``FileDescriptorName=`` of the socket
  unit, or ``FDNAME=`` of the fd store; unnamed ones are ``unknown``, or the socket
  unit's name).
* the watchdog (``sd_watchdog_enabled(3)``): ``$WATCHDOG_USEC`` is the interval,
  ``$WATCHDOG_PID`` (if set) the process it applies to; systemd recommends a ping at half
  the interval.

The parsing functions are pure (they take the environment and the pid as arguments); only
:class:`Notifier` and :func:`take_listen_fds` do I/O. Without ``$NOTIFY_SOCKET`` (not
under systemd) the notifier does nothing.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LISTEN_FDS_START",
    "MAX_FDNAME",
    "ListenFd",
    "Notifier",
    "check_fdname",
    "format_message",
    "is_listening_unix_stream",
    "listen_fds",
    "notify_address",
    "pick_listen_fd",
    "take_listen_fds",
    "watchdog_interval",
]

LISTEN_FDS_START: Final = 3
# FDNAME= (and FileDescriptorName=): at most 255 characters, no ':' and no control
# characters (systemd's fdname_is_valid()).
MAX_FDNAME: Final = 255
# systemd stores at most 253 fds per FDSTORE=1 message (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE: Final = 253


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One fd systemd passed: its number and name (``unknown`` if unnamed)."""

    fd: int
    name: str


# --------------------------------------------------------------------------- pure parts


def notify_address(value: str | None) -> str | bytes | None:
    """The address to send sd_notify datagrams to, from ``$NOTIFY_SOCKET``.

    ``None`` when unset or empty (not under systemd, or ``NotifyAccess=none``). ``@name``
    is the abstract socket ``\\0name`` (returned as bytes). Raises ValueError for
    anything else than an absolute path or ``@name`` (systemd also accepts ``vsock:``
    addresses, which a local daemon never gets).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """``KEY=VALUE`` lines of one sd_notify datagram. Raises ValueError for a key that is
    not ``[A-Z0-9_]+`` or a value with a newline (it would start another assignment)."""
    lines = []
    for key, value in fields.items():
        if not key or not all(c.isascii() and (c.isupper() or c.isdigit() or c == "_")
                              for c in key):
            raise ValueError(f"invalid sd_notify key {key!r}")
        text = str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify value of {key} contains a newline")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def check_fdname(name: str) -> str:
    """``name`` if systemd accepts it as ``FDNAME=``; else ValueError."""
    if not name or len(name) > MAX_FDNAME or ":" in name or not name.isprintable() \
            or not name.isascii():
        raise ValueError(f"invalid fd name {name!r}: 1-{MAX_FDNAME} printable ASCII "
                         f"characters without ':'")
    return name


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval in seconds that applies to process ``pid``, or ``None`` when
    there is none: ``$WATCHDOG_USEC`` unset, not a positive integer, or ``$WATCHDOG_PID``
    set to another process (as ``sd_watchdog_enabled``)."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw, 10)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner, 10) != pid:
                return None
        except ValueError:
            return None
    return usec / 1e6


def listen_fds(env: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The fds systemd passed to process ``pid``, with their names (as ``sd_listen_fds``
    plus ``sd_listen_fds_with_names``).

    Empty when ``$LISTEN_PID`` is unset or names another process (the variables were
    inherited by accident) or ``$LISTEN_FDS`` is unset. Raises ValueError for values that
    are not numbers, or a ``$LISTEN_FDNAMES`` whose count differs from ``$LISTEN_FDS``.
    Missing names are ``unknown``.
    """
    owner = env.get("LISTEN_PID")
    count = env.get("LISTEN_FDS")
    if not owner or not count:
        return []
    try:
        if int(owner, 10) != pid:
            return []
        n = int(count, 10)
    except ValueError:
        raise ValueError(f"LISTEN_PID={owner!r} / LISTEN_FDS={count!r}: not numbers") from None
    if n < 0 or n > 65536:
        raise ValueError(f"LISTEN_FDS={count!r} is out of range")
    raw_names = env.get("LISTEN_FDNAMES")
    if raw_names is None:
        names = ["unknown"] * n
    else:
        names = raw_names.split(":") if n else []
        if len(names) != n:
            raise ValueError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={n}")
    return [ListenFd(LISTEN_FDS_START + i, name or "unknown") for i, name in enumerate(names)]


def pick_listen_fd(fds: Sequence[ListenFd], name: str) -> ListenFd | None:
    """The fd named ``name`` (``FileDescriptorName=`` in the socket unit); failing that,
    the only fd whose name systemd made up (``unknown``, or a socket unit's name ``*.socket``
    when the unit sets no ``FileDescriptorName=``). ``None`` if there is no such fd or the
    choice is ambiguous. Fds from the fd store always carry their ``FDNAME=``."""
    for item in fds:
        if item.name == name:
            return item
    unnamed = [item for item in fds if item.name == "unknown" or item.name.endswith(".socket")]
    return unnamed[0] if len(unnamed) == 1 else None


# --------------------------------------------------------------------------- I/O


_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def take_listen_fds(env: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """:func:`listen_fds` for this process; then removes the ``LISTEN_*`` variables from
    ``env`` (default :data:`os.environ`) so no child inherits them, and marks the fds
    close-on-exec. The caller owns the fds. Raises ValueError as :func:`listen_fds`."""
    environ = os.environ if env is None else env
    fds = listen_fds(environ, os.getpid())
    for name in _LISTEN_VARS:
        environ.pop(name, None)
    for item in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(item.fd, False)
    return fds


#: How long a message that matters (READY, STOPPING, FDSTORE...) may wait for room in
#: the manager's queue, in seconds. The event loop sends them, so the wait is bounded.
SEND_TIMEOUT: Final = 0.5


class Notifier:
    """Sends sd_notify messages. Every method is a no-op without ``$NOTIFY_SOCKET``.

    Sending never raises: a failure is returned as ``False`` (the manager may be gone
    during shutdown; a notification is never worth crashing for), except that
    :meth:`store_fds` raises ValueError for a bad name.

    Sending never blocks for long: messages go from the event loop, and a datagram to a
    unix socket whose reader is behind (its queue holds ``net.unix.max_dgram_qlen``
    datagrams, 10 by default) would block until it reads. ``WATCHDOG=1`` and ``STATUS=``
    are repeated anyway, so they are dropped when there is no room; the others wait up
    to :data:`SEND_TIMEOUT`. The socket is connected to the manager's, so poll() can
    tell when its queue has room again.
    """

    def __init__(self, address: str | bytes | None, *, watchdog: float | None = None) -> None:
        self.address = address
        #: the watchdog interval in seconds, or None (no ``WATCHDOG=1`` expected)
        self.watchdog_interval = watchdog
        self._sock: socket.socket | None = None
        self.last_error: OSError | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``. The variables
        stay set: a restarted child of ours would need them too (we never start one)."""
        environ = os.environ if env is None else env
        try:
            address = notify_address(environ.get("NOTIFY_SOCKET"))
        except ValueError:
            address = None
        return cls(address, watchdog=watchdog_interval(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, str | int], fds: Sequence[int] = (), *,
             wait: bool = True) -> bool:
        """One datagram with ``fields`` (and ``fds`` as ``SCM_RIGHTS``); with ``wait``
        it may wait up to :data:`SEND_TIMEOUT` for room in the manager's queue, without
        it the message is dropped when there is none."""
        if self.address is None:
            return False
        message = format_message(fields)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        deadline = time.monotonic() + (SEND_TIMEOUT if wait else 0.0)
        try:
            for attempt in (1, 2):
                try:
                    self._send_until(message, ancillary, deadline)
                    return True
                except (ConnectionRefusedError, ConnectionResetError, NotADirectoryError,
                        FileNotFoundError):
                    # The manager made its socket anew (daemon-reexec): connect again.
                    self.close()
                    if attempt == 2:
                        raise
        except OSError as exc:
            self.last_error = exc
        return False

    def _send_until(self, message: bytes, ancillary: list[tuple[int, int, bytes]],
                    deadline: float) -> None:
        if self._sock is None:
            assert self.address is not None  # send() checked
            sock = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                sock.connect(self.address)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        while True:
            try:
                self._sock.sendmsg([message], ancillary)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                poller = select.poll()
                poller.register(self._sock, select.POLLOUT)
                poller.poll(remaining * 1000)

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        fields["MAINPID"] = os.getpid()
        return self.send(fields)

    def status(self, text: str) -> bool:
        return self.send({"STATUS": text}, wait=False)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by ``Type=notify-reload``);
        send :meth:`ready` when the reload is done."""
        return self.send({"RELOADING": 1,
                          "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000})

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def watchdog(self) -> bool:
        return self.send({"WATCHDOG": 1}, wait=False)

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """Put ``fds`` into the service's fd store under ``name`` (``FDSTORE=1``). systemd
        keeps its own copies (the caller still owns and closes its fds) and passes them
        back to the next start as ``LISTEN_FDS`` with ``LISTEN_FDNAMES`` entries ``name``.
        Needs ``FileDescriptorStoreMax=`` > 0. At most 253 fds per call."""
        check_fdname(name)
        if not fds or len(fds) > MAX_FDS_PER_MESSAGE:
            raise ValueError(f"store_fds takes 1-{MAX_FDS_PER_MESSAGE} fds, got {len(fds)}")
        return self.send({"FDSTORE": 1, "FDNAME": name}, fds)

    def remove_fds(self, name: str) -> bool:
        """Drop every fd stored under ``name`` (``FDSTOREREMOVE=1``)."""
        check_fdname(name)
        return self.send({"FDSTOREREMOVE": 1, "FDNAME": name})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def is_listening_unix_stream(fd: int) -> bool:
    """Whether ``fd`` is a listening ``AF_UNIX`` ``SOCK_STREAM`` socket (as
    ``sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0)``). Never raises."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False
    finally:
        sock.detach()
