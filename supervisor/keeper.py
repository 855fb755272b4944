"""The fd keeper: systemd's fd store for a daemon that runs without systemd (a pod).

Under systemd, every session's notify fd and state sit in the service's fd store
(:mod:`supervisor.fdstore`), so a crashed daemon's successor serves the same containers.
A pod has no systemd, so ``seccomp-supervisor keep --socket PATH`` is that store: a small
process (standard library only) that outlives the daemon's process (in a pod: a native
sidecar sharing an ``emptyDir`` with the daemon), and ``serve --fd-keeper PATH`` uses it
instead of systemd's.

**Protocol.** The keeper's socket is a unix *datagram* socket, like ``$NOTIFY_SOCKET``,
and understands the subset of sd_notify the daemon sends to systemd, so
:class:`~supervisor.fdstore.FdStore` works unchanged:

* ``FDSTORE=1`` + ``FDNAME=name`` with fds as ``SCM_RIGHTS``: keep copies of them under
  ``name`` (several messages with one name add up, as in systemd);
* ``FDSTOREREMOVE=1`` + ``FDNAME=name``: close every fd kept under ``name``;

and two messages of its own:

* ``ATTACH=1`` with one fd, a connected ``SOCK_SEQPACKET`` unix socket (one end of a
  ``socketpair``): the keeper answers on it with every kept fd and its name (messages
  ``FDNAME=name`` + ``SCM_RIGHTS``, at most 253 fds each), then ``END=1`` with ``FDS=``
  (the count), ``RETIRED=`` and ``ATTACHES=`` (daemons attached before this one). It
  keeps the socket: the sender is now *the attached daemon*, and each side learns of the
  other's death by ``POLLHUP`` on it. What :func:`attach` returns is the
  ``list[ListenFd]`` that ``$LISTEN_FDS``/``$LISTEN_FDNAMES`` give under systemd;
* ``HANDEDOVER=1``: the attached daemon gave its sessions to a newer daemon (``serve
  --takeover``, a rolling update): the keeper closes every fd and answers every later
  ``ATTACH`` with ``RETIRED=1``, so a daemon the kubelet restarts in the old pod neither
  serves those containers again nor takes them back (no ping-pong).

**A security boundary.** Whoever reaches the keeper could take every container's notify
fd and answer its system calls. So:

* every message must carry the sender's credentials (``SO_PASSCRED``: the kernel adds
  them) with the keeper's own uid (root); ``FDSTORE``/``FDSTOREREMOVE``/``HANDEDOVER``
  must come from the attached daemon's pid, and only one daemon is attached at a time
  (a second ``ATTACH`` is refused while the first one's socket is open). So the keeper
  must see the daemon's pid: it runs in the daemon's pid namespace (a pod's containers
  share the node's with ``hostPID``) or an ancestor of it;
* the socket's directory must belong to the keeper's uid and be writable by nobody else
  (an ``emptyDir``'s 0777 is tightened when it is ours; anything else is refused), and
  the socket is 0600. The daemon checks the same before it sends a single fd;
* fds are checked: a seccomp listener is kept only as the first fd of a new
  ``session-*`` name and at most one per name; names follow systemd's ``FDNAME=`` rules;
  at most ``--max-fds`` fds (``FileDescriptorStoreMax=``), 253 per message, datagrams of
  at most :data:`MAX_DATAGRAM` bytes. A refused message's fds are all closed;
* a kept fd that reports ``POLLHUP`` is closed, as systemd does (a seccomp listener
  whose filter has no task left); for a listener, its whole ``session-*`` name goes
  (the state is of no use without it). A notify fd is never read: only polled for
  ``POLLHUP`` (``epoll`` with no events asked for);
* it never blocks on a client: every socket is non-blocking; an attach whose reader does
  not take its fds within :data:`REPLY_TIMEOUT` is dropped.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .systemd import MAX_FDS_PER_MESSAGE, ListenFd, check_fdname, format_message

__all__ = [
    "DEFAULT_MAX_FDS",
    "MAX_DATAGRAM",
    "Attached",
    "Keeper",
    "KeeperError",
    "KeeperUnavailable",
    "attach",
    "check_private_directory",
    "parse_message",
    "resolve_socket_path",
]

log = logging.getLogger("supervisor.keeper")

#: The default of ``--max-fds``: the systemd unit's ``FileDescriptorStoreMax=``.
DEFAULT_MAX_FDS: Final = 6144
#: The longest datagram accepted (an ``FDSTORE=1`` message is ~40 bytes).
MAX_DATAGRAM: Final = 4096
#: Seconds an attaching daemon has to take its fds.
REPLY_TIMEOUT: Final = 10.0
SESSION_PREFIX: Final = "session-"  # = fdstore.SESSION_PREFIX (not imported: keep it light)
_INT: Final = array.array("i").itemsize
_UCRED: Final = struct.Struct("iII")  # pid, uid, gid
_ANCILLARY: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _INT) + socket.CMSG_SPACE(
    _UCRED.size)


class KeeperError(Exception):
    """The keeper cannot be used (refused, gone, unsafe path)."""


class KeeperUnavailable(KeeperError):
    """No keeper answers on the path (yet): no socket there, or nobody bound to it."""


# --------------------------------------------------------------------------- pure parts


def parse_message(data: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of one datagram. Raises ValueError for anything that is
    not one (bad UTF-8, a line without ``=``, a key given twice)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"not KEY=VALUE: {line[:40]!r}")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value
    return fields


def directory_problem(st: os.stat_result, uid: int) -> str | None:
    """Why a directory with this ``stat`` may not hold the keeper's socket, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"belongs to uid {st.st_uid}, not {uid}"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def ancestor_problem(st: os.stat_result, uid: int) -> str | None:
    """Why a directory with this ``stat`` may not be above the keeper's, or None: whoever
    may write to it could rename the keeper's directory away and put theirs (with a
    socket of theirs) in its place. A sticky one (``/tmp``) lets only the owner of an
    entry rename it."""
    if st.st_uid not in (0, uid):
        return f"belongs to uid {st.st_uid}, not 0 or {uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o}, not sticky)"
    return None


