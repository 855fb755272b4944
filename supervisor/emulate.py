"""Doing a call on a target's behalf, as the caller: one primitive, :func:`as_caller`,
and a request type per operation (:class:`Mknod`, :class:`Mkdir`, :class:`Unlink`,
:class:`Rename`, :class:`Open`, :class:`Chown`). Policies use it through
:mod:`supervisor.caller`, the documented API (functions that return the Decision).
Paths are bytes, as the kernel has them.

Why emulate: after a handler read a pointer argument, CONTINUE lets the kernel read it
again, and another thread may have changed it in between (DESIGN.md §4.9). A decision that
must hold is carried out by the supervisor itself, with its own copy of the arguments, and
the target gets the result (``returns(0)`` or ``deny(errno)``); nothing is re-read.

Race checks: everything about the caller is opened through ``/proc/<tid>/...`` and then
the notification is checked to still be pending (ID_VALID). While it is pending the
calling thread is alive and blocked in the call, so ``<tid>`` still names it and the
files opened before the check are its own. The pure parts (:func:`parse_status`,
:func:`decode_dev`, :func:`signed_fd`, :func:`identity_for`) do no I/O.

Who acts: the emulation helper (:mod:`supervisor._emulate_helper`), a pre-started fork
server, one child per call. The daemon starts it at its own start
(:func:`start_helper`, before it drops the capabilities only the helper needs); code
that runs policies without a daemon (``supervisor.testing``) gets one on first use. The
helper is shared by every container, so each call is bounded here, before it reaches the
helper: per container a token bucket (``rate``/``burst``) and a cap on calls in flight
(``per_container``), and in total ``max_children``. A call over the rate waits for its
token if that comes before the handler's deadline (the container is slowed down to its
rate), else raises :class:`EmulationBusy` at once; one over a cap waits for a slot,
inside the handler's deadline. The daemon never blocks on the helper: every exchange is
a non-blocking socket operation awaited in trio, under the deadline and a timeout of its
own. A helper that died is started again on the next call.

"As the caller" means: the caller's mount namespace and root; its working directory or
dirfd for relative paths; its fsuid, fsgid and groups (as seen from the supervisor's
user namespace: root of a user-namespaced container mapped to host uid 100000 acts as
100000); its umask; and as capabilities its effective set *if it is in the supervisor's
user namespace* (its capabilities in a child user namespace do not hold for host
objects, so it gets none), plus only those the policy adds (CAP_MKNOD for a device node),
all limited to what the helper holds (never more than the caller). Not applied: the
caller's other namespaces (pid, network, cgroup...: so opens in procfs and cgroupfs are
refused, except the caller's own fds named as ``/proc/self/fd/N``, which are opened
again from ``/proc/<tid>/fd/N``), its LSM labels (AppArmor, SELinux), its seccomp
filters and its resource limits.

A call that overran its deadline got ``on_error``; the helper drops it if it had not
started and kills its child otherwise, but a child that had already done the call
before the kill leaves it done.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from . import _emulate_helper as wire
from . import abi
from .errors import NotificationGone, TargetMemoryError
from .policy import Notification
from .ratelimit import TokenBucket

log = logging.getLogger("supervisor.emulate")

__all__ = [
    "AT_FDCWD",
    "AT_REMOVEDIR",
    "AT_SYMLINK_NOFOLLOW",
    "CAP_MKNOD",
    "Caller",
    "Chown",
    "Credentials",
    "EmulationBusy",
    "EmulationError",
    "EmulationHelper",
    "Limits",
    "Mkdir",
    "Mknod",
    "Open",
    "Operation",
    "Rename",
    "Result",
    "Unlink",
    "as_caller",
    "decode_dev",
    "drop_helper_capabilities",
    "encode_dev",
    "identity_for",
    "map_id",
    "open_caller",
    "parse_id_map",
    "parse_status",
    "signed_fd",
    "start_helper",
    "stop_helper",
]

AT_FDCWD: Final = -100
AT_REMOVEDIR: Final = 0x200
AT_SYMLINK_NOFOLLOW: Final = 0x100
CAP_MKNOD: Final = 27
_PACKAGE_PARENT: Final = str(Path(__file__).resolve().parent.parent)
_BOOTSTRAP: Final = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from supervisor._emulate_helper import main; main(sys.argv[1:])"
)


class EmulationError(Exception):
    """The supervisor could not do the call (not the call failing: that is an errno)."""


class EmulationBusy(EmulationError):
    """The container is over its emulation rate: the call was not tried. ``errno``
    (EAGAIN) is the answer to give."""

    errno = errno.EAGAIN


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the kernel checks file-system access with, from ``/proc/<tid>/status``:
    ``uid``/``gid`` are the *file-system* ids, as seen from the supervisor's user
    namespace; ``cap_effective`` is the ``CapEff`` bit mask."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    cap_effective: int
    # False when the caller is in another user namespace than the supervisor: then its
    # capabilities are not valid for the objects the supervisor acts on.
    same_user_namespace: bool = True

    def has_capability(self, number: int) -> bool:
        return bool(self.cap_effective >> number & 1)


def parse_status(text: str) -> Credentials:
    """Credentials from the text of ``/proc/<tid>/status``. Raises ValueError if a
    field is missing or malformed."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    try:
        uids = fields["Uid"].split()
        gids = fields["Gid"].split()
        return Credentials(
            uid=int(uids[3]),
            gid=int(gids[3]),
            groups=tuple(int(g) for g in fields.get("Groups", "").split()),
            umask=int(fields["Umask"], 8),
            cap_effective=int(fields["CapEff"], 16),
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"malformed /proc status: {exc!r}") from None


