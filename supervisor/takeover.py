"""Restart without systemd: a new daemon takes the sessions of the running one.

``seccomp-supervisor serve --takeover`` connects to the running daemon's control socket
(:mod:`supervisor.control`) and, on that one connection::

    → {"command": "takeover"}                 old: stops accepting, stops reading
    ← {"pid": P, "sessions": N, "pages": K, "listener": true}     + the notify socket fd
    → {"command": "takeover-page", "page": i}     (i = 0 .. K-1)
    ← {"sessions": [STATE, ...]}                  + one notify fd per STATE, in order
    → {"command": "takeover-commit"}
    ← {"committed": true}                         old: closes its copies and exits 0

Why no notified call is lost or answered twice:

* the old daemon first stops accepting handoffs (a connection being read is finished and
  its session included), then **stops calling RECV** on every notify fd, and waits until
  every notification it already received has its answer (each is bounded by
  ``[defaults] deadline``). Only then does it send the fds. A call made from then on
  waits in the kernel (the filter keeps it pending while any process holds a listener);
  the new daemon RECVs it as soon as its session starts. The kernel hands each
  notification to exactly one RECV, and an answer goes to the id that RECV returned, so
  each call is answered once, by the daemon that received it.
* until the commit, the old daemon keeps its own copies of the fds. If the new one dies,
  asks ``takeover-abort``, or does not commit within :data:`HANDOVER_TIMEOUT`, the old
  one serves the same fds again (its sessions are rebuilt from the same state).
* the listening notify socket itself is passed too, so runtimes that connect during the
  switch wait in its backlog instead of being refused.

``STATE`` is :func:`supervisor.fdstore.session_state`. The new daemon routes every
container again with its own config (as a reload would).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from .control import ControlError, ControlReply, ControlRequest, decode_reply, encode_request
from .fdstore import container_from_state, session_state
from .policy import Container

__all__ = [
    "HANDOVER_TIMEOUT",
    "AcceptGate",
    "HandedSession",
    "Handover",
    "TakenOver",
    "TakeoverError",
    "take_over",
]

log = logging.getLogger("supervisor.takeover")

#: fds a handoff needs at once: the accepted connection and the listener it carries.
FDS_PER_HANDOFF: Final = 2
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 1.0
#: How long the old daemon waits for the commit before it serves its sessions again.
HANDOVER_TIMEOUT: Final = 30.0
#: Sessions per page: at most this many fds in one SCM_RIGHTS message (SCM_MAX_FD 253).
PAGE_FDS: Final = 200
#: ...and at most about this many bytes of state per page.
PAGE_BYTES: Final = 1024 * 1024
_FD_SIZE: Final = array.array("i").itemsize
_MAX_REPLY: Final = 64 * 1024 * 1024
_UCRED: Final = struct.Struct("iII")


class TakeoverError(Exception):
    """The takeover did not happen (no daemon to take over, refused, broken off). The
    old daemon, if any, keeps serving."""


# --------------------------------------------------------------------------- accept gate


class AcceptGate:
    """A listening socket whose ``accept()`` can be paused, for a graceful stop or a
    handover: :meth:`close` makes waiting and future ``accept()`` calls wait instead of
    taking a connection (connections stay queued in the backlog for whoever listens
    next), :meth:`reopen` undoes it. :meth:`wait_idle` waits until every connection it
    handed out was closed by the listener (a handoff being read is finished first).

    The listener only calls ``accept()`` on it; the caller keeps owning the socket.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.is_open = True
        self._reopened = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._conns: list[trio.socket.SocketType] = []
        self._closed_one = trio.Event()

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        """Accept one connection, but only when this process can still open
        :data:`FDS_PER_HANDOFF` fds: a listener fd that does not fit into ``recvmsg``
        is dropped by the kernel (``MSG_CTRUNC``), which would leave that container's
        filter without any listener (ENOSYS). A connection that waits stays queued,
        with its fd, in the backlog."""
        delay = _BACKOFF_FIRST
        while True:
            while not self.is_open:
                await self._reopened.wait()
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                    if not _fds_available(FDS_PER_HANDOFF):
                        log.warning("out of file descriptors: a handoff waits in the "
                                    "backlog; retrying in %.2f s", delay)
                        await trio.sleep(delay)
                        delay = min(delay * 2, _BACKOFF_MAX)
                        continue
                    delay = _BACKOFF_FIRST
                    conn, address = await self.sock.accept()
                finally:
                    self._scope = None
                self._conns = [c for c in self._conns if c.fileno() >= 0]
                self._conns.append(conn)
                return conn, address
            # close() cancelled the wait: nothing was accepted; wait for reopen().

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._reopened = trio.Event()
            if self._scope is not None:
                self._scope.cancel()

    def reopen(self) -> None:
        if not self.is_open:
            self.is_open = True
            self._reopened.set()

    async def wait_idle(self) -> None:
        """Wait until no connection handed out is open (bound it with a cancel scope).
        The listener closes a connection right before it passes the handoff on, with no
        checkpoint in between, so a closed connection's session has started."""
        while True:
            self._conns = [c for c in self._conns if c.fileno() >= 0]
            if not self._conns:
                return
            await trio.sleep(0.005)