def resolve_socket_path(path: str, uid: int | None = None) -> str:
    """``path`` with its directory resolved (symlinks followed once, here: one retargeted
    later changes nothing for whoever uses the result). Raises KeeperError if a
    directory above that one may be written by others."""
    owner = os.geteuid() if uid is None else uid
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    parent = directory
    while parent != "/":
        parent = os.path.dirname(parent)
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise KeeperError(f"{parent}: {exc.strerror}") from None
        problem = ancestor_problem(st, owner)
        if problem is not None:
            raise KeeperError(f"{parent} {problem}: it may not be above the fd keeper's "
                              f"socket")
    return os.path.join(directory, os.path.basename(path))


def check_private_directory(path: str, uid: int | None = None, *,
                            tighten: bool = False) -> None:
    """Raise KeeperError unless directory ``path`` belongs to ``uid`` (default: ours) and
    nobody else may write to it. ``tighten``: drop group/other write permission from a
    directory of ours instead (an ``emptyDir`` is created 0777)."""
    owner = os.geteuid() if uid is None else uid
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise KeeperError(f"{path}: {exc.strerror}") from None
    problem = directory_problem(st, owner)
    if problem is not None and tighten and stat.S_ISDIR(st.st_mode) and st.st_uid == owner:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
        log.info("%s: removed write permission for group and others", path)
        return
    if problem is not None:
        raise KeeperError(f"{path} {problem}: it may not hold the fd keeper's socket")


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _is_listener(fd: int) -> bool:
    return _fd_kind(fd) == "anon_inode:seccomp notify"


def _peer_closed(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in poller.poll(0))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------- keeper


@dataclass
class _Attachment:
    sock: socket.socket
    pid: int
    queue: list[tuple[bytes, list[int]]] = field(default_factory=list)
    deadline: float = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()