def decode_dev(raw: int) -> tuple[int, int]:
    """(major, minor) of the ``dev`` argument of mknod/mknodat, as the kernel decodes it
    (``new_decode_dev`` of the ``unsigned int``, the low 32 bits in every ABI: 12-bit
    major, 20-bit minor). ``raw`` may be the register or ``n.uint32(i)``."""
    dev = abi.arg_u32(raw)
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def encode_dev(major: int, minor: int) -> int:
    """Inverse of :func:`decode_dev` (``new_encode_dev``)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def signed_fd(raw: int) -> int:
    """A dirfd argument (an ``int`` in a register) as the kernel reads it; the same as
    ``Notification.fd(i)``, which handlers should prefer."""
    return abi.arg_s32(raw)


IdMap = tuple[tuple[int, int, int], ...]  # (first inside, first outside, count) ranges
IDENTITY_MAP: Final[IdMap] = ((0, 0, 2**32 - 1),)


def parse_id_map(text: str) -> IdMap:
    """The ranges of ``/proc/<tid>/uid_map`` (or ``gid_map``) as read from here: the
    outside ids are in the reader's user namespace. Raises ValueError."""
    ranges = []
    for line in text.splitlines():
        if line.strip():
            inside, outside, count = (int(x) for x in line.split())
            ranges.append((inside, outside, count))
    return tuple(ranges)


def map_id(ids: IdMap, value: int) -> int:
    """An id of the caller's user namespace as seen from ours (``uid_t`` -1 stays -1,
    as :data:`NO_ID`); -2 if it has no mapping (the kernel then says EINVAL)."""
    value &= 0xFFFFFFFF
    if value == wire.NO_ID:
        return wire.NO_ID
    for inside, outside, count in ids:
        if inside <= value < inside + count:
            return outside + value - inside
    return -2


@dataclass
class Caller:
    """Open handles on the calling thread's mount namespace, root and the base
    directories of its relative paths (cwd or dirfds, in the order asked for; ``-1`` for
    an absolute path), and its credentials. Owns the fds. ``uid_map``/``gid_map``: its
    user namespace's id maps, when asked for (chown names ids in that namespace)."""

    mnt_fd: int
    root_fd: int
    bases: list[int]
    credentials: Credentials
    uid_map: IdMap = IDENTITY_MAP
    gid_map: IdMap = IDENTITY_MAP

    @property
    def base_fd(self) -> int:
        return self.bases[0] if self.bases else -1

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.mnt_fd, self.root_fd, *self.bases) if fd >= 0)

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.mnt_fd = self.root_fd = -1
        self.bases = [-1 for _ in self.bases]