def _fds_available(count: int) -> bool:
    """Whether ``count`` more fds can be opened right now (EMFILE/ENFILE otherwise)."""
    opened: list[int] = []
    try:
        for _ in range(count):
            opened.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        return True
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return False
        raise
    finally:
        _close_all(opened)


# --------------------------------------------------------------------------- old side


@dataclass
class HandedSession:
    """A session whose reader stopped: its fd (still owned by the old daemon until the
    commit), container and route."""

    notify_fd: int
    container: Container
    policies: Sequence[str]
    mode: str
    #: Its name in the fd store, if it has one: the new daemon stores the session under
    #: a name of its own (with a fresh in-flight journal) and then removes this one, so
    #: one listener is never in the store twice (the old journal is empty: every
    #: notification received was answered before the handover).
    stored_as: str | None = None
    #: Its in-flight journal, sent right after ``notify_fd`` (the state then says
    #: ``"journal": true``). Only a restarted daemon giving its keeper's sessions away
    #: (giveback.py) sends one: a session paused for a handover answered everything.
    journal_fd: int = -1


class Handing(Protocol):
    """What :class:`Handover` needs from the daemon."""

    async def pause_for_handover(self) -> tuple[int, list[HandedSession]]:
        """Stop accepting and reading; return the listening socket's fd (-1 if none)
        and every session, once all received notifications are answered."""

    def resume_after_handover(self, sessions: list[HandedSession]) -> None:
        """Serve these sessions again and accept again (the takeover failed)."""

    def finish_handover(self) -> None:
        """The new daemon has everything: close the copies and exit 0."""


@dataclass
class _Pending:
    peer_pid: int
    listen_fd: int
    sessions: list[HandedSession]
    pages: list[tuple[int, int]]
    done: trio.Event = field(default_factory=trio.Event)
    committed: bool = False


class Handover:
    """The old daemon's side: the ``takeover*`` control commands.

    ``register(server)`` adds them to a :class:`~supervisor.control.ControlServer`;
    ``nursery`` runs the watchdog that gives up a takeover that is not committed.
    """

    def __init__(self, daemon: Handing, nursery: trio.Nursery, *,
                 timeout: float = HANDOVER_TIMEOUT) -> None:
        self.daemon = daemon
        self.nursery = nursery
        self.timeout = timeout
        self._pending: _Pending | None = None
        self._finished = False

    def register(self, register: Callable[[str, Callable[[ControlRequest],
                                                          Awaitable[Any]]], None]) -> None:
        register("takeover", self.begin)
        register("takeover-page", self.page)
        register("takeover-commit", self.commit)
        register("takeover-abort", self.abort)

    async def begin(self, req: ControlRequest) -> ControlReply:
        if self._pending is not None or self._finished:
            raise ControlError("a takeover is already under way")
        log.info("takeover requested by pid %d: handing over", req.peer.pid)
        listen_fd, sessions = await self.daemon.pause_for_handover()
        pending = _Pending(req.peer.pid, listen_fd, sessions, _pages(sessions))
        self._pending = pending
        self.nursery.start_soon(self._watch, pending)
        fds = [listen_fd] if listen_fd >= 0 else []
        return ControlReply({"pid": os.getpid(), "sessions": len(sessions),
                             "pages": len(pending.pages), "listener": listen_fd >= 0},
                            fds=fds)

    async def page(self, req: ControlRequest) -> ControlReply:
        pending = self._require(req)
        index = req.args.get("page")
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < len(pending.pages):
            raise ControlError(f"no page {index!r} (pages: {len(pending.pages)})")
        start, end = pending.pages[index]
        chunk = pending.sessions[start:end]
        fds: list[int] = []
        for s in chunk:
            fds.append(s.notify_fd)
            if s.journal_fd >= 0:
                fds.append(s.journal_fd)
        return ControlReply({"sessions": [_handed_state(s) for s in chunk]}, fds=fds)

    async def commit(self, req: ControlRequest) -> ControlReply:
        pending = self._require(req)
        pending.committed = True
        pending.done.set()
        self._finished = True
        reply = ControlReply({"committed": True, "sessions": len(pending.sessions)})
        self.nursery.start_soon(self._finish_after, reply)
        return reply

    async def abort(self, req: ControlRequest) -> ControlReply:
        pending = self._require(req)
        pending.done.set()
        return ControlReply({"aborted": True})

    def _require(self, req: ControlRequest) -> _Pending:
        pending = self._pending
        if pending is None or pending.done.is_set():
            raise ControlError("no takeover is under way")
        if req.peer.pid != pending.peer_pid:
            raise ControlError(f"the takeover belongs to pid {pending.peer_pid}")
        return pending

    async def _watch(self, pending: _Pending) -> None:
        """Resume unless committed in time (an abort, the peer's exit and the timeout all
        end up here)."""
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_exit, pending.peer_pid, pending.done)
                await pending.done.wait()
                nursery.cancel_scope.cancel()
        pending.done.set()
        if pending.committed:
            return
        self._pending = None
        log.warning("takeover by pid %d did not complete: serving %d sessions again",
                    pending.peer_pid, len(pending.sessions))
        self.daemon.resume_after_handover(pending.sessions)

    async def _finish_after(self, reply: ControlReply) -> None:
        # Let the control server send the reply first (bounded: the peer may be gone).
        for _ in range(2000):
            if reply.sent:
                break
            await trio.sleep(0.001)
        log.info("takeover committed: %d sessions handed over; exiting",
                 len(self._pending.sessions) if self._pending else 0)
        self.daemon.finish_handover()


