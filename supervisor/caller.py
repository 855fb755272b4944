"""Doing a call as the caller: the public API for handlers that carry a call out
themselves instead of letting it continue.

Each function does one file-system call for the caller of a notification, in its mount
namespace and root, from its working directory (or the dirfd given), with its fsuid,
fsgid, groups and umask and the capabilities it holds in the supervisor's user namespace
(see :mod:`supervisor.emulate` and the security model), and returns the
:class:`~supervisor.policy.Decision` that gives the caller the result::

    import errno
    from supervisor import caller
    from supervisor.policy import Notification, PolicySet, deny

    policy = PolicySet("tmp-dirs")

    @policy.on("mkdir")
    async def mkdir_tmp(n: Notification):
        path = await n.read_path(0)
        if not path.startswith(b"/tmp/"):
            return deny(errno.EPERM, reason="mkdir outside /tmp")
        return await caller.mkdir(n, path, n.mode(1))   # returns(0) or deny(errno)

Nothing the caller's memory holds is read again: the call is made with the bytes the
handler has, so what was checked is what is done (a CONTINUE after a memory read is
not: the kernel reads the pointers again, DESIGN.md §4.9).

Paths are ``bytes``, as the kernel has them (:meth:`Notification.read_path
<supervisor.policy.Notification.read_path>` returns ``bytes``): a name that is not UTF-8
works like any other. Ids given to :func:`chown` are the caller's, in its user
namespace, as the system call takes them.

The functions are coroutines: call them from an ``async def`` handler, with ``await``.
Each call goes to the emulation helper, a fork server started with the daemon (or, in
:mod:`supervisor.testing` and other code without a daemon, at the first call); it is
bounded per container by ``limits`` (rate, burst, calls in flight): over the rate the
answer is ``deny(EAGAIN)``. A failure of the supervisor itself (the helper cannot
start, does not answer) raises :class:`~supervisor.emulate.EmulationError`: the chain
answers ``on_error``. A bad dirfd or a caller that is not visible from here gives
``deny(EBADF / ENOTDIR / EPERM)``.

Why a fixed set of operations, and no "run this function as the caller": the work is
done in a child of a privileged fork server that has entered the caller's mount
namespace and root; running arbitrary policy code there would give every policy the
helper's capabilities (setns, chroot, setfsuid) in a process that must stay small
enough to audit. Each operation is a few lines of the helper
(:mod:`supervisor._emulate_helper`), resolving its path with the same race-free rules.
:func:`run` takes any of the request types of :mod:`supervisor.emulate` and returns the
raw :class:`~supervisor.emulate.Result` for the handler to look at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from .emulate import (
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_NOFOLLOW,
    CAP_MKNOD,
    DEFAULT_LIMITS,
    Chown,
    Credentials,
    EmulationBusy,
    EmulationError,
    Limits,
    Mkdir,
    Mknod,
    Open,
    Operation,
    Rename,
    Result,
    Unlink,
    as_caller,
    open_caller,
)
from .policy import Decision, Notification, deny, inject_fd, returns

__all__ = [
    "AT_FDCWD",
    "AT_REMOVEDIR",
    "AT_SYMLINK_NOFOLLOW",
    "CAP_MKNOD",
    "Chown",
    "Credentials",
    "EmulationBusy",
    "EmulationError",
    "Limits",
    "Mkdir",
    "Mknod",
    "Open",
    "Operation",
    "Rename",
    "Result",
    "Unlink",
    "chown",
    "credentials",
    "decision",
    "mkdir",
    "mknod",
    "open",
    "rename",
    "run",
    "unlink",
]

_NAMES: Final = {Mkdir: "mkdir", Mknod: "mknod", Open: "open", Unlink: "unlink",
                 Rename: "rename", Chown: "chown"}


async def run(n: Notification, op: Operation, *, add_capabilities: int = 0,
              guard: Sequence[bytes] = (), limits: Limits = DEFAULT_LIMITS) -> Result:
    """Carry out ``op`` as the caller of ``n`` and return what happened (see
    :func:`supervisor.emulate.as_caller`); an opened fd in the result is the handler's
    to inject or close. Raises EmulationBusy, EmulationError."""
    return await as_caller(n, op, add_capabilities=add_capabilities, guard=guard,
                           limits=limits)


def credentials(n: Notification) -> Credentials:
    """The caller's file-system credentials (fsuid, fsgid, groups, umask, effective
    capabilities and whether they hold in the supervisor's user namespace), read
    race-free from ``/proc/<tid>/status``. Raises NotificationGone, TargetMemoryError."""
    found = open_caller(n, b"/")
    found.close()
    return found.credentials


def decision(op: Operation, result: Result, *, reason: str = "") -> Decision:
    """The answer that gives the caller ``result``: ``deny(errno)`` if the call failed
    (the reason then says so); for an :class:`Open`, ``inject_fd`` of the opened fd
    (close-on-exec in the caller if it asked for ``O_CLOEXEC``); else ``returns(0)``."""
    what = reason or f"{_NAMES[type(op)]} as the caller"
    if result.errno:
        result.close()
        return deny(result.errno, reason=f"{what}: failed")
    if isinstance(op, Open):
        return inject_fd(result.take_fd(), cloexec=bool(op.flags & os.O_CLOEXEC), reason=what)
    result.close()
    return returns(0, reason=what)


async def _answer(n: Notification, op: Operation, reason: str, add_capabilities: int,
                  limits: Limits) -> Decision:
    try:
        result = await as_caller(n, op, add_capabilities=add_capabilities, limits=limits)
    except EmulationBusy as busy:
        return deny(busy.errno, reason=f"{_NAMES[type(op)]}: {busy}")
    return decision(op, result, reason=reason)


async def mkdir(n: Notification, path: bytes, mode: int, *, dirfd: int = AT_FDCWD,
                reason: str = "", limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``mkdirat(dirfd, path, mode)`` as the caller (its umask applies)."""
    return await _answer(n, Mkdir(path, mode, dirfd), reason, 0, limits)