def open_caller(n: Notification, path: bytes, dirfd: int = AT_FDCWD, *more: tuple[bytes, int],
                id_maps: bool = False) -> Caller:
    """Open what is needed to act as the caller of ``n`` on ``path`` (relative to
    ``dirfd`` when it is not absolute), and on each further ``(path, dirfd)`` of
    ``more``, race-checked; with ``id_maps``, read its uid and gid maps too.

    Raises TargetMemoryError with the errno the caller gets for a bad ``dirfd`` (EBADF,
    ENOTDIR) or EPERM when the caller is not visible here; NotificationGone if the call
    was abandoned.
    """
    tid = n.pid
    if tid <= 0:
        raise TargetMemoryError(errno.EPERM, "the caller is not visible in our pid namespace")
    proc = f"/proc/{tid}"
    opened: list[int] = []

    def open_(name: str, flags: int) -> int:
        try:
            fd = os.open(f"{proc}/{name}", flags | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            if not n.still_valid():
                raise NotificationGone("id_valid") from None
            if name.startswith("fd/"):
                raise TargetMemoryError(errno.EBADF, f"dirfd {name[3:]} is not open") from None
            raise
        opened.append(fd)
        return fd

    try:
        mnt_fd = open_("ns/mnt", os.O_RDONLY)
        root_fd = open_("root", os.O_PATH | os.O_DIRECTORY)
        bases = []
        for one_path, one_dirfd in ((path, dirfd), *more):
            if one_path.startswith(b"/"):
                bases.append(-1)
                continue
            where = "cwd" if one_dirfd == AT_FDCWD else f"fd/{one_dirfd}"
            if one_dirfd != AT_FDCWD and one_dirfd < 0:
                raise TargetMemoryError(errno.EBADF, f"dirfd {one_dirfd}")
            try:
                bases.append(open_(where, os.O_PATH | os.O_DIRECTORY))
            except NotADirectoryError:
                raise TargetMemoryError(errno.ENOTDIR, f"dirfd {one_dirfd} is not a "
                                                       "directory") from None
        user_ns = open_("ns/user", os.O_RDONLY)
        status_fd = open_("status", os.O_RDONLY)
        map_fds = [open_(name, os.O_RDONLY) for name in ("uid_map", "gid_map")] \
            if id_maps else []
        try:
            text = os.read(status_fd, 65536).decode("ascii", "replace")
            maps = [os.read(fd, 65536).decode("ascii", "replace") for fd in map_fds]
            theirs = os.fstat(user_ns)
        finally:
            for fd in (status_fd, user_ns, *map_fds):
                opened.remove(fd)
                os.close(fd)
        if not n.still_valid():  # the files opened above belong to the caller
            raise NotificationGone("id_valid")
        ours = os.stat("/proc/self/ns/user")
        credentials = parse_status(text)
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            credentials = Credentials(credentials.uid, credentials.gid, credentials.groups,
                                      credentials.umask, credentials.cap_effective,
                                      same_user_namespace=False)
        caller = Caller(mnt_fd, root_fd, bases, credentials)
        if maps:
            try:
                caller.uid_map, caller.gid_map = (parse_id_map(m) for m in maps)
            except ValueError:
                raise TargetMemoryError(errno.EPERM, "unreadable id map") from None
        return caller
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


def identity_for(credentials: Credentials, add_capabilities: int = 0) -> wire.Identity:
    """Who the helper becomes for a caller with ``credentials``: its ids, groups and
    umask; its effective capabilities only if they are valid here (same user namespace),
    plus ``add_capabilities`` (a bit mask the policy grants, e.g. CAP_MKNOD)."""
    own = credentials.cap_effective if credentials.same_user_namespace else 0
    return wire.Identity(credentials.uid, credentials.gid, credentials.groups,
                         credentials.umask, own | add_capabilities)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class Mknod:
    """``mknodat(dirfd, path, mode, makedev(major, minor))``."""

    path: bytes
    mode: int
    major: int = 0
    minor: int = 0
    dirfd: int = AT_FDCWD


@dataclass(frozen=True, slots=True)
class Mkdir:
    """``mkdirat(dirfd, path, mode)``."""

    path: bytes
    mode: int
    dirfd: int = AT_FDCWD


@dataclass(frozen=True, slots=True)
class Unlink:
    """``unlinkat(dirfd, path, flags)``: ``flags`` AT_REMOVEDIR for rmdir."""

    path: bytes
    dirfd: int = AT_FDCWD
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Rename:
    """``renameat2(old_dirfd, old, new_dirfd, new, flags)``."""

    old: bytes
    new: bytes
    old_dirfd: int = AT_FDCWD
    new_dirfd: int = AT_FDCWD
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Open:
    """``openat(dirfd, path, flags, mode)``; the result carries the opened fd."""

    path: bytes
    flags: int
    mode: int = 0
    dirfd: int = AT_FDCWD


@dataclass(frozen=True, slots=True)
class Chown:
    """``fchownat(dirfd, path, uid, gid, flags)``: ``uid``/``gid`` as the caller named
    them, in its user namespace (-1: unchanged); ``flags`` AT_SYMLINK_NOFOLLOW for
    lchown."""

    path: bytes
    uid: int
    gid: int
    dirfd: int = AT_FDCWD
    flags: int = 0


Operation = Mknod | Mkdir | Unlink | Rename | Open | Chown


def _paths(op: Operation) -> tuple[tuple[bytes, int], ...]:
    if isinstance(op, Rename):
        return ((op.old, op.old_dirfd), (op.new, op.new_dirfd))
    return ((op.path, op.dirfd),)


def _request(op: Operation, bases: Sequence[int], identity: wire.Identity,
             guard: tuple[bytes, ...], owner: tuple[int, int] = (wire.NO_ID, wire.NO_ID)
             ) -> tuple[wire.Request, list[int]]:
    """The helper's request for ``op`` and the base fds to send with it (the fds of
    ``bases`` that are not -1, in order)."""
    sent: list[int] = []
    targets = []
    for (path, _dirfd), base in zip(_paths(op), bases, strict=True):
        if base >= 0:
            targets.append(wire.Target(path, len(sent)))
            sent.append(base)
        else:
            targets.append(wire.Target(path, -1))
    mode = dev = flags = 0
    name = "open"
    if isinstance(op, Mknod):
        name, mode, dev = "mknod", op.mode & 0o177777, os.makedev(op.major, op.minor)
    elif isinstance(op, Mkdir):
        name, mode = "mkdir", op.mode & 0o7777
    elif isinstance(op, Unlink):
        name, flags = "unlink", op.flags & AT_REMOVEDIR
    elif isinstance(op, Rename):
        name, flags = "rename", op.flags
    elif isinstance(op, Chown):
        name, flags = "chown", op.flags & AT_SYMLINK_NOFOLLOW
    else:
        mode, flags = op.mode & 0o7777, op.flags & 0xFFFFFFFF
    return wire.Request(name, tuple(targets), identity, mode, dev, flags, guard, owner), sent


@dataclass
class Result:
    """What the call did: ``errno`` 0 or the errno the caller gets; for an :class:`Open`
    that worked, ``fd`` (owned by this object until :meth:`take_fd`); ``guarded``: the
    resolved path a guard refused (then nothing was done)."""

    errno: int
    fd: int = -1
    guarded: bytes | None = None
    reopen: int = -1  # internal: the open named the caller's fd N (see as_caller)

    def take_fd(self) -> int:
        """The opened fd; the caller owns it from now on."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.take_fd())


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-container bounds on emulated calls: ``rate`` per second with ``burst``
    (a token bucket; 0 = no rate limit) and ``per_container`` calls in flight."""

    rate: float = 100.0
    burst: int = 100
    per_container: int = 4


DEFAULT_LIMITS: Final = Limits()
# Containers' entries (semaphore and bucket) are kept until there are this many; then
# the idle ones whose bucket is full again are dropped.
_MAX_IDLE_ENTRIES: Final = 256


# --------------------------------------------------------------------------- the helper


@dataclass
class _Slots:
    """Calls of one container in flight, and its token bucket."""

    semaphore: trio.Semaphore
    bucket: TokenBucket | None
    users: int = 0
    # time.monotonic() from which the bucket is full again (forgetting the entry loses nothing)
    refilled_at: float = 0.0


@dataclass
class EmulationHelper:
    """The daemon's side of the helper process: owns the process and its socket.

    ``max_children`` bounds the calls in flight in total (the helper forks at most that
    many children); ``timeout`` bounds one call (the handler's deadline is usually
    shorter and applies too)."""

    max_children: int = 16
    timeout: float = 10.0
    python: str = sys.executable
    hello: dict[str, int] = field(default_factory=dict, init=False)  # its first message
    restarts: int = field(default=0, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _sock: socket.socket | None = field(default=None, init=False)
    _total: trio.Semaphore | None = field(default=None, init=False)
    # One task at a time waits on the shared socket (trio allows one waiter per fd).
    _sending: trio.Lock = field(default_factory=trio.Lock, init=False)
    _containers: dict[tuple[str, Limits], _Slots] = field(default_factory=dict, init=False)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    def start(self) -> None:
        """Start the helper process (it inherits our capabilities). Raises OSError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [self.python, "-I", "-S", "-c", _BOOTSTRAP, _PACKAGE_PARENT,
                 str(theirs.fileno()), str(self.max_children)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.hello = {}

    def close(self) -> None:
        """Stop the helper: closing our end makes it kill its children and exit."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _restart_if_dead(self) -> None:
        if self._sock is not None and self.alive():
            return
        if self._proc is not None:
            log.error("the emulation helper (pid %d) died (status %s): starting it again",
                      self._proc.pid, self._proc.returncode)
            self.restarts += 1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(ChildProcessError):
                self._proc.wait(timeout=1)
            self._proc = None
        self.start()

    async def _read_hello(self, sock: socket.socket) -> None:
        while not self.hello:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                raise EmulationError("the emulation helper exited at start")
            hello = json.loads(data)
            self.hello = {k: int(v) for k, v in hello.items()}
            missing = HELPER_ONLY_CAPABILITIES & ~self.hello["permitted"]
            if missing and self.restarts:
                log.error("the emulation helper was started again without capabilities "
                          "%#x (the daemon dropped them): emulated calls will fail until "
                          "the service restarts", missing)
            else:
                log.debug("emulation helper pid %d: capabilities %#x", self.hello["pid"],
                          self.hello["permitted"])

    def _slots(self, container: str, limits: Limits) -> _Slots:
        key = (container, limits)
        slots = self._containers.get(key)
        if slots is None:
            if len(self._containers) >= _MAX_IDLE_ENTRIES:
                now = time.monotonic()
                for idle in [k for k, v in self._containers.items()
                             if v.users == 0 and v.refilled_at <= now]:
                    del self._containers[idle]
            bucket = (TokenBucket(limits.rate, max(1, limits.burst), time.monotonic())
                      if limits.rate > 0 else None)
            slots = self._containers[key] = _Slots(trio.Semaphore(limits.per_container),
                                                   bucket)
        return slots

    async def call(self, key: str, request: wire.Request, mnt_fd: int, root_fd: int,
                   bases: Sequence[int], limits: Limits = DEFAULT_LIMITS) -> Result:
        """Carry out ``request`` for the container ``key``. The fds are lent (the helper
        gets copies). Raises EmulationBusy (over the rate) or EmulationError."""
        slots = self._slots(key, limits)
        if self._total is None:
            self._total = trio.Semaphore(self.max_children)
        slots.users += 1
        try:
            with trio.fail_after(self.timeout):
                async with slots.semaphore:
                    if slots.bucket is not None:
                        await _take_token(slots.bucket, limits)
                    async with self._total:
                        return await self._exchange(request, [mnt_fd, root_fd, *bases])
        except trio.TooSlowError:
            raise EmulationError(f"the emulation helper did not answer within "
                                 f"{self.timeout:g}s") from None
        finally:
            slots.users -= 1
            if slots.bucket is not None:
                slots.refilled_at = time.monotonic() + (
                    slots.bucket.burst - slots.bucket.tokens) / slots.bucket.rate

    async def _exchange(self, request: wire.Request, fds: list[int]) -> Result:
        self._restart_if_dead()
        sock = self._sock
        assert sock is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            try:
                ours.setblocking(False)
                payload = wire.encode_request(request)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [theirs.fileno(), *fds]))]
                async with self._sending:
                    await self._read_hello(sock)
                    await self._send(sock, payload, ancillary)
            finally:
                theirs.close()
            return await self._receive(ours)

    @staticmethod
    async def _send(sock: socket.socket, payload: bytes,
                    ancillary: list[tuple[int, int, array.array[int]]]) -> None:
        while True:
            try:
                sock.sendmsg([payload], ancillary)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:  # EPIPE, ECONNRESET: it died just now
                raise EmulationError(f"the emulation helper is gone: {exc}") from None

    async def _receive(self, sock: socket.socket) -> Result:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(sock, 4096, 1)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
        fd = fds[0] if fds else -1
        try:
            if not data:
                raise EmulationError("the emulation helper's child died without answering")
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise EmulationError("the emulation helper's reply was truncated")
            reply = wire.decode_reply(data)
            if reply.error:
                raise EmulationError(f"the emulation helper failed: {reply.error}")
            if reply.has_fd != (fd >= 0) or len(fds) > 1:
                raise EmulationError("the emulation helper sent a reply without its fd")
        except BaseException:
            for one in fds:
                os.close(one)
            raise
        return Result(reply.errno, fd, reply.guarded, reply.reopen)


