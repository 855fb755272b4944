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

**Worker threads are shared fairly** (:class:`ReadGate`). A thread that reads for one
container competes with the event loop's thread for the GIL three times per read, and
each hand-over of the GIL to a thread the kernel has not scheduled yet can stall the loop
-- every other container's answers -- for a scheduler time slice. Measured
(bench/neighbour.py), one container flooding path_guard reads with four threads of its
own moved a quiet neighbour's p50 from 60 us to 2 ms and its p99 to 40-100 ms. So:

* a container has at most :data:`READS_PER_SESSION` read in a thread at a time (its
  other reads wait in its own queue, FIFO);
* the whole daemon has at most :data:`ACTIVE_READS` threads reading at a time; a read
  waiting for one is served in turn, one container after another (each container has at
  most one read waiting for a thread, so first come, first served is round-robin);
* a read still running after :data:`SLOW_READ` seconds (its page is slow: userfaultfd,
  FUSE) stops counting against the daemon's threads: it sleeps in the kernel and takes no
  GIL, and its container's own slot stays taken until the thread returns, so the cost of
  slow memory stays with the container that made it slow;
* reading threads run :data:`READER_NICE` nice levels below the event loop. Waking one
  otherwise let the kernel preempt the loop's thread for it on the same CPU, and the
  loop then waited behind whatever else was runnable (measured: the loop's hand-over of
  a job to the thread took 0.5 ms on average under a flood). Niced, a flood's reads get
  the CPU the loop leaves over: the flooder is slowed, its neighbours are not.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections import deque
from typing import Final, cast

import trio
from trio.lowlevel import RunVar

from .errors import NotificationGone, TargetMemoryError
from .notifyfd import NotifyFd

PAGE_SIZE: Final = mmap.PAGESIZE
PIDFD_THREAD: Final = 0o200  # O_EXCL: a pidfd for a thread that need not lead its group
#: Reads of one container's memory in worker threads at a time.
READS_PER_SESSION: Final = 1
#: Worker threads reading for the whole daemon at a time (slow reads not counted). One:
#: with two, four flooding containers moved a neighbour's p50 19x instead of 4-5x
#: (bench/neighbour.py --flooders 4), for 1.7x the reads per second.
ACTIVE_READS: Final = 1
#: A read that has run this long (seconds) is slow: it no longer counts as active.
SLOW_READ: Final = 0.005
#: How much nicer (setpriority) than the daemon the threads that read are.
READER_NICE: Final = 10

# The daemon's own nice value, read when this module is imported (in the main thread).
_DAEMON_NICE: Final = os.getpriority(os.PRIO_PROCESS, 0)
_thread_state = threading.local()


def _lower_thread_priority() -> None:
    """Make the calling worker thread :data:`READER_NICE` nicer than the daemon, once.
    (On Linux, setpriority(PRIO_PROCESS, 0) changes the calling thread only.) trio's
    thread cache may later give this thread to a policy's own ``trio.to_thread`` call:
    that work is done for a container too."""
    if getattr(_thread_state, "niced", False):
        return
    _thread_state.niced = True
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, _DAEMON_NICE + READER_NICE))
    except OSError:
        pass  # only speed is at stake


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


