"""The notify socket: runtimes connect and hand over their seccomp listener fds.

This is the I/O shell around :mod:`supervisor.handoff`. Per connection: check the peer's
uid (``SO_PEERCRED``), read the message with its fds under a size, fd-count and time
limit, let :func:`~supervisor.handoff.accept_handoff` validate it (and close every fd it
does not keep), count the result and pass an accepted :class:`~supervisor.handoff.Handoff`
on. A bad client costs one log line and a counter; it never ends the accept loop.

Facts this relies on:

* With ``SCM_RIGHTS``, the fds exist in this process as soon as ``recvmsg`` returns
  (``MSG_CMSG_CLOEXEC`` makes them close-on-exec). If the ancillary buffer is too small
  the kernel installs the fds that fit, closes the rest and sets ``MSG_CTRUNC``.
* fds still queued on a socket that is closed unread are released by the kernel.
* On a stream socket one ``recvmsg`` may return the data of several ``sendmsg`` calls,
  but it ends with the first chunk that carried fds.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final

import trio

from ._start import bind_unix_listener
from .errors import HandoffError
from .handoff import BadFdError, Handoff, MessageAssembler, PeerCredentials, accept_handoff
from .metrics import Metrics

__all__ = ["RESULTS", "ListenerLimits", "bind_socket", "serve_handoffs"]

logger = logging.getLogger("supervisor.listener")

RESULTS: Final = ("accepted", "invalid", "forbidden", "too_large", "timeout", "bad_fd",
                  "closed_empty")
# crun connects to the listener socket early and, when the container fails before the
# handoff (an rlimit it may not set, a missing binary...), closes the connection without
# writing anything: that is no malformed message, and the operator should look at the
# runtime's error, not at the daemon.
CLOSED_EMPTY: Final = ("the runtime closed the connection before sending anything; the "
                       "container probably failed to start")

# struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED: Final = struct.Struct("iII")
_FD_SIZE: Final = array.array("i").itemsize
_CHUNK: Final = 64 * 1024
# accept() errors that say "no resources now": the connection stays queued, try later.
_ACCEPT_BACKOFF: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors about one connection that died while queued: take the next one.
_ACCEPT_SKIP: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 1.0

OnHandoff = Callable[[Handoff], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one connection may do.

    ``allowed_uids``: uids that may hand over fds (any collection; stored as a frozenset).
    ``max_message``: bytes of JSON. ``timeout``: seconds from accept to a complete
    message. ``max_handoffs``: connections served at once; more wait in the listen
    backlog. ``max_fds``: fds in one message (the ancillary buffer holds that many).

    Raises ValueError for a limit that is not positive.
    """

    allowed_uids: Collection[int] = frozenset({0})
    max_message: int = 64 * 1024
    timeout: float = 5.0
    max_handoffs: int = 64
    max_fds: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_uids", frozenset(self.allowed_uids))
        for name in ("max_message", "max_handoffs", "max_fds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ListenerLimits.{name} must be a positive int, got {value!r}")
        if not self.timeout > 0:
            raise ValueError(f"ListenerLimits.timeout must be positive, got {self.timeout!r}")


def bind_socket(path: str | os.PathLike[str], mode: int = 0o600, *,
                backlog: int = 128) -> trio.socket.SocketType:
    """Create the listening unix socket at ``path`` with permissions ``mode``.

    A missing parent directory is created with mode 0700, plus search permission
    (``x``) for the group and others when ``mode`` lets them read or write the socket
    (0660 → 0710, 0666 → 0711): a socket they may use in a directory they cannot enter
    would be useless. (For a group other than root's, create the directory yourself:
    setgid and owned by that group, the socket inherits it.) A socket file left by a
    process that is gone is replaced. Peers are also checked by uid, so the moment
    between ``bind`` and ``chmod`` grants nothing.

    Raises FileExistsError if ``path`` exists and is not a socket, OSError(EADDRINUSE)
    if a live process listens on it, and OSError for any failure to create, bind or
    listen. (The work is :func:`supervisor._start.bind_unix_listener`'s, which ``serve``
    also calls before the daemon is even imported.)
    """
    sock = bind_unix_listener(os.fspath(path), mode, backlog=backlog)
    return trio.socket.from_stdlib_socket(sock)