async def _take_token(bucket: TokenBucket, limits: Limits) -> None:
    """Take a token, waiting for it if it comes before the caller's deadline (the
    container is slowed down to its rate); else raise EmulationBusy."""
    while not bucket.take(time.monotonic()):
        wait = (1.0 - bucket.tokens) / bucket.rate
        if trio.current_time() + wait > trio.current_effective_deadline():
            raise EmulationBusy(f"over the emulation rate ({limits.rate:g}/s)")
        await trio.sleep(wait)


_helper: EmulationHelper | None = None


def start_helper(max_children: int = 16) -> EmulationHelper:
    """Start the process-wide helper now (the daemon does at start, before dropping
    capabilities); idempotent."""
    global _helper
    if _helper is None:
        _helper = EmulationHelper(max_children=max_children)
        _helper.start()
    return _helper


# What the helper needs (and why), dropped by the daemon once the helper runs: setns()
# into a mount namespace needs CAP_SYS_ADMIN and CAP_SYS_CHROOT, chroot() CAP_SYS_CHROOT,
# setgroups()/setfsgid() CAP_SETGID, setfsuid() CAP_SETUID, and a device node
# CAP_MKNOD (each verified: without it every emulated call failed with EPERM). The
# helper also keeps the file-system capabilities a caller may have itself (CAP_CHOWN,
# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID; given to a child only
# when the caller has them), which the daemon does not use either. The daemon keeps
# CAP_SYS_PTRACE: reading a target's memory and opening its
# /proc/<tid>/{root,cwd,fd/N,ns/*} are ptrace-mode access checks.
CAP_SETGID: Final = 6
CAP_SETUID: Final = 7
CAP_SYS_CHROOT: Final = 18
CAP_SYS_ADMIN: Final = 21
HELPER_ONLY_CAPABILITIES: Final = (1 << CAP_MKNOD | 1 << CAP_SYS_ADMIN | 1 << CAP_SYS_CHROOT
                                   | 1 << CAP_SETUID | 1 << CAP_SETGID)