def _handed_state(s: HandedSession) -> dict[str, Any]:
    state = session_state(s.container, s.policies, s.mode)
    if s.stored_as is not None:
        state["fdstore"] = s.stored_as
    if s.journal_fd >= 0:
        state["journal"] = True
    return state


def _pages(sessions: Sequence[HandedSession]) -> list[tuple[int, int]]:
    pages: list[tuple[int, int]] = []
    start = 0
    size = 0
    fds = 0
    for i, s in enumerate(sessions):
        estimate = 256 + len(s.container.metadata) + sum(
            len(k) + len(v) + 8 for table in (s.container.labels, s.container.annotations)
            for k, v in table.items())
        count = 2 if s.journal_fd >= 0 else 1
        if i > start and (fds + count > PAGE_FDS or size + estimate > PAGE_BYTES):
            pages.append((start, i))
            start, size, fds = i, 0, 0
        size += estimate
        fds += count
    if start < len(sessions):
        pages.append((start, len(sessions)))
    return pages


async def _wait_for_exit(pid: int, done: trio.Event) -> None:
    """Set ``done`` when process ``pid`` exits (never, if it cannot be watched)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        await trio.sleep_forever()
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
        log.warning("the daemon taking over (pid %d) exited before the commit", pid)
        done.set()
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


# --------------------------------------------------------------------------- new side


@dataclass
class TakenOver:
    """What the new daemon received. It owns ``listen_fd`` and every fd in
    ``sessions`` from now on (close what it does not use)."""

    old_pid: int
    listen_fd: int
    sessions: list[tuple[int, Container]]
    invalid: list[tuple[int, str]] = field(default_factory=list)
    #: fd -> the name the old daemon kept that session under in the fd store.
    stored_names: dict[int, str] = field(default_factory=dict)
    #: fd -> the in-flight journal sent with it (giveback.py; not checked yet).
    journals: dict[int, int] = field(default_factory=dict)


class TakeoverClient:
    """The new daemon's side of one takeover connection."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buffer = bytearray()

    async def call(self, command: str, args: dict[str, Any] | None = None, *,
                   max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
        """One request and its reply. Raises TakeoverError; fds received are owned by the
        caller only if it returns."""
        await self.sock.send(encode_request(command, args))
        fds: list[int] = []
        try:
            while b"\n" not in self._buffer:
                data, ancdata, flags, _ = await self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE),
                    socket.MSG_CMSG_CLOEXEC)
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        whole = len(payload) - len(payload) % _FD_SIZE
                        fds.extend(array.array("i", payload[:whole]))
                if flags & socket.MSG_CTRUNC:
                    raise TakeoverError(f"{command}: more fds than expected ({max_fds})")
                if not data:
                    raise TakeoverError(f"{command}: the old daemon closed the connection")
                self._buffer.extend(data)
                if len(self._buffer) > _MAX_REPLY:
                    raise TakeoverError(f"{command}: reply too long")
            end = self._buffer.index(b"\n")
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            try:
                return decode_reply(line), fds
            except ControlError as exc:
                raise TakeoverError(f"{command}: {exc}") from None
        except BaseException:
            _close_all(fds)
            raise