async def serve_handoffs(
    sock: trio.socket.SocketType,
    on_handoff: OnHandoff,
    *,
    limits: ListenerLimits = ListenerLimits(),
    metrics: Metrics,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``sock`` (listening) until cancelled.

    Each accepted :class:`~supervisor.handoff.Handoff` is passed to ``on_handoff``,
    which owns it from then on. It is called from the connection's task after the
    connection is closed and its slot freed; it should return soon (hand the work to
    another nursery or a channel). If it raises, the listener logs the error and closes
    the handoff (a no-op if its fd was taken).

    Every connection is counted in ``metrics.handoffs`` under one of :data:`RESULTS`;
    more than ``max_fds`` fds counts as ``too_large``. The caller keeps ownership of
    ``sock``. Raises OSError only for an ``accept`` failure that is not about one
    connection or a temporary lack of resources (e.g. ``sock`` was closed).
    """
    for result in RESULTS:
        metrics.handoffs.labels(result)
    slots = trio.Semaphore(limits.max_handoffs)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                conn = await _accept(sock)
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_serve_connection, conn, slots, on_handoff, limits, metrics)


async def _accept(sock: trio.socket.SocketType) -> trio.socket.SocketType:
    delay = _BACKOFF_FIRST
    while True:
        try:
            conn, _ = await sock.accept()
            return conn
        except OSError as exc:
            if exc.errno in _ACCEPT_BACKOFF:
                logger.warning("cannot accept a connection (%s); retrying in %.2f s",
                               exc.strerror, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            elif exc.errno in _ACCEPT_SKIP:
                logger.debug("a queued connection failed before accept: %s", exc.strerror)
                await trio.lowlevel.checkpoint()
            else:
                raise


class _Rejected(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


async def _serve_connection(conn: trio.socket.SocketType, slots: trio.Semaphore,
                            on_handoff: OnHandoff, limits: ListenerLimits,
                            metrics: Metrics) -> None:
    handoff: Handoff | None = None
    peer = PeerCredentials(0, -1, -1)
    try:
        try:
            peer = _peer_credentials(conn)
            if peer.uid not in limits.allowed_uids:
                raise _Rejected("forbidden", f"uid {peer.uid} is not in allowed_uids")
            handoff = await _receive_handoff(conn, peer, limits)
            result = "accepted"
        except _Rejected as exc:
            result = exc.result
            if result == "closed_empty":
                logger.warning("connection from pid %d uid %d: %s", peer.pid, peer.uid,
                               exc.reason)
            else:
                logger.warning("rejected a handoff from pid %d uid %d (%s): %s",
                               peer.pid, peer.uid, result, exc.reason)
        except Exception:
            result = "invalid"
            logger.exception("error while receiving a handoff from pid %d uid %d",
                             peer.pid, peer.uid)
    finally:
        conn.close()
        slots.release()
    metrics.handoffs.labels(result).inc()
    if handoff is None:
        return
    logger.info("accepted the seccomp fd of container %r (pid %d, status %r) from pid %d "
                "uid %d", handoff.container.id, handoff.state.pid, handoff.state.status,
                peer.pid, peer.uid)
    try:
        await on_handoff(handoff)
    except Exception:
        logger.exception("the handoff handler failed for container %r", handoff.container.id)
        handoff.close()
    except BaseException:
        handoff.close()
        raise


def _peer_credentials(conn: trio.socket.SocketType) -> PeerCredentials:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


async def _receive_handoff(conn: trio.socket.SocketType, peer: PeerCredentials,
                           limits: ListenerLimits) -> Handoff:
    """Read one message with its fds and validate it. Raises _Rejected; every fd
    received is closed unless it is returned inside the Handoff."""
    message = MessageAssembler()
    fds: list[int] = []
    try:
        try:
            with trio.fail_after(limits.timeout):
                await _read_message(conn, message, fds, limits)
        except trio.TooSlowError:
            raise _Rejected("timeout", f"no complete message within {limits.timeout:g} s "
                            f"({len(message)} bytes, {len(fds)} fds so far)") from None
        except OSError as exc:
            raise _Rejected("invalid", f"receive failed: {exc.strerror or exc}") from None
        if not len(message) and not fds:
            raise _Rejected("closed_empty", CLOSED_EMPTY)
        taken, fds = fds, []
        try:
            return accept_handoff(message.data, taken, peer)
        except BadFdError as exc:
            raise _Rejected("bad_fd", str(exc)) from None
        except HandoffError as exc:
            raise _Rejected("invalid", str(exc)) from None
    finally:
        _close_all(fds)


async def _read_message(conn: trio.socket.SocketType, message: MessageAssembler,
                        fds: list[int], limits: ListenerLimits) -> None:
    """Read until the message is complete or EOF, appending every fd received to
    ``fds`` at once (the caller closes them on error). Raises _Rejected, OSError."""
    ancbufsize = socket.CMSG_SPACE(limits.max_fds * _FD_SIZE)
    while not message.complete:
        room = limits.max_message - len(message)
        data, ancdata, msg_flags, _ = await conn.recvmsg(
            min(room + 1, _CHUNK), ancbufsize, socket.MSG_CMSG_CLOEXEC)
        received = _fds_in(ancdata)
        fds.extend(received)
        if msg_flags & socket.MSG_CTRUNC:
            raise _Rejected("too_large", f"more than {limits.max_fds} fds in one message")
        if received and len(message):
            raise _Rejected("invalid", "fds arrived after the first part of the message")
        if not data:
            return
        if len(data) > room:
            raise _Rejected("too_large", f"message longer than {limits.max_message} bytes")
        message.feed(data)


def _fds_in(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            # A truncated array can end in part of an int: only whole ones are fds.
            whole = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:whole]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