DAEMON_DROPS: Final = wire.HELPER_CAPABILITIES


def drop_helper_capabilities() -> int:
    """Remove :data:`DAEMON_DROPS` from this process's effective and
    permitted sets (capabilities are per thread: call it while the process has one
    thread, before trio starts). Returns the mask removed. Raises RuntimeError with more
    than one thread, OSError if the kernel refuses.

    Under ``NoNewPrivileges`` (the unit sets it) nothing this process executes gets them
    back; without it, root regains its capabilities on execve (a restarted helper then
    has them again)."""
    if len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("capabilities are per thread: drop them before starting threads")
    _effective, permitted = wire.capabilities()
    wire.set_capabilities(permitted & ~DAEMON_DROPS)
    return permitted & DAEMON_DROPS


def stop_helper() -> None:
    global _helper
    if _helper is not None:
        _helper.close()
        _helper = None


async def as_caller(n: Notification, op: Operation, *, add_capabilities: int = 0,
                    guard: Sequence[bytes] = (), limits: Limits = DEFAULT_LIMITS) -> Result:
    """Carry out ``op`` as the caller of ``n`` (see the module docstring), with the
    capabilities ``add_capabilities`` (a bit mask) on top of the caller's own. With
    ``guard`` (absolute normalised directory paths in the caller's root), nothing is done
    if a path resolves to one of them or below: the result's ``guarded`` says where.

    Returns the :class:`Result` (its fd is the caller's to close or inject). Raises
    NotificationGone, TargetMemoryError (see :func:`open_caller`), EmulationBusy and
    EmulationError.
    """
    paths = _paths(op)
    if any(not path for path, _ in paths):
        return Result(errno.ENOENT)
    if any(b"\0" in path for path, _ in paths):
        return Result(errno.EINVAL)  # not a C string: no call could pass it
    if isinstance(op, Chown) and op.flags & ~AT_SYMLINK_NOFOLLOW:
        return Result(errno.EINVAL)  # AT_EMPTY_PATH (an fd, no path) is not emulated
    caller = open_caller(n, paths[0][0], paths[0][1], *paths[1:],
                         id_maps=isinstance(op, Chown))
    try:
        identity = identity_for(caller.credentials, add_capabilities)
        owner = (wire.NO_ID, wire.NO_ID)
        if isinstance(op, Chown):
            owner = (map_id(caller.uid_map, op.uid), map_id(caller.gid_map, op.gid))
            if -2 in owner:
                return Result(errno.EINVAL)  # an id the caller's namespace does not map
        request, bases = _request(op, caller.bases, identity, tuple(guard), owner)
        helper = start_helper()
        result = await helper.call(n.container.id, request, caller.mnt_fd, caller.root_fd,
                                   bases, limits)
        if result.reopen < 0 or not isinstance(op, Open):
            return result
        # The path named one of the caller's own fds (/dev/stdout is a symlink to
        # /proc/self/fd/1): the helper cannot follow that in the caller's /proc (it
        # would be its own), so we open the file from /proc/<tid>/fd/N and the helper
        # opens it again, as the caller.
        own = _open_callers_fd(n, result.reopen)
        if own < 0:
            return Result(errno.ENOENT)
        try:
            again = wire.Request("reopen", (wire.Target(b"fd", 0),), identity,
                                 op.mode & 0o7777, 0, op.flags & 0xFFFFFFFF, tuple(guard))
            return await helper.call(n.container.id, again, caller.mnt_fd, caller.root_fd,
                                     [own], limits)
        finally:
            os.close(own)
    finally:
        caller.close()


def _open_callers_fd(n: Notification, number: int) -> int:
    """An O_PATH fd on the file the caller of ``n`` has open as ``number``, race-checked;
    -1 if it has no such fd."""
    try:
        fd = os.open(f"/proc/{n.pid}/fd/{number}", os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if not n.still_valid():  # the fd table read was the caller's
        if fd >= 0:
            os.close(fd)
        raise NotificationGone("id_valid")
    return fd