async def take_over(control_path: str, *, limit: float = HANDOVER_TIMEOUT,
                    peer_uid: int | None = None) -> TakenOver:
    """Take the sessions of the daemon listening on ``control_path``, within ``limit``
    seconds. Returns after the commit: the caller owns every fd in the result and must
    serve the sessions at once (their calls wait in the kernel meanwhile).

    Raises TakeoverError (after asking the old daemon to serve again, if it had begun;
    every fd received is closed) and OSError if the control socket cannot be reached.
    ``peer_uid``: refuse (TakeoverError) a socket whose listener runs as another uid.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    taken = TakenOver(0, -1, [])
    with sock:
        with trio.move_on_after(limit) as connecting:
            await sock.connect(control_path)
        if connecting.cancelled_caught:
            raise TakeoverError(f"{control_path} did not accept within {limit:g} s")
        if peer_uid is not None:
            _pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid != peer_uid:
                raise TakeoverError(f"{control_path} is served by uid {uid}, "
                                    f"not {peer_uid}")
        client = TakeoverClient(sock)
        began = False
        try:
            with trio.fail_after(limit):
                hello, fds = await client.call("takeover", max_fds=1)
                began = True
                taken.old_pid = int(hello.get("pid", 0))
                if hello.get("listener") and fds:
                    taken.listen_fd = fds.pop(0)
                _close_all(fds)
                pages = int(hello.get("pages", 0))
                for index in range(pages):
                    result, fds = await client.call("takeover-page", {"page": index},
                                                    max_fds=PAGE_FDS)
                    states = result.get("sessions")
                    with_journal = [isinstance(state, dict) and state.get("journal") is True
                                    for state in states] if isinstance(states, list) else []
                    if not isinstance(states, list) \
                            or len(states) + sum(with_journal) != len(fds):
                        _close_all(fds)
                        raise TakeoverError(f"page {index}: {len(fds)} fds for "
                                            f"{len(states) if isinstance(states, list) else '?'}"
                                            " sessions")
                    page: list[tuple[int, Container]] = []
                    next_fd = iter(fds)
                    for state, journal in zip(states, with_journal, strict=True):
                        fd = next(next_fd)
                        if journal:
                            taken.journals[fd] = next(next_fd)
                        name = state.get("fdstore") if isinstance(state, dict) else None
                        if isinstance(name, str):
                            taken.stored_names[fd] = name
                        try:
                            page.append((fd, container_from_state(state)))
                        except ValueError as exc:
                            # A live filter is never dropped: serve it under a placeholder.
                            taken.invalid.append((fd, str(exc)))
                            page.append((fd, Container(id=f"unknown-takeover-{fd}")))
                    taken.sessions.extend(page)
                await client.call("takeover-commit")
        except trio.TooSlowError:
            await _abort(client, began)
            _release(taken)
            raise TakeoverError(f"no complete takeover within {limit:g} s") from None
        except (TakeoverError, OSError, ValueError) as exc:
            await _abort(client, began)
            _release(taken)
            if isinstance(exc, TakeoverError):
                raise
            raise TakeoverError(f"takeover broken off: {exc}") from None
    return taken


async def _abort(client: TakeoverClient, began: bool) -> None:
    if not began:
        return
    with trio.move_on_after(2), contextlib.suppress(TakeoverError, OSError):
        await client.call("takeover-abort")


def _release(taken: TakenOver) -> None:
    """After a failed takeover: close every fd received (the old daemon serves on)."""
    if taken.listen_fd >= 0:
        _close_all([taken.listen_fd])
        taken.listen_fd = -1
    # A session with a bad state is in both lists: close each fd once (a second close
    # could hit an fd another thread opened under the same number meanwhile).
    _close_all(list(dict.fromkeys([fd for fd, _ in taken.sessions]
                                  + [fd for fd, _ in taken.invalid]
                                  + list(taken.journals.values()))))
    taken.sessions = []
    taken.invalid = []
    taken.journals = {}


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
