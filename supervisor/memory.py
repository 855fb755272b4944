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

**Reading threads are shared fairly** (:class:`ReadPool`). A thread that reads for one
container competes with the event loop's thread for the GIL three times per read, and
each hand-over of the GIL to a thread the kernel has not scheduled yet can stall the loop
-- every other container's answers -- for a scheduler time slice. Measured
(bench/neighbour.py), one container flooding path_guard reads with four threads of its
own moved a quiet neighbour's p50 from 60 us to 2 ms and its p99 to 40-100 ms. So:

* a container has at most :data:`READS_PER_SESSION` read queued or in a thread at a time
  (its other reads wait in its own queue, FIFO);
* reads wait for a thread in one queue, first come, first served: with at most one read
  per container in it, that is one container after another (round-robin);
* one thread reads for the whole daemon, taking the queue's reads one after another (a
  burst of reads costs one wake-up of the thread and one of the event loop, not one
  each: trio's ``to_thread.run_sync`` per read cost ~0.5 M instructions per read, more
  than the rest of a path_guard decision, bench/instructions.py);
* a read still running after :data:`SLOW_READ` seconds while others wait (its page is
  slow: userfaultfd, FUSE) retires its thread: that thread stays with the read (it sleeps
  in the kernel and takes no GIL) and a new one takes over the queue, so the cost of
  slow memory stays with the container that made it slow (one thread per stuck read, and
  its container's own slot stays taken until the thread returns);
* at most :data:`MAX_STUCK_READS` retired threads may still be in their read: a read of
  memory served by a process outside the container outlives its session, so sessions do
  not bound them. Past that (or when no thread can be started), the reads waiting behind
  a slow one fail at once with EAGAIN instead of a new thread starting;
* the reading thread takes up to :data:`BATCH_READS` queued reads of strings at a
  time and, with the compiled module, reads them in one call that lets go of the GIL
  once: one by one, every read needed the GIL back while the loop held it. A batch that
  turns slow is stopped: the reads it did are delivered, those it did not begin go back
  to the head of the queue, and only the read it is in stays with its thread;
* reading threads run :data:`READER_NICE` nice levels below the event loop. Waking one
  otherwise let the kernel preempt the loop's thread for it on the same CPU, and the
  loop then waited behind whatever else was runnable (measured: the loop's hand-over of
  a job to the thread took 0.5 ms on average under a flood). Niced, a flood's reads get
  the CPU the loop leaves over: the flooder is slowed, its neighbours are not;
* with the compiled module, the reading thread spins briefly (the GIL released) for its
  next read before it sleeps, when its last wait was short (:data:`READER_SPIN`), and
  the loop's inline wait spins for the read while that thread spins on another CPU
  (:data:`INLINE_SPIN`): a thread's sleep and wake-up costs more than the read on
  virtual machines;
* with the compiled module, a read the loop waits for inline (:data:`INLINE_WAIT`,
  :data:`INLINE_WAIT_SHARED`) goes to a thread of its own that never takes the GIL
  (``_hotloop.InlineReader``), with the same spins: through the reading thread, the
  read also took that thread's Python and two hand-overs of the GIL. A read it does not
  finish within the wait is left to it (it finishes, or stays stuck alone) and read
  again by the pool, the slow-read rules above applying; a new such thread takes the
  next inline reads, those left in a read counting against :data:`MAX_STUCK_READS`
  with the retired reading threads (past it, inline waits take the reading thread, as
  they do without the module).

The read cannot run on the event loop's thread: ``process_vm_readv`` of a page
registered with a userfaultfd that nobody serves waits until the fault is served (or the
registering process exits), in a killable sleep that no other signal interrupts
(verified: 5 s, until the target exited, through a SIGALRM after 1 s); with
``UFFD_USER_MODE_ONLY`` (what an unprivileged user gets with
``vm.unprivileged_userfaultfd = 0``) it fails at once with EFAULT. Whether a page can
fault that way cannot be known beforehand from user space without a race (another thread
of the target can remap it after any check).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Final, Protocol

import outcome
import trio
from trio.lowlevel import RunVar

from . import accel
from .errors import NotificationGone, TargetMemoryError
from .notifyfd import NotifyFd, Suspended, carry_suspended, poller_turn, suspended_ended

log = logging.getLogger("supervisor.memory")

PAGE_SIZE: Final = mmap.PAGESIZE
PIDFD_THREAD: Final = 0o200  # O_EXCL: a pidfd for a thread that need not lead its group
#: Reads of one container's memory in worker threads at a time.
READS_PER_SESSION: Final = 1
#: A read that has run this long (seconds) while others wait is slow: its thread retires.
#: (One thread reads at a time, slow ones not counted: with two, four flooding
#: containers moved a neighbour's p50 19x instead of 4-5x, bench/neighbour.py
#: --flooders 4, for 1.7x the reads per second.)
SLOW_READ: Final = 0.005
#: While the daemon serves one listener fd only, the event loop blocks up to this long
#: (seconds) for a read in the reading thread before it waits for it as it does otherwise
#: (0: never block). A hand-off through trio costs a checkpoint, the suspended handler's
#: own task (and a new poller task), and a wake-up of the loop; blocking costs two thread
#: wake-ups. With one fd nothing else waits for the loop meanwhile but the daemon's own
#: sockets, for at most this long per read; a read stuck on slow memory is then waited for
#: asynchronously, and its session's next reads find its slot taken and do not block.
#: Measured (bench/run.py, K=1, same run): p50 325 us without, 148 us at 1 ms, 128 us at
#: 5 ms (a read that is not slow, SLOW_READ, is worth waiting for).
INLINE_WAIT: Final = SLOW_READ
#: Seconds the event loop may spend blocked in inline waits while the rest of the daemon
#: waits for its turn: once they took that long since the poller last let the daemon
#: run (notifyfd.poller_turn), a read is waited for asynchronously (which lets it run).
#: The same budget holds while a few listener fds are served (INLINE_WAIT_SHARED).
#: The poller lets the daemon run when no notification is pending, and otherwise only
#: every 256 notifications (notifyfd.Poller.EVENTS_PER_YIELD), a few ms when each takes
#: microseconds; but a container can make each of its reads take just under INLINE_WAIT
#: (a userfaultfd page its own thread serves after 1-3 ms) and keep a notification
#: pending: 256 of them held the control socket, /metrics, signals and the next
#: container's handover for 0.2-3.4 s at a time (tests/test_hostile_reads.py).
INLINE_BUDGET: Final = 0.004
#: While the daemon serves 2 to INLINE_SHARED_FDS listener fds, the event loop blocks up
#: to this long (seconds) for a read, and up to INLINE_BUDGET per turn of the poller, as
#: with one: the other containers' notifications wait meanwhile. A read handed over and
#: delivered asynchronously costs the loop two sleeps and wake-ups, a pass of trio's
#: scheduler and the delivery task: measured at 2 busy targets, 110-120 us of the
#: daemon's CPU per guarded call, 2 context switches and 1.4 IPIs, against ~65 us
#: waited for inline (bench/README.md, "Session 15"). A read not done within this wait
#: is waited for asynchronously, as with more fds; so a container whose memory is slow
#: to read delays each notification of a neighbour by at most this much, about what one
#: of its guarded calls cost the loop asynchronously (the poller reads each fd once per
#: round). A smaller budget per turn (400 us) left the reads past it to the pool's
#: delivery in the middle of a turn: the calls' p99 at 4 busy targets went from ~340 to
#: ~950 us; with INLINE_BUDGET it stays at ~320 (bench/README.md, "Session 15").
INLINE_WAIT_SHARED: Final = 100e-6
#: The most listener fds the daemon serves while it still waits for reads inline (see
#: INLINE_WAIT_SHARED). With more, reads queue up in batches and a neighbour's notification
#: would wait behind more containers' inline waits per round. Only while the hand-over
#: spins (READER_SPIN, INLINE_SPIN): without the spins each inline wait sleeps and wakes
#: both threads, and at 2-4 busy targets that made 15-45% fewer calls/s than handing the
#: reads over (bench/README.md, "Session 15").
INLINE_SHARED_FDS: Final = 4
#: How much nicer (setpriority) than the daemon the threads that read are.
READER_NICE: Final = 10
#: Seconds the reading thread spins (the GIL released) for the next read before it
#: sleeps, when the read before came within that time after it had finished its last
#: (else it sleeps at once: a container whose reads come further apart costs no spin).
#: A thread's sleep and wake-up cost 20-40 us of CPU and as much latency on the virtual
#: machines measured, and an idle virtual CPU takes longer still to run a thread woken on
#: it; a container's run of path_guard calls on one listener came 40-80 us apart, so
#: spinning over those gaps kept both off the hot path: K=1 p50 205 -> 66 us at less CPU
#: per call (bench/README.md, "Session 10"). Spinning needs the compiled module.
READER_SPIN: Final = 200e-6
#: The environment variable that stops the spinning (READER_SPIN, INLINE_SPIN), for a
#: daemon under a CPU quota, where the spin would count against the loop's share.
NO_SPIN_ENV: Final = "SECCOMP_SUPERVISOR_NO_SPIN"
#: Seconds the event loop spins (the GIL released) in an inline wait before it sleeps,
#: when the reading thread was spinning for the read on another CPU: it takes the read at
#: once, and the read takes ~5-10 us. (Woken from its sleep, or spinning on the loop's own
#: CPU, which the loop then holds, it could not run while the loop spins.)
INLINE_SPIN: Final = 50e-6
#: Queued reads of strings (declared paths, ``read_cstring``) the reading thread takes in
#: one batch at most: it reads them in one call that lets go of the GIL once
#: (``_hotloop.ReadBatch``), where reading them one by one needed the GIL back after
#: every read while the event loop held it. At
#: 100 busy targets a batch held 12-14 reads on average (half the reads were in batches
#: of 17-23 or more); guarded calls/s 1.3-1.6x, daemon CPU per call -25 to -40%
#: (bench/README.md, "Session 11"). To the watch for slow reads (:data:`SLOW_READ`) a
#: batch is one read: 64 reads of a page take well under 1 ms.
BATCH_READS: Final = 64
#: The largest ``limit`` of a string a batch reads (the session's is PATH_MAX).
BATCH_LIMIT: Final = 1 << 20

#: With more than one listener fd served, how long the compiled poll round waits for
#: its reads of declared paths (supervisor/_hotloop.c, round_read) per read, on top of
#: :data:`INLINE_WAIT_SHARED` (ReadPool.round_wait): a read takes ~2-5 microseconds,
#: the reading thread's wake-up more on a busy machine. Reads not done within the wait
#: are read by the pool (and the container whose read was slow stays out of rounds
#: for a second).
ROUND_WAIT: Final = 20e-6
_U64_MAX: Final = 2**64 - 1  # (registers hold 64 bits: so do the addresses a batch takes)
#: Threads retired for a slow read that are still in it, daemon-wide, at most. Such a
#: read can last forever: a userfaultfd page or a FUSE mapping served by a process that
#: outlives the container (its creator's, a sidecar's) keeps the thread in a killable
#: sleep that nothing but the death of the daemon ends, after the session that asked has
#: ended and given its slot up with it. Without a bound, containers that end one after
#: another each leave a thread (8 MiB of stack) behind until thread creation fails.
#: With this many stuck, a read that turns slow keeps its thread, and the reads waiting
#: behind it fail at once with EAGAIN (their call is denied EAGAIN) instead.
MAX_STUCK_READS: Final = 64


class _PySignal:
    """The pure-Python twin of ``supervisor._hotloop.Signal``: a flag one thread waits
    for, set by any thread (two sets before a wait count once). It does not spin."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def wait(self, timeout: float = -1.0, spin: float = 0.0) -> bool:
        """Until set (then clear it), or False after ``timeout`` seconds (< 0: none)."""
        return self._lock.acquire(timeout=timeout)

    def set_then_wait(self, other: _PySignal, timeout: float = -1.0,
                      spin: float = 0.0) -> bool:
        """Set this flag, then wait for ``other``."""
        self.set()
        return other.wait(timeout, spin)

    def spinning_elsewhere(self) -> bool:
        """Whether its waiter spins on another CPU (this one never spins)."""
        return False


def signal_type() -> type[_PySignal]:
    """The flag the reading thread and the inline wait use: the compiled ``Signal``,
    which spins before it sleeps, or with the pure-Python hot loop its twin."""
    hotloop = accel.HOTLOOP
    return _PySignal if hotloop is None else hotloop.Signal


def why_no_spin() -> str | None:
    """Why the hand-over of reads does not spin (None: it spins)."""
    if accel.HOTLOOP is None:
        return "pure Python"
    if os.environ.get(NO_SPIN_ENV, "") not in ("", "0"):
        return f"{NO_SPIN_ENV} is set"
    return None


def spinning() -> str:
    """How the hand-over of reads waits, for the start log."""
    why = why_no_spin()
    return "spins before it sleeps" if why is None else f"sleeps ({why})"


def next_spin(last_wait: float, spin: float) -> float:
    """How long to spin in the next wait: ``spin`` if the last wait took at most that
    long (the next one is likely as short), else 0 (sleep at once)."""
    return spin if last_wait <= spin else 0.0


#: The states of a job in a read batch (as _hotloop.c's ReadBatch).
_UNCLAIMED, _READING, _DONE, _TAKEN, _STOPPED = range(5)


class _PyReadBatch:
    """The pure-Python twin of ``supervisor._hotloop.ReadBatch``: the NUL-terminated
    strings of queued jobs, each ``(tid, addresses, limit)``, read by one thread in
    :meth:`run`, as :meth:`_Reader.read_cstring` reads them (process_vm_readv). The event
    loop may :meth:`stop` a run that lasts: jobs not claimed yet are then never read. A
    job's result is handed out once, by :meth:`take`, to whichever thread asks first
    once it is read: a list with per address the bytes, or EFAULT (unmapped, NULL) or
    ENAMETOOLONG; or a negative errno when the job failed as a whole (the thread died:
    ESRCH, or the read was refused: EPERM). The compiled one reads without the GIL."""

    __slots__ = ("_lock", "_ran", "_requests", "_results", "_states")

    def __init__(self, requests: list[tuple[int, tuple[int, ...], int]]) -> None:
        for tid, addresses, limit in requests:
            if not 0 < tid <= 2**31 - 1 or not 0 < limit <= BATCH_LIMIT:
                raise ValueError(f"ReadBatch: tid {tid} or limit {limit} out of range")
            if addresses.__class__ is not tuple:
                raise TypeError("a request is (tid, tuple of addresses, limit)")
        self._requests = requests
        self._lock = threading.Lock()
        self._ran = False
        self._states = [_UNCLAIMED] * len(requests)
        self._results: list[list[bytes | int] | int | None] = [None] * len(requests)

    def __len__(self) -> int:
        return len(self._requests)

    def run(self) -> int:
        """Read the jobs in order until all are read or :meth:`stop` was called; the
        number claimed (take jobs 0 to that number - 1). Once per batch."""
        with self._lock:
            if self._ran:
                raise RuntimeError("a ReadBatch runs once")
            self._ran = True
        claimed = 0
        for i, request in enumerate(self._requests):
            with self._lock:
                if self._states[i] != _UNCLAIMED:  # stopped
                    break
                self._states[i] = _READING
            claimed = i + 1
            self._results[i] = self._read(*request)
            with self._lock:
                self._states[i] = _DONE
        return claimed

    @staticmethod
    def _read(tid: int, addresses: tuple[int, ...], limit: int) -> list[bytes | int] | int:
        reader = _Reader(tid, -1)
        got: list[bytes | int] = []
        for address in addresses:
            if address == 0:
                got.append(errno.EFAULT)
                continue
            try:
                got.append(reader.read_cstring(address, limit))
            except TargetMemoryError as exc:
                got.append(exc.errno)
            except OSError as exc:
                return -(exc.errno or errno.EIO)
        return got

    def stop(self) -> int:
        """No more jobs are claimed: the number claimed already."""
        with self._lock:
            states = self._states
            claimed = next((i for i, state in enumerate(states)
                            if state in (_UNCLAIMED, _STOPPED)), len(states))
            for i in range(claimed, len(states)):
                states[i] = _STOPPED
            return claimed

    def busy(self, i: int) -> bool:
        """Whether job ``i`` is being read."""
        with self._lock:
            return self._states[i] == _READING

    def take(self, i: int) -> list[bytes | int] | int | None:
        """Job ``i``'s result, once; None if it is not read yet or was taken."""
        with self._lock:
            if self._states[i] != _DONE:
                return None
            self._states[i] = _TAKEN
            result, self._results[i] = self._results[i], None
            return result


def batch_type() -> type[_PyReadBatch]:
    """What the reading thread reads declared paths with: the compiled ``ReadBatch``
    (no GIL while it reads), or with the pure-Python hot loop its twin."""
    hotloop = accel.HOTLOOP
    return _PyReadBatch if hotloop is None else hotloop.ReadBatch


def batch_outcome(request: tuple[int, tuple[int, ...], int],
                  result: list[bytes | int] | int) -> outcome.Outcome[Any]:
    """A batch's ``result`` for ``request`` as :meth:`TargetMemory.read_cstrings_soon`'s
    job would have returned it: per address the bytes or the TargetMemoryError
    :meth:`_Reader.read_cstring` raises; an OSError for the whole job."""
    if isinstance(result, int):
        return outcome.Error(OSError(-result, os.strerror(-result)))
    _tid, addresses, limit = request
    got: list[bytes | Exception] = []
    for address, value in zip(addresses, result, strict=True):
        if value.__class__ is bytes:
            got.append(value)
        elif address == 0:
            got.append(TargetMemoryError(errno.EFAULT, "NULL pointer"))
        elif value == errno.EFAULT:
            got.append(TargetMemoryError(
                errno.EFAULT, f"string at {address:#x} runs into unmapped memory"))
        else:
            got.append(TargetMemoryError(
                errno.ENAMETOOLONG, f"string at {address:#x} has no NUL in {limit} bytes"))
    return outcome.Value(got)


def job_outcome(job: _Job, result: list[bytes | int] | int) -> outcome.Outcome[Any]:
    """What ``job``'s work would have returned or raised, from its batch ``result``."""
    assert job.request is not None
    got = batch_outcome(job.request, result)
    if job.single and isinstance(got, outcome.Value):
        (value,) = got.value
        return outcome.Error(value) if isinstance(value, Exception) else outcome.Value(value)
    return got


def taken_outcome(batch: _PyReadBatch, i: int, job: _Job) -> outcome.Outcome[Any] | None:
    """:meth:`_PyReadBatch.take` of job ``i`` as ``job``'s outcome (None if it was taken
    already or is not read yet). Making the result's objects can fail (MemoryError):
    that is the job's error then, never its thread's, nor the event loop's."""
    try:
        result = batch.take(i)
        return None if result is None else job_outcome(job, result)
    except Exception as exc:
        return outcome.Error(exc)


# The daemon's own nice value, read when this module is imported (in the main thread).
_DAEMON_NICE: Final = os.getpriority(os.PRIO_PROCESS, 0)
_thread_state = threading.local()


def _lower_thread_priority() -> None:
    """Make the calling thread :data:`READER_NICE` nicer than the daemon, once. (On
    Linux, setpriority(PRIO_PROCESS, 0) changes the calling thread only.)"""
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


class _Scratch:
    """A reading thread's page buffer and iovecs, made once: the reading thread holds
    the GIL while it runs Python, and the event loop waits for it meanwhile (every
    ioctl and epoll_wait of the loop lets it run), so its per-read Python is kept short."""

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(PAGE_SIZE)
        self.address = ctypes.addressof(self.buffer)
        self.local = _Iovec(self.address, PAGE_SIZE)
        self.remote = _Iovec(0, 0)
        self.local_ref = ctypes.byref(self.local)
        self.remote_ref = ctypes.byref(self.remote)


_scratch = threading.local()
_process_vm_readv = _libc.process_vm_readv


#: The last address ``pread`` of /proc/<tid>/mem can take (its offset is a signed 64 bits).
_MAX_MEM_OFFSET: Final = 2**63 - 1


class _Reader:
    """Reads of one task's memory; used from a worker thread only."""

    def __init__(self, tid: int, mem_fd: int) -> None:
        self.tid = tid
        self.mem_fd = mem_fd  # -1: use process_vm_readv

    def read(self, address: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``address``; short only at an unreadable page."""
        if self.mem_fd >= 0:
            if address > _MAX_MEM_OFFSET:
                # A negative offset for pread(2): the kernel half of the address space,
                # which the target's own kernel would answer EFAULT for.
                return b""
            try:
                return os.pread(self.mem_fd, length, address)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EFAULT):
                    return b""
                raise
        if length > PAGE_SIZE:  # (callers read page by page)
            raise ValueError(f"read of {length} bytes: at most a page at a time")
        scratch = _scratch.__dict__.get("iov")
        if scratch is None:
            scratch = _scratch.iov = _Scratch()
        remote = scratch.remote
        remote.base = address
        remote.len = length
        n = _process_vm_readv(self.tid, scratch.local_ref, 1, scratch.remote_ref, 1, 0)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EFAULT:
                return b""
            raise OSError(err, os.strerror(err))
        return ctypes.string_at(scratch.address, n)

    def read_exact(self, address: int, length: int) -> bytes:
        # A bytearray: ``bytes += page`` copies all read so far per page, quadratic
        # (5 s of CPU, mostly holding the GIL, for the 16 MiB read_bytes allows).
        data = bytearray()
        while len(data) < length:
            # Stop at page boundaries so one unmapped page does not hide a readable one.
            chunk = min(length - len(data), PAGE_SIZE - (address + len(data)) % PAGE_SIZE)
            got = self.read(address + len(data), chunk)
            data += got
            if len(got) < chunk:
                raise TargetMemoryError(
                    errno.EFAULT, f"cannot read {length} bytes at {address:#x}: unmapped")
        return bytes(data)

    def read_cstring(self, address: int, limit: int) -> bytes:
        data = bytearray()  # (see read_exact)
        while len(data) < limit:
            at = address + len(data)
            chunk = min(limit - len(data), PAGE_SIZE - at % PAGE_SIZE)
            got = self.read(at, chunk)
            nul = got.find(b"\0")
            if nul >= 0:
                return bytes(data) + got[:nul] if data else got[:nul]
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


class _Slot(Protocol):
    """A session's places for reads in a :class:`ReadPool` (``trio.CapacityLimiter``
    has these, and :class:`ReadSlot`)."""

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None: ...

    async def acquire_on_behalf_of(self, borrower: object) -> None: ...

    def release_on_behalf_of(self, borrower: object) -> None: ...


class _WaitingTask:
    """A task waiting in a :class:`ReadSlot`'s FIFO for a place, for ``borrower``."""

    __slots__ = ("borrower", "task")

    def __init__(self, borrower: object, task: trio.lowlevel.Task) -> None:
        self.borrower = borrower
        self.task = task


class ReadSlot:
    """A session's ``places`` (:data:`READS_PER_SESSION`) in the :class:`ReadPool`, for
    both kinds of reads, which wait for one in a single FIFO,
    :attr:`deferred`: a read submitted without a task (:meth:`ReadPool.submit`; the pool
    queues it when a place is given back) or a task's (:meth:`ReadPool.run`: the task is
    woken with the place). One queue: when the tasks waited in the limiter's own queue,
    served first whenever a place came back, a flood with parked decisions always had one
    waiting, and the submitted reads -- the session's oldest decisions -- waited until
    their deadline (tests/test_declared_paths.py). The places are counted here, not by a
    ``trio.CapacityLimiter``, whose own queue is never used: its acquire and release
    took 5 calls of Python each, per guarded call (bench/README.md, "Session 11")."""

    __slots__ = ("_borrowers", "_handing_over", "deferred", "places", "pool")

    def __init__(self, places: int = READS_PER_SESSION) -> None:
        if places < 1:
            raise ValueError("a ReadSlot needs places >= 1")
        self.places = places
        self._borrowers: set[object] = set()
        self.deferred: deque[_Job | _WaitingTask] = deque()
        self.pool: ReadPool | None = None  # where deferred reads go when a place is free
        self._handing_over = False  # see _hand_over

    @property
    def borrowed_tokens(self) -> int:
        return len(self._borrowers)

    def _take(self, borrower: object) -> None:
        """A place for ``borrower`` now, or trio.WouldBlock."""
        borrowers = self._borrowers
        if len(borrowers) >= self.places:
            raise trio.WouldBlock
        if borrower in borrowers:  # (a bug: as CapacityLimiter says it)
            raise RuntimeError("this borrower is already holding one of this slot's places")
        borrowers.add(borrower)

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None:
        if self.deferred:  # they were first
            raise trio.WouldBlock
        self._take(borrower)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        """A place for ``borrower``, after the reads that asked before (a checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiting = _WaitingTask(borrower, trio.lowlevel.current_task())
        deferred = self.deferred
        deferred.append(waiting)

        def abort(_: object) -> trio.lowlevel.Abort:
            deferred.remove(waiting)  # (handed a place, it was rescheduled: no abort)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def release_on_behalf_of(self, borrower: object) -> None:
        try:
            self._borrowers.remove(borrower)
        except KeyError:  # (a bug: as CapacityLimiter says it)
            raise RuntimeError("this borrower isn't holding any of this slot's "
                               "places") from None
        if self.deferred:
            self._hand_over()

    def _hand_over(self) -> None:
        """A place was given back: hand places to the reads waiting, in order, while
        there are places."""
        if self._handing_over:  # (called again from the loop below: it goes on)
            return
        self._handing_over = True
        try:
            deferred = self.deferred
            while deferred:
                head = deferred[0]
                borrower = head.borrower if head.__class__ is _WaitingTask else head
                try:
                    self._take(borrower)
                except trio.WouldBlock:
                    return
                deferred.popleft()
                if isinstance(head, _WaitingTask):
                    trio.lowlevel.reschedule(head.task)
                else:
                    assert self.pool is not None  # (set by the submit that deferred it)
                    self.pool._start_submitted(head)
        finally:
            self._handing_over = False


class _Job:
    """One read handed to the reading thread: ``work`` runs there; its outcome comes back
    to the trio thread, which gives ``slot`` back and wakes ``task`` (None once the task
    gave up waiting: the result is dropped). ``discard`` is called (in the trio thread)
    instead when the job is dropped before a thread took it: what ``work`` would have
    released (an open /proc/<tid>/mem) is released then."""

    __slots__ = ("deliver", "discard", "outcome", "request", "single", "slot", "stuck",
                 "task", "waiter", "work")

    def __init__(self, work: Callable[[], Any], slot: _Slot,
                 discard: Callable[[], None] | None,
                 deliver: Callable[[outcome.Outcome[Any]], Suspended | None] | None = None
                 ) -> None:
        self.work = work
        # (tid, addresses, limit) when ``work`` reads those strings through
        # process_vm_readv: the reading thread may read it in a batch instead.
        self.request: tuple[int, tuple[int, ...], int] | None = None
        self.single = False  # its work returns the one string's bytes, or raises
        self.slot = slot
        self.discard = discard
        self.stuck = False  # its thread was retired: counted in ReadPool.stuck
        self.task: trio.lowlevel.Task | None = None
        # Called (in the trio thread, by the pool's delivery task) with the outcome of a
        # job submitted without a task (ReadPool.submit); None once it was cancelled.
        # What it returns, a decision that suspended, the delivery task carries on.
        self.deliver = deliver
        self.outcome: outcome.Outcome[Any] | None = None
        # Released by the thread when the trio thread waits for this read synchronously
        # (ReadPool.run's ``wait``); None otherwise, or once it stopped waiting.
        self.waiter: _PySignal | None = None


class _Released:
    """The slot of a job that gave its place back already (see ReadPool._start_submitted)."""

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None:
        raise trio.WouldBlock

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        raise RuntimeError("not a slot")

    def release_on_behalf_of(self, borrower: object) -> None:
        pass


_RELEASED: Final = _Released()


def _no_work() -> Any:
    """The work of a job delivered with its outcome set (ReadPool.deliver_soon): never
    run by a thread."""
    raise AssertionError("a job delivered as done was run")


def _batch_request(reader: _Reader, tid: int, addresses: Sequence[int],
                   limit: int) -> tuple[int, tuple[int, ...], int] | None:
    """What a job reading the strings at ``addresses`` through ``reader`` hands a read
    batch (see :data:`BATCH_READS`), or None when it cannot be batched: it reads
    /proc/<tid>/mem, or a limit or address is beyond what a batch takes."""
    if (reader.mem_fd >= 0 or not 0 < limit <= BATCH_LIMIT or not addresses
            or min(addresses) < 0 or max(addresses) > _U64_MAX):
        return None
    return (tid, tuple(addresses), limit)


class _ReaderThread:
    """A thread that takes jobs off its pool's queue, in turn, until it is retired (its
    read turned slow, or the pool closed). ``current``/``started`` tell the pool what it
    is reading since when (``time.perf_counter``)."""

    __slots__ = ("batch", "batch_jobs", "current", "holding", "idle", "pool", "retired",
                 "started", "wake")
    # (wake: the Signal it sleeps on when the queue is empty, set by kick)

    def __init__(self, pool: ReadPool) -> None:
        self.pool = pool
        self.wake = pool.signal()
        self.idle = False
        self.retired = False
        self.current: _Job | None = None
        self.started = 0.0
        # While it reads a batch (see BATCH_READS): the batch and its jobs; ``holding``
        # is set before it takes more than one job off the queue, so that the pool's
        # watch sees reads wait (in the queue or in the batch) at every moment.
        self.batch: _PyReadBatch | None = None
        self.batch_jobs: list[_Job] = []
        self.holding = False
        threading.Thread(target=self._main, daemon=True,
                         name="seccomp-supervisor reader").start()

    def kick(self) -> bool:
        """Called from the trio thread after queueing a job: True if the thread was
        spinning for it on another CPU (so it takes the job at once)."""
        if self.idle:
            self.idle = False
            hot = self.wake.spinning_elsewhere()
            self.wake.set()
            return hot
        return False

    def kick_then_wait(self, waiter: _PySignal, timeout: float, spin: float) -> bool:
        """:meth:`kick`, but the wake-up comes once this (trio) thread has let go of
        the GIL, and then ``waiter.wait(timeout, spin)``; ``spin`` is used only if the
        thread was spinning on another CPU. Kicked under the GIL, the thread woke up only
        to wait for the GIL the trio thread still held until its wait: a sleep and a
        wake-up more per read waited for inline (bench/README.md, "Session 14")."""
        if self.idle:
            self.idle = False
            if not self.wake.spinning_elsewhere():
                spin = 0.0
            return self.wake.set_then_wait(waiter, timeout, spin)
        return waiter.wait(timeout, 0.0)

    def _read_batch(self, first: _Job) -> _Job | None:
        """Read ``first`` and the jobs with a ``request`` queued right behind it (up to
        :data:`BATCH_READS`) in one batch; hand over all it read but the last, which
        it returns (None if the pool took them all: it stopped the batch)."""
        pool = self.pool
        pending = pool.pending
        jobs = [first]
        if pending and pending[0].request is not None:
            self.holding = True  # before the queue shrinks (see ReadPool._watch)
            while len(jobs) < BATCH_READS:
                try:
                    job = pending.popleft()
                except IndexError:
                    break
                if job.request is None:  # (the trio thread removed the one looked at)
                    pending.appendleft(job)
                    break
                jobs.append(job)
                if not pending or pending[0].request is None:
                    break
        mine: list[_Job] = []
        try:
            batch = pool.batch([job.request for job in jobs])  # type: ignore[misc]
            self.batch_jobs = jobs
            self.batch = batch
            claimed = batch.run()
        except Exception as exc:
            # No memory, or a bug: _batch_request checks what a batch takes, and run()
            # raises only before it claims a job (a second run), so no job was read and
            # the pool's watch (which waits SLOW_READ) took none. They fail; the thread
            # and the reads after them go on.
            log.exception("reading a batch of %d jobs failed", len(jobs))
            self.batch = None
            claimed = 0
            for job in jobs:
                job.outcome = outcome.Error(exc)
                mine.append(job)
        for i in range(claimed):
            got = taken_outcome(batch, i, jobs[i])
            if got is not None:  # (else the pool took it, see ReadPool._stop_batch)
                jobs[i].outcome = got
                mine.append(jobs[i])
        self.current = None
        self.batch = None
        self.batch_jobs = []
        self.holding = False
        for job in mine[:-1]:
            pool.hand_over(job)
        return mine[-1] if mine else None

    def _main(self) -> None:
        _lower_thread_priority()
        pending = self.pool.pending
        report = self.pool.report
        handoff = self.pool.handoff
        capture = outcome.capture
        wake = self.wake
        reader_spin = self.pool.reader_spin
        spin = 0.0  # see READER_SPIN
        while True:
            while not self.retired:
                try:
                    job = pending.popleft()
                except IndexError:
                    break
                self.started = perf_counter()
                self.current = job
                if job.request is None:
                    job.outcome = capture(job.work)
                    self.current = None
                else:
                    last = self._read_batch(job)
                    if last is None:  # the pool took them all (ReadPool._stop_batch)
                        continue
                    job = last
                if job.waiter is not None:
                    with handoff:  # see ReadPool._stop_waiting
                        waiter = job.waiter
                    if waiter is not None:  # the trio thread waits for it: no report
                        if pending or self.retired:
                            waiter.set()
                            continue
                        # Nothing else to read: wake the trio thread once the GIL is
                        # released, or it wakes up only to wait for the GIL.
                        self.idle = True
                        parked = perf_counter()
                        waiter.set_then_wait(wake, -1.0, spin)
                        spin = next_spin(perf_counter() - parked, reader_spin)
                        continue
                report(job)
            if self.retired:
                return
            self.idle = True
            if pending or self.retired:  # queued between the last look and `idle`
                self.idle = False
                continue
            parked = perf_counter()
            wake.wait(-1.0, spin)
            spin = next_spin(perf_counter() - parked, reader_spin)


class ReadPool:
    """The daemon's threads for memory reads (see the module docstring).

    Reads wait in one queue, in the order they were asked for; each session has at most
    :data:`READS_PER_SESSION` in it or running (its own limiter holds the rest), so that
    order takes the sessions in turn. One thread, the *active* one, takes them off the
    queue one after another: a burst of reads costs one wake-up of that thread, and the
    results come back to the trio thread in one wake-up too. A read running for longer
    than ``slow_after`` seconds while others wait makes its thread *retire*: it finishes
    (or stays stuck in) that read alone, and a new thread takes over the queue. So at most
    one thread competes with the event loop for the GIL, and a container's slow memory
    costs one thread per stuck read, never the others' turn. Used from the trio thread
    (but for what the threads do: :meth:`report`).
    """

    def __init__(self, slow_after: float = SLOW_READ,
                 max_stuck: int = MAX_STUCK_READS) -> None:
        if slow_after <= 0:
            raise ValueError("a ReadPool needs slow_after > 0")
        if max_stuck < 0:
            raise ValueError("a ReadPool needs max_stuck >= 0")
        self.slow_after = slow_after
        self.max_stuck = max_stuck
        self.stuck = 0  # retired threads still in their read (see MAX_STUCK_READS)
        self.refused = 0  # reads failed with EAGAIN for want of a thread (statistics)
        self.pending: deque[_Job] = deque()
        self.done: deque[_Job] = deque()
        self.retired = 0  # threads retired for a slow read (statistics, tests)
        self._active: _ReaderThread | None = None
        self.signal = signal_type()  # chosen when the pool is made (tests switch loops)
        self.batch = batch_type()
        # Whether the hand-over spins (READER_SPIN, INLINE_SPIN); reads are waited for
        # inline with a few fds served only if it does (INLINE_SHARED_FDS).
        self.spins = why_no_spin() is None
        self.reader_spin = READER_SPIN if self.spins else 0.0
        self.inline_spin = INLINE_SPIN if self.spins else 0.0
        # With the compiled module, the reads the loop waits for inline go to a thread
        # of their own that never takes the GIL (_hotloop.InlineReader; see
        # _read_inline). Its twin is this pool's own inline wait.
        hotloop = accel.HOTLOOP
        self._inline_type: Any = None if hotloop is None else hotloop.InlineReader
        self.inline: Any = self._new_inline()
        # Inline readers whose thread is in a read the loop gave up waiting for (see
        # _inline_abandoned): they count against max_stuck with the retired threads.
        self.inline_left: list[Any] = []
        self.inline_read = 0  # reads done by an inline reader (statistics)
        self.inline_given_up = 0  # reads an inline reader did not finish in time
        # The reads of declared paths the compiled poll rounds made (statistics, written
        # by supervisor/_hotloop.c, round_read).
        self.round_reads = 0
        # The active thread, when the job just queued is waited for inline and the
        # thread is woken by that wait (_queue's kick, _wait_inline).
        self._to_kick: _ReaderThread | None = None
        self._fd_lock = threading.Lock()  # the eventfd is closed only under it
        self.handoff = threading.Lock()  # who takes a read waited for synchronously
        self._efd = -1
        self._signalled = False
        self._watch_wake: trio.Event | None = None
        # Seconds blocked in inline waits since the poller's turn _inline_turn began or a
        # read was last waited for asynchronously (see INLINE_BUDGET).
        self._inline_spent = 0.0
        self._inline_turn = -1

    async def run(self, work: Callable[[], bytes], slot: _Slot,
                  wait: float = 0.0, turn: int = -1,
                  discard: Callable[[], None] | None = None,
                  request: tuple[int, tuple[int, ...], int] | None = None) -> bytes:
        """``work()`` in a reading thread, after taking one of ``slot``'s places (FIFO).
        Cancelled while waiting, the result is dropped; the place is given back only when
        the thread returned.

        ``wait`` > 0: if ``slot`` has a place free at once, block the trio thread up to
        ``wait`` seconds for the result (no checkpoint, no task switch, no wake-up of
        the loop: the cheap way when the loop has nothing else to do); a read not done by
        then is waited for like any other. Inline waits stop for one read once they took
        :data:`INLINE_BUDGET` since the loop last let the rest of the daemon run: since
        ``turn`` changed (:func:`~supervisor.notifyfd.poller_turn`), or a read was waited
        for asynchronously. ``discard()`` is called if ``work`` does not run (cancelled
        before a thread took it, refused). ``request``: ``work`` reads the one string
        ``(tid, (address,), limit)`` as :meth:`_Reader.read_cstring` does, and the
        reading thread may read it in a batch instead (see :data:`BATCH_READS`)."""
        job = _Job(work, slot, discard)
        if request is not None:
            job.request = request
            job.single = True
        if turn != self._inline_turn:
            self._inline_turn = turn
            self._inline_spent = 0.0
        if wait > 0 and self._inline_spent < INLINE_BUDGET:
            try:
                slot.acquire_on_behalf_of_nowait(job)
            except trio.WouldBlock:
                pass
            else:
                return await self._run_waiting(job, wait)
        self._inline_spent = 0.0  # this task waits: the rest of the daemon runs
        try:
            await slot.acquire_on_behalf_of(job)  # a checkpoint
        except BaseException:
            if discard is not None:
                discard()
            raise
        self._queue(job)
        return await self._result(job)

    def _queue(self, job: _Job, kick: bool = True) -> None:
        """Queue ``job`` for the active reading thread (one is started if there is
        none) and wake it; with ``kick`` False, the caller waits for the job inline
        and wakes it itself (:meth:`_wait_inline`)."""
        try:
            self._start()
        except BaseException:
            self._drop(job)
            raise
        self.pending.append(job)
        active = self._active
        self._to_kick = None
        if active is None or active.retired:
            try:
                self._active = _ReaderThread(self)
            except RuntimeError as exc:  # can't start new thread (RLIMIT_NPROC, memory)
                try:
                    self.pending.remove(job)
                except ValueError:  # a retired thread that returned took it: it reports
                    return
                self._drop(job)
                self.refused += 1
                raise TargetMemoryError(errno.EAGAIN, f"no thread to read: {exc}") from None
        elif kick:
            active.kick()
        else:
            self._to_kick = active

    def _read_inline(self, job: _Job, wait: float) -> outcome.Outcome[Any] | bool:
        """``job`` (its place taken) read by :attr:`inline`, the loop blocked up to
        ``wait`` seconds: its outcome; True if it was not read in time (that thread
        finishes the read alone: the job is the pool's to read now); False if it could
        not be taken (no compiled module, that thread still in such a read, not a job
        of strings): the pool's own inline wait then."""
        inline = self.inline
        if inline is None or job.request is None:
            return False
        tid, addresses, limit = job.request
        started = perf_counter()
        try:
            got = inline.read(tid, addresses, limit, wait, self.inline_spin)
        except Exception as exc:  # (MemoryError making the result): the job's error
            return outcome.Error(exc)
        if got is False:
            return False
        self._inline_spent += perf_counter() - started
        if got is None:
            self.inline_given_up += 1
            self._inline_abandoned(inline)
            return True
        self.inline_read += 1
        try:
            return job_outcome(job, got)
        except Exception as exc:
            return outcome.Error(exc)

    def _new_inline(self) -> Any:
        if self._inline_type is None:
            return None
        return self._inline_type(self.reader_spin, min(19, _DAEMON_NICE + READER_NICE))

    def _inline_abandoned(self, inline: Any) -> None:
        """``inline``'s thread stays in a read the loop gave up waiting for (slow or
        stuck memory): a new reader takes the next inline reads, so one container's
        slow memory does not put its neighbours' reads back on the slower path. Unless
        :attr:`max_stuck` threads are in such reads already (retired reading threads
        and these together): then ``inline`` stays, and while it is busy inline waits
        take the reading thread. (A container cannot hold two: the read given up is
        read again by the pool, and its place stays taken until that read returns.)"""
        # One reader out of its read is kept to take over next time: a container whose
        # every read takes a little longer than the wait would otherwise cost a thread
        # started (by this thread) and ended per read.
        spare = None
        left = []
        for reader in self.inline_left:
            if reader.busy:
                left.append(reader)
            elif spare is None:
                spare = reader
            else:
                reader.close()
        self.inline_left = left
        if self.stuck + len(left) < self.max_stuck:
            left.append(inline)
            self.inline = spare if spare is not None else self._new_inline()
        elif spare is not None:
            spare.close()

    @staticmethod
    def round_wait(reads: int, fds: int) -> float:
        """How long the compiled poll round may wait for its ``reads`` reads of declared
        paths while the poller serves ``fds`` listener fds (and no longer than the
        shortest :data:`INLINE_WAIT` of their sessions): with one, as long as an inline
        wait may block the loop in a turn (:data:`INLINE_BUDGET`); with more,
        :data:`INLINE_WAIT_SHARED` and :data:`ROUND_WAIT` per read."""
        if fds <= 1:
            return INLINE_BUDGET
        return min(INLINE_BUDGET, INLINE_WAIT_SHARED + ROUND_WAIT * reads)

    def _round_abandoned(self, inline: Any) -> None:
        """Called by the compiled poll round: ``inline``'s thread stays in one of the
        round's reads (the round gave up waiting; the pool reads the rest again)."""
        self.inline_given_up += 1
        if inline is self.inline:
            self._inline_abandoned(inline)

    def deliver_soon(self, job: _Job) -> None:
        """Deliver ``job`` (its outcome set, its place given back already or never
        taken) by the delivery task, as a read that was done: for a caller that must not
        decide now."""
        job.slot = _RELEASED
        self._start()
        self.report(job)

    def stats(self) -> dict[str, int]:
        """What ``status`` shows of the reads (statistics since the daemon started)."""
        active = self._active
        slow = (active is not None and not active.retired and active.current is not None
                and perf_counter() - active.started > self.slow_after)
        return {
            # Threads in a read of slow memory now: those MAX_STUCK_READS bounds, and
            # the active reading thread if its read has lasted SLOW_READ (it is retired
            # only once other reads wait).
            "threads_in_slow_reads": self._stuck_now() + slow,
            "retired_threads": self.retired,
            # Reads that failed with EAGAIN for want of a thread.
            "refused": self.refused,
            "read_inline": self.inline_read,
            "inline_given_up": self.inline_given_up,
            "read_in_rounds": self.round_reads,
        }

    def _stuck_now(self) -> int:
        """Threads in reads given up on: retired reading threads and inline readers
        still in theirs."""
        return self.stuck + sum(1 for reader in self.inline_left if reader.busy)

    def _wait_inline(self, waiter: _PySignal, wait: float) -> bool:
        """Wait up to ``wait`` seconds for the job just queued with ``kick`` False:
        the reading thread is woken once this thread let go of the GIL (see
        :meth:`_ReaderThread.kick_then_wait`). True if it was read."""
        active, self._to_kick = self._to_kick, None
        if active is None:  # a new thread: it takes the queue at its start
            return waiter.wait(wait, 0.0)
        return active.kick_then_wait(waiter, wait, self.inline_spin)

    def submit(self, job: _Job, wait: float = 0.0, turn: int = -1) -> bool:
        """Start ``job`` (``job.deliver`` set) without a task: :meth:`run` for a caller
        that does not wait. True if it is done already (``job.outcome``: read within an
        inline wait, see :meth:`run`'s ``wait`` and ``turn``, or refused), and then
        ``deliver`` is not called; else ``job.deliver(outcome)`` is called by the pool's
        delivery task once it is done, unless :meth:`cancel` came first. When its
        session's place is taken (``job.slot`` must then be a :class:`ReadSlot`), it
        waits in that session's own FIFO, taking no place in the pool's queue."""
        if turn != self._inline_turn:
            self._inline_turn = turn
            self._inline_spent = 0.0
        slot = job.slot
        try:
            slot.acquire_on_behalf_of_nowait(job)
        except trio.WouldBlock:
            if not isinstance(slot, ReadSlot):
                raise TypeError("a read submitted while its slot is taken needs a "
                                "ReadSlot to wait in") from None
            slot.pool = self
            slot.deferred.append(job)
            return False
        if wait <= 0 or self._inline_spent >= INLINE_BUDGET:
            if not self._queue_or_refuse(job):
                return True
            self._kick_watch()
            return False
        got = self._read_inline(job, wait)
        if got is not False:
            if got is True:  # not read in time: the pool reads it
                if not self._queue_or_refuse(job):
                    return True
                self._kick_watch()
                return False
            job.outcome = got
            slot.release_on_behalf_of(job)
            return True
        waiter = job.waiter = self.signal()
        if not self._queue_or_refuse(job, kick=False):
            return True
        started = perf_counter()
        try:
            done = self._wait_inline(waiter, wait)
        except BaseException:  # a signal handler raised (KeyboardInterrupt)
            if not self._stop_waiting(job):
                job.deliver = None
                slot.release_on_behalf_of(job)
            raise  # (else its thread reports it: delivered as any other)
        finally:
            # No checkpoint follows, whatever happens: the budget is not reset here.
            self._inline_spent += perf_counter() - started
        if done or not self._stop_waiting(job):
            slot.release_on_behalf_of(job)
            return True
        self._kick_watch()
        return False

    def cancel(self, job: _Job) -> None:
        """Drop a job given to :meth:`submit`: its ``deliver`` is not called. Not started
        yet, it leaves its queue and gives its place back (``discard`` is called); running,
        its place comes back when its thread returns (see :data:`SLOW_READ`)."""
        job.deliver = None
        slot = job.slot
        if isinstance(slot, ReadSlot):
            try:
                slot.deferred.remove(job)
            except ValueError:
                pass
            else:
                if job.discard is not None:
                    job.discard()
                return
        try:
            self.pending.remove(job)
        except ValueError:  # running or done: the delivery task drops it
            return
        self._drop(job)

    def _queue_or_refuse(self, job: _Job, kick: bool = True) -> bool:
        """:meth:`_queue` for a job given to :meth:`submit`: False if it was refused
        (no thread, no eventfd), its outcome the error."""
        try:
            self._queue(job, kick)
        except OSError as exc:  # TargetMemoryError(EAGAIN) included; the job was dropped
            job.outcome = outcome.Error(exc)
            return False
        return True

    def _kick_watch(self) -> None:
        if self._watch_wake is not None:
            self._watch_wake.set()
            self._watch_wake = None

    def _start_submitted(self, job: _Job) -> None:
        """Queue ``job``, deferred by :meth:`submit`, now that it has its place."""
        if self._queue_or_refuse(job):
            self._kick_watch()
        else:  # its place was given back: the delivery task tells its caller
            job.slot = _RELEASED
            self.report(job)

    @staticmethod
    def _drop(job: _Job) -> None:
        """``job`` will not run: its slot back, what its work would release released."""
        job.slot.release_on_behalf_of(job)
        if job.discard is not None:
            job.discard()

    async def _run_waiting(self, job: _Job, wait: float) -> bytes:
        got = self._read_inline(job, wait)
        if got is not False:
            if got is not True:
                job.slot.release_on_behalf_of(job)
                data: bytes = got.unwrap()
                return data
            self._inline_spent = 0.0  # this task waits: the rest of the daemon runs
            self._queue(job)
            return await self._result(job)
        waiter = job.waiter = self.signal()
        self._queue(job, kick=False)
        started = perf_counter()
        try:
            done = self._wait_inline(waiter, wait)
        except BaseException:  # a signal handler raised (KeyboardInterrupt)
            if self._stop_waiting(job):
                job.task = None  # its thread reports it: the slot is given back then
            else:
                job.slot.release_on_behalf_of(job)
            raise
        finally:
            self._inline_spent += perf_counter() - started
        if done or not self._stop_waiting(job):
            job.slot.release_on_behalf_of(job)
            assert job.outcome is not None
            data = job.outcome.unwrap()
            return data
        self._inline_spent = 0.0  # this task waits: the rest of the daemon runs
        return await self._result(job)  # slow: its thread reports it

    def _stop_waiting(self, job: _Job) -> bool:
        """The synchronous wait for ``job`` timed out: True if its thread will report it
        (it had not finished), False if it finished meanwhile (the result is here)."""
        with self.handoff:
            if job.outcome is not None:
                return False
            job.waiter = None
            return True

    async def _result(self, job: _Job) -> bytes:
        """Wait for the thread to report ``job`` (queued already)."""
        self._kick_watch()
        job.task = trio.lowlevel.current_task()
        pending, drop = self.pending, self._drop

        def abort(_: object) -> trio.lowlevel.Abort:
            try:
                pending.remove(job)  # not started: give the place back now
            except ValueError:
                job.task = None  # running: its thread gives the place back
            else:
                drop(job)
            return trio.lowlevel.Abort.SUCCEEDED

        result: bytes = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def hand_over(self, job: _Job) -> None:
        """``job`` is read (its outcome set): wake the trio thread if it waits for it
        inline, else :meth:`report` it. From any thread."""
        if job.waiter is not None:
            with self.handoff:  # see _stop_waiting
                waiter = job.waiter
            if waiter is not None:
                waiter.set()
                return
        self.report(job)

    def report(self, job: _Job) -> None:
        """Called by a reading thread: ``job`` is done. One eventfd write per batch."""
        self.done.append(job)
        if not self._signalled:
            self._signalled = True
            with self._fd_lock:
                if self._efd >= 0:
                    os.eventfd_write(self._efd, 1)

    def _start(self) -> None:
        if self._efd < 0:
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            trio.lowlevel.spawn_system_task(self._deliver, name="seccomp-supervisor reads")
            trio.lowlevel.spawn_system_task(self._watch, name="seccomp-supervisor slow reads")

    async def _deliver(self) -> None:
        """Give every finished read's result to its task, or to its ``deliver`` callback
        (:meth:`submit`), one batch per wake-up. A decision a callback resumed that
        suspends (its handler awaits something) is carried on by this task under its
        deadline, and a new task takes the delivery over at once, as the notify poller
        does (supervisor/notifyfd.py): a trap belongs to the task it was yielded in."""
        efd = self._efd
        done = self.done
        reschedule = trio.lowlevel.reschedule
        suspended: Suspended | None = None
        with trio.CancelScope() as scope:
            try:
                while True:
                    while done:
                        job = done.popleft()
                        job.slot.release_on_behalf_of(job)
                        if job.stuck:
                            self.stuck -= 1
                        if job.task is not None:
                            assert job.outcome is not None
                            reschedule(job.task, job.outcome)
                        elif job.deliver is not None:
                            deliver, job.deliver = job.deliver, None
                            assert job.outcome is not None
                            try:
                                suspended = deliver(job.outcome)
                            except Exception:  # a bug: never the whole daemon
                                log.exception("delivering a memory read failed")
                            if suspended is not None:
                                break
                    if suspended is not None:
                        break
                    await trio.lowlevel.wait_readable(efd)
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        pass
                    # After the read (a report between a reset and the read would leave
                    # the flag set with nothing to wake us), before draining (a report
                    # after the drain signals again).
                    self._signalled = False
            finally:
                if suspended is None:
                    with self._fd_lock:
                        trio.lowlevel.notify_closing(efd)
                        os.close(efd)
                        self._efd = -1
                    if self._active is not None:
                        self._active.retired = True
                        self._active.idle = True
                        self._active.kick()
                    for reader in (self.inline, *self.inline_left):
                        if reader is not None:
                            reader.close()
            # The rest of this batch, and every later one, goes to the successor.
            trio.lowlevel.spawn_system_task(self._deliver, name="seccomp-supervisor reads")
            failure: Exception | None = None  # (a deadline cancels the await below)
            failure = await carry_suspended(suspended, scope)
        assert suspended is not None  # the loop above only ends (not raising) with one
        suspended_ended(suspended, scope, failure)

    async def _watch(self) -> None:
        """While reads wait, retire the active thread when its read turns slow."""
        while True:
            active = self._active
            if active is None or not (self.pending or active.holding):
                wake = self._watch_wake = trio.Event()
                await wake.wait()
                continue
            job, started = active.current, active.started
            left = started + self.slow_after - perf_counter()
            if job is None or left > 0:
                # Not started yet (the thread is waking up), or not slow yet.
                await trio.sleep(self.slow_after if job is None else left)
                continue
            if (active.current is job and (self.pending or active.holding)
                    and self._active is active):
                self._retire(active, job)

    def _retire(self, active: _ReaderThread, job: _Job) -> None:
        """``active``'s read ``job`` turned slow while reads wait: a new thread takes the
        queue over, unless :attr:`max_stuck` threads are stuck already (or no thread can
        be started): then the waiting reads fail with EAGAIN, and ``active`` keeps the
        queue (the reads asked for while its read lasts fail in turn)."""
        if self._stuck_now() < self.max_stuck:
            try:
                successor = _ReaderThread(self)  # before retiring: it may fail
            except RuntimeError as exc:
                why = f"no thread to read: {exc}"
            else:
                active.retired = True
                reading = self._stop_batch(active, job)
                if reading is not None:
                    reading.stuck = True
                    self.stuck += 1
                self.retired += 1
                self._active = successor
                successor.kick()  # (it may have found the queue empty before _stop_batch)
                return
        else:
            why = (f"{self._stuck_now()} reads are stuck on slow memory already "
                   f"(the reading thread's is slow too)")
        self._stop_batch(active, job)
        if not self.refused:
            log.error("memory reads refused (EAGAIN): %s", why)
        reschedule = trio.lowlevel.reschedule
        while True:
            try:
                waiting = self.pending.popleft()
            except IndexError:  # (the active thread may take the last one meanwhile)
                break
            self.refused += 1
            self._drop(waiting)
            refusal = outcome.Error(TargetMemoryError(errno.EAGAIN, why))
            if waiting.task is not None:
                reschedule(waiting.task, refusal)
            elif waiting.deliver is not None:  # submitted: the delivery task tells it
                waiting.outcome = refusal
                waiting.slot = _RELEASED  # (given back by _drop)
                self.report(waiting)

    def _stop_batch(self, active: _ReaderThread, job: _Job) -> _Job | None:
        """``active`` turned slow in ``job``: if that is a batch (see BATCH_READS), stop
        it; the reads done are handed over now, those not begun go back to the head of
        the queue. Returns the job ``active`` is still reading (None if none)."""
        batch = active.batch
        if batch is None:
            return job
        jobs = active.batch_jobs
        claimed = batch.stop()
        active.holding = False
        active.batch_jobs = jobs[:claimed]  # (once: the watch may come back to it)
        reading = None
        for i in range(claimed):
            if batch.busy(i):
                reading = jobs[i]
                continue
            got = taken_outcome(batch, i, jobs[i])
            if got is not None:  # (else its thread took it)
                jobs[i].outcome = got
                self.hand_over(jobs[i])
        self.pending.extendleft(reversed(jobs[claimed:]))
        return reading


_POOL: RunVar[ReadPool] = RunVar("seccomp_supervisor_read_pool")


def current_read_pool() -> ReadPool:
    """The :class:`ReadPool` of the running trio run (shared by every session)."""
    try:
        return _POOL.get()
    except LookupError:
        pool = ReadPool()
        _POOL.set(pool)
        return pool


class PendingReads:
    """Reads of :meth:`TargetMemory.read_cstrings_soon` under way: :meth:`cancel` drops
    them (their results are not delivered; not started yet, their place goes back)."""

    __slots__ = ("job", "pool")

    def __init__(self) -> None:
        self.job: _Job | None = None
        self.pool: ReadPool | None = None

    def cancel(self) -> None:
        job, self.job = self.job, None
        if job is not None and self.pool is not None:
            self.pool.cancel(job)


class TargetMemory:
    """Memory access for the notifications of one listener fd.

    ``places`` bounds the reads one session has queued or running in threads (default
    :data:`READS_PER_SESSION`); ``pool`` is the daemon's shared :class:`ReadPool`
    (default: the trio run's); ``inline_wait``: see :data:`INLINE_WAIT`. ``reads``
    counts the reads asked for (one per string or buffer).
    """

    def __init__(self, notify: NotifyFd, places: int = READS_PER_SESSION,
                 *, use_proc_mem: bool = False, pool: ReadPool | None = None,
                 inline_wait: float = INLINE_WAIT) -> None:
        self._notify = notify
        self._inline_wait = inline_wait
        self._slot = ReadSlot(places)
        self._pool = pool
        self._use_proc_mem = use_proc_mem
        self.reads = 0
        # Until when (time.monotonic()) this session's reads stay out of the compiled
        # poll rounds (supervisor/_hotloop.c, round_judge): they were slow there. And its
        # slow reads in rounds in a row so far.
        self._round_slow_until = 0.0
        self._round_strikes = 0

    def id_valid(self, notif_id: int) -> bool:
        return not self._notify.closed and self._notify.id_valid(notif_id)

    def _inline(self, pool: ReadPool) -> tuple[int, float]:
        """The poller's turn, and how long the loop may block for a read by ``pool``
        now (within INLINE_BUDGET per turn): ``inline_wait`` while the daemon serves one
        listener fd, at most INLINE_WAIT_SHARED while it serves a few and the pool's
        hand-over spins (see there), not at all otherwise."""
        turn, fds = poller_turn()
        if fds == 1:
            return turn, self._inline_wait
        if 1 < fds <= INLINE_SHARED_FDS and pool.spins:
            return turn, min(self._inline_wait, INLINE_WAIT_SHARED)
        return turn, 0.0

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

        pool = self._pool
        if pool is None:
            pool = self._pool = current_read_pool()
        turn, wait = self._inline(pool)
        try:
            request = _batch_request(reader, tid, (address,), length) if cstring else None
            data = await pool.run(work, self._slot, wait, turn, reader.close, request)
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
        self.reads += 1
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
        self.reads += 1
        return await self._run(notif_id, tid, address, limit, cstring=True)

    def read_cstrings_soon(self, notif_id: int, tid: int, addresses: Sequence[int],
                           limit: int, deliver: Callable[[list[bytes | Exception]],
                                                         Suspended | None],
                           pending: PendingReads | None = None, *, inline: bool = True,
                           values: Sequence[bytes | Exception] | None = None
                           ) -> list[bytes | Exception] | PendingReads:
        """The NUL-terminated strings at ``addresses``, each as :meth:`read_cstring`
        reads it (the same reader, limit and errors, ID_VALID after the read), in one
        job of the reading thread and **without a task**: the results, one per address
        (bytes, or the exception :meth:`read_cstring` would raise), if they were read
        within the inline wait; else a :class:`PendingReads`, and ``deliver(results)``
        is called later by the pool's delivery task (what it returns, a decision that
        suspended, that task carries on). While this session's place in the pool is
        taken, the job waits in the session's own FIFO. With ``inline`` False, the
        results are always delivered, never returned: no inline wait, and what fails at
        once is delivered too (for the compiled poll round, where no decision may go
        on: Session._read_later). ``values`` (with ``inline`` False): the strings, read
        and race-checked already (by that round), delivered as they are."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        if values is not None:
            if inline or len(values) != len(addresses):
                raise ValueError("values read already are delivered, one per address")
            return self._deliver_later(list(values), deliver, pending or PendingReads())
        count = len(addresses)
        if pending is None:
            self.reads += count
            pending = PendingReads()
        try:
            reader = self._open_reader(notif_id, tid)
        except Exception as exc:  # not visible, /proc/<tid>/mem refused, gone
            if inline:
                return [exc] * count
            return self._deliver_later([exc] * count, deliver, pending)
        if not addresses and not inline:
            reader.close()
            return self._deliver_later([], deliver, pending)

        def work() -> list[bytes | Exception]:
            try:
                got: list[bytes | Exception] = []
                for address in addresses:
                    if address == 0:
                        got.append(TargetMemoryError(errno.EFAULT, "NULL pointer"))
                        continue
                    try:
                        got.append(reader.read_cstring(address, limit))
                    except TargetMemoryError as exc:
                        got.append(exc)
                return got
            finally:
                reader.close()

        def finished(result: outcome.Outcome[list[bytes | Exception]]) -> Suspended | None:
            pending.job = None
            values = self._strings_read(notif_id, tid, addresses, limit, result, deliver,
                                        pending)
            return None if values is None else deliver(values)

        pool = self._pool
        if pool is None:
            pool = self._pool = current_read_pool()
        turn, wait = self._inline(pool)
        if not inline:
            wait = 0.0
        job = _Job(work, self._slot, reader.close, finished)
        job.request = _batch_request(reader, tid, addresses, limit)
        pending.pool = pool
        pending.job = job
        if pool.submit(job, wait, turn):
            pending.job = None
            assert job.outcome is not None
            values = self._strings_read(notif_id, tid, addresses, limit, job.outcome,
                                        deliver, pending, inline)
            if values is not None:
                if inline:
                    return values
                return self._deliver_later(values, deliver, pending)
        return pending

    def _deliver_later(self, values: list[bytes | Exception],
                       deliver: Callable[[list[bytes | Exception]], Suspended | None],
                       pending: PendingReads) -> PendingReads:
        """``deliver(values)`` by the pool's delivery task, not now (see
        :meth:`read_cstrings_soon`'s ``inline``); :meth:`PendingReads.cancel` drops it."""
        pool = self._pool
        if pool is None:
            pool = self._pool = current_read_pool()

        def delivered(result: outcome.Outcome[list[bytes | Exception]]) -> Suspended | None:
            pending.job = None
            return deliver(result.unwrap())

        job = _Job(_no_work, _RELEASED, None, delivered)
        job.outcome = outcome.Value(values)
        pending.pool = pool
        pending.job = job
        pool.deliver_soon(job)
        return pending

    def _strings_read(self, notif_id: int, tid: int, addresses: Sequence[int], limit: int,
                      result: outcome.Outcome[list[bytes | Exception]],
                      deliver: Callable[[list[bytes | Exception]], Suspended | None],
                      pending: PendingReads, inline: bool = True
                      ) -> list[bytes | Exception] | None:
        """The results of :meth:`read_cstrings_soon`'s job, race-checked; None if they
        are read again (through /proc/<tid>/mem) and ``deliver`` gets them later."""
        count = len(addresses)
        try:
            values = result.unwrap()
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS) and not self._use_proc_mem:
                self._use_proc_mem = True  # as _run does
                again = self.read_cstrings_soon(notif_id, tid, addresses, limit, deliver,
                                                pending, inline=inline)
                return again if isinstance(again, list) else None
            if exc.errno == errno.ESRCH:
                return [NotificationGone("id_valid")] * count
            return [exc] * count
        except Exception as exc:
            return [exc] * count
        try:
            valid = self.id_valid(notif_id)  # the call still waits: these are its arguments
        except OSError as exc:
            return [exc] * count
        if not valid:
            return [NotificationGone("id_valid") if value.__class__ is bytes else value
                    for value in values]
        return values

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
