"""Which seccomp listeners the daemon serves, so that none is served twice.

Two sessions on one listener (the same file reached through two fds: a client sent it
twice, or a restored and a handed-over copy meet) break the rule RECV relies on: one
reader per filter (see :mod:`supervisor.notifyfd`). Both fds report POLLIN for the same
notification; the first RECV takes it and the second blocks the daemon's only thread
until the filter's next call, which may never come.

What identifies a listener is its open file, not its fd number and not its inode: every
seccomp listener is the same anonymous inode (verified: ``fstat`` gives the same
``st_dev``/``st_ino`` for listeners of unrelated filters). The kernel tells whether two
fds are one file with ``kcmp(pid, pid, KCMP_FILE, fd1, fd2)`` (CONFIG_KCMP, part of
``@system-service`` in systemd's syscall filter): 0 when they are, else 1 or 2 by a
fixed order of the (obfuscated) file pointers, which is a total order as long as the
files are open. So the served listeners are kept sorted by that order and looked up by
binary search: ~log2(n) kcmp calls per session start.

A filter has at most one listener file (the kernel refuses a second NEW_LISTENER on a
filter chain that has one), so "same file" is exactly "same filter".
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

from .notifyfd import NotifyFd

__all__ = ["KcmpUnavailable", "ServedListeners", "kcmp_problem", "same_file_order"]

SYS_KCMP: Final = 312  # x86_64
KCMP_FILE: Final = 0

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class KcmpUnavailable(OSError):
    """kcmp(2) cannot be used here (kernel without CONFIG_KCMP: ENOSYS; a syscall filter
    or an LSM: EPERM)."""


def same_file_order(fd1: int, fd2: int) -> int:
    """``kcmp(self, self, KCMP_FILE, fd1, fd2)``: 0 if both fds are the same open file,
    -1 or 1 by the kernel's fixed order of open files otherwise.

    Raises KcmpUnavailable if kcmp cannot be used and OSError (EBADF) for a closed fd.
    """
    pid = os.getpid()
    result = _syscall(ctypes.c_long(SYS_KCMP), ctypes.c_long(pid), ctypes.c_long(pid),
                      ctypes.c_long(KCMP_FILE), ctypes.c_ulong(fd1), ctypes.c_ulong(fd2))
    if result < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise KcmpUnavailable(err, f"kcmp: {os.strerror(err)}")
        raise OSError(err, os.strerror(err))
    # kcmp: 0 equal, 1 "less than", 2 "greater than", 3 not ordered (other types).
    return 0 if result == 0 else (-1 if result == 1 else 1)


def kcmp_problem() -> str | None:
    """Why kcmp(KCMP_FILE) cannot be used here, or None when it works (probed on a
    file of our own)."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        dup = os.dup(fd)
        try:
            if same_file_order(fd, dup) != 0:
                return "kcmp says an fd and its dup are different files"
        finally:
            os.close(dup)
    except KcmpUnavailable as exc:
        return str(exc)
    finally:
        os.close(fd)
    return None


class ServedListeners:
    """The listeners of the daemon's sessions (running or paused for a handover).

    Holds the :class:`NotifyFd` objects, not fd numbers: a NotifyFd that was closed
    (``fileno() == -1``) is dropped before every lookup, so an fd number reused after a
    close is never mistaken for the listener it used to be. Never owns or closes an fd.
    """

    def __init__(self) -> None:
        self._sorted: list[NotifyFd] = []  # by same_file_order of their fds

    def __len__(self) -> int:
        self._prune()
        return len(self._sorted)

    def _prune(self) -> None:
        if any(n.fileno() < 0 for n in self._sorted):
            self._sorted = [n for n in self._sorted if n.fileno() >= 0]

    def _search(self, fd: int) -> tuple[int, NotifyFd | None]:
        """(insertion index, the served NotifyFd that is the same file or None)."""
        lo, hi = 0, len(self._sorted)
        while lo < hi:
            mid = (lo + hi) // 2
            order = same_file_order(fd, self._sorted[mid].fileno())
            if order == 0:
                return mid, self._sorted[mid]
            if order < 0:
                hi = mid
            else:
                lo = mid + 1
        return lo, None

    def claim(self, notify: NotifyFd) -> NotifyFd | None:
        """Record ``notify`` as served, unless another NotifyFd already serves the same
        listener: then return that one and record nothing. Claiming a NotifyFd that is
        recorded already (a session resumed after a handover) returns None.

        Raises KcmpUnavailable if kcmp cannot be used (nothing is recorded)."""
        self._prune()
        index, found = self._search(notify.fileno())
        if found is not None:
            return None if found is notify else found
        self._sorted.insert(index, notify)
        return None

    def release(self, notify: NotifyFd) -> None:
        """Forget ``notify`` (a no-op if it is not recorded)."""
        self._sorted = [n for n in self._sorted if n is not notify]