async def open(n: Notification, path: bytes, flags: int, mode: int = 0, *,
               dirfd: int = AT_FDCWD, reason: str = "",
               limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``openat(dirfd, path, flags, mode)`` as the caller; the opened file is installed
    in the caller (``inject_fd``), and the call returns its number there. Files of procfs
    and cgroupfs are refused (EACCES), except the caller's own fds named through
    ``/proc/self/fd/N`` or ``/dev/fd/N``."""
    return await _answer(n, Open(path, flags, mode, dirfd), reason, 0, limits)


async def unlink(n: Notification, path: bytes, *, dirfd: int = AT_FDCWD,
                 rmdir: bool = False, reason: str = "",
                 limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``unlinkat(dirfd, path, rmdir and AT_REMOVEDIR)`` as the caller."""
    return await _answer(n, Unlink(path, dirfd, AT_REMOVEDIR if rmdir else 0), reason, 0,
                         limits)


async def rename(n: Notification, old: bytes, new: bytes, *, old_dirfd: int = AT_FDCWD,
                 new_dirfd: int = AT_FDCWD, flags: int = 0, reason: str = "",
                 limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``renameat2(old_dirfd, old, new_dirfd, new, flags)`` as the caller."""
    return await _answer(n, Rename(old, new, old_dirfd, new_dirfd, flags), reason, 0,
                         limits)


async def chown(n: Notification, path: bytes, uid: int, gid: int, *, dirfd: int = AT_FDCWD,
                follow_symlinks: bool = True, reason: str = "",
                limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``fchownat(dirfd, path, uid, gid)`` as the caller: ``uid``/``gid`` as it named
    them, in its user namespace (-1, or ``n.uint32(i)`` of a -1: unchanged); an id its
    namespace does not map gives EINVAL. The kernel's own rules decide: the owner may
    change the group to one of its groups, only CAP_CHOWN changes the owner (and only
    held in the supervisor's user namespace: see the security model)."""
    op = Chown(path, uid, gid, dirfd, 0 if follow_symlinks else AT_SYMLINK_NOFOLLOW)
    return await _answer(n, op, reason, 0, limits)


async def mknod(n: Notification, path: bytes, mode: int, major: int = 0, minor: int = 0, *,
                dirfd: int = AT_FDCWD, add_capabilities: int = 0, reason: str = "",
                limits: Limits = DEFAULT_LIMITS) -> Decision:
    """``mknodat(dirfd, path, mode, makedev(major, minor))`` as the caller. A device
    node needs CAP_MKNOD, which a container's caller does not hold in the supervisor's
    user namespace: a policy that has decided the device is allowed grants it with
    ``add_capabilities=1 << CAP_MKNOD`` (and nothing else)."""
    return await _answer(n, Mknod(path, mode, major, minor, dirfd), reason,
                         add_capabilities, limits)