class ReadGate:
    """The daemon's worker threads for memory reads, handed out in turn (see the module
    docstring): at most ``active`` reads run in threads at once, not counting the ones
    running for longer than ``slow_after`` seconds. Used from the trio thread only."""

    def __init__(self, active: int = ACTIVE_READS, slow_after: float = SLOW_READ) -> None:
        if active < 1 or slow_after <= 0:
            raise ValueError("a ReadGate needs active >= 1 and slow_after > 0")
        self.active = active
        self.slow_after = slow_after
        # Reads that count as active -> when they got their thread (trio time). Ordered:
        # the first is the oldest.
        self._running: dict[object, float] = {}
        # Reads waiting for a thread, in turn: (borrower, granted, head). ``granted`` is
        # set when a thread is theirs, ``head`` when they are first in line. Only the
        # first in line watches for the running read turning slow: with every waiter
        # watching, each slow turn woke all of them (measured: 100 waiting sessions took
        # the loop to 100% CPU, ~15 ms per read; bench/run.py guard rows at K=100).
        self._waiting: deque[tuple[object, trio.Event, trio.Event]] = deque()

    @property
    def running(self) -> int:
        """Reads counted as active now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, borrower: object) -> None:
        """Wait until ``borrower`` may start its read in a thread."""
        if len(self._running) < self.active and not self._waiting:
            # No checkpoint: the session's own limiter, asked first, made one.
            self._running[borrower] = trio.current_time()
            return
        granted, head = trio.Event(), trio.Event()
        entry = (borrower, granted, head)
        self._waiting.append(entry)
        if self._waiting[0] is entry:
            head.set()
        try:
            while not granted.is_set():
                if not head.is_set():
                    await head.wait()  # set when first in line, or granted
                    continue
                # First in line and every thread is taken: wake up when the oldest read
                # turns slow, if it is still running then, and let it stop counting.
                oldest = next(iter(self._running.values()), None)
                if oldest is None:  # no read to wait for (should not happen): take one
                    self._grant()
                    continue
                with trio.move_on_at(oldest + self.slow_after):
                    await granted.wait()
                if not granted.is_set():
                    self._retire_slow(trio.current_time())
        except BaseException:
            if granted.is_set():
                self.release(borrower)
            else:
                self._waiting.remove(entry)
                self._mark_head()
            raise

    def release(self, borrower: object) -> None:
        """``borrower``'s thread returned (or never started): its slot is free."""
        if self._running.pop(borrower, None) is not None:
            self._grant()

    def _retire_slow(self, now: float) -> None:
        for borrower, started in list(self._running.items()):
            if started + self.slow_after > now:  # the deadline's own sum: no float gap
                break
            del self._running[borrower]
        self._grant()

    def _mark_head(self) -> None:
        if self._waiting:
            self._waiting[0][2].set()

    def _grant(self) -> None:
        now = -1.0
        while self._waiting and len(self._running) < self.active:
            borrower, granted, head = self._waiting.popleft()
            if now < 0:
                now = trio.current_time()
            self._running[borrower] = now
            granted.set()
            head.set()
        self._mark_head()


_GATE: RunVar[ReadGate] = RunVar("seccomp_supervisor_read_gate")


def current_read_gate() -> ReadGate:
    """The :class:`ReadGate` of the running trio run (shared by every session)."""
    try:
        return _GATE.get()
    except LookupError:
        gate = ReadGate()
        _GATE.set(gate)
        return gate


class _SessionSlots:
    """What ``trio.to_thread.run_sync`` takes as its limiter: first one of the session's
    own slots (FIFO within the session), then a turn at the shared :class:`ReadGate`.
    Both are given back when the thread has returned, even if it was abandoned."""

    def __init__(self, own: trio.CapacityLimiter, gate: ReadGate) -> None:
        self.own = own
        self.gate = gate

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.own.acquire_on_behalf_of(borrower)
        try:
            await self.gate.acquire(borrower)
        except BaseException:
            self.own.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self.gate.release(borrower)
        self.own.release_on_behalf_of(borrower)


class TargetMemory:
    """Memory access for the notifications of one listener fd.

    ``limiter`` bounds the worker threads one session can tie up (default
    :data:`READS_PER_SESSION`); ``gate`` is the daemon's shared :class:`ReadGate`
    (default: the trio run's).
    """

    def __init__(self, notify: NotifyFd, limiter: trio.CapacityLimiter | None = None,
                 *, use_proc_mem: bool = False, gate: ReadGate | None = None) -> None:
        self._notify = notify
        self._limiter = limiter or trio.CapacityLimiter(READS_PER_SESSION)
        self._gate = gate
        self._slots: _SessionSlots | None = None
        self._use_proc_mem = use_proc_mem

    def _thread_limiter(self) -> trio.CapacityLimiter:
        if self._slots is None:
            self._slots = _SessionSlots(self._limiter, self._gate or current_read_gate())
        # to_thread.run_sync accepts any object with the two *_on_behalf_of methods.
        return cast(trio.CapacityLimiter, self._slots)

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
            _lower_thread_priority()
            try:
                if cstring:
                    return reader.read_cstring(address, length)
                return reader.read_exact(address, length)
            finally:
                reader.close()

        try:
            data = await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._thread_limiter())
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
