"""Race-checked reads of a target's memory.

A read is only worth something if it read the memory of the task that made the call,
while the call was still waiting for us. So every read is bracketed by ID_VALID:

* ``process_vm_readv`` names the task by TID. If that TID died and was reused before the
  read, the notification died with it, so ID_VALID *after* the read catches it.
* ``/proc/<tid>/mem`` (the fallback when process_vm_readv is refused) is checked after
  opening (the open file is our target's) and after reading (the call was not abandoned
  and its memory reused meanwhile).

Neither check stops another thread of the target from changing the memory after we read
it; that is why the policy API refuses an unchecked CONTINUE after a read.

``process_vm_readv`` faults like the kernel would (EFAULT on an unmapped page, a short
read at a mapping boundary), so strings are read page by page. The reads run in a worker
thread: a target can make its own memory slow to read (userfaultfd, a FUSE-backed
mapping), and that must cost at most one abandoned thread, never the event loop.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Final

import trio

from .errors import NotificationGone, TargetMemoryError
from .notifyfd import NotifyFd

PAGE_SIZE: Final = mmap.PAGESIZE
PIDFD_THREAD: Final = 0o200  # O_EXCL: a pidfd for a thread that need not lead its group

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
    ctypes.c_ulong,
]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Reader:
    """Reads of one task's memory; used from a worker thread only."""

    def __init__(self, tid: int, mem_fd: int) -> None:
        self.tid = tid
        self.mem_fd = mem_fd  # -1: use process_vm_readv

    def read(self, address: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``address``; short only at an unreadable page."""
        if self.mem_fd >= 0:
            try:
                return os.pread(self.mem_fd, length, address)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EFAULT):
                    return b""
                raise
        buf = ctypes.create_string_buffer(length)
        local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), length)
        remote = _Iovec(address, length)
        n = _libc.process_vm_readv(self.tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EFAULT:
                return b""
            raise OSError(err, os.strerror(err))
        return buf.raw[:n]

    def read_exact(self, address: int, length: int) -> bytes:
        data = b""
        while len(data) < length:
            # Stop at page boundaries so one unmapped page does not hide a readable one.
            chunk = min(length - len(data), PAGE_SIZE - (address + len(data)) % PAGE_SIZE)
            got = self.read(address + len(data), chunk)
            data += got
            if len(got) < chunk:
                raise TargetMemoryError(
                    errno.EFAULT, f"cannot read {length} bytes at {address:#x}: unmapped")
        return data

    def read_cstring(self, address: int, limit: int) -> bytes:
        data = b""
        while len(data) < limit:
            at = address + len(data)
            chunk = min(limit - len(data), PAGE_SIZE - at % PAGE_SIZE)
            got = self.read(at, chunk)
            nul = got.find(b"\0")
            if nul >= 0:
                return data + got[:nul]
            data += got
            if len(got) < chunk:
                raise TargetMemoryError(
                    errno.EFAULT, f"string at {address:#x} runs into unmapped memory")
        raise TargetMemoryError(
            errno.ENAMETOOLONG, f"string at {address:#x} has no NUL in {limit} bytes")

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1


class TargetMemory:
    """Memory access for the notifications of one listener fd.

    ``limiter`` bounds the worker threads one session can tie up.
    """

    def __init__(self, notify: NotifyFd, limiter: trio.CapacityLimiter | None = None,
                 *, use_proc_mem: bool = False) -> None:
        self._notify = notify
        self._limiter = limiter or trio.CapacityLimiter(4)
        self._use_proc_mem = use_proc_mem

    def id_valid(self, notif_id: int) -> bool:
        return not self._notify.closed and self._notify.id_valid(notif_id)

    def _check(self, notif_id: int) -> None:
        if not self.id_valid(notif_id):
            raise NotificationGone("id_valid")

    def _open_reader(self, notif_id: int, tid: int) -> _Reader:
        if tid <= 0:
            raise TargetMemoryError(
                errno.EPERM, "the calling thread is not visible in our pid namespace")
        if not self._use_proc_mem:
            return _Reader(tid, -1)
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Either the thread is gone, or /proc hides it from us (hidepid=invisible,
            # systemd's ProtectProc=, for a process we may not ptrace): the caller is
            # still blocked then and must get an answer.
            self._check(notif_id)
            raise PermissionError(
                errno.EPERM, f"/proc/{tid} is not visible to the supervisor (no ptrace "
                "access to the caller under hidepid/ProtectProc=invisible)") from None
        reader = _Reader(tid, fd)
        try:
            self._check(notif_id)  # the file we opened belongs to the caller
        except BaseException:
            reader.close()
            raise
        return reader

    async def _run(self, notif_id: int, tid: int, address: int, length: int,
                   cstring: bool) -> bytes:
        if address == 0:
            raise TargetMemoryError(errno.EFAULT, "NULL pointer")
        reader = self._open_reader(notif_id, tid)

        def work() -> bytes:
            try:
                if cstring:
                    return reader.read_cstring(address, length)
                return reader.read_exact(address, length)
            finally:
                reader.close()

        try:
            data = await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._limiter)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS) and not self._use_proc_mem:
                # process_vm_readv refused (ptrace rules, seccomp on us): /proc/<tid>/mem
                # is checked differently but reads the same memory.
                self._use_proc_mem = True
                return await self._run(notif_id, tid, address, length, cstring)
            if exc.errno == errno.ESRCH:
                raise NotificationGone("id_valid") from None
            raise
        self._check(notif_id)  # the call is still waiting: these bytes are its arguments
        return data

    async def read_bytes(self, notif_id: int, tid: int, address: int, length: int) -> bytes:
        """Exactly ``length`` bytes. Raises TargetMemoryError(EFAULT), NotificationGone."""
        if length < 0 or length > 16 * 1024 * 1024:
            raise ValueError(f"read length {length} out of range")
        if length == 0:
            self._check(notif_id)
            return b""
        return await self._run(notif_id, tid, address, length, cstring=False)

    async def read_cstring(self, notif_id: int, tid: int, address: int, limit: int) -> bytes:
        """A NUL-terminated string without its NUL; ``limit`` counts the NUL.

        Raises TargetMemoryError (EFAULT, or ENAMETOOLONG when no NUL within ``limit``)
        and NotificationGone.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        return await self._run(notif_id, tid, address, limit, cstring=True)

    def pidfd(self, notif_id: int, tid: int) -> int:
        """A pidfd for thread ``tid``, checked to be the caller of ``notif_id``."""
        if tid <= 0:
            raise TargetMemoryError(
                errno.EPERM, "the calling thread is not visible in our pid namespace")
        try:
            fd = os.pidfd_open(tid, PIDFD_THREAD)
        except ProcessLookupError:
            raise NotificationGone("id_valid") from None
        try:
            self._check(notif_id)
        except BaseException:
            os.close(fd)
            raise
        return fd