class Keeper:
    """The keeper's state and loop. ``run()`` serves until SIGTERM/SIGINT."""

    def __init__(self, path: str, *, max_fds: int = DEFAULT_MAX_FDS,
                 uid: int | None = None, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path
        self.reply_timeout = reply_timeout
        self.max_fds = max_fds
        self.uid = os.geteuid() if uid is None else uid
        self.groups: dict[str, list[int]] = {}
        self.total = 0
        self.retired = False
        self.attaches = 0
        self.refused = 0
        self.owner: _Attachment | None = None
        self._polled: dict[int, str] = {}  # kept fd -> its name (registered in epoll)
        self._epoll = select.epoll()
        self._sock: socket.socket | None = None
        self._stop = False
        self._wake = -1
        self._identity: tuple[int, int] | None = None

    # -- setup ---------------------------------------------------------------------------

    def bind(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        self.path = resolve_socket_path(self.path, self.uid)
        directory = os.path.dirname(self.path)
        check_private_directory(directory, self.uid, tighten=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a previous keeper's (this directory is ours)
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        if os.path.lexists(self.retired_marker):
            self.retired = True
            log.info("fd keeper: %s exists: retired (this pod's daemon handed its "
                     "sessions over before this keeper restarted)", self.retired_marker)
        st = os.lstat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    @property
    def retired_marker(self) -> str:
        """Where "retired" outlives the keeper's process: beside the socket, in the
        directory only we may write (a pod's emptyDir lives as long as the pod)."""
        return self.path + ".retired"

    def _write_retired_marker(self) -> None:
        try:
            fd = os.open(self.retired_marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            log.error("fd keeper: cannot write %s (%s): a restarted keeper would not know "
                      "it is retired", self.retired_marker, exc.strerror)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (then close everything: the store dies with us)."""
        if self._sock is None:
            self.bind()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(wake_r, select.EPOLLIN)
        self._wake = wake_r
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {signum: signal.signal(signum, self._on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        log.info("fd keeper on %s (at most %d fds, for uid %d)", self.path, self.max_fds,
                 self.uid)
        try:
            while not self._stop:
                self.step(self._timeout())
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            _close_all([wake_r, wake_w])
            self.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = True

    def _timeout(self) -> float:
        owner = self.owner
        if owner is not None and owner.queue:
            return max(0.0, owner.deadline - time.monotonic())
        return -1

    def step(self, timeout: float = -1) -> None:
        """One wait for events and their handling."""
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            return
        sock = self._sock
        owner = self.owner
        receive = False
        owner_mask = 0
        for fd, mask in events:
            if sock is not None and fd == sock.fileno():
                # After the kept fds' events: it closes kept fds (FDSTOREREMOVE) and
                # receives new ones, which may take their numbers; an event later in
                # this batch for such a number would be the old fd's.
                receive = True
            elif self.owner is not None and fd == self.owner.fileno():
                # Last: what the daemon sent before it died (HANDEDOVER=1) comes first.
                owner_mask = mask
            elif fd in self._polled:
                if mask & (select.EPOLLHUP | select.EPOLLERR):
                    self._hung_up(fd)
            elif fd == self._wake:
                with contextlib.suppress(OSError):
                    os.read(fd, 512)
        if receive:
            self._receive_all()
        if owner_mask and owner is not None and self.owner is owner:
            self._owner_event(owner_mask)
        owner = self.owner
        if owner is not None and owner.queue and time.monotonic() >= owner.deadline:
            log.warning("the daemon attached as pid %d did not take its fds within "
                        "%g s: detached", owner.pid, self.reply_timeout)
            self._detach()

    def close(self) -> None:
        self._detach()
        for name in list(self.groups):
            self._drop(name)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            # Our socket file only: a daemon then gets ENOENT, not a refusal.
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
        self._epoll.close()

    # -- datagrams -----------------------------------------------------------------------

    def _receive_all(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # then let the other events in
            try:
                data, ancdata, flags, _addr = self._sock.recvmsg(
                    MAX_DATAGRAM, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            fds: list[int] = []
            creds: tuple[int, int, int] | None = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    whole = len(payload) - len(payload) % _INT
                    fds.extend(array.array("i", payload[:whole]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                        and len(payload) >= _UCRED.size:
                    creds = _UCRED.unpack_from(payload)
            try:
                self._dispatch(data, fds, flags, creds)
            except Exception:  # a bug must not end the store: refuse this one message
                log.exception("fd keeper: message refused")
                _close_all(fds)

    def _refuse(self, fds: Sequence[int], why: str, pid: int = 0) -> None:
        self.refused += 1
        log.warning("fd keeper: refused a message from pid %d (%d fds closed): %s", pid,
                    len(fds), why)
        _close_all(fds)

    def _dispatch(self, data: bytes, fds: list[int], flags: int,
                  creds: tuple[int, int, int] | None) -> None:
        pid = creds[0] if creds is not None else 0
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self._refuse(fds, "too long (message or fds truncated)", pid)
            return
        if creds is None or creds[1] != self.uid:
            self._refuse(fds, "sender is uid " + (str(creds[1]) if creds else "unknown")
                         + f", only uid {self.uid} may use the keeper", pid)
            return
        try:
            fields = parse_message(data)
        except ValueError as exc:
            self._refuse(fds, str(exc), pid)
            return
        if fields.get("ATTACH") == "1":
            self._attach(fds, pid)
            return
        owner = self.owner
        if owner is None or owner.pid != pid:
            self._refuse(fds, "only the attached daemon may store" if owner else
                         "no daemon is attached", pid)
            return
        if fields.get("FDSTORE") == "1":
            self._store(fields.get("FDNAME", "stored"), fds, pid)  # systemd's default
        elif fields.get("FDSTOREREMOVE") == "1":
            _close_all(fds)
            name = fields.get("FDNAME", "")
            if name in self.groups:
                self._drop(name)
        elif fields.get("HANDEDOVER") == "1":
            _close_all(fds)
            count = len(self.groups)
            for name in list(self.groups):
                self._drop(name)
            self.retired = True
            self._write_retired_marker()
            log.info("fd keeper: pid %d handed its sessions over to a newer daemon: %d "
                     "names dropped; retired (every later attach is told so)", pid, count)
        elif fds:
            self._refuse(fds, "fds without FDSTORE=1", pid)
        # anything else (READY=1, STATUS=...): ignored, as systemd ignores unknown keys

    def _store(self, name: str, fds: list[int], pid: int) -> None:
        try:
            check_fdname(name)
        except ValueError as exc:
            self._refuse(fds, str(exc), pid)
            return
        if not fds:
            return
        if self.total + len(fds) > self.max_fds:
            self._refuse(fds, f"the store is full ({self.total} of {self.max_fds} fds)",
                         pid)
            return
        listeners = [i for i, fd in enumerate(fds) if _is_listener(fd)]
        kept = self.groups.get(name)
        if name.startswith(SESSION_PREFIX):
            if kept is None and listeners != [0]:
                self._refuse(fds, f"{name}: a new session must start with exactly one "
                                  "seccomp listener", pid)
                return
            if kept is not None and listeners:
                self._refuse(fds, f"{name}: has its seccomp listener already", pid)
                return
        elif listeners:
            self._refuse(fds, f"{name}: a seccomp listener is kept only under a "
                              f"{SESSION_PREFIX}* name", pid)
            return
        registered: list[int] = []
        for fd in fds:
            try:
                self._epoll.register(fd, 0)  # POLLHUP/POLLERR are always reported
                registered.append(fd)
            except PermissionError:
                pass  # not pollable (a regular file, a memfd): kept, as systemd does
            except OSError as exc:
                for other in registered:
                    self._epoll.unregister(other)
                self._refuse(fds, f"{name}: cannot poll fd: {exc.strerror}", pid)
                return
        for fd in registered:
            self._polled[fd] = name
        self.groups.setdefault(name, []).extend(fds)
        self.total += len(fds)
        log.debug("fd keeper: stored %d fds under %s (%d in all)", len(fds), name,
                  self.total)

    def _drop(self, name: str) -> None:
        for fd in self.groups.pop(name, []):
            self._forget(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            self.total -= 1

    def _forget(self, fd: int) -> None:
        # Unregister before closing: epoll keys on the open file, which the daemon and
        # the container's filter keep open, and this number will be reused.
        if self._polled.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _hung_up(self, fd: int) -> None:
        name = self._polled[fd]
        group = self.groups.get(name, [])
        if name.startswith(SESSION_PREFIX) and group and group[0] == fd:
            log.info("fd keeper: %s: its filter has no task left: dropped", name)
            self._drop(name)
            return
        self._forget(fd)
        group.remove(fd)
        os.close(fd)
        self.total -= 1
        if not group:
            self.groups.pop(name, None)

    # -- attach --------------------------------------------------------------------------

    def _attach(self, fds: list[int], pid: int) -> None:
        if len(fds) != 1:
            self._refuse(fds, f"ATTACH carries {len(fds)} fds, not 1", pid)
            return
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError as exc:
            self._refuse(fds, f"ATTACH fd is not a socket: {exc.strerror}", pid)
            return
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.close()
            self._refuse([], "ATTACH fd is not a unix SOCK_SEQPACKET socket", pid)
            return
        sock.setblocking(False)
        if self.owner is not None and _peer_closed(self.owner.sock):
            self._owner_gone()  # dead, its POLLHUP not handled yet: not busy
        if pid == 0:
            # The kernel gives 0 for a sender outside our pid namespace: its stores could
            # not be told from anyone else's.
            self._refuse([], "the sender's pid is not visible here", pid)
            with contextlib.suppress(OSError):
                sock.send(format_message({"ERROR": "the keeper cannot see your pid: run it "
                                                   "in the daemon's pid namespace"}))
            sock.close()
            return
        if self.owner is not None:
            self._refuse([], f"pid {self.owner.pid} is attached: one daemon per keeper",
                         pid)
            with contextlib.suppress(OSError):
                sock.send(format_message({"ERROR": f"the keeper serves pid "
                                                   f"{self.owner.pid}"}))
            sock.close()
            return
        owner = _Attachment(sock, pid, deadline=time.monotonic() + self.reply_timeout)
        for name, group in self.groups.items():
            for start in range(0, len(group), MAX_FDS_PER_MESSAGE):
                owner.queue.append((format_message({"FDNAME": name}),
                                    group[start:start + MAX_FDS_PER_MESSAGE]))
        owner.queue.append((format_message({
            "END": 1, "FDS": self.total, "RETIRED": int(self.retired),
            "ATTACHES": self.attaches}), []))
        self.attaches += 1
        self.owner = owner
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        log.info("fd keeper: pid %d attached: giving it %d fds under %d names%s", pid,
                 self.total, len(self.groups), " (retired)" if self.retired else "")
        self._flush()

    def _flush(self) -> None:
        owner = self.owner
        assert owner is not None
        while owner.queue:
            data, fds = owner.queue[0]
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          array.array("i", fds).tobytes())] if fds else []
            try:
                owner.sock.sendmsg([data], ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("fd keeper: pid %d: %s: detached", owner.pid, exc.strerror)
                self._detach()
                return
            owner.queue.pop(0)
        self._epoll.modify(owner.fileno(), select.EPOLLIN)

    def _owner_event(self, mask: int) -> None:
        owner = self.owner
        assert owner is not None
        if mask & (select.EPOLLHUP | select.EPOLLERR):
            self._receive_all()  # its last messages, if this batch did not have them
            if self.owner is owner:  # (an ATTACH among them may have replaced it)
                self._owner_gone()
            return
        if mask & select.EPOLLIN:
            # The daemon has nothing to say here: drain (fds sent are closed).
            with contextlib.suppress(BlockingIOError, InterruptedError):
                data, ancdata, _flags, _addr = owner.sock.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(16 * _INT), socket.MSG_CMSG_CLOEXEC)
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        whole = len(payload) - len(payload) % _INT
                        _close_all(array.array("i", payload[:whole]))
                if not data:
                    self._detach()
                    return
        if mask & select.EPOLLOUT and owner.queue:
            self._flush()

    def _owner_gone(self) -> None:
        assert self.owner is not None
        log.info("fd keeper: pid %d detached (its socket closed): keeping %d fds for the "
                 "next daemon", self.owner.pid, self.total)
        self._detach()

    def _detach(self) -> None:
        owner = self.owner
        if owner is None:
            return
        self.owner = None
        with contextlib.suppress(OSError):
            self._epoll.unregister(owner.fileno())
        owner.sock.close()


# --------------------------------------------------------------------------- daemon side


@dataclass
class Attached:
    """A daemon's attachment to a keeper: the socket whose ``POLLHUP`` says the keeper
    is gone (the caller owns it), the fds kept (owned by the caller, as
    ``$LISTEN_FDS``), and whether this keeper's daemon handed everything over."""

    sock: socket.socket
    fds: list[ListenFd]
    retired: bool
    attaches: int
    #: The keeper's socket as checked and attached to (symlinks resolved): store there,
    #: not at the path given, which a link retargeted later could send elsewhere.
    path: str = ""


def check_keeper_path(path: str) -> str:
    """``path`` resolved (:func:`resolve_socket_path`: connect to that one). Raises
    KeeperError unless it is a socket of ours in a directory nobody else may write to,
    nor to any directory above it: a socket anyone could have put there would receive
    notify fds."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(directory):
        raise KeeperUnavailable(f"{directory}: no such directory")
    path = resolve_socket_path(path)
    directory = os.path.dirname(path)
    check_private_directory(directory)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeeperUnavailable(f"{path}: no such socket") from None
    except OSError as exc:
        raise KeeperError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise KeeperError(f"{path} is not a socket of uid {os.geteuid()}")
    return path


def attach(path: str, *, timeout: float = 5.0) -> Attached:
    """Attach to the keeper at ``path`` and take its fds. Raises KeeperError (every fd
    received closed) when it is unsafe, absent, refuses or does not answer in time."""
    resolved = check_keeper_path(path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds: list[ListenFd] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as dgram:
            dgram.settimeout(timeout)
            try:
                dgram.connect(resolved)
                dgram.sendmsg([format_message({"ATTACH": 1})], [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS,
                     array.array("i", [theirs.fileno()]).tobytes())])
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise KeeperUnavailable(f"{path}: {exc.strerror}") from None
            except OSError as exc:
                raise KeeperError(f"{path}: {exc.strerror or exc}") from None
        theirs.close()
        deadline = time.monotonic() + timeout
        while True:
            ours.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data, ancdata, flags, _addr = ours.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _INT),
                    socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                raise KeeperError(f"{path}: no answer within {timeout:g} s") from None
            received: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    whole = len(payload) - len(payload) % _INT
                    received.extend(array.array("i", payload[:whole]))
            if not data:
                _close_all(received)
                raise KeeperError(f"{path}: the keeper closed the connection")
            try:
                fields = parse_message(data)
            except ValueError as exc:
                _close_all(received)
                raise KeeperError(f"{path}: bad reply: {exc}") from None
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                _close_all(received)
                raise KeeperError(f"{path}: reply truncated")
            if "ERROR" in fields:
                _close_all(received)
                raise KeeperError(f"{path}: refused: {fields['ERROR']}")
            if "FDNAME" in fields:
                fds.extend(ListenFd(fd, fields["FDNAME"]) for fd in received)
                continue
            _close_all(received)
            if fields.get("END") != "1":
                raise KeeperError(f"{path}: unexpected reply {sorted(fields)}")
            if fields.get("FDS") != str(len(fds)):
                raise KeeperError(f"{path}: {len(fds)} fds for FDS={fields.get('FDS')}")
            ours.settimeout(None)
            ours.setblocking(False)
            return Attached(ours, fds, fields.get("RETIRED") == "1",
                            int(fields.get("ATTACHES", "0") or 0), resolved)
    except BaseException:
        _close_all([item.fd for item in fds])
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()
        raise


# --------------------------------------------------------------------------- command line


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keep = sub.add_parser(
        "keep", help="keep the daemon's sessions across its crashes (an fd store "
                     "outside systemd, for pods)",
        description="Hold the fds `serve --fd-keeper PATH` stores (every container's "
                    "notify fd, state and in-flight journal) and give them back to the "
                    "next daemon that attaches, as systemd's fd store does for the "
                    "unit. Only the uid it runs as may use it.")
    keep.add_argument("--socket", required=True, metavar="PATH",
                      help="the keeper's datagram socket (its directory must be writable "
                           "by this uid only)")
    keep.add_argument("--max-fds", type=int, default=DEFAULT_MAX_FDS, metavar="N",
                      help="keep at most N fds, three per container: notify fd, state, "
                           "in-flight journal (as FileDescriptorStoreMax=)")
    keep.add_argument("--reply-timeout", type=float, default=REPLY_TIMEOUT,
                      metavar="SECONDS",
                      help="drop an attaching daemon that has not taken its fds after "
                           "this long")


def standalone_main(argv: Sequence[str]) -> int:
    """``seccomp-supervisor [--log-level L] keep ...`` without loading the rest of the
    command line (:func:`supervisor._start.main` sends ``keep`` here): the same options
    as the full parser's ``keep``, a fraction of its imports."""
    from .logfmt import OneLineFormatter

    parser = argparse.ArgumentParser(prog="seccomp-supervisor")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler],
                        force=True)
    return main(args)


def main(args: argparse.Namespace) -> int:
    if args.max_fds < 1:
        log.error("--max-fds must be at least 1")
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.max_fds + 64) if hard != resource.RLIM_INFINITY \
        else args.max_fds + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    keeper = Keeper(args.socket, max_fds=args.max_fds, reply_timeout=args.reply_timeout)
    try:
        keeper.bind()
    except (KeeperError, OSError) as exc:
        log.error("fd keeper: %s", exc)
        return 1
    keeper.run()
    return 0

