"""The owner of one seccomp listener fd, and the only caller of the notify ioctls.

Facts this relies on (verified on the target kernel, DESIGN.md §4):

* RECV ignores O_NONBLOCK: with nothing pending it blocks the calling thread, and so the
  whole event loop. It is only called after poll() with a zero timeout showed POLLIN.
* RECV needs a zeroed ``struct seccomp_notif`` every time; otherwise EINVAL, forever.
* POLLHUP means no task uses the filter any more; it stays set (RECV then gives ENOENT at
  once), so the owner must close the fd and stop, or it spins.
* ENOENT from RECV, SEND, ADDFD or ID_VALID is routine: the call was withdrawn (target
  killed, signalled, stopped) or the id is stale.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
from typing import Final

import trio

from . import abi
from .errors import NotificationGone

POLLIN: Final = select.POLLIN
POLL_END: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL
_ZERO_NOTIF: Final = bytes(abi.NOTIF_SIZE)
_NOTIF_STRUCT: Final = abi.NOTIF


class NotifyFd:
    """Owns one listener fd. Not safe to share between reader tasks: exactly one task
    waits on it and receives from it; any task may answer."""

    __slots__ = ("_buf", "_fd", "_poll")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray(abi.NOTIF_SIZE)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def __repr__(self) -> str:
        return f"<NotifyFd {self._fd}>"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    async def wait_readable(self) -> None:
        """Wait until a notification is pending or the filter lost its last task."""
        await trio.lowlevel.wait_readable(self._fd)

    def poll_now(self) -> int:
        """The fd's poll events right now (zero timeout): POLLIN, POLLHUP... or 0."""
        for _fd, events in self._poll.poll(0):
            return events
        return 0

    def recv(self) -> tuple[int, ...] | None:
        """Receive one notification; None when it was withdrawn meanwhile (ENOENT).

        Only call after :meth:`poll_now` showed POLLIN. Returns the unpacked
        ``seccomp_notif`` fields (id, pid, flags, nr, arch, ip, args0..args5).
        """
        buf = self._buf
        buf[:] = _ZERO_NOTIF
        try:
            fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return _NOTIF_STRUCT.unpack(buf)

    def send(self, notif_id: int, val: int, error: int, flags: int) -> None:
        """Answer a notification. Raises NotificationGone("send") on ENOENT."""
        try:
            fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_SEND, abi.NOTIF_RESP.pack(
                notif_id, val, error, flags))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotificationGone("send") from None
            raise

    def send_fd(self, notif_id: int, srcfd: int, *, cloexec: bool) -> int:
        """Install ``srcfd`` in the target and answer the call with its number there
        (ADDFD with ADDFD_FLAG_SEND: both happen atomically). Returns the target's fd.

        Raises NotificationGone("addfd") on ENOENT. The caller still owns ``srcfd``.
        """
        # The kernel returns the new fd number as the ioctl's result; a mutable buffer
        # makes fcntl.ioctl hand back that result instead of a copy of the argument.
        buf = bytearray(abi.pack_addfd(notif_id, srcfd, cloexec=cloexec, send=True))
        try:
            return int(fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_ADDFD, buf, True))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotificationGone("addfd") from None
            raise

    def id_valid(self, notif_id: int) -> bool:
        """True while the kernel still waits for an answer to ``notif_id``."""
        try:
            fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_ID_VALID, struct.pack("<Q", notif_id))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def set_sync_wakeup(self) -> bool:
        """Ask the kernel to wake the target on the answering CPU (Linux >= 6.6).

        Returns False when the kernel does not know the flag.
        """
        try:
            # The argument is passed by value, not through a pointer.
            fcntl.ioctl(self._fd, abi.IOCTL_NOTIF_SET_FLAGS, abi.USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTTY):
                return False
            raise
        return True

    def close(self) -> None:
        """Close the fd (once). Every call the filter notifies from now on gets ENOSYS
        unless another process holds a copy of the listener."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._poll.unregister(fd)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


def is_seccomp_listener(fd: int) -> bool:
    """True if ``fd`` is a seccomp user-notification listener."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False
